"""`python -m vitexp` end to end, as users call it: train, evaluate, resume, sweeps, bad input."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests import cli
from tests.conftest import TINY, metric_rows, vitexp

CHECKPOINT_KEYS = {
    "model",
    "arch",
    "optimizer",
    "scheduler",
    "scaler",
    "ema",
    "epoch",
    "step",
    "rng",
    "config",
    "metrics",
    "wandb_run_id",
    "version",
}
LOG_FIELDS = ["train/loss", "val/loss", "val/acc1", "lr", "grad_norm", "time/epoch_s"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One tiny training run (3 epochs, full validation split) shared by the tests that read its outputs."""
    cwd = tmp_path_factory.mktemp("train")
    vitexp(*TINY, "trainer.max_epochs=3", "trainer.limit_val_batches=null", "trainer.ckpt_every_n_epochs=2", cwd=cwd)
    (run,) = (cwd / "outputs" / "train" / "baseline").iterdir()
    return run


def test_train_run_folder_holds_everything(trained):
    names = {p.relative_to(trained).as_posix() for p in trained.rglob("*") if p.is_file()}
    assert {
        ".hydra/config.yaml",
        ".hydra/overrides.yaml",
        "train_baseline.log",
        "metrics.csv",
        "results.json",
        "checkpoints/best.pt",
        "checkpoints/last.pt",
        "checkpoints/epoch_0002.pt",
        "plots/learning_curves.png",
    } <= names
    assert not any(n.endswith(".tmp") for n in names)
    epoch_lines = [line for line in (trained / "train_baseline.log").read_text().splitlines() if "| train/loss" in line]
    assert len(epoch_lines) == 3
    assert all(line.startswith("[20") and all(f in line for f in LOG_FIELDS) for line in epoch_lines)
    with (trained / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert all(0 <= float(r["val/acc1"]) <= 1 and float(r["grad_norm"]) > 0 for r in rows)
    results = json.loads((trained / "results.json").read_text())
    assert results["status"] == "completed" and results["task"] == "train" and results["model"] == "baseline"
    assert results["best_val_acc1"] == max(float(r["val/acc1"]) for r in rows)
    assert results["params"] > 0 and results["macs"] > 0 and results["infer_img_per_s"] > 0


def test_checkpoint_contents(trained):
    ckpt = torch.load(trained / "checkpoints" / "last.pt", weights_only=True)
    assert CHECKPOINT_KEYS <= set(ckpt)
    assert ckpt["epoch"] == 3 and ckpt["step"] == 9 and ckpt["arch"]["builder"] == "vit"
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    assert ckpt["config"]["model"]["depth"] == 2 and isinstance(ckpt["config"], dict)
    best = torch.load(trained / "checkpoints" / "best.pt", weights_only=True)
    assert best["metrics"]["val/acc1"] == best["metrics"]["best_val_acc1"]


def test_evaluate_reproduces_the_logged_val_accuracy(trained, tmp_path):
    best = trained / "checkpoints" / "best.pt"
    logged = torch.load(best, weights_only=True)["metrics"]["val/acc1"]
    proc = vitexp("task=evaluate", f"ckpt_path={best}", "trainer.device=cpu", cwd=tmp_path)
    (run,) = (tmp_path / "outputs" / "evaluate").glob("*/*")
    results = json.loads((run / "results.json").read_text())
    assert results["split"] == "val" and results["images"] == 360
    assert results["val_acc1"] == pytest.approx(logged, abs=1e-9)
    assert results["macs"] > 0 and results["infer_img_per_s"] > 0 and "val_acc1/7" in results
    assert (run / "plots" / "confusion_matrix.png").stat().st_size > 0
    assert "acc1" in proc.stderr


def _state(path: Path) -> dict:
    return torch.load(path, weights_only=True)


@pytest.mark.slow  # the default set kills and resumes in tests/reliability (test_kill_resume, test_step_resume)
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    args = [*TINY, "trainer.max_epochs=4", "trainer.limit_train_batches=40"]
    vitexp(*args, "hydra.run.dir=straight", cwd=tmp_path)
    for attempt in range(5):
        run = tmp_path / f"killed{attempt}"
        child = cli.Child([*args, f"hydra.run.dir={run}"], tmp_path)
        while not (run / "checkpoints" / "last.pt").exists() and child.process.is_alive():
            time.sleep(0.005)
        time.sleep(0.1 + 0.1 * attempt)  # into the next epoch
        child.kill()
        if child.wait().returncode == -signal.SIGKILL and _state(run / "checkpoints" / "last.pt")["epoch"] < 4:
            break
    else:
        pytest.fail("the run always finished before it could be killed")
    killed_at = _state(run / "checkpoints" / "last.pt")["epoch"]
    vitexp(f"resume={run}", cwd=tmp_path)
    straight, resumed = (
        _state(tmp_path / "straight" / "checkpoints" / "last.pt"),
        _state(run / "checkpoints" / "last.pt"),
    )
    assert resumed["epoch"] == 4 and resumed["step"] == straight["step"]
    for key, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][key]), key
    for a, b in zip(straight["optimizer"]["state"].values(), resumed["optimizer"]["state"].values()):
        assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert straight["scheduler"] == resumed["scheduler"]
    with (run / "metrics.csv").open() as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2", "3", "4"]
    log = (run / "train_baseline.log").read_text()
    assert f"resuming {run}" in log and f"from epoch {killed_at}" in log
    assert (run / ".hydra" / "config.yaml").is_file() and list((run / ".hydra").glob("resume_*/config.yaml"))


