"""Image files as training data: any size, mode and bit depth read as 8-bit RGB (or grey), bad files named, class
folders (torchvision's ImageFolder) with the files that are not images skipped and counted."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np
from PIL import Image
from torchvision import datasets

from vitexp import VitexpError

log = logging.getLogger("vitexp")


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


def load_image(path: str, mode: str = "RGB") -> Image.Image:
    """The image file at `path` in `mode`; a file that fails to decode (say, truncated after its header) is named."""
    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            image.load()  # decode now, while the file is open (and fail here if it is truncated)
        return to_mode(image, mode)
    except (OSError, SyntaxError, ValueError) as e:
        raise VitexpError(f"cannot decode {path} ({e}); delete or replace the file") from None


def image_folder(path: Path, mode: str, check: bool = True) -> datasets.ImageFolder:
    """The class folders under `path`, images read as `mode`; files that are not images (by extension or, with
    `check`, by their header) are skipped and counted in the log, so one stray file does not stop a run hours in."""
    skipped: list[str] = []

    def readable(file: str) -> bool:
        if not file.lower().endswith(datasets.folder.IMG_EXTENSIONS):
            skipped.append(f"{file} (not an image file name)")
            return False
        if not check:
            return True
        try:
            with Image.open(file):  # reads the header only
                return True
        except (OSError, SyntaxError, ValueError) as e:
            skipped.append(f"{file} ({type(e).__name__}: {e})")
            return False

    try:
        folder = datasets.ImageFolder(path, loader=functools.partial(load_image, mode=mode), is_valid_file=readable)
    except FileNotFoundError as e:
        if "for the classes" in str(e):
            empty = str(e).split("for the classes ", 1)[1].split(". ")[0]
            raise VitexpError(f"no readable images in class folder(s) {empty} under {path}: add images or remove "
                              f"the folder") from None  # fmt: skip
        raise VitexpError(f"no images in {path}: put them in class folders {path}/<class>/*.jpg ({e})") from None
    if skipped:
        log.warning(f"skipped {len(skipped)} files under {path} that are not readable images, e.g. {skipped[0]}")
    return folder
