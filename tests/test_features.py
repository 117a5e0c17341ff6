"""Each documented training feature switched on and its effect asserted: the weight EMA, fp16 with a GradScaler,
`trainer.ckpt_every_n_minutes` on a fake clock, `optim=sgd`, `task.distill_type=hard`, Taylor importance's
calibration batches, and an exact resume with the EMA and the GradScaler on."""

from __future__ import annotations

import json
import types

import pytest
import torch

from tests.conftest import TINY, compose_config, metric_rows, vitexp
from vitexp import checkpoint, pruning, stop, training
from vitexp.hardware import seed_everything
from vitexp.models import build_from_arch
from vitexp.tasks.recipe import read_recipe
from vitexp.training import evaluate_on, fit

FP32 = [*TINY, "trainer.precision=32"]
EMA = "trainer.ema_decay=0.9"


def _recipe(*overrides: str):
    return read_recipe(compose_config(*overrides))


def _weights(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in state.items()}


def test_the_ema_moves_and_val_ema_acc1_is_its_accuracy(tmp_path):
    recipe = _recipe(*FP32, EMA)
    fit(recipe, tmp_path)
    last = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    ema, model = _weights(last["ema"], "module."), last["model"]
    seed_everything(recipe.settings.seed)
    initial = build_from_arch(recipe.arch).state_dict()  # what the EMA starts from
    moved = [k for k in model if not torch.equal(ema[k], initial[k])]
    assert "head.weight" in moved and "blocks.0.attn.qkv.weight" in moved
    assert not torch.equal(ema["head.weight"], model["head.weight"])  # an average, not a copy of the weights
    average = build_from_arch(recipe.arch)
    average.load_state_dict(ema)
    rows = metric_rows(tmp_path / "metrics.csv")
    acc1 = evaluate_on(recipe, average, recipe.loaders[1])[0]["acc1"]
    assert float(rows[-1]["val_ema/acc1"]) == pytest.approx(acc1, abs=1e-12)


def test_fp16_steps_the_grad_scaler_every_optimizer_step(tmp_path, monkeypatch):
    # torch >= 2.6 (pyproject's floor) autocasts to fp16 on the CPU; the wrapped step counts the scaler's steps
    calls = []
    real = torch.amp.GradScaler.step

    def counted(self, optimizer, *args, **kwargs):
        calls.append(self.get_scale())
        return real(self, optimizer, *args, **kwargs)

    monkeypatch.setattr(torch.amp.GradScaler, "step", counted)
    recipe = _recipe(*TINY, "trainer.precision=16")
    assert recipe.machine.amp is torch.float16 and recipe.machine.fp16_scaler
    results = fit(recipe, tmp_path)
    last = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    assert len(calls) == last["step"] == 6  # 2 epochs of 3 steps, each through the scaler
    assert last["scaler"]["scale"] == calls[-1] and results["status"] == "completed"


def test_ckpt_every_n_minutes_saves_mid_epoch_when_the_clock_says_so(tmp_path, monkeypatch):
    now = [0.0]

    def monotonic() -> float:  # each reading 40 s after the one before
        now[0] += 40
        return now[0]

    monkeypatch.setattr(training, "time", types.SimpleNamespace(monotonic=monotonic, perf_counter=lambda: now[0]))
    saves = []
    real = checkpoint.save
    monkeypatch.setattr(
        checkpoint,
        "save",
        lambda ckpt, path, root=None, **names: (saves.append(ckpt.get("position")), real(ckpt, path, root, **names)),
    )
    fit(_recipe(*FP32, "trainer.ckpt_every_n_minutes=1"), tmp_path)
    mid = [(p["epoch"], p["batch"]) for p in saves if p is not None]
    # the clock starts at 40 s; after step 1 it reads 80 (40 s on), after step 2 120 (80 s on: save, then 160)
    assert mid == [(1, 2), (2, 2)]


def test_without_ckpt_every_n_minutes_no_mid_epoch_checkpoint(tmp_path, monkeypatch):
    saves = []
    real = checkpoint.save
    monkeypatch.setattr(
        checkpoint,
        "save",
        lambda ckpt, path, root=None, **names: (saves.append(ckpt.get("position")), real(ckpt, path, root, **names)),
    )
    fit(_recipe(*FP32), tmp_path)
    assert saves and all(p is None for p in saves)