def test_patch8_trains_and_the_console_shows_the_log_lines(tmp_path):
    proc = vitexp(*TINY, "model=patch8", cwd=tmp_path)
    (run,) = (tmp_path / "outputs" / "train" / "patch8").iterdir()
    assert json.loads((run / "results.json").read_text())["model"] == "patch8"
    epoch_lines = [line for line in (run / "train_patch8.log").read_text().splitlines() if "| train/loss" in line]
    assert len(epoch_lines) == 2 and all(line in proc.stderr for line in epoch_lines)


def test_multirun_writes_one_folder_per_job(tmp_path):
    vitexp("--multirun", *TINY, "trainer.max_epochs=1", "optim.lr=1e-3,3e-4", cwd=tmp_path)
    (sweep,) = (tmp_path / "multirun_outputs").iterdir()
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0", "1"]
    lrs = [json.loads((sweep / j / ".hydra" / "config.yaml").read_text().split("lr: ")[1].split()[0]) for j in jobs]
    assert lrs == [0.001, 0.0003]
    assert all(
        (sweep / j / "results.json").is_file() and (sweep / j / "checkpoints" / "best.pt").is_file() for j in jobs
    )


def test_train_on_real_cifar10_images(cifar_small, tmp_path):
    vitexp(*TINY, "data=cifar10", f"data.root={cifar_small}", "data.val_size=100", "data.num_workers=0", cwd=tmp_path)
    (run,) = (tmp_path / "outputs" / "train" / "baseline").iterdir()
    results = json.loads((run / "results.json").read_text())
    assert results["data"] == "cifar10" and results["status"] == "completed" and results["val_images"] == 100
    assert 0 <= results["best_val_acc1"] <= 1
    saved = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    # trained on the real photos with CIFAR-10's own statistics
    assert saved["config"]["data"]["mean"] == [0.4914, 0.4822, 0.4465] and saved["arch"]["kwargs"]["num_classes"] == 10
    rows = metric_rows(run / "metrics.csv")
    assert len(rows) == 2 and all(math.isfinite(float(r["train/loss"])) for r in rows)


