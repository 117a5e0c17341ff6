"""A small data set of real photographs: crops, scales and rotations of the two photos scikit-learn ships
(a temple in China, a flower), one class each, in every size, shape and file format a folder of photos holds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("china", "flower")


def _sources() -> dict[str, Image.Image]:
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    return {name: Image.fromarray(image) for name, image in zip(CLASSES, photos.images)}


def _variant(photo: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A random crop (portrait or landscape), scaled to between 6 and 900 pixels on its long side, maybe rotated."""
    w, h = photo.size
    cw, ch = int(rng.integers(w // 5, w)), int(rng.integers(h // 5, h))
    left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    image = photo.crop((left, top, left + cw, top + ch))
    if rng.random() < 0.3:
        image = image.rotate(float(rng.choice([90, 270])), expand=True)  # portrait from landscape
    elif rng.random() < 0.2:
        image = image.rotate(float(rng.uniform(-20, 20)), resample=Image.BILINEAR)
    long_side = int(
        rng.choice([6, 12, 24, 40, 64, 100, 160, 300, 900], p=[0.05, 0.05, 0.1, 0.15, 0.2, 0.2, 0.15, 0.05, 0.05])
    )
    scale = long_side / max(image.size)
    return image.resize((max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale))))


def make_photos(root: Path, per_class: int = 110, seed: int = 0) -> Path:
    """Write `per_class` photos per class under `root/train/<class>/`, JPEG and PNG, including one grayscale JPEG,
    one CMYK JPEG, one PNG with alpha, one palette PNG with transparency and one 16-bit grey PNG per class."""
    rng = np.random.default_rng(seed)
    for name, photo in _sources().items():
        folder = root / "train" / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = _variant(photo, rng)
            if i == 0:
                image.convert("L").save(folder / f"{i:03d}_grey.jpg")
            elif i == 1:
                image.convert("CMYK").save(folder / f"{i:03d}_cmyk.jpg")
            elif i == 2:
                rgba = image.convert("RGBA")
                rgba.putalpha(128)
                rgba.save(folder / f"{i:03d}_alpha.png")
            elif i == 3:
                image.convert("P", palette=Image.ADAPTIVE).save(folder / f"{i:03d}_palette.png", transparency=0)
            elif i == 4:
                grey = np.asarray(image.convert("L"), dtype=np.uint16) * 257  # the full 16-bit range
                Image.fromarray(grey).save(folder / f"{i:03d}_grey16.png")
            elif i % 5 == 0:
                image.save(folder / f"{i:03d}.png")
            else:
                image.save(folder / f"{i:03d}.jpg", quality=90)
    return root
