"""The shared loops on their own: learning, gradient accumulation, metrics."""

from __future__ import annotations

import contextlib
import math
import threading
import time
from dataclasses import replace

import pytest
import torch
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from vitexp import VitexpError, engine


def _data(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


CPU = engine.StepSettings(
    device=torch.device("cpu"),
    autocast_dtype=None,
    accumulate_grad_batches=1,
    gradient_clip_val=None,
    skip_nonfinite=False,
    reduce=None,
)


def _opt(optimizer, scheduler):
    return engine.Optimization(optimizer, scheduler)


def _setup(lr=0.1):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    return model, opt, CosineLRScheduler(opt, t_initial=1000, t_in_epochs=False)


def test_train_one_epoch_learns_and_counts_steps():
    x, y = _data()
    model, opt, sched = _setup()
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    first, step = engine.train_one_epoch(model, loader, nn.CrossEntropyLoss(), _opt(opt, sched), 0, CPU)
    for _ in range(20):
        last, step = engine.train_one_epoch(model, loader, nn.CrossEntropyLoss(), _opt(opt, sched), step, CPU)
    assert step == 21 * 4
    assert last["train/loss"] < 0.7 * first["train/loss"]
    assert last["grad_norm"] > 0 and last["throughput/img_s"] > 0


def test_accumulating_two_half_batches_equals_one_full_batch():
    x, y = _data(16)
    full, opt_full, sched_full = _setup()
    half, opt_half, sched_half = _setup()
    loss = nn.CrossEntropyLoss()
    engine.train_one_epoch(
        full, DataLoader(TensorDataset(x, y), batch_size=16), loss, _opt(opt_full, sched_full), 0, CPU
    )
    _, steps = engine.train_one_epoch(
        half,
        DataLoader(TensorDataset(x, y), batch_size=8),
        loss,
        _opt(opt_half, sched_half),
        0,
        replace(CPU, accumulate_grad_batches=2),
    )
    assert steps == 1
    for a, b in zip(full.parameters(), half.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_gradient_clipping_bounds_the_update():
    x, y = _data()
    model, opt, sched = _setup(lr=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    loader = DataLoader(TensorDataset(x * 100, y), batch_size=32)
    metrics, _ = engine.train_one_epoch(
        model, loader, nn.CrossEntropyLoss(), _opt(opt, sched), 0, replace(CPU, gradient_clip_val=0.01)
    )
    moved = torch.sqrt(sum(((p - b) ** 2).sum() for p, b in zip(model.parameters(), before)))
    assert metrics["grad_norm"] > 0.01  # the logged norm is the one before clipping
    assert moved <= 0.01 * 1.01  # SGD, lr 1: the step is the clipped gradient


def test_evaluate_counts_top1_top5_and_confusion():
    logits = torch.tensor([[9.0, 1, 0, 0, 0, 0], [0, 9.0, 1, 0, 0, 0], [9.0, 0, 1, 0, 0, 0], [0, 1, 1, -5, 1, 9.0]])
    targets = torch.tensor([0, 1, 2, 3])
    loader = DataLoader(TensorDataset(logits, targets), batch_size=3)
    metrics, confusion = engine.evaluate(nn.Identity(), loader, torch.device("cpu"), num_classes=6)
    assert metrics["acc1"] == 0.5
    assert metrics["acc5"] == 0.75  # the last row's true class is ranked last of six
    assert confusion.sum() == 4 and confusion[2, 0] == 1 and confusion[3, 5] == 1
    expected = nn.functional.cross_entropy(logits, targets)
    assert abs(metrics["loss"] - expected.item()) < 1e-6


def test_evaluate_gives_the_same_loss_for_any_batch_size():
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(1000, 10, generator=g) * 4, torch.randint(0, 10, (1000,), generator=g)
    loaders = [DataLoader(TensorDataset(logits, targets), batch_size=b) for b in (1000, 512, 128, 7)]
    scores = [engine.evaluate(nn.Identity(), loader, torch.device("cpu"), 10)[0] for loader in loaders]
    scores = [{k: v for k, v in s.items() if k != "forward_img_per_s"} for s in scores]  # a clock's, not a score
    assert all(s == scores[0] for s in scores[1:]), scores  # bit for bit, the loss included
    each = nn.functional.cross_entropy(logits, targets, reduction="none").double()
    assert scores[0]["loss"] == math.fsum(each.tolist()) / 1000  # the exact sum of the images' float32 losses


class _Slow(nn.Module):
    """The identity, after `pauses[i]` seconds on the i-th call."""

    def __init__(self, pauses):
        super().__init__()
        self.pauses = list(pauses)

    def forward(self, x):
        time.sleep(self.pauses.pop(0))
        return x


def test_evaluate_times_the_forward_passes_after_the_first_batch():
    x, y = torch.randn(12, 3), torch.randint(0, 3, (12,))
    loader = DataLoader(TensorDataset(x, y), batch_size=4)  # three batches: the first one's 2 s are set-up
    metrics, _ = engine.evaluate(_Slow([2.0, 0.05, 0.05]), loader, torch.device("cpu"), num_classes=3)
    # 8 images in at least 0.1 s; had the first batch counted, 12 images in more than 2 s (under 6 a second)
    assert 20 < metrics["forward_img_per_s"] <= 80
    one, _ = engine.evaluate(_Slow([0.05]), DataLoader(TensorDataset(x, y), batch_size=12), torch.device("cpu"), 3)
    assert 0 < one["forward_img_per_s"] <= 12 / 0.05  # a single batch is all there is to time
    none, _ = engine.evaluate(nn.Identity(), loader, torch.device("cpu"), 3, limit_batches=0)
    assert none["forward_img_per_s"] == 0.0 and none["images"] == 0


def test_per_step_logging_reports_interval_means_every_n_steps():
    x, y = _data(48)
    model, opt, sched = _setup()
    loader = DataLoader(TensorDataset(x, y), batch_size=8)  # 6 steps
    logged = []
    monitor = engine.Monitor(on_log=lambda s, m: logged.append((s, m)), log_every_n_steps=2)
    metrics, step = engine.train_one_epoch(
        model, loader, nn.CrossEntropyLoss(), _opt(opt, sched), 0, CPU, monitor=monitor
    )
    assert [s for s, _ in logged] == [2, 4, 6]
    assert all(m.keys() == {"train_loss", "lr", "grad_norm"} for _, m in logged)
    # the rate the schedule set for the step: cosine from 0.1 over 1000 steps, no warm-up
    assert [m["lr"] for _, m in logged] == pytest.approx([0.05 * (1 + math.cos(math.pi * s / 1000)) for s in (2, 4, 6)])
    # the three interval means of equal-sized intervals average to the epoch means
    assert abs(sum(m["train_loss"] for _, m in logged) / 3 - metrics["train/loss"]) < 1e-5
    assert abs(sum(m["grad_norm"] for _, m in logged) / 3 - metrics["grad_norm"]) < 1e-5


def test_non_finite_loss_stops_with_the_epoch_named():
    x, y = _data()
    model, opt, sched = _setup()
    loader = DataLoader(TensorDataset(x, y), batch_size=8)

    def exploding(logits, targets):
        return nn.functional.cross_entropy(logits, targets) * float("inf")

    try:
        engine.train_one_epoch(
            model, loader, exploding, _opt(opt, sched), 0, CPU, monitor=engine.Monitor(desc="epoch 7")
        )
    except VitexpError as e:
        assert "in epoch 7" in str(e) and "optim.lr" in str(e) and "\n" not in str(e)
    else:
        raise AssertionError("a non-finite loss went unnoticed")


def _frozen(n=20, batch=8):
    """A model that SGD at lr 0 never changes, its loader (batches of 8, 8 and 4) and each batch's loss, computed
    here before the loop runs: the oracle for the epoch's image-weighted mean."""
    x, y = _data(n)
    model, opt, sched = _setup(lr=0.0)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch)
    with torch.no_grad():
        losses = [(nn.functional.cross_entropy(model(a), b).item(), len(b)) for a, b in loader]
    return model, loader, _opt(opt, CosineLRScheduler(opt, t_initial=100, t_in_epochs=False)), losses


def _weighted(losses):
    return sum(loss * n for loss, n in losses) / sum(n for _, n in losses)


def test_the_epoch_loss_is_the_image_weighted_mean_of_its_batches():
    model, loader, opt, losses = _frozen()
    metrics, step = engine.train_one_epoch(model, loader, nn.CrossEntropyLoss(), opt, 5, CPU)
    assert step == 8 and metrics["train/loss"] == pytest.approx(_weighted(losses), rel=1e-6)
    assert metrics["lr"] == 0.0 and "skipped_steps" not in metrics


def test_skipping_a_non_finite_step_drops_its_loss_and_counts_it():
    model, loader, opt, losses = _frozen()
    calls = []

    def nan_on_second(logits, targets):
        calls.append(1)
        loss = nn.functional.cross_entropy(logits, targets)
        return loss * float("nan") if len(calls) == 2 else loss

    settings = replace(CPU, skip_nonfinite=True)
    metrics, step = engine.train_one_epoch(model, loader, nan_on_second, opt, 0, settings)
    assert step == 3 and metrics["skipped_steps"] == 1
    assert metrics["train/loss"] == pytest.approx(_weighted([losses[0], losses[2]]), rel=1e-6)
    assert metrics["grad_norm"] > 0 and math.isfinite(metrics["grad_norm"])  # the mean over the two taken steps


def test_limit_and_start_pick_the_batches_of_the_epoch():
    model, loader, opt, losses = _frozen()
    metrics, step = engine.train_one_epoch(model, loader, nn.CrossEntropyLoss(), opt, 0, CPU, limit_batches=2)
    assert step == 2 and metrics["train/loss"] == pytest.approx(_weighted(losses[:2]), rel=1e-6)
    # a loader placed at batch 1 yields from there; the epoch still ends at its third batch
    rest = DataLoader(TensorDataset(*_data(20)), batch_size=8)
    _, step = engine.train_one_epoch(model, rest, nn.CrossEntropyLoss(), opt, 0, CPU, start=engine.EpochStart(batch=1))
    assert step == 3  # zip(range(1, 4), loader): three batches of the placed loader


def test_mixup_is_applied_to_each_batch_before_the_forward_pass():
    model, loader, opt, _ = _frozen()
    seen = []

    def blank(images, targets):
        seen.append(images.shape[0])
        return torch.zeros_like(images), targets

    opt.mixup = blank
    metrics, _ = engine.train_one_epoch(model, loader, nn.CrossEntropyLoss(), opt, 0, CPU)
    x, y = _data(20)
    with torch.no_grad():
        expected = nn.functional.cross_entropy(model(torch.zeros_like(x)), y).item()
    assert seen == [8, 8, 4] and metrics["train/loss"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_grad_scaler_changes_no_update(accumulate):
    x, y = _data()
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    plain, scaled = _setup(), _setup()
    settings = replace(CPU, accumulate_grad_batches=accumulate)
    engine.train_one_epoch(plain[0], loader, nn.CrossEntropyLoss(), _opt(*plain[1:]), 0, settings)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt = engine.Optimization(scaled[1], scaled[2], scaler=scaler)
    metrics, _ = engine.train_one_epoch(scaled[0], loader, nn.CrossEntropyLoss(), opt, 0, settings)
    for a, b in zip(plain[0].parameters(), scaled[0].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert metrics["grad_norm"] < 100  # the logged norm is the unscaled one


def test_reduce_sums_the_figures_of_every_rank():
    model, loader, opt, losses = _frozen()
    twice = replace(CPU, reduce=lambda t: t * 2)  # as if a second rank saw the same batches
    metrics, _ = engine.train_one_epoch(model, loader, nn.CrossEntropyLoss(), opt, 0, twice)
    assert metrics["train/loss"] == pytest.approx(_weighted(losses), rel=1e-6)
    val, _ = engine.evaluate(model, loader, torch.device("cpu"), 3, reduce=lambda t: t * 2)
    assert val["images"] == 40 and val["loss"] == pytest.approx(_weighted(losses), rel=1e-6)


def test_base_lr_divides_out_the_layer_scale():
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [param], "lr": 0.2, "lr_scale": 0.5}])
    assert engine.base_lr(opt) == pytest.approx(0.4)
    assert engine.base_lr(torch.optim.SGD([param], lr=0.3)) == 0.3


def test_running_out_of_memory_names_a_smaller_batch_and_more_accumulation():
    x, y = _data(16)
    model, opt, sched = _setup()

    def oom(logits, targets):
        raise MemoryError

    with pytest.raises(
        VitexpError,
        match=r"^out of memory on cpu with batches of 8 images; lower data\.batch_size "
        r"\(e\.g\. data\.batch_size=4\) and set trainer\.accumulate_grad_batches=4 to keep",
    ):
        engine.train_one_epoch(
            model,
            DataLoader(TensorDataset(x, y), batch_size=8),
            oom,
            _opt(opt, sched),
            0,
            replace(CPU, accumulate_grad_batches=2),
        )


def test_epoch_sums_round_trip_and_merge_across_rank_counts():
    sums = engine.EpochSums(torch.device("cpu"), skip_nonfinite=True)
    sums.add_batch(torch.tensor(2.0), 4, logging=True)
    sums.add_step(torch.tensor(3.0), logging=True)
    sums.add_batch(torch.tensor(1.0), 2, logging=True)  # pending: its step not taken yet
    sums.steps = 1
    state = sums.state_dict()
    again = engine.EpochSums(torch.device("cpu"), skip_nonfinite=True)
    again.load_state_dict(state)
    assert again.state_dict().keys() == state.keys()
    assert all(
        torch.equal(again.state_dict()[k], v) if torch.is_tensor(v) else again.state_dict()[k] == v
        for k, v in state.items()
    )
    assert again.totals(None) == (8.0, 4.0, 6.0) and again.running_loss() == 2.0
    assert again.interval_means() == (10 / 6, 3.0)
    merged = engine.sums_for_rank([state, state], 0)  # two saved ranks resumed on one
    assert merged["seen"] == 12 and merged["loss"].item() == 16.0 and merged["counted"].item() == 8.0
    assert merged["pending"].tolist() == [4.0, 4.0] and merged["interval"].tolist() == [20.0, 12.0, 3.0]


def _saved_rank(loss: float, images: int, pending: float, norm: float) -> dict:
    """One saved rank's running figures after one step and a logged batch whose step is still to come."""
    sums = engine.EpochSums(torch.device("cpu"), skip_nonfinite=True)
    sums.add_batch(torch.tensor(loss), images, logging=True)
    sums.add_step(torch.tensor(norm), logging=True)
    sums.add_batch(torch.tensor(pending), images, logging=True)
    sums.steps, sums.skipped = 1, 2
    return sums.state_dict()


def test_running_sums_saved_on_three_ranks_resume_on_two(monkeypatch):
    # the norm is the global gradient's, the same on every rank; images and losses differ per rank
    saved = [_saved_rank(1.0, 2, 5.0, 7.0), _saved_rank(2.0, 4, 6.0, 7.0), _saved_rank(3.0, 8, 0.5, 7.0)]
    before = [{k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for s in saved]
    monkeypatch.setattr(engine.distributed, "world_size", lambda: 2)
    first, second = engine.sums_for_rank(saved, 0), engine.sums_for_rank(saved, 1)
    # rank 0: loss * images and images summed by hand over the three saved ranks
    assert first["loss"].item() == 1.0 * 2 + 2.0 * 4 + 3.0 * 8 and first["counted"].item() == 2 + 4 + 8
    assert first["pending"].tolist() == [5.0 * 2 + 6.0 * 4 + 0.5 * 8, 2 + 4 + 8]
    assert first["interval"].tolist() == [(1 + 5) * 2 + (2 + 6) * 4 + (3 + 0.5) * 8, 2 * (2 + 4 + 8), 7.0] and first[
        "seen"
    ] == 2 * (2 + 4 + 8)
    # rank 1: no images and no losses, the same global norm and step counts
    assert second["loss"].item() == 0 and second["counted"].item() == 0 and second["seen"] == 0
    assert second["pending"].tolist() == [0.0, 0.0] and second["interval"].tolist() == [0.0, 0.0, 7.0]
    for merged in (first, second):
        assert merged["norm"].item() == 7.0 and (merged["steps"], merged["skipped"], merged["interval_steps"]) == (
            1,
            2,
            1,
        )
        assert merged.keys() == saved[0].keys()
    for s, b in zip(saved, before):  # the loaded file's figures are left as they were
        assert all(torch.equal(s[k], v) if torch.is_tensor(v) else s[k] == v for k, v in b.items())
    alone = engine.sums_for_rank(saved[:1], 1)  # one saved rank on two: the second starts empty
    assert alone["seen"] == 0 and alone["interval"].tolist() == [0.0, 0.0, 7.0] and alone["steps"] == 1
    resumed = engine.EpochSums(torch.device("cpu"), skip_nonfinite=True)
    resumed.load_state_dict(first)
    assert resumed.running_loss() == 34.0 / 14 and resumed.interval_means() == (72.0 / 28, 7.0)


def _grad_norms(model, loader):
    """Each batch's gradient norm for the frozen model, computed here."""
    norms = []
    for a, b in loader:
        model.zero_grad()
        nn.functional.cross_entropy(model(a), b).backward()
        norms.append(torch.sqrt(sum((p.grad**2).sum() for p in model.parameters())).item())
    model.zero_grad(set_to_none=True)
    return norms


def test_skipped_steps_count_and_the_norm_is_the_mean_of_the_steps_taken():
    model, loader, opt, losses = _frozen(n=32)  # four batches of 8
    norms = _grad_norms(model, loader)
    calls = []

    def nan_on_odd(logits, targets):
        calls.append(1)
        loss = nn.functional.cross_entropy(logits, targets)
        return loss * float("nan") if len(calls) % 2 else loss

    metrics, _ = engine.train_one_epoch(model, loader, nan_on_odd, opt, 0, replace(CPU, skip_nonfinite=True))
    assert metrics["skipped_steps"] == 2
    assert metrics["train/loss"] == pytest.approx(_weighted([losses[1], losses[3]]), rel=1e-6)
    assert metrics["grad_norm"] == pytest.approx((norms[1] + norms[3]) / 2, rel=1e-5)


def test_skip_nonfinite_with_accumulation_counts_every_batch_of_a_step():
    model, loader, opt, losses = _frozen()
    settings = replace(CPU, skip_nonfinite=True, accumulate_grad_batches=2)
    metrics, step = engine.train_one_epoch(model, loader, nn.CrossEntropyLoss(), opt, 0, settings)
    assert step == 2 and metrics["skipped_steps"] == 0
    assert metrics["train/loss"] == pytest.approx(_weighted(losses), rel=1e-6)


def test_accumulation_over_an_uneven_epoch_matches_a_hand_written_loop():
    x, y = _data(24)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)  # 3 batches, 2 per step: steps of 2 and 1 batches
    model, opt, sched = _setup()
    reference, ref_opt, _ = _setup()
    _, step = engine.train_one_epoch(
        model, loader, nn.CrossEntropyLoss(), _opt(opt, sched), 0, replace(CPU, accumulate_grad_batches=2)
    )
    for group in ([0, 1], [2]):
        for i in group:
            a, b = x[8 * i : 8 * i + 8], y[8 * i : 8 * i + 8]
            (nn.functional.cross_entropy(reference(a), b) / len(group)).backward()
        ref_opt.step()  # lr 0.1: the cosine schedule's first steps are at its peak, to 1e-6
        ref_opt.zero_grad()
    assert step == 2
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_after_step_the_ema_and_a_saved_start_see_each_step():
    model, loader, opt, losses = _frozen()
    updates, after = [], []

    class Recorder:
        def update(self, module, step):
            updates.append((module is model, step))

    opt.ema = Recorder()
    hook = lambda step, batch, sums: after.append((step, batch, sums.seen))  # noqa: E731
    engine.train_one_epoch(model, loader, nn.CrossEntropyLoss(), opt, 10, CPU, after_step=hook)
    assert updates == [(True, 11), (True, 12), (True, 13)]
    assert after == [(11, 1, 8), (12, 2, 16)]  # not after the epoch's last step: the epoch end saves that
    # the same epoch continued from batch 1 with the figures saved there
    first = engine.EpochSums(torch.device("cpu"), skip_nonfinite=False)
    first.add_batch(torch.tensor(losses[0][0]), 8, logging=False)
    rest = DataLoader(TensorDataset(*[t[8:] for t in _data(20)]), batch_size=8)
    start = engine.EpochStart(batch=1, sums=first.state_dict())
    metrics, step = engine.train_one_epoch(model, rest, nn.CrossEntropyLoss(), opt, 0, CPU, start=start)
    assert step == 2 and metrics["train/loss"] == pytest.approx(_weighted(losses), rel=1e-6)


class _Recorder(nn.Sequential):
    """The `_setup` model that records the dtype of its logits and, as DDP's wrapper has, a `no_sync` context."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        self.dtypes, self.unsynced = [], 0

    def forward(self, x):
        out = super().forward(x)
        self.dtypes.append(out.dtype)
        return out

    @contextlib.contextmanager
    def no_sync(self):
        self.unsynced += 1
        yield


@pytest.mark.filterwarnings("error")  # without a dtype autocast is off, not asked for float32 (which a CPU refuses)
@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16])
def test_the_forward_runs_under_autocast_at_the_given_precision(dtype):
    model, (x, y) = _Recorder(), _data(16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = CosineLRScheduler(opt, t_initial=10, t_in_epochs=False)
    settings = replace(CPU, autocast_dtype=dtype)
    engine.train_one_epoch(
        model, DataLoader(TensorDataset(x, y), batch_size=8), nn.CrossEntropyLoss(), _opt(opt, sched), 0, settings
    )
    engine.evaluate(model, DataLoader(TensorDataset(x, y), batch_size=16), torch.device("cpu"), 3, autocast_dtype=dtype)
    assert model.dtypes == [dtype or torch.float32] * 3


def test_accumulating_three_batches_steps_after_the_third_and_syncs_only_there():
    model, (x, y) = _Recorder(), _data(56)  # 7 batches of 8: steps of 3, 3 and 1 batches
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = CosineLRScheduler(opt, t_initial=10, t_in_epochs=False)
    after = []
    _, step = engine.train_one_epoch(
        model,
        DataLoader(TensorDataset(x, y), batch_size=8),
        nn.CrossEntropyLoss(),
        _opt(opt, sched),
        0,
        replace(CPU, accumulate_grad_batches=3),
        after_step=lambda step, batch, sums: after.append((step, batch, sums.seen)),
    )
    assert step == 3 and after == [(1, 3, 24), (2, 6, 48)]
    assert model.unsynced == 4  # DDP's all-reduce skipped for batches 1, 2, 4 and 5, run on each step's last
    assert all(p.grad is None for p in model.parameters())  # the step frees the gradients


def test_a_resumed_epoch_with_a_limit_runs_the_batches_from_its_start_up_to_the_limit():
    model, loader, opt, losses = _frozen(n=28)  # batches of 8, 8, 8 and 4
    rest = DataLoader(TensorDataset(*[t[8:] for t in _data(28)]), batch_size=8)  # placed at batch 1
    after = []
    metrics, step = engine.train_one_epoch(
        model,
        rest,
        nn.CrossEntropyLoss(),
        opt,
        0,
        CPU,
        limit_batches=3,
        start=engine.EpochStart(batch=1),
        after_step=lambda step, batch, sums: after.append((step, batch)),
    )
    assert step == 2 and after == [(1, 2)]  # batches 1 and 2: the limit counts the epoch's batches, not the rest's
    assert metrics["train/loss"] == pytest.approx(_weighted(losses[1:3]), rel=1e-6)
    val, _ = engine.evaluate(model, loader, torch.device("cpu"), 3, limit_batches=1)
    assert val["images"] == 8 and val["loss"] == pytest.approx(losses[0][0], rel=1e-6)


def test_a_reduce_adds_the_other_ranks_figures_and_the_throughput_counts_every_image():
    model, loader, opt, losses = _frozen()
    other = torch.tensor([3.0 * 5, 5.0, 5.0])  # a second rank that saw 5 images at a loss of 3
    begin = time.perf_counter()
    metrics, _ = engine.train_one_epoch(
        model, loader, nn.CrossEntropyLoss(), opt, 0, replace(CPU, reduce=lambda t: t + other)
    )
    wall = time.perf_counter() - begin
    expected = (sum(loss * n for loss, n in losses) + 15.0) / (20 + 5)
    assert metrics["train/loss"] == pytest.approx(expected, rel=1e-6)
    assert 25 / wall <= metrics["throughput/img_s"] < math.inf  # the epoch's images over a time inside this call's


def test_one_step_reports_its_own_gradient_norm():
    model, loader, opt, _ = _frozen(n=8)
    norms = _grad_norms(model, loader)
    metrics, step = engine.train_one_epoch(model, loader, nn.CrossEntropyLoss(), opt, 0, CPU)
    assert step == 1 and metrics["grad_norm"] == pytest.approx(norms[0], rel=1e-5)


@pytest.mark.parametrize("skip", [False, True])
def test_an_epoch_without_a_finite_step_is_an_error_that_hints_at_skipping_only_when_off(skip):
    model, loader, opt, _ = _frozen()

    def nan(logits, targets):
        return nn.functional.cross_entropy(logits, targets) * float("nan")

    hint = "" if skip else " (or skip such steps with trainer.skip_nonfinite=true)"
    with pytest.raises(VitexpError) as e:
        engine.train_one_epoch(
            model, loader, nan, opt, 4, replace(CPU, skip_nonfinite=skip), monitor=engine.Monitor(desc="epoch 2")
        )
    assert str(e.value) == (
        "train loss became nan in epoch 2 (by step 7); the checkpoints of the last good epoch are kept: lower "
        f"optim.lr, set trainer.gradient_clip_val, or use trainer.precision=32{hint}"
    )
    assert all(p.grad is None for p in model.parameters())  # a skipped step frees its gradients too


def test_the_cpu_allocator_failing_is_out_of_memory_and_another_runtime_error_is_left_alone():
    x, y = _data(6)
    model, opt, sched = _setup()

    def fails(message):
        def loss(logits, targets):
            raise RuntimeError(message)

        return loss

    cpu = (
        "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate 9"
    )
    loader = DataLoader(TensorDataset(x, y), batch_size=3)
    with pytest.raises(
        VitexpError,
        match=r"^out of memory on cpu with batches of 3 images; lower data\.batch_size \(e\.g\. data\.batch_size=1\) and set trainer\.accumulate_grad_batches=2 to keep the effective batch$",
    ):
        engine.train_one_epoch(model, loader, fails(cpu), _opt(opt, sched), 0, CPU)
    with pytest.raises(RuntimeError, match=r"^mat1 and mat2 shapes cannot be multiplied$"):
        engine.train_one_epoch(
            model, loader, fails("mat1 and mat2 shapes cannot be multiplied"), _opt(opt, sched), 0, CPU
        )


def test_the_running_loss_is_over_the_images_counted():
    sums = engine.EpochSums(torch.device("cpu"), skip_nonfinite=False)
    assert sums.running_loss() == 0.0  # before any batch: no division by zero
    sums.add_batch(torch.tensor(3.0), 1, logging=False)
    assert sums.running_loss() == 3.0
    sums.add_batch(torch.tensor(1.0), 3, logging=False)
    assert sums.running_loss() == (3.0 + 3 * 1.0) / 4


@pytest.fixture
def own_tqdm_lock():
    """tqdm's bars drawn under a lock of this process only: its default lock is shared with every process forked
    from the one that made it, and a fork-based mutation-testing worker stopped while drawing would keep it."""
    shared = tqdm.get_lock()
    tqdm.set_lock(threading.RLock())
    yield
    tqdm.set_lock(shared)


@pytest.mark.usefixtures("own_tqdm_lock")
def test_the_progress_bar_counts_from_the_start_and_shows_the_running_loss_every_ten_steps(capsys):
    model, _, opt, losses = _frozen(n=88)  # 11 batches of 8
    rest = DataLoader(TensorDataset(*[t[8:] for t in _data(88)]), batch_size=8)  # placed at batch 1: ten steps
    monitor = engine.Monitor(progress=True, desc="epoch 3")
    engine.train_one_epoch(
        model, rest, nn.CrossEntropyLoss(), opt, 0, CPU, monitor=monitor, start=engine.EpochStart(batch=1)
    )
    out = capsys.readouterr().err
    assert out.startswith("\repoch 3:   9%") and "| 1/11 [" in out  # batch 1 of the epoch's 11
    assert f", loss={_weighted(losses[1:]):.4f}, lr=0.00e+00]" in out  # the ten steps' running loss, SGD at lr 0
    *_, last, end = out.rsplit("\r", 2)
    assert last and not last.strip() and end == ""  # the bar is blanked when the epoch ends, not left behind
    engine.train_one_epoch(model, rest, nn.CrossEntropyLoss(), opt, 0, CPU, start=engine.EpochStart(batch=1))
    assert capsys.readouterr().err == ""  # off unless asked for
