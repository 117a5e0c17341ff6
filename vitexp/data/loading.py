"""Loaders: a rank's share of a split as batches, from worker processes or held on the device, and their epochs."""

from __future__ import annotations

import signal
from collections.abc import Iterable

import torch
from torch.utils.data import DataLoader, Dataset

from vitexp import VitexpError, distributed
from vitexp.augment import DeviceAugment
from vitexp.data.datasets import Splits
from vitexp.data.on_device import DeviceLoader, to_device
from vitexp.data.sampling import SeededSamples, ShardedSampler, per_rank_batch
from vitexp.schema import Data

# Augmentations that only the worker path (data.on_device=false) runs.
WORKER_ONLY = ("rotate", "auto_augment", "re_prob")
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


def loaders(
    data: Data, splits: Splits, device: torch.device, device_augment: DeviceAugment | None
) -> tuple[Iterable, Iterable]:
    """Train and val loaders of this rank's share: worker processes over the transforms, or with `data.on_device` the
    splits held on the device as uint8 and cropped, flipped, augmented by `device_augment` and normalised there."""
    if len(splits.train) < data.batch_size:
        raise VitexpError(
            f"{len(splits.train)} train images make no full batch of {data.batch_size}; lower data.batch_size"
        )
    if data.on_device:
        return _device_loaders(data, splits, device, device_augment)
    if device_augment is not None:
        raise VitexpError(
            "data.device_augment runs with data.on_device=true only; set data.on_device=true or "
            "data.device_augment.policy=null"
        )
    return _worker_loaders(data, splits, device)


def _worker_loaders(data: Data, splits: Splits, device: torch.device) -> tuple[DataLoader, DataLoader]:
    """Loaders whose worker processes decode and transform each sample."""
    rank, world, pin = distributed.rank(), distributed.world_size(), device.type == "cuda"
    shared = {"persistent_workers": data.persistent_workers, "pin_memory": pin, "rank": rank, "world": world}
    train = make_loader(splits.train, data.batch_size, data.num_workers, train=True, **shared)
    val = make_loader(splits.val, data.eval_batch_size, data.num_workers, train=False, **shared)
    return train, val


def _device_loaders(
    data: Data, splits: Splits, device: torch.device, device_augment: DeviceAugment | None
) -> tuple[DeviceLoader, DeviceLoader]:
    """Loaders over the splits decoded once and held on `device`; the worker-only augmentations are refused."""
    if data.transform != "cifar":
        raise VitexpError(
            f"data.on_device=true holds the images at one size and shifts and flips them there, but "
            f"data.transform={data.transform} crops each photo from its full size; set data.on_device=false"
        )
    if worker_only := [key for key in WORKER_ONLY if getattr(data.augment, key)]:
        key = worker_only[0]
        instead = f" (use {ON_DEVICE_INSTEAD[key]} instead)" if key in ON_DEVICE_INSTEAD else ""
        raise VitexpError(
            f"data.on_device=true does not run data.augment.{key}: set data.augment.{key}=0 (or null){instead}, "
            f"or data.on_device=false"
        )
    rank, world, aug = distributed.rank(), distributed.world_size(), data.augment
    mean, std = tuple(map(float, data.mean)), tuple(map(float, data.std))
    train_data = to_device(splits.train, data.img_size, device, data.num_workers)
    train = DeviceLoader(
        *train_data,
        data.batch_size,
        train=True,
        mean=mean,
        std=std,
        rank=rank,
        world=world,
        crop_padding=aug.crop_padding,
        hflip=aug.hflip,
        policy=device_augment,
    )
    val_data = to_device(splits.val, data.img_size, device, data.num_workers)
    val = DeviceLoader(*val_data, data.eval_batch_size, train=False, mean=mean, std=std, rank=rank, world=world)
    return train, val
