"""Image files as training data: any size, mode and bit depth read as 8-bit RGB (or grey), bad files named, class
folders (torchvision's ImageFolder) with the files that are not images skipped and counted."""

from __future__ import annotations

import functools
import logging
import warnings
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image
from torchvision import datasets

from vitexp import VitexpError, files
from vitexp.files import open_regular, printable

log = logging.getLogger("vitexp")

# The most pixels an image may declare in its header, on every read whatever PIL's own global says: PIL's default
# limit (a quarter of a GiB of 24-bit RGB). A larger image (a decompression bomb: a few KB on disk that decode to
# gigabytes) is refused before its pixels are decoded, and skipped like any other unreadable file.
MAX_PIXELS = 89_478_485
# The largest image file read (its pixels are bounded by MAX_PIXELS; this bounds what is read to find them out)
MAX_IMAGE_BYTES = 1 << 30
# What reading a bad or hostile image file raises (UnidentifiedImageError is an OSError).
UNREADABLE = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError, Image.DecompressionBombWarning)


def to_mode(image: Image.Image, mode: str) -> Image.Image:
    """`image` as 8-bit `mode` ("RGB" or "L"), whatever it was stored as: 16- and 32-bit grey scaled to 8 bits
    (PIL's own conversion would clip them), palette and alpha images flattened, CMYK and grey converted."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or pixels.max() > 255 else 255.0
        image = Image.fromarray(np.clip(pixels * (255.0 / peak), 0, 255).round().astype(np.uint8), mode="L")
    elif image.mode == "P":
        image = image.convert("RGBA")  # a palette with transparency converts to RGB only through RGBA
    return image if image.mode == mode else image.convert(mode)


def open_image(file: str | Path | IO[bytes]) -> Image.Image:
    """The image in `file` with only its header read (pixels are decoded on `load()`); one that declares more than
    `MAX_PIXELS` pixels raises `Image.DecompressionBombError`, as do PIL's own bomb warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL only warns between 1x and 2x its limit
        image = Image.open(file)
    if image.width * image.height > MAX_PIXELS:
        image.close()
        raise Image.DecompressionBombError(
            f"{image.width}x{image.height} pixels, more than the {MAX_PIXELS} an image may have (a decompression bomb?)"
        )
    return image


def load_image(path: str, mode: str = "RGB", *, follow_links: bool = True) -> Image.Image:
    """The image file at `path` in `mode`, opened by the one reader (`files.open_regular`: a FIFO or device is refused
    at once; a symlink only with `follow_links`); a file that fails to decode (say, truncated after its header) is
    named."""
    try:
        with open_regular(path, follow=follow_links, max_bytes=MAX_IMAGE_BYTES) as f:
            image = open_image(f)
            image.load()  # decode now, while the file is open (and fail here if it is truncated)
        return to_mode(image, mode)
    except UNREADABLE as e:
        raise VitexpError(f"cannot decode {printable(path)} ({printable(e)}); delete or replace the file") from None


def image_folder(path: Path, mode: str, *, check: bool = True, follow_links: bool = True) -> datasets.ImageFolder:
    """The class folders under `path`, images read as `mode`; files that are not images (by extension or, with
    `check`, by their header: a FIFO or device is not) are skipped and counted in the log, so one stray file does not
    stop a run hours in. Without `follow_links`, a symlinked image or a file in a symlinked folder is skipped too."""
    skipped: list[str] = []

    def readable(file: str) -> bool:
        if not file.lower().endswith(datasets.folder.IMG_EXTENSIONS):
            skipped.append(f"{printable(file)} (not an image file name)")
            return False
        if not follow_links and _linked(Path(file), path):
            skipped.append(f"{printable(file)} (a symbolic link, or in a linked folder; data.follow_links=false)")
            return False
        if not check:
            return True
        try:
            with open_regular(file, follow=follow_links) as f, open_image(f):  # reads the header only
                return True
        except (*UNREADABLE, VitexpError) as e:
            skipped.append(f"{printable(file)} ({type(e).__name__}: {printable(e)})")
            return False

    try:
        loader = functools.partial(load_image, mode=mode, follow_links=follow_links)
        folder = datasets.ImageFolder(path, loader=loader, is_valid_file=readable)
    except FileNotFoundError as e:
        if "for the classes" in str(e):
            empty = str(e).split("for the classes ", 1)[1].split(". ")[0]
            raise VitexpError(
                f"no readable images in class folder(s) {printable(empty)} under {printable(path)}: add "
                f"images or remove the folder"
            ) from None
        raise VitexpError(
            f"no images in {printable(path)}: put them in class folders {printable(path)}/<class>/*.jpg "
            f"({printable(e)})"
        ) from None
    if skipped:
        examples = "; ".join(skipped[:3])
        log.warning(
            f"skipped {len(skipped)} files under {printable(path)} that are not readable images, e.g. {examples}"
        )
    return folder


def _linked(file: Path, root: Path) -> bool:
    """Whether `file` or a folder between `root` and it is a symlink."""
    try:
        files.check_inside(file, root)
    except VitexpError:
        return True
    return False
