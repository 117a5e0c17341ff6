"""Data sets, seeded splits, transforms and loaders: digits (embedded), CIFAR-10/100 and ImageFolder trees."""

from __future__ import annotations

import logging
import math
import random
import signal
import urllib.error
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data import auto_augment_transform, create_transform, rand_augment_transform, str_to_interp_mode
from timm.data.auto_augment import augment_and_mix_transform
from timm.data.random_erasing import RandomErasing
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info
from torchvision import datasets, transforms

from vitexp import VitexpError, distributed
from vitexp.files import printable
from vitexp.images import image_folder
from vitexp.shards import INDEX, ShardSet

log = logging.getLogger("vitexp")

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


PRESETS = ("cifar", "imagenet")


def train_transform(
    preset: str,
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str,
    hflip: float,
    auto_augment: str | None,
    re_prob: float,
    crop_padding: int,
    rotate: float,
    scale: Sequence[float],
    ratio: Sequence[float],
    color_jitter: float | None,
) -> transforms.Compose:
    """The training augmentation of `preset`, always ending in square `img_size` tensors.

    `cifar` (small images): resize the short side, random shift (crop of the zero-padded image), flip, rotation.
    `imagenet` (photos of any size): timm's `create_transform`, i.e. RandomResizedCrop(`scale`, `ratio`), flip and
    colour jitter (off when `auto_augment` is set, as in timm). Both then apply timm's `auto_augment` policy
    (`rand-m9-mstd0.5-inc1`, `augmix-m5-w4-d2`, `original`, ...), normalise, and timm's random erasing (`re_prob`).
    """
    mean, std = _floats(mean), _floats(std)
    if preset == "imagenet":
        return create_transform(img_size, is_training=True, scale=tuple(_floats(scale)), ratio=tuple(_floats(ratio)),
                                hflip=hflip, color_jitter=color_jitter, auto_augment=auto_augment,
                                interpolation=interpolation, mean=mean, std=std, re_prob=re_prob, re_mode="pixel")  # fmt: skip
    if preset != "cifar":
        raise VitexpError(f"data.transform={preset} is not a preset; choose one of {', '.join(PRESETS)}")
    ops: list[Callable] = [transforms.Resize(img_size, _interpolation(interpolation)),
                           transforms.RandomCrop(img_size, padding=crop_padding)]  # fmt: skip
    if hflip:
        ops.append(transforms.RandomHorizontalFlip(hflip))
    if rotate:
        ops.append(transforms.RandomRotation(rotate))
    if auto_augment:
        ops.append(_auto_augment(auto_augment, img_size, mean, interpolation))
    ops += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    if re_prob:
        ops.append(RandomErasing(re_prob, mode="pixel", device="cpu"))
    return transforms.Compose(ops)


def _auto_augment(policy: str, img_size: int, mean: list[float], interpolation: str) -> Callable:
    """timm's augmentation policy named `policy`, with the parameters timm's create_transform gives it."""
    fill = tuple(round(255 * m) for m in mean)
    params = {"translate_const": int(img_size * 0.45), "img_mean": fill}
    try:
        if policy.startswith("rand"):
            return rand_augment_transform(policy, params)
        if policy.startswith("augmix"):
            return augment_and_mix_transform(policy, params)
        return auto_augment_transform(policy, params)
    except (AssertionError, KeyError, ValueError, IndexError) as e:
        raise VitexpError(f"auto_augment={policy!r} is not a timm policy ({e}); use e.g. rand-m9-mstd0.5-inc1, "
                          f"augmix-m5-w4-d2 or original") from None  # fmt: skip


def eval_transform(
    img_size: int, mean: Sequence[float], std: Sequence[float], crop_pct: float, interpolation: str
) -> transforms.Compose:
    """Deterministic square `img_size` tensors, as timm evaluates: resize the short side to `img_size / crop_pct`,
    center-crop `img_size`, normalise (crop_pct 1: resize and crop the long side only)."""
    if not 0 < crop_pct <= 1:
        raise VitexpError(f"data.crop_pct={crop_pct} must be in (0, 1]; timm's ImageNet value is 0.875")
    return create_transform(img_size, is_training=False, interpolation=interpolation, mean=_floats(mean),
                            std=_floats(std), crop_pct=crop_pct)  # fmt: skip


