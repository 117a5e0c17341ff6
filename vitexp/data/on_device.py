"""Splits held on the device as uint8 and shuffled, augmented and normalised there (`data.on_device=true`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision import transforms

from vitexp.data.datasets import TransformSubset
from vitexp.data.sampling import ShardedSampler, per_rank_batch, uniform_draws


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
            batch_idx = torch.arange(b, device=device)[:, None, None, None]
            channel_idx = torch.arange(c, device=device)[None, :, None, None]
            images = padded[batch_idx, channel_idx, rows, cols]
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
