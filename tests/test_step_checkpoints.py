"""The pieces of an exact mid-epoch resume: per-sample augmentation seeds, the sampler placed at a batch on any
number of ranks, the device loader's counter-based draws, the epoch's running sums, and stop requests."""

from __future__ import annotations

import os
import random
import signal

import numpy as np
import pytest
import torch

from tests.builders import splits_of
from tests.conftest import compose_config
from vitexp import engine, stop
from vitexp.data import CropFlip, DeviceLoader, ShardedSampler, make_loader, set_epoch, uniform_draws


def test_a_samples_augmentation_depends_on_seed_epoch_and_index_only():
    splits = splits_of(compose_config())  # digits: random crop and rotation on the worker path
    plain = make_loader(splits.train, 32, 0, train=True)
    workers = make_loader(splits.train, 32, 2, train=True, persistent_workers=True)
    torch.manual_seed(1)
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    set_epoch(plain, 0, 3)
    first = next(iter(plain))[0]
    # decoding in the main process leaves the model's generators where they were
    assert torch.equal(before[0], torch.get_rng_state()) and before[1] == random.getstate()
    assert np.array_equal(before[2], np.random.get_state()[1])
    for start in (0, 1):  # two persistent workers, from the start of the epoch and one batch in
        set_epoch(workers, 0, 3, start_batch=start)
        batches = [x for x, _ in workers]
        assert len(batches) == len(plain) - start
        if start == 0:
            assert torch.equal(batches[0], first)
        else:
            set_epoch(plain, 0, 3)
            assert torch.equal(batches[0], list(plain)[1][0])  # batch 1, as the uninterrupted epoch drew it
    set_epoch(plain, 0, 4)
    assert not torch.equal(next(iter(plain))[0], first)  # another epoch, other draws


@pytest.mark.parametrize("world", [1, 2, 4])
def test_the_sampler_resumes_at_the_same_samples_on_any_number_of_ranks(world):
    n, batch = 103, 8

    def batches(world: int, start: int) -> list[list[int]]:
        ranks = []
        for rank in range(world):
            sampler = ShardedSampler(n, batch // world, rank, world, shuffle=True)
            sampler.set_epoch(5, 2, start)
            ranks.append(sampler.indices())
        per = batch // world
        return [sorted(i for r in ranks for i in r[b * per : (b + 1) * per]) for b in range(len(ranks[0]) // per)]

    full = batches(1, 0)
    assert len(full) == n // batch
    assert batches(world, 0) == full and batches(world, 3) == full[3:]


def test_device_draws_are_a_function_of_the_sample_alone():
    idx = torch.tensor([5, 17, 3, 99, 17])
    u = uniform_draws(0, 2, idx, 3)
    assert u.shape == (5, 3) and u.dtype == torch.float32 and (u >= 0).all() and (u < 1).all()
    assert torch.equal(u[1], u[4])  # the same sample, the same draws, wherever it sits in a batch
    assert torch.equal(uniform_draws(0, 2, idx[2:4], 3), u[2:4])
    assert not torch.equal(uniform_draws(0, 3, idx, 3), u) and not torch.equal(uniform_draws(1, 2, idx, 3), u)
    many = uniform_draws(0, 1, torch.arange(100_000), 3)
    assert abs(many.mean().item() - 0.5) < 0.01 and abs(torch.corrcoef(many.T)[0, 1].item()) < 0.02


def test_the_device_loader_resumes_at_the_same_augmented_images():
    images = torch.randint(0, 256, (40, 1, 6, 6), dtype=torch.uint8)
    labels = torch.arange(40)
    full = DeviceLoader(images, labels, 8, train=True, mean=[0.0], std=[1.0], crop_padding=2, hflip=0.5)
    set_epoch(full, 0, 1)
    expected = list(full)
    for world in (1, 2):
        shards = [
            DeviceLoader(
                images, labels, 8, train=True, mean=[0.0], std=[1.0], crop_padding=2, hflip=0.5, rank=rank, world=world
            )
            for rank in range(world)
        ]
        for shard in shards:
            set_epoch(shard, 0, 1, start_batch=2)
        for b, parts in enumerate(zip(*shards, strict=True)):
            x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            order = y.argsort()
            want_x, want_y = expected[b + 2]
            assert torch.equal(y[order], want_y.sort().values) and torch.equal(x[order], want_x[want_y.argsort()])
    assert CropFlip.n_draws == 3  # the device augmentation contract: aug(images_uint8, u[B, n_draws])


def _sums(loss: float, images: int, norm: float) -> dict:
    sums = engine.EpochSums(torch.device("cpu"), skip_nonfinite=False)
    sums.add_batch(torch.tensor(loss), images, logging=True)
    sums.add_step(torch.tensor(norm), logging=True)
    sums.steps += 1
    return sums.state_dict()


def test_running_sums_move_to_another_number_of_ranks(monkeypatch):
    saved = [_sums(2.0, 8, 3.0), _sums(4.0, 8, 3.0)]  # two ranks, one step; the norm is the global gradient's
    monkeypatch.setattr(engine.distributed, "world_size", lambda: 1)
    one = engine.sums_for_rank(saved, 0)
    assert one["loss"].item() == 2.0 * 8 + 4.0 * 8 and one["seen"] == 16 and one["norm"].item() == 3.0
    assert one["steps"] == 1 and one["interval"].tolist() == [48.0, 16.0, 3.0]
    monkeypatch.setattr(engine.distributed, "world_size", lambda: 2)
    assert engine.sums_for_rank(saved, 1) is saved[1]  # the same number of ranks: each its own
    monkeypatch.setattr(engine.distributed, "world_size", lambda: 4)
    other = engine.sums_for_rank(saved[:1], 3)
    assert other["loss"].item() == 0 and other["seen"] == 0 and other["norm"].item() == 3.0 and other["steps"] == 1


def test_a_signal_inside_the_loop_waits_for_the_step_and_a_second_one_does_not(monkeypatch):
    monkeypatch.setattr(stop, "_requested", [])
    monkeypatch.setattr(stop, "_chained", {})
    before = {signum: signal.getsignal(signum) for signum in stop.SIGNALS}
    chained = []
    signal.signal(signal.SIGUSR2, lambda signum, frame: chained.append(signum))  # e.g. submitit's
    try:
        stop.install()
        with stop.deferred():
            os.kill(os.getpid(), signal.SIGUSR2)  # recorded, not raised: the loop saves first
            assert stop.requested() == "SIGUSR2"
            with pytest.raises(KeyboardInterrupt, match="SIGUSR2"):
                stop.check_stop()
            assert chained == [signal.SIGUSR2]  # the scheduler's own handler ran, after the save
            with pytest.raises(KeyboardInterrupt, match="SIGUSR1"):
                os.kill(os.getpid(), signal.SIGUSR1)  # a second signal: stop now
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