def _interpolation(name: str) -> transforms.InterpolationMode:
    try:
        return str_to_interp_mode(name)
    except KeyError:
        raise VitexpError(f"data.interpolation={name} is not one of bilinear, bicubic, nearest") from None


def _floats(values: Sequence[float]) -> list[float]:
    # Plain floats, not the config's ListConfig: Normalize would otherwise probe the ListConfig's attributes
    # for every image, and each failed probe raises and formats an OmegaConf error.
    return [float(v) for v in values]


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


def digits_splits(
    val_size: int | float, train_subset: int | None, seed: int, train_transform: Callable, eval_transform: Callable
) -> Splits:
    """The embedded digits, split into train and val by `seed`; no test split."""
    base = DigitImages()
    train_idx, val_idx = split_indices(len(base), val_size, train_subset, seed)
    return Splits(
        TransformSubset(base, train_idx, train_transform),
        TransformSubset(base, val_idx, eval_transform),
        None,
        [str(d) for d in range(10)],
    )


def _torchvision_set(source: str, root: Path, download: bool) -> tuple[Dataset, Dataset]:
    cls = TORCHVISION_SETS[source]
    try:
        return cls(root, train=True, download=download), cls(root, train=False, download=download)
    except (RuntimeError, urllib.error.URLError, OSError) as e:
        raise VitexpError(
            f"{source} not found under data.root={root} and not downloadable ({type(e).__name__}): put torchvision's "
            f"files or an ImageFolder tree (train/<class>/*.jpg) there, or set data.root to where they are"
        ) from None


def image_splits(
    source: str,
    root: str,
    download: bool,
    val_size: int | float,
    train_subset: int | None,
    seed: int,
    train_transform: Callable,
    eval_transform: Callable,
    in_chans: int = 3,
    check_images: bool = True,
) -> Splits:
    """The images under `root`: shards (`python -m vitexp.shards`), an ImageFolder tree (train/, optional val/ and
    test/), or torchvision's files for `source`; val is a seeded split of train unless the data has its own."""
    path, mode = Path(root).expanduser(), {1: "L", 3: "RGB"}.get(in_chans)
    if mode is None:
        raise VitexpError(f"data.in_chans={in_chans}: image files are read as grey (1) or RGB (3) channels")
    if (path / "train" / INDEX).is_file():
        bases = {s: ShardSet(path / s, mode) for s in ("train", "val", "test") if (path / s / INDEX).is_file()}
    elif source == "shards":
        raise VitexpError(f"no shards under data.root={path}: write them with python -m vitexp.shards <image folder> "
                          f"--out {path}")  # fmt: skip
    elif (path / "train").is_dir():
        bases = {s: image_folder(path / s, mode, check_images) for s in ("train", "val", "test") if (path / s).is_dir()}
    elif source in TORCHVISION_SETS:
        if not download and not path.is_dir():
            raise VitexpError(
                f"data.root={path} does not exist: point it at {source}'s files or set data.download=true"
            )
        bases = dict(zip(("train", "test"), _torchvision_set(source, path, download)))
    else:
        raise VitexpError(f"no train/ folder under data.root={path}: lay the images out as {path}/train/<class>/*.jpg")
    classes = list(bases["train"].classes)
    for split, base in bases.items():
        if list(base.classes) != classes:
            raise VitexpError(f"{split}/ has classes {printable(base.classes[:5])}..., train/ has "
                              f"{printable(classes[:5])}...; give every split the same class folders")  # fmt: skip
    if "val" in bases:
        train_idx, val_idx = list(range(len(bases["train"])))[:train_subset], range(len(bases["val"]))
    else:
        train_idx, val_idx = split_indices(len(bases["train"]), val_size, train_subset, seed)
    test = bases.get("test")
    return Splits(
        TransformSubset(bases["train"], train_idx, train_transform),
        TransformSubset(bases.get("val", bases["train"]), val_idx, eval_transform),
        TransformSubset(test, range(len(test)), eval_transform) if test is not None else None,
        classes,
    )


