"""Distillation: loss formulas, the frozen teacher, the token student, the one-command pipeline."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image
from torch import nn

from tests.builders import model_of
from tests.conftest import TINY, compose_config, vitexp
from vitexp.distill import DistillationLoss, Distiller, TokenHead
from vitexp.models import arch_of, build_from_arch, vit_distilled

LOGITS = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
TEACHER = torch.tensor([[0.0, 3.0, 0.0], [1.0, 0.0, 2.0]])
LABELS = torch.tensor([0, 1])


def _ce(logits, target):  # hand-written cross-entropy of one row
    return -logits[target] + math.log(sum(math.exp(v) for v in logits))


def test_hard_loss_by_hand():
    loss = DistillationLoss(nn.CrossEntropyLoss(), "hard", alpha=0.25, tau=1.0)((LOGITS, TEACHER), LABELS)
    rows = LOGITS.tolist()
    base = (_ce(rows[0], 0) + _ce(rows[1], 1)) / 2
    distill = (_ce(rows[0], 1) + _ce(rows[1], 2)) / 2  # teacher argmax: 1 and 2
    assert loss.item() == pytest.approx(0.75 * base + 0.25 * distill, rel=1e-6)


def test_soft_loss_by_hand():
    tau = 2.0
    loss = DistillationLoss(nn.CrossEntropyLoss(), "soft", alpha=1.0, tau=tau)((LOGITS, TEACHER), LABELS)
    kl = 0.0
    for s_row, t_row in zip(LOGITS.tolist(), TEACHER.tolist()):
        zs = sum(math.exp(v / tau) for v in s_row)
        zt = sum(math.exp(v / tau) for v in t_row)
        for s, t in zip(s_row, t_row):
            p = math.exp(t / tau) / zt
            kl += p * (math.log(p) - math.log(math.exp(s / tau) / zs))
    assert loss.item() == pytest.approx(kl / 2 * tau**2, rel=1e-6)  # batchmean, times tau^2


def test_token_loss_uses_class_head_for_labels_and_distillation_head_for_teacher():
    other = torch.zeros_like(LOGITS)
    loss = DistillationLoss(nn.CrossEntropyLoss(), "token", alpha=0.5, tau=1.0)(((LOGITS, other), TEACHER), LABELS)
    rows = LOGITS.tolist()
    base = (_ce(rows[0], 0) + _ce(rows[1], 1)) / 2
    assert loss.item() == pytest.approx(0.5 * base + 0.5 * math.log(3), rel=1e-6)


def test_the_teachers_preprocessing_lives_on_the_teachers_device():
    # on a GPU the teacher's re-normalisation must be there too (it was left on the CPU once)
    teacher = nn.Linear(3, 2, device="meta")
    distiller = Distiller(nn.Identity(), teacher, [0.5] * 3, [0.2] * 3, [0.4] * 3, [0.3] * 3, 8)
    assert distiller.scale.device.type == distiller.shift.device.type == "meta"


def test_teacher_is_frozen_in_eval_mode_and_sees_its_own_preprocessing():
    student = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))
    seen = {}

    class Teacher(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3 * 4 * 4, 3)
            self.drop = nn.Dropout(0.5)

        def forward(self, x):
            seen["x"], seen["training"] = x, self.training
            return self.fc(self.drop(x.flatten(1)))

    teacher = Teacher()
    distiller = Distiller(student, teacher, [0.5] * 3, [0.25] * 3, [0.0] * 3, [1.0] * 3, teacher_img_size=4)
    distiller.train()
    x = torch.full((2, 3, 8, 8), 2.0)  # normalised for the student: raw value 2 * 0.25 + 0.5 = 1.0
    student_out, teacher_out = distiller(x)
    assert seen["training"] is False and teacher.training is False and student.training
    assert seen["x"].shape == (2, 3, 4, 4) and torch.allclose(seen["x"], torch.ones(2, 3, 4, 4))
    DistillationLoss(nn.CrossEntropyLoss(), "soft", 0.5, 2.0)((student_out, teacher_out), LABELS).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    distiller.eval()
    assert distiller(x).shape == (2, 3)  # eval: the student alone


def test_token_student_averages_its_heads_in_eval_and_rebuilds():
    cfg = compose_config(*TINY)
    kwargs = dict(arch_of(model_of(cfg.model)).kwargs)
    model = vit_distilled("baseline", **kwargs)
    x = torch.randn(2, 1, 16, 16)
    model.train()
    cls_logits, dist_logits = model(x)
    model.eval()
    heads = (TokenHead(model, "cls")(x), TokenHead(model, "dist")(x))
    torch.testing.assert_close(model(x), (heads[0] + heads[1]) / 2)
    clone = build_from_arch(arch_of(model)).eval()
    clone.load_state_dict(model.state_dict())
    torch.testing.assert_close(clone(x), model(x))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """One command: train a tiny CNN teacher on demand, then distil it into a token student."""
    cwd = tmp_path_factory.mktemp("distill")
    # fp32: in bf16 the tiny ResNet teacher's third step can overflow on some CPUs' kernels (a NaN stop, not a test)
    proc = vitexp(
        *TINY,
        "task=distill",
        "task.distill_type=token",
        "task.teacher.name=resnet10t",
        "trainer.precision=32",
        cwd=cwd,
    )
    (run,) = (cwd / "outputs" / "distill" / "baseline").iterdir()
    return run, proc


def test_one_command_pipeline_leaves_teacher_and_student_runs(pipeline):
    run, proc = pipeline
    for folder in (run, run / "teacher"):
        assert (folder / "checkpoints" / "best.pt").is_file() and (folder / "metrics.csv").is_file()
    results = json.loads((run / "results.json").read_text())
    assert results["task"] == "distill" and results["teacher"] == "resnet10t" and 0 <= results["teacher_val_acc1"] <= 1
    log = (run / "distill_baseline.log").read_text()
    assert "teacher resnet10t" in log and "val/acc1_cls" in log and "val/acc1_dist" in log
    ckpt = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert ckpt["arch"]["builder"] == "vit_distilled" and "dist_token" in ckpt["model"]
    assert not any(k.startswith(("student.", "teacher.")) for k in ckpt["model"])


def test_resuming_a_finished_distill_run_skips_the_teacher_and_keeps_the_student(pipeline, tmp_path):
    run, _ = pipeline
    before = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    vitexp(f"resume={run}", cwd=tmp_path)
    after = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert after["epoch"] == before["epoch"] and torch.equal(
        after["model"]["dist_token"], before["model"]["dist_token"]
    )


def test_token_student_checkpoint_evaluates(pipeline, tmp_path):
    run, _ = pipeline
    best = run / "checkpoints" / "best.pt"
    vitexp(*TINY, "task=evaluate", f"ckpt_path={best}", cwd=tmp_path)
    (out,) = (tmp_path / "outputs" / "evaluate").glob("*/*")
    logged = torch.load(best, weights_only=True)["metrics"]["val/acc1"]
    assert json.loads((out / "results.json").read_text())["val_acc1"] == pytest.approx(logged)


def _one_line_error(proc) -> str:
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr.strip().splitlines()[-1]


def test_bad_teachers_are_one_line_errors(pipeline, tmp_path):
    run, _ = pipeline
    missing = vitexp(*TINY, "task=distill", "task.teacher_ckpt=/no/teacher.pt", cwd=tmp_path, check=False)
    assert "not found" in _one_line_error(missing)
    teacher = run / "teacher" / "checkpoints" / "best.pt"
    for cls in ("a", "b", "c"):
        (tmp_path / "three" / "train" / cls).mkdir(parents=True)
        for i in range(4):
            Image.new("L", (16, 16), 60 * i).save(tmp_path / "three" / "train" / cls / f"{i}.png")
    wrong = vitexp(
        *TINY,
        "task=distill",
        f"task.teacher_ckpt={teacher}",
        "data=imagefolder",
        "data.num_classes=3",
        f"data.root={tmp_path / 'three'}",
        "data.in_chans=1",
        "data.val_size=3",
        cwd=tmp_path,
        check=False,
    )
    assert "predicts 10 classes" in _one_line_error(wrong)
    cnn_student = vitexp(
        *TINY,
        "task=distill",
        "task.distill_type=token",
        f"task.teacher_ckpt={teacher}",
        "model.builder=cnn",
        cwd=tmp_path,
        check=False,
    )
    assert "needs a ViT student" in _one_line_error(cnn_student)
