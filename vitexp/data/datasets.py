"""Data sets and their seeded train/val/test splits: digits (embedded), CIFAR-10/100, shards and ImageFolder trees."""

from __future__ import annotations

import urllib.error
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets

from vitexp import VitexpError
from vitexp.files import printable
from vitexp.images import image_folder
from vitexp.schema import Data, ImageData
from vitexp.shards import INDEX, ShardSet

TORCHVISION_SETS = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}


@dataclass
class Splits:
    """Train/val (and optional test) data sets with their transforms applied, and the class names."""

    train: Dataset
    val: Dataset
    test: Dataset | None
    classes: list[str]


class TransformSubset(Dataset):
    """`indices` of `base` (which yields (PIL image, label)), passed through `transform`."""

    def __init__(self, base: Dataset, indices: Sequence[int], transform: Callable) -> None:
        self.base, self.indices, self.transform = base, list(indices), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[self.indices[i]]
        return self.transform(image), label


class DigitImages(Dataset):
    """scikit-learn's 1,797 8x8 handwritten digits as grey PIL images (0..16 scaled to 0..255)."""

    def __init__(self) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        self.images = [Image.fromarray((img * (255 / 16)).round().astype(np.uint8), mode="L") for img in digits.images]
        self.targets = [int(t) for t in digits.target]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return self.images[i], self.targets[i]


def split_indices(n: int, val_size: int | float, train_subset: int | None, seed: int) -> tuple[list[int], list[int]]:
    """A seeded (train, val) partition of range(n); `val_size` < 1 is a fraction; train optionally capped."""
    n_val = round(val_size * n) if isinstance(val_size, float) and val_size < 1 else int(val_size)
    if not 0 < n_val < n:
        raise VitexpError(
            f"data.val_size={val_size} leaves no train or no val images out of {n}; pick 0 < val_size < {n}"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    train = perm[n_val:]
    if train_subset is not None:
        train = train[:train_subset]
    return train, perm[:n_val]


def make_splits(data: Data, seed: int, train_transform: Callable, eval_transform: Callable) -> Splits:
    """The splits of `data` (image files under `data.root` for an image data option, else the embedded digits),
    val split off train by `data.split_seed` (null: `seed`) where the data has no val/ of its own."""
    seed = seed if data.split_seed is None else data.split_seed
    if isinstance(data, ImageData):
        return image_splits(data, seed, train_transform, eval_transform)
    return digits_splits(data, seed, train_transform, eval_transform)


def digits_splits(data: Data, seed: int, train_transform: Callable, eval_transform: Callable) -> Splits:
    """The embedded digits, split into train and val by `seed`; no test split."""
    base = DigitImages()
    train_idx, val_idx = split_indices(len(base), data.val_size, data.train_subset, seed)
    return Splits(
        TransformSubset(base, train_idx, train_transform),
        TransformSubset(base, val_idx, eval_transform),
        None,
        [str(d) for d in range(10)],
    )


def image_splits(data: ImageData, seed: int, train_transform: Callable, eval_transform: Callable) -> Splits:
    """The images under `data.root`: shards (`python -m vitexp.shards`), an ImageFolder tree (train/, optional val/
    and test/), or torchvision's files for `data.name`; val is a seeded split of train unless the data has its own."""
    path, mode = Path(data.root).expanduser(), {1: "L", 3: "RGB"}.get(data.in_chans)
    if mode is None:
        raise VitexpError(f"data.in_chans={data.in_chans}: image files are read as grey (1) or RGB (3) channels")
    bases = _image_bases(
        data.name, path, mode, download=data.download, check_images=data.check_images, follow_links=data.follow_links
    )
    classes = list(bases["train"].classes)
    for split, base in bases.items():
        if list(base.classes) != classes:
            raise VitexpError(
                f"{split}/ has classes {printable(base.classes[:5])}..., train/ has "
                f"{printable(classes[:5])}...; give every split the same class folders"
            )
    if "val" in bases:
        train_idx, val_idx = list(range(len(bases["train"])))[: data.train_subset], range(len(bases["val"]))
    else:
        train_idx, val_idx = split_indices(len(bases["train"]), data.val_size, data.train_subset, seed)
    test = bases.get("test")
    return Splits(
        TransformSubset(bases["train"], train_idx, train_transform),
        TransformSubset(bases.get("val", bases["train"]), val_idx, eval_transform),
        TransformSubset(test, range(len(test)), eval_transform) if test is not None else None,
        classes,
    )


def _image_bases(
    name: str, path: Path, mode: str, *, download: bool, check_images: bool, follow_links: bool
) -> dict[str, Dataset]:
    """The splits found under `path`, by name (train, and val and test where the data has them)."""
    if (path / "train" / INDEX).is_file():
        return {s: ShardSet(path / s, mode) for s in ("train", "val", "test") if (path / s / INDEX).is_file()}
    if name == "shards":
        raise VitexpError(
            f"no shards under data.root={path}: write them with python -m vitexp.shards <image folder> --out {path}"
        )
    if (path / "train").is_dir():
        return {
            s: image_folder(path / s, mode, check=check_images, follow_links=follow_links)
            for s in ("train", "val", "test")
            if (path / s).is_dir()
        }
    if name in TORCHVISION_SETS:
        if not download and not path.is_dir():
            raise VitexpError(f"data.root={path} does not exist: point it at {name}'s files or set data.download=true")
        return dict(zip(("train", "test"), _torchvision_set(name, path, download=download)))
    raise VitexpError(f"no train/ folder under data.root={path}: lay the images out as {path}/train/<class>/*.jpg")


def _torchvision_set(name: str, root: Path, *, download: bool) -> tuple[Dataset, Dataset]:
    cls = TORCHVISION_SETS[name]
    try:
        return cls(root, train=True, download=download), cls(root, train=False, download=download)
    except (RuntimeError, urllib.error.URLError, OSError) as e:
        raise VitexpError(
            f"{name} not found under data.root={root} and not downloadable ({type(e).__name__}): put torchvision's "
            f"files or an ImageFolder tree (train/<class>/*.jpg) there, or set data.root to where they are"
        ) from None