class ShardedSampler(Sampler):
    """The indices one rank reads: a shared permutation (train) or the split in order (eval), every
    `world`-th index from `rank` on.

    A training permutation is drawn from a generator seeded from the (seed, epoch) of `set_epoch` alone, so it
    does not depend on what else draws from a loader's generator (a persistent loader draws its workers' base
    seed once, a fresh one every epoch). Global batch b is positions [b*B, (b+1)*B) of the permutation for any
    number of ranks (rank r reads every `world`-th of them), so `start_batch` skips to the same sample in a run
    resumed mid-epoch, on as many processes as it likes. With `keyed`, it yields (index, seed, epoch) for
    `SeededSamples`.
    """

    def __init__(self, n: int, batch_size: int, rank: int, world: int, shuffle: bool, keyed: bool = False) -> None:
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world
        self.shuffle, self.keyed = shuffle, keyed
        self.keep = n // (batch_size * world) * batch_size * world if shuffle else n
        self.seed, self.epoch, self.start = 0, 0, 0

    def set_epoch(self, seed: int, epoch: int, start_batch: int = 0) -> None:
        """The permutation of (seed, epoch), read from global batch `start_batch` on."""
        self.seed, self.epoch, self.start = seed, epoch, start_batch * self.batch_size * self.world

    def __len__(self) -> int:
        return len(range(self.start + self.rank, self.keep, self.world))

    def indices(self) -> list[int]:
        """This rank's remaining indices of the epoch, in order."""
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        else:
            order = torch.arange(self.n)
        return order[self.start : self.keep][self.rank :: self.world].tolist()

    def __iter__(self) -> Iterator:
        if not self.keyed:
            return iter(self.indices())
        return iter([(i, self.seed, self.epoch) for i in self.indices()])


_MASK64 = (1 << 64) - 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample's augmentation, from (seed, epoch, sample index) alone (splitmix64 mixing)."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xD1B54A32D192ED03 + index * 0x8CB92BA72F3D8DD7) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) >> 1


class SeededSamples(Dataset):
    """`dataset` read by (index, seed, epoch) keys, each sample's augmentation drawn from Python's, NumPy's and
    torch's generators seeded by `sample_seed`: what a sample looks like depends on (seed, epoch, index) only, not
    on which worker or process decodes it, nor on what that worker decoded before (persistent workers included).
    In the main process (no workers) the generators are put back afterwards: the model's own draws (dropout,
    mixup) must not depend on the data."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int, int]) -> tuple[torch.Tensor, int]:
        index, seed, epoch = key
        saved = _generators() if get_worker_info() is None else None
        s = sample_seed(seed, epoch, index)
        random.seed(s)
        np.random.seed(s % (1 << 32))
        torch.default_generator.manual_seed(s)
        try:
            return self.dataset[index]
        finally:
            if saved is not None:
                random.setstate(saved[0])
                np.random.set_state(saved[1])
                torch.set_rng_state(saved[2])


def _generators() -> tuple:
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def _quiet_worker(worker_id: int) -> None:
    # A stop signal is the main process's to honour (it saves, then stops the workers): SLURM and a terminal's
    # Ctrl-C signal every process of the job, and a worker killed by one would end the epoch with an error.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_IGN)


def per_rank_batch(batch_size: int, world: int) -> int:
    """Each of `world` processes' share of the global `batch_size`."""
    if batch_size % world:
        raise VitexpError(
            f"batch size {batch_size} does not split over {world} processes; make it a multiple of {world}"
        )
    return batch_size // world


def make_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    persistent_workers: bool,
    train: bool,
    pin_memory: bool,
    rank: int = 0,
    world: int = 1,
) -> DataLoader:
    """A loader of this rank's share (`batch_size` is the global batch); training ones shuffle by (seed, epoch),
    augment each sample from (seed, epoch, index) (see `set_epoch`) and drop the last partial batch."""
    per_rank = per_rank_batch(batch_size, world)
    return DataLoader(
        SeededSamples(dataset) if train else dataset,
        batch_size=per_rank,
        sampler=ShardedSampler(len(dataset), per_rank, rank, world, shuffle=train, keyed=train),
        drop_last=train,
        num_workers=num_workers,
        persistent_workers=persistent_workers and num_workers > 0,
        pin_memory=pin_memory,
        worker_init_fn=_quiet_worker,
        generator=torch.Generator(),  # the workers' base seed: not from the global generator the model draws from
    )


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32's shape, multipliers below 2**31 so that int64 never overflows)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & 0xFFFFFFFF
    return x ^ (x >> 16)


