"""Loaders: a rank's share of a split as batches, from worker processes or held on the device, and their epochs."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from vitexp import VitexpError, distributed
from vitexp.data.datasets import Splits
from vitexp.data.on_device import DeviceLoader, to_device
from vitexp.data.sampling import SeededSamples, ShardedSampler, per_rank_batch


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


def _quiet_worker(worker_id: int) -> None:
    # A stop signal is the main process's to honour (it saves, then stops the workers): SLURM and a terminal's
    # Ctrl-C signal every process of the job, and a worker killed by one would end the epoch with an error.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_IGN)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    *,
    train: bool,
    persistent_workers: bool = False,
    pin_memory: bool = False,
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


def set_epoch(loader: DataLoader | DeviceLoader, seed: int, epoch: int, start_batch: int = 0) -> None:
    """Make the shuffle order and every sample's augmentation a function of (seed, epoch) alone, and start the
    epoch at global batch `start_batch` (a run resumed mid-epoch; the skipped images are not read).

    This is what lets a resumed run see exactly the batches an uninterrupted one would have seen.
    """
    sampler = loader.shard if isinstance(loader, DeviceLoader) else loader.sampler
    sampler.set_epoch(seed, epoch, start_batch)


def loaders(settings: LoaderSettings, splits: Splits, device: torch.device) -> tuple[Iterable, Iterable]:
    """Train and val loaders of this rank's share: worker processes over the transforms, or with `on_device` the
    splits held on the device as uint8 and cropped, flipped, augmented by `device_augment` and normalised there."""
    if len(splits.train) < settings.batch_size:
        raise VitexpError(
            f"{len(splits.train)} train images make no full batch of {settings.batch_size}; lower data.batch_size"
        )
    if settings.on_device:
        return _device_loaders(settings, splits, device)
    return _worker_loaders(settings, splits, device)


def _worker_loaders(s: LoaderSettings, splits: Splits, device: torch.device) -> tuple[DataLoader, DataLoader]:
    """Loaders whose worker processes decode and transform each sample."""
    if s.device_augment is not None:
        raise VitexpError(
            "data.device_augment runs with data.on_device=true only; set data.on_device=true or "
            "data.device_augment.policy=null"
        )
    rank, world, pin = distributed.rank(), distributed.world_size(), device.type == "cuda"
    shared = {"persistent_workers": s.persistent_workers, "pin_memory": pin, "rank": rank, "world": world}
    train = make_loader(splits.train, s.batch_size, s.num_workers, train=True, **shared)
    val = make_loader(splits.val, s.eval_batch_size, s.num_workers, train=False, **shared)
    return train, val


def _device_loaders(s: LoaderSettings, splits: Splits, device: torch.device) -> tuple[DeviceLoader, DeviceLoader]:
    """Loaders over the splits decoded once and held on `device`; the worker-only augmentations are refused."""
    if s.transform != "cifar":
        raise VitexpError(
            f"data.on_device=true holds the images at one size and shifts and flips them there, but "
            f"data.transform={s.transform} crops each photo from its full size; set data.on_device=false"
        )
    if s.worker_only:
        key = s.worker_only[0]
        instead = f" (use {ON_DEVICE_INSTEAD[key]} instead)" if key in ON_DEVICE_INSTEAD else ""
        raise VitexpError(
            f"data.on_device=true does not run train_transform.{key}: set data.splits.train_transform."
            f"{key}=0 (or null){instead}, or data.on_device=false"
        )
    rank, world = distributed.rank(), distributed.world_size()
    train_data = to_device(splits.train, s.img_size, device, s.num_workers)
    train = DeviceLoader(
        *train_data,
        s.batch_size,
        train=True,
        mean=s.mean,
        std=s.std,
        rank=rank,
        world=world,
        crop_padding=s.crop_padding,
        hflip=s.hflip,
        policy=s.device_augment,
    )
    val_data = to_device(splits.val, s.img_size, device, s.num_workers)
    val = DeviceLoader(*val_data, s.eval_batch_size, train=False, mean=s.mean, std=s.std, rank=rank, world=world)
    return train, val
