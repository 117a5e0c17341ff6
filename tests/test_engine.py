"""The shared loops on their own: learning, gradient accumulation, metrics."""

from __future__ import annotations

from dataclasses import replace

import torch
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

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
