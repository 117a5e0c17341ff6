"""torchrun/DDP on CPU (gloo) as users call it, resume across world sizes, and the SLURM launcher config."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from tests.conftest import TINY, compose_config, vitexp

# Deterministic batches (no random crop or rotation) and fp32, so that 1 and 2 processes can be compared.
SAME = [
    *TINY,
    "trainer.precision=32",
    "optim.fused=false",
    "trainer.limit_train_batches=null",
    "trainer.limit_val_batches=null",
    "data.augment.crop_padding=0",
    "data.augment.rotate=0",
]


def torchrun(nproc: int, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node=N -m vitexp ARGS`, as a user would start it."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--standalone",
        "-m",
        "vitexp",
        *args,
    ]
    proc = subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    return proc


def rows(run: Path) -> list[dict[str, float]]:
    with (run / "metrics.csv").open() as f:
        return [{k: float(v) for k, v in r.items() if v} for r in csv.DictReader(f)]


def only_run(cwd: Path) -> Path:
    (run,) = (cwd / "outputs" / "train" / "baseline").iterdir()
    return run


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """One process, 2 epochs, a checkpoint after each."""
    cwd = tmp_path_factory.mktemp("single")
    vitexp(*SAME, "trainer.max_epochs=2", "trainer.ckpt_every_n_epochs=1", cwd=cwd)
    return only_run(cwd)


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> Path:
    """The same with two processes (gloo), the same global batch."""
    cwd = tmp_path_factory.mktemp("ddp")
    torchrun(2, *SAME, "trainer.max_epochs=2", "trainer.ckpt_every_n_epochs=1", cwd=cwd)
    return only_run(cwd)


def test_two_processes_write_one_run_folder_once(ddp):
    files = sorted(p.relative_to(ddp).as_posix() for p in ddp.rglob("*") if p.is_file())
    assert [f for f in files if f.endswith(".log")] == ["train_baseline.log"]
    assert [f for f in files if f.startswith("checkpoints/")] == [
        "checkpoints/best.pt",
        "checkpoints/epoch_0001.pt",
        "checkpoints/epoch_0002.pt",
        "checkpoints/last.pt",
    ]
    epoch_lines = [line for line in (ddp / "train_baseline.log").read_text().splitlines() if "| train/loss" in line]
    assert len(epoch_lines) == 2  # printed by rank 0 only
    assert len(rows(ddp)) == 2
    assert len(list(ddp.parent.iterdir())) == 1  # no second, per-rank timestamp folder
    results = json.loads((ddp / "results.json").read_text())
    assert results["processes"] == 2 and results["status"] == "completed"


def test_two_processes_match_one_with_the_same_global_batch(single, ddp):
    # Each global batch holds the same images (rank r reads every 2nd index of the shared permutation) and DDP
    # averages the two half-batch gradients, which is the full-batch gradient up to float summation order:
    # ~1e-7 relative per step, so 1e-5 over 2 epochs is a wide margin that still catches any other difference.
    for one, two in zip(rows(single), rows(ddp), strict=True):
        assert two["train/loss"] == pytest.approx(one["train/loss"], rel=1e-5)
        assert two["val/loss"] == pytest.approx(one["val/loss"], rel=1e-5)
        assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)
        assert two["val/acc1"] == one["val/acc1"]
    # validation counted every image of the split exactly once, split over the two ranks
    for run in (single, ddp):
        assert json.loads((run / "results.json").read_text())["val_images"] == 360


def _interrupted_copy(run: Path, dest: Path) -> Path:
    """`run` as it was after epoch 1: last.pt is the epoch-1 checkpoint and metrics.csv has one row."""
    shutil.copytree(run, dest)
    shutil.copy(dest / "checkpoints" / "epoch_0001.pt", dest / "checkpoints" / "last.pt")
    for name in ("best.pt", "epoch_0002.pt"):
        (dest / "checkpoints" / name).unlink()
    (dest / "results.json").unlink()
    return dest


@pytest.mark.parametrize(("started", "resumed"), [(2, 1), (1, 2)], ids=["2-to-1", "1-to-2"])
def test_resume_on_another_world_size(started, resumed, single, ddp, tmp_path):
    source = ddp if started == 2 else single
    run = _interrupted_copy(source, tmp_path / "run")
    args = [f"resume={run}", "trainer.device=cpu"]
    if resumed == 2:
        torchrun(2, *args, cwd=tmp_path)
    else:
        vitexp(*args, cwd=tmp_path)
    assert [r["epoch"] for r in rows(run)] == [1, 2]
    # epoch 2 continued from epoch 1's weights, optimizer moments and schedule: it equals the uninterrupted run's
    assert rows(run)[1]["train/loss"] == pytest.approx(rows(source)[1]["train/loss"], rel=1e-5)
    assert rows(run)[1]["lr"] == rows(source)[1]["lr"]
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    reference = torch.load(source / "checkpoints" / "last.pt", weights_only=True)
    assert last["epoch"] == 2 and last["step"] == reference["step"]
    assert last["optimizer"]["state"][0]["step"] == reference["optimizer"]["state"][0]["step"]
    for name, tensor in reference["model"].items():
        ours = last["model"][name]
        if name.endswith("attn.qkv.bias"):
            # Attention is invariant to the key bias, so its gradient is float rounding noise, which Adam
            # scales up to full steps: it differs between any two summation orders. Compare the q and v parts.
            dim = len(tensor) // 3
            ours, tensor = torch.cat([ours[:dim], ours[2 * dim :]]), torch.cat([tensor[:dim], tensor[2 * dim :]])
        assert (ours - tensor).norm() <= 1e-4 * tensor.norm() + 1e-6, name
    assert json.loads((run / "results.json").read_text())["processes"] == resumed


def test_slurm_launcher_config_composes_and_instantiates():
    cfg = compose_config("cluster=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=4", hydra=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and cfg.hydra.mode.name == "MULTIRUN"
    assert (launcher.partition, launcher.tasks_per_node, launcher.max_num_timeout) == ("gpu", 4, 20)
    assert cfg.auto_resume is True
    assert type(instantiate(launcher)).__name__ == "SlurmLauncher"


def test_cfg_hydra_shows_the_slurm_job_settings(tmp_path):
    proc = vitexp("cluster=slurm", "hydra.launcher.partition=gpu", "--cfg", "hydra", cwd=tmp_path)
    assert "submitit_slurm" in proc.stdout and "partition: gpu" in proc.stdout and "timeout_min: 1440" in proc.stdout


def test_submitit_local_launcher_runs_a_sweep_in_one_folder(tmp_path):
    vitexp(
        "--multirun",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=10",
        "optim.lr=1e-3,2e-3",
        *TINY,
        "trainer.max_epochs=1",
        cwd=tmp_path,
    )
    (sweep,) = (tmp_path / "multirun_outputs").iterdir()  # jobs in other processes resolve the same folder
    for job in ("0", "1"):
        assert json.loads((sweep / job / "results.json").read_text())["status"] == "completed"


def test_auto_resume_continues_a_requeued_job_in_its_folder(tmp_path):
    folder = tmp_path / "job"
    vitexp(*TINY, f"hydra.run.dir={folder}", "trainer.max_epochs=1", cwd=tmp_path)
    proc = vitexp(*TINY, f"hydra.run.dir={folder}", "trainer.max_epochs=2", "auto_resume=true", cwd=tmp_path)
    assert "resuming" in proc.stderr
    assert [r["epoch"] for r in rows(folder)] == [1, 2]


@pytest.mark.parametrize("task", ["distill", "prune"])
def test_distill_and_prune_run_under_torchrun(task, tmp_path):
    torchrun(2, f"task={task}", *TINY, "trainer.max_epochs=1", cwd=tmp_path)
    (run,) = (tmp_path / "outputs" / task / "baseline").iterdir()
    assert [p.name for p in run.glob("*.log")] == [f"{task}_baseline.log"]
    sub = run / ("teacher" if task == "distill" else "unpruned")
    for folder in (run, sub):  # the sub-run (teacher / model to prune) trained with both processes too
        results = json.loads((folder / "results.json").read_text())
        assert results["status"] == "completed" and results["processes"] == 2


# Mid-epoch: 20 global batches an epoch, stopped by a signal in step 27 (epoch 2, batch 7), random crops on.
MID = [*SAME, "trainer.max_epochs=2", "trainer.limit_train_batches=20", "data.augment.crop_padding=2"]
INJECT = str(Path(__file__).parent / "reliability" / "inject.py")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """One process, never stopped, no step checkpoints."""
    cwd = tmp_path_factory.mktemp("uninterrupted")
    vitexp(*MID, f"hydra.run.dir={cwd / 'run'}", cwd=cwd)
    return cwd / "run"


@pytest.mark.slow
@pytest.mark.parametrize(("started", "resumed"), [(2, 1), (1, 2)], ids=["2-to-1", "1-to-2"])
def test_a_run_stopped_mid_epoch_resumes_at_the_same_sample_on_another_world_size(
    started, resumed, uninterrupted, tmp_path
):
    run = tmp_path / "run"
    args = [INJECT, "SIGTERM", "27", *MID, f"hydra.run.dir={run}"]
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"] if started == 2 else []
    proc = subprocess.run(
        [sys.executable, *launcher, *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode != 0 and "interrupted (SIGTERM)" in proc.stderr, proc.stderr[-3000:]
    stopped = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    # the signal reached rank 0 only, in step 27: every rank stopped after it, and it was saved there
    assert (stopped["epoch"], stopped["step"], stopped["position"]["batch"]) == (1, 27, 7)
    assert len(stopped["position"]["sums"]) == started
    args = [f"resume={run}", "trainer.device=cpu"]
    torchrun(2, *args, cwd=tmp_path) if resumed == 2 else vitexp(*args, cwd=tmp_path)
    # epoch 2 went on from batch 7 with the same images, crops and flips: the same figures as one process
    # (up to float summation order), and the epoch's loss sums what both attempts saw
    for one, two in zip(rows(uninterrupted), rows(run), strict=True):
        assert two["train/loss"] == pytest.approx(one["train/loss"], rel=1e-5)
        assert two["val/loss"] == pytest.approx(one["val/loss"], rel=1e-5)
        assert two["lr"] == one["lr"] and two["val/acc1"] == one["val/acc1"]
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert last["step"] == 40 and last["position"] is None
    assert json.loads((run / "results.json").read_text())["processes"] == resumed
