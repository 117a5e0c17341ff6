"""Sample order and per-sample randomness, each a function of (seed, epoch, sample index) alone.

Which indices each rank reads, in what order, and the seeds and draws of every sample's augmentation.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, get_worker_info

from vitexp import VitexpError

_MASK64 = (1 << 64) - 1


def per_rank_batch(batch_size: int, world: int) -> int:
    """Each of `world` processes' share of the global `batch_size`."""
    if batch_size % world:
        raise VitexpError(
            f"batch size {batch_size} does not split over {world} processes; make it a multiple of {world}"
        )
    return batch_size // world


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

    def __init__(self, n: int, batch_size: int, rank: int, world: int, *, shuffle: bool, keyed: bool = False) -> None:
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