# 64 training images seen 8 times: a loss that falls there is the optimizer's doing
FIT_64 = ["data.train_subset=64", "trainer.max_epochs=8", "trainer.limit_train_batches=null", "optim.warmup_epochs=0"]


@pytest.mark.parametrize(("optim", "lr"), [("sgd", 0.05), ("adamw", 3e-3)])
def test_each_optimizer_trains(optim, lr, tmp_path):
    recipe = _recipe(*FP32, f"optim={optim}", f"optim.lr={lr}", *FIT_64)
    expected = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}[optim]
    assert type(recipe.optimizer([torch.nn.Parameter(torch.zeros(1))])) is expected
    fit(recipe, tmp_path)
    losses = [float(r["train/loss"]) for r in metric_rows(tmp_path / "metrics.csv")]
    assert losses[-1] < losses[0] - 0.1, losses  # chance's loss is ln 10 = 2.30


def test_hard_distillation_trains_the_student(tmp_path):
    args = [*FP32, "trainer.limit_train_batches=10"]
    vitexp(*args, "trainer.max_epochs=1", "hydra.run.dir=teacher", cwd=tmp_path)
    teacher = tmp_path / "teacher" / "checkpoints" / "best.pt"
    vitexp(
        *args,
        "task=distill",
        "task.distill_type=hard",
        f"task.teacher_ckpt={teacher}",
        "trainer.max_epochs=3",
        "hydra.run.dir=student",
        cwd=tmp_path,
    )
    losses = [float(r["train/loss"]) for r in metric_rows(tmp_path / "student" / "metrics.csv")]
    assert losses[-1] < 0.95 * losses[0], losses
    results = json.loads((tmp_path / "student" / "results.json").read_text())
    assert results["status"] == "completed" and results["teacher_ckpt"] == str(teacher)


def test_calibration_batches_change_taylor_scores():
    recipe = _recipe(*FP32)
    seed_everything(0)
    model = build_from_arch(recipe.arch)
    example = torch.zeros(1, 1, 16, 16)
    tokens = {p: p.dim() - 1 for n, p in model.named_parameters() if n in ("cls_token", "pos_embed")}
    batches = [batch for batch, _ in zip(recipe.loaders[0], range(2))]

    def scores(n: int) -> list[torch.Tensor]:
        model.zero_grad()
        for images, targets in batches[:n]:
            torch.nn.functional.cross_entropy(model(images), targets).backward()
        return [s for pair in pruning.block_scores(model, "taylor", example, tokens) for s in pair]

    one, two = scores(1), scores(2)
    model.zero_grad()
    assert all(s.abs().sum() > 0 for s in one)  # the gradients of one batch give every group a score
    assert any(not torch.allclose(a, b) for a, b in zip(one, two))  # a second batch changes them


@pytest.mark.parametrize("setting", [EMA, "trainer.precision=16"], ids=["ema", "grad_scaler"])
def test_a_resume_with_the_ema_or_the_grad_scaler_equals_an_uninterrupted_run(setting, tmp_path, monkeypatch):
    recipe = _recipe(*FP32, setting)
    whole = tmp_path / "whole"
    fit(recipe, whole)
    monkeypatch.setattr(stop, "_requested", ["SIGTERM"])  # as if the signal arrived during epoch 1's first step
    with pytest.raises(KeyboardInterrupt):
        fit(recipe, tmp_path / "cut")
    monkeypatch.setattr(stop, "_requested", [])
    fit(recipe, tmp_path / "cut", checkpoint.load_training_state(tmp_path / "cut" / "checkpoints" / "last.pt"))
    assert metric_rows(tmp_path / "cut" / "metrics.csv") == metric_rows(whole / "metrics.csv")
    ours, theirs = (checkpoint.load(f / "checkpoints" / "last.pt") for f in (tmp_path / "cut", whole))
    part = "ema" if setting == EMA else "scaler"
    assert theirs[part] is not None
    for key in ("model", part):
        for name, value in theirs[key].items():
            same = torch.equal(ours[key][name], value) if isinstance(value, torch.Tensor) else ours[key][name] == value
            assert same, f"{key}.{name}"