def _fails_with_one_line(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(("error:", "[")) and "error:" in last, proc.stderr
    for fragment in fragments:
        assert fragment in last, last
    return last


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["model=nope"], ["model/nope", "baseline", "patch8"]),
        (["task=nope"], ["task/nope", "train"]),
        (["data=nope"], ["data/nope", "digits"]),
        (["trainer.max_epoch=3"], ["trainer.max_epoch", "not a config key"]),
        (["data=imagefolder", "data.root=/no/such/folder"], ["/no/such/folder"]),
        (["resume=/no/such/run"], ["/no/such/run"]),
        (["task=evaluate", "ckpt_path=/no/such/best.pt"], ["not found", "/no/such/best.pt"]),
        (["optim.lr=-1e-3"], ["optim.lr=-0.001", "> 0"]),
        (["optim.lr=fast"], ["optim.lr='fast'", "number"]),
        (["data.batch_size=0"], ["data.batch_size=0", ">= 1"]),
        (["trainer.max_epochs=2.5"], ["trainer.max_epochs=2.5", "whole number"]),
        (["task=prune", "task.ratio=1.0"], ["task.ratio=1.0", "[0, 1)"]),
        (["trainer.precision=8"], ["trainer.precision='8'", "auto, 32, bf16, 16"]),
        (["data.val_size=0"], ["data.val_size=0", "count >= 1"]),
        (["optim.lr=[1e-3"], ["optim.lr=[1e-3"]),
        (["data=imagefolder"], ["data.root must be set"]),
    ],
    ids=[
        "model",
        "task",
        "data",
        "misspelled-key",
        "missing-data-folder",
        "missing-resume",
        "missing-ckpt",
        "negative-lr",
        "text-lr",
        "zero-batch",
        "fractional-epochs",
        "ratio-1",
        "precision",
        "val-size-0",
        "malformed",
        "missing-value",
    ],
)
def test_bad_input_is_one_line_and_nonzero(args, fragments, tmp_path):
    _fails_with_one_line(vitexp(*TINY, *args, cwd=tmp_path, check=False), *fragments)


def test_a_new_run_never_writes_into_an_existing_run_and_resume_keeps_its_model(trained, tmp_path):
    before = {p: p.read_bytes() for p in trained.rglob("*") if p.is_file()}
    proc = vitexp(*TINY, f"hydra.run.dir={trained}", cwd=tmp_path, check=False)
    _fails_with_one_line(proc, f"{trained} already holds a run", f"resume={trained}")
    proc = vitexp(f"resume={trained}", "model=patch8", cwd=tmp_path, check=False)
    _fails_with_one_line(proc, "model=patch8 cannot change on resume")
    changed = [p for p, b in before.items() if p.read_bytes() != b and p.suffix != ".log"]  # logs say it was refused
    assert not changed


def test_empty_data_folder(tmp_path):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    proc = vitexp(*TINY, "data=imagefolder", f"data.root={tmp_path / 'empty'}", cwd=tmp_path, check=False)
    _fails_with_one_line(proc, "no images", "empty")


def test_truncated_and_wrong_architecture_checkpoints(trained, tmp_path):
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((trained / "checkpoints" / "best.pt").read_bytes()[:4096])
    proc = vitexp("task=evaluate", f"ckpt_path={truncated}", cwd=tmp_path, check=False)
    _fails_with_one_line(proc, "truncated or corrupt")
    proc = vitexp(*TINY, "model=patch8", f"ckpt_path={trained / 'checkpoints' / 'best.pt'}", cwd=tmp_path, check=False)
    _fails_with_one_line(proc, "does not fit this model")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_and_sigint_stop_cleanly_with_a_resume_hint(signum, tmp_path):
    for attempt in range(3):  # a run that finished before the signal arrived is tried again, longer
        run = tmp_path / f"run{attempt}"
        epochs = 30 * 4**attempt
        args = [*TINY, f"trainer.max_epochs={epochs}", f"hydra.run.dir={run}"]
        child = cli.Child(args, tmp_path)
        while not (run / "checkpoints" / "last.pt").exists() and child.process.is_alive():
            time.sleep(0.005)
        os.kill(child.pid, signum)
        proc = child.wait(timeout=120)
        stderr = proc.stderr
        if proc.returncode != 0:
            break
    assert proc.returncode == 130, f"every run finished before the signal arrived: {stderr[-2000:]}"
    last_line = stderr.strip().splitlines()[-1]
    assert f"interrupted ({signum.name})" in last_line and f"resume={run}" in last_line and "Traceback" not in stderr
    epoch = _state(run / "checkpoints" / "last.pt")["epoch"]  # intact and loadable
    vitexp(f"resume={run}", f"trainer.max_epochs={epochs}", cwd=tmp_path)
    assert _state(run / "checkpoints" / "last.pt")["epoch"] == epochs > epoch