def uniform_draws(seed: int, epoch: int, indices: torch.Tensor, k: int) -> torch.Tensor:
    """u[B, k] in [0, 1): `k` random numbers per sample, a counter-based hash of (seed, epoch, sample index) in
    torch integer ops on the samples' device, the same whichever process or batch holds the sample."""
    key = sample_seed(seed, epoch, 0) & 0xFFFFFFFF
    base = _mix32((indices.to(torch.int64) & 0xFFFFFFFF) ^ key)
    draws = torch.arange(1, k + 1, device=indices.device, dtype=torch.int64) * 0x61C88647
    bits = _mix32(_mix32((base[:, None] + draws) & 0xFFFFFFFF) ^ (key >> 7))
    return (bits >> 8).to(torch.float32) * 2.0**-24  # 24 bits: exact in float32, never 1.0


class CropFlip:
    """Random shift (crop of the zero-padded image) and horizontal flip, per image, from its draws u[:, :3] (top,
    left, flip): the distribution of torchvision's RandomCrop(padding, fill 0) and RandomHorizontalFlip.

    A device augmentation is any callable `aug(images_uint8[B, C, H, W], u[B, n_draws]) -> images`."""

    n_draws = 3

    def __init__(self, padding: int, hflip: float) -> None:
        self.padding, self.hflip = padding, hflip

    def __call__(self, images: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        b, c, h, w = images.shape
        device = images.device
        if self.padding:
            p = self.padding
            padded = nn.functional.pad(images, (p, p, p, p))
            top, left = (u[:, :2] * (2 * p + 1)).long().clamp_(max=2 * p).unbind(1)
            rows = (top[:, None] + torch.arange(h, device=device))[:, None, :, None]
            cols = (left[:, None] + torch.arange(w, device=device))[:, None, None, :]
            images = padded[torch.arange(b, device=device)[:, None, None, None],
                            torch.arange(c, device=device)[None, :, None, None], rows, cols]  # fmt: skip
        if self.hflip:
            images = torch.where((u[:, 2] < self.hflip)[:, None, None, None], images.flip(3), images)
        return images


class Chain:
    """Device augmentations applied one after another, each reading its own columns of the draws."""

    def __init__(self, *steps: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        self.steps = steps
        self.n_draws = sum(step.n_draws for step in steps)

    def __call__(self, images: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        first = 0
        for step in self.steps:
            images, first = step(images, u[:, first : first + step.n_draws]), first + step.n_draws
        return images


class DeviceLoader:
    """A whole split held on the device as uint8 and shuffled, augmented and normalised there, a batch at a time,
    so that no loader process has to keep up with the step (`data.on_device=true`).

    Behaves like a `make_loader` loader: `len()`, iteration over (images, labels), and a sampler that `set_epoch`
    places. The order is the worker loader's for the same (seed, epoch); each image's augmentation reads draws
    that are a function of (seed, epoch, sample index) alone (`uniform_draws`), so a run resumed mid-epoch, on
    any number of processes, augments every image as the uninterrupted run did. `augment` defaults to `CropFlip`
    (`crop_padding`, `hflip`), followed by `policy` (a `vitexp.augment.DeviceAugment`) when given; the
    normalisation is ToTensor's and Normalize's, in the same order.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        train: bool,
        mean: Sequence[float],
        std: Sequence[float],
        crop_padding: int = 0,
        hflip: float = 0.0,
        rank: int = 0,
        world: int = 1,
        augment: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        policy: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.images, self.labels = images, labels  # uint8 [N, C, H, W] and int64 [N], on the device
        self.batch_size = per_rank_batch(batch_size, world)
        self.train = train
        self.augment = augment or CropFlip(crop_padding, hflip)
        if policy is not None:
            self.augment = Chain(self.augment, policy)
        self.shard = ShardedSampler(len(images), self.batch_size, rank, world, shuffle=train)
        device = images.device
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)

    def __len__(self) -> int:
        n = len(self.shard)
        return n // self.batch_size if self.train else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.tensor(self.shard.indices(), device=self.images.device, dtype=torch.int64)
        seed, epoch, k = self.shard.seed, self.shard.epoch, self.augment.n_draws
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            images = self.images[idx]
            if self.train:
                images = self.augment(images, uniform_draws(seed, epoch, idx, k))
            yield images.float().div_(255).sub_(self.mean).div_(self.std), self.labels[idx]


def to_device(
    dataset: TransformSubset, img_size: int, device: torch.device, num_workers: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A split's images, resized to `img_size` as the transforms do, as one uint8 tensor (and its labels) on
    `device`; decoded once, by `num_workers` processes."""
    square = transforms.Compose(
        [transforms.Resize(img_size), transforms.CenterCrop(img_size), transforms.PILToTensor()]
    )
    raw = TransformSubset(dataset.base, dataset.indices, square)
    # its own generator: reading the data must not move the global RNG that initialises the model next
    loader = DataLoader(raw, batch_size=1024, num_workers=num_workers, generator=torch.Generator())
    images, labels = zip(*loader)
    return torch.cat(images).to(device), torch.cat(labels).to(device)


def set_epoch(loader: DataLoader | DeviceLoader, seed: int, epoch: int, start_batch: int = 0) -> None:
    """Make the shuffle order and every sample's augmentation a function of (seed, epoch) alone, and start the
    epoch at global batch `start_batch` (a run resumed mid-epoch; the skipped images are not read).

    This is what lets a resumed run see exactly the batches an uninterrupted one would have seen.
    """
    sampler = loader.shard if isinstance(loader, DeviceLoader) else loader.sampler
    sampler.set_epoch(seed, epoch, start_batch)


@dataclass(frozen=True)
class LoaderSettings:
    """How splits become batches: the `data.*` settings the loaders read (batch sizes are global under torchrun)."""

    batch_size: int
    eval_batch_size: int
    num_workers: int
    persistent_workers: bool
    on_device: bool
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int
    hflip: float
    worker_only: tuple[str, ...] = ()  # augmentations switched on that only the worker path runs
    transform: str = "cifar"  # the augmentation preset
    device_augment: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None  # on-device policy


# what the device path runs instead of a worker-only augmentation
ON_DEVICE_INSTEAD = {
    "auto_augment": "data.device_augment.policy=rand",
    "re_prob": "data.device_augment.erase_prob",
}


def loaders(settings: LoaderSettings, splits: Splits, device: torch.device) -> tuple[Iterable, Iterable]:
    """Train and val loaders of this rank's share: worker processes over the transforms, or with `on_device` the
    splits held on the device as uint8 and cropped, flipped, augmented by `device_augment` and normalised there."""
    s, rank, world = settings, distributed.rank(), distributed.world_size()
    if len(splits.train) < s.batch_size:
        raise VitexpError(
            f"{len(splits.train)} train images make no full batch of {s.batch_size}; lower data.batch_size"
        )
    if not s.on_device:
        if s.device_augment is not None:
            raise VitexpError("data.device_augment runs with data.on_device=true only; set data.on_device=true or "
                              "data.device_augment.policy=null")  # fmt: skip
        pin = device.type == "cuda"
        return (make_loader(splits.train, s.batch_size, s.num_workers, s.persistent_workers, True, pin, rank, world),
                make_loader(splits.val, s.eval_batch_size, s.num_workers, s.persistent_workers, False, pin, rank,
                            world))  # fmt: skip
    if s.transform != "cifar":
        raise VitexpError(
            f"data.on_device=true holds the images at one size and shifts and flips them there, but "
            f"data.transform={s.transform} crops each photo from its full size; set data.on_device=false"
        )
    if s.worker_only:
        key = s.worker_only[0]
        instead = f" (use {ON_DEVICE_INSTEAD[key]} instead)" if key in ON_DEVICE_INSTEAD else ""
        raise VitexpError(f"data.on_device=true does not run train_transform.{key}: set data.splits.train_transform."
                          f"{key}=0 (or null){instead}, or data.on_device=false")  # fmt: skip
    train = DeviceLoader(*to_device(splits.train, s.img_size, device, s.num_workers), s.batch_size, True, s.mean,
                         s.std, s.crop_padding, s.hflip, rank, world, policy=s.device_augment)  # fmt: skip
    val = DeviceLoader(*to_device(splits.val, s.img_size, device, s.num_workers), s.eval_batch_size, False, s.mean,
                       s.std, rank=rank, world=world)  # fmt: skip
    return train, val
