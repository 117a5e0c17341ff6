"""Faults other than a kill: a NaN loss, a full disk, an unwritable folder, a batch too big for memory, a
checkpoint for another class count, broken image files."""

from __future__ import annotations

import logging
import math
import resource
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from tests import cli
from tests.conftest import TINY, compose_config, vitexp
from vitexp import VitexpError, checkpoint
from vitexp.tasks.recipe import read_recipe
from vitexp.training import fit


def _nan_from(call: int, until: int | None = None):
    """Cross-entropy that turns NaN from its `call`-th use (to its `until`-th), like a diverging run."""
    calls = [0]

    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        value = nn.functional.cross_entropy(logits, targets)
        return value * math.nan if call <= calls[0] <= (until or calls[0]) else value

    return loss


def test_a_nan_loss_stops_with_the_epoch_named_and_keeps_the_last_good_checkpoints(tmp_path):
    cfg = compose_config(*TINY, "trainer.max_epochs=3")  # 3 batches an epoch: NaN from epoch 2 on
    with pytest.raises(VitexpError, match=r"in epoch 2 .*trainer.skip_nonfinite=true") as e:
        fit(replace(read_recipe(cfg), loss=_nan_from(4)), tmp_path)
    assert "\n" not in str(e.value)
    assert checkpoint.load(tmp_path / "checkpoints" / "best.pt")["epoch"] == 1  # not overwritten
    last = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    assert last["epoch"] == 1 and all(torch.isfinite(t).all() for t in last["model"].values())
    assert (tmp_path / "metrics.csv").read_text().count("\n") == 2  # header and epoch 1


def test_skip_nonfinite_skips_the_bad_step_and_finishes(tmp_path, caplog):
    cfg = compose_config(*TINY, "trainer.max_epochs=2", "trainer.skip_nonfinite=true")
    with caplog.at_level(logging.WARNING, logger="vitexp"):
        results = fit(replace(read_recipe(cfg), loss=_nan_from(5, 5)), tmp_path)  # one batch of epoch 2
    assert results["status"] == "completed" and results["epochs"] == 2
    assert "epoch 2: skipped 1 optimizer steps" in caplog.text
    last = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    assert last["step"] == 6 and all(torch.isfinite(t).all() for t in last["model"].values())
    assert math.isfinite(last["metrics"]["train/loss"])


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    run = tmp_path / "run"
    vitexp(*TINY, "trainer.max_epochs=1", f"hydra.run.dir={run}", cwd=tmp_path)
    before = (run / "checkpoints" / "last.pt").read_bytes()
    # no file may grow past 64 KiB (logs and metrics stay below it; a checkpoint does not): writes fail as on a
    # full disk
    proc = cli.run([f"resume={run}", "trainer.max_epochs=2"], tmp_path, limits={resource.RLIMIT_FSIZE: 64 << 10})
    assert proc.returncode == 2, proc.stderr[-2000:]
    last_line = proc.stderr.strip().splitlines()[-1]
    assert "cannot write" in last_line and "the previous" in last_line and "Traceback" not in proc.stderr
    assert (run / "checkpoints" / "last.pt").read_bytes() == before
    assert checkpoint.load(run / "checkpoints" / "last.pt")["epoch"] == 1
    assert not list(run.rglob("*.tmp"))


def test_an_unwritable_run_folder_is_one_line(tmp_path):
    proc = vitexp(*TINY, "hydra.run.dir=/proc/vitexp_run", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: cannot create /proc/vitexp_run (No such file or directory); run from a writable folder or pick a "
        "writable hydra.run.dir"
    ]


def test_a_batch_too_big_for_memory_suggests_gradient_accumulation(tmp_path):
    # 1024 images of 64x64 in 2x2 patches need ~100 GB of activations; the process may map 6 GiB
    args = [
        "trainer.device=cpu",
        "logger=none",
        "trainer.max_epochs=1",
        "data.batch_size=1024",
        "data.img_size=64",
        "model.patch_size=2",
        "trainer.precision=32",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    proc = cli.run(args, tmp_path, limits={resource.RLIMIT_AS: 6 << 30})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .endswith(
            "error: out of memory on cpu with batches of 1024 images; lower data.batch_size (e.g. data.batch_size=512) "
            "and set trainer.accumulate_grad_batches=2 to keep the effective batch"
        )
    )


def _tree(root: Path, classes: int) -> Path:
    for c in range(classes):
        (root / "train" / f"class{c}").mkdir(parents=True)
        for i in range(12):
            Image.new("RGB", (16, 16), (60 * c, 20 * i, 90)).save(root / "train" / f"class{c}" / f"{i}.png")
    return root


def test_a_checkpoint_for_another_class_count_is_one_line(tmp_path):
    three, four = _tree(tmp_path / "three", 3), _tree(tmp_path / "four", 4)
    data = ["data=imagefolder", "data.img_size=16", "data.batch_size=8", "data.val_size=0.25", "data.num_workers=0"]
    vitexp(
        *TINY,
        *data,
        f"data.root={three}",
        "data.num_classes=3",
        "trainer.max_epochs=1",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    best = tmp_path / "run" / "checkpoints" / "best.pt"
    on_four = [*TINY, *data, f"data.root={four}", "data.num_classes=4", f"ckpt_path={best}"]
    finetune = vitexp(*on_four, f"hydra.run.dir={tmp_path / 'finetune'}", cwd=tmp_path, check=False)
    assert finetune.returncode == 2 and finetune.stderr.strip().splitlines()[-1].endswith(
        f"error: {best} predicts 3 classes but this model has 4 (data.num_classes); pick the data= it was trained on"
    )
    evaluate = vitexp(*on_four, "task=evaluate", f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path, check=False)
    assert (
        evaluate.returncode == 2
        and "and 3 classes but data=imagefolder has 3 and 4" in evaluate.stderr.strip().splitlines()[-1]
    )


def test_broken_image_files_are_skipped_and_counted(tmp_path, caplog):
    root = _tree(tmp_path, 2)
    (root / "train" / "class0" / "notes.txt").write_text("not an image")
    (root / "train" / "class0" / "fake.jpg").write_bytes(b"<html>not a jpeg</html>")
    (root / "train" / "class1" / "empty.png").write_bytes(b"")
    cfg = compose_config("data=imagefolder", f"data.root={root}", "data.val_size=0.25", "data.num_classes=2")
    from tests.builders import splits_of

    with caplog.at_level(logging.WARNING, logger="vitexp"):
        splits = splits_of(cfg)
    assert len(splits.train) + len(splits.val) == 24
    assert f"skipped 3 files under {root / 'train'} that are not readable images" in caplog.text


def test_an_image_that_fails_to_decode_is_named(tmp_path):
    root = _tree(tmp_path, 2)
    good = (root / "train" / "class1" / "0.png").read_bytes()
    (root / "train" / "class1" / "cut.png").write_bytes(good[: len(good) // 2])  # header intact, pixels cut
    args = [
        *TINY,
        "data=imagefolder",
        f"data.root={root}",
        "data.img_size=16",
        "data.num_classes=2",
        "data.batch_size=8",
        "data.val_size=1",
        "data.num_workers=1",
        "trainer.max_epochs=1",
    ]
    # 3 train batches of 8 and 1 val image: every file is decoded in the first epoch
    proc = vitexp(*args, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last_line = proc.stderr.strip().splitlines()[-1]
    assert f"cannot decode {root / 'train' / 'class1' / 'cut.png'}" in last_line and "delete or replace" in last_line
