"""SIGKILL train, distill and prune runs at random points (an optimizer step, an evaluation, half-way through a
checkpoint write, or a random moment), resume them with `resume=`, and compare with the uninterrupted run.

The default suite runs one chosen trial per task; `pytest -m slow tests/reliability` runs VITEXP_TRIALS
(default 12) random trials per task.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests import cli
from tests.conftest import metric_rows, vitexp
from vitexp import checkpoint
from vitexp.runs import resumable

DEVICE = os.environ.get("VITEXP_RELIABILITY_DEVICE", "cpu")  # cuda: the same trials on a GPU
# on a GPU, deterministic kernels: CUDA's fastest ones (attention's backward) add in a varying order
BASE = [
    "debug=fast",
    f"trainer.device={DEVICE}",
    "logger=none",
    "trainer.limit_train_batches=4",
    *(["trainer.deterministic=true"] if DEVICE == "cuda" else []),
]
TASKS = {
    "train": [*BASE, "trainer.max_epochs=3"],
    "distill": [*BASE, "task=distill", "task.teacher_epochs=2", "trainer.max_epochs=2"],
    "prune": [*BASE, "task=prune", "task.train_epochs=2", "task.finetune_epochs=2"],
    "prune_kd": [*BASE, "task=prune", "task.train_epochs=2", "task.finetune_epochs=2", "task.finetune_distill=true"],
}
# every checkpoint a finished run of each task holds, sub-runs included
CHECKPOINTS = {
    "train": ["checkpoints/last.pt", "checkpoints/best.pt"],
    "distill": [
        "teacher/checkpoints/last.pt",
        "teacher/checkpoints/best.pt",
        "checkpoints/last.pt",
        "checkpoints/best.pt",
    ],
    "prune": [
        "unpruned/checkpoints/last.pt",
        "unpruned/checkpoints/best.pt",
        "checkpoints/pruned.pt",
        "checkpoints/last.pt",
        "checkpoints/best.pt",
    ],
}
CHECKPOINTS["prune_kd"] = CHECKPOINTS["prune"]
FAULTS = ("step", "eval", "save", "time")
TRIALS = int(os.environ.get("VITEXP_TRIALS", "12"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Each task run once without a fault: its folder, how many steps/evaluations/saves it made, its wall time."""
    found = {}

    def get(task: str) -> tuple[Path, dict[str, int], float]:
        if task not in found:
            root = tmp_path_factory.mktemp(f"reference_{task}")
            counts = root / "counts.json"
            started = time.perf_counter()
            proc = cli.run(["count", str(counts), *TASKS[task], f"hydra.run.dir={root / 'run'}"], root, entry="inject")
            assert proc.returncode == 0, proc.stderr[-3000:]
            found[task] = (root / "run", json.loads(counts.read_text()), time.perf_counter() - started)
        return found[task]

    return get


def _trial(task: str, fault: str, n: float, reference, tmp_path: Path, requeue: bool = False) -> None:
    """Kill a run at `fault` number `n`, then continue it with `resume=` (or, `requeue`, as a cluster does: the
    same command again, with `auto_resume=true`) and compare with the uninterrupted run."""
    ref, _, _ = reference(task)
    run = tmp_path / "run"
    args = [*TASKS[task], f"hydra.run.dir={run}", *(["auto_resume=true"] if requeue else [])]
    if fault == "time":
        child = cli.Child(args, tmp_path)
        try:
            child.wait(timeout=n)
        except subprocess.TimeoutExpired:  # still running at n seconds: killed by SIGKILL
            pass
        killed = child.process.exitcode == -signal.SIGKILL
    else:
        proc = cli.run([fault, str(int(n)), *args], tmp_path, entry="inject")
        assert proc.returncode == -signal.SIGKILL, f"{fault} {n} was not reached:\n{proc.stderr[-3000:]}"
        killed = True

    # whatever the kill left, no checkpoint is unreadable
    for path in run.rglob("*.pt"):
        checkpoint.load(path)
    if killed:
        if requeue:
            vitexp(*args, cwd=tmp_path)
        elif resumable(run):
            vitexp(f"resume={run}", cwd=tmp_path)
        else:  # killed before Hydra made the run folder: nothing ran, start again
            vitexp(*args, cwd=tmp_path)

    assert_same_run(run, ref, task)


def assert_same_run(run: Path, ref: Path, task: str) -> None:
    """`run` finished with `ref`'s results.json figures, checkpoints (weights, optimizer state, epoch and step) and
    metrics.csv rows (its sub-runs' included), bitwise."""
    results, expected = (json.loads((folder / "results.json").read_text()) for folder in (run, ref))
    assert results["status"] == "completed"
    varies = ("img_per_s", "latency", "wall_s", "_ckpt")  # timings, and paths into each run's own folder
    same = [k for k in expected if not any(v in k for v in varies)]
    assert results.keys() == expected.keys() and {k: results[k] for k in same} == {k: expected[k] for k in same}
    assert not list(run.rglob("*.tmp")), "a killed checkpoint write left its temp file behind"
    for name in CHECKPOINTS[task]:
        want, got = checkpoint.load(ref / name), checkpoint.load(run / name)
        assert want["epoch"] == got["epoch"] and want["step"] == got["step"], name
        for key, tensor in want["model"].items():
            assert torch.equal(tensor, got["model"][key]), f"{name}: {key} differs from the uninterrupted run"
        for a, b in zip(
            want.get("optimizer", {}).get("state", {}).values(), got.get("optimizer", {}).get("state", {}).values()
        ):
            assert all(torch.equal(a[k], b[k]) for k in a), f"{name}: optimizer state differs"
    assert metric_rows(run / "metrics.csv") == metric_rows(ref / "metrics.csv")
    for sub in {"distill": ["teacher"], "prune": ["unpruned"], "prune_kd": ["unpruned"]}.get(task, []):
        assert metric_rows(run / sub / "metrics.csv") == metric_rows(ref / sub / "metrics.csv")


# the default suite: one trial per task, each at a point that once went wrong or is easy to get wrong
@pytest.mark.parametrize(
    "task, fault, n",
    [
        ("train", "save", 3),  # half-way through epoch 2's best.pt
        ("distill", "step", 6),  # inside the teacher's second epoch: the run folder has no last.pt yet
        pytest.param("distill", "eval", 5, marks=pytest.mark.slow),  # the student's 2nd evaluation: resume= must
        # go on distilling, not training (slow: the default set already distils once)
        ("prune", "save", 6),  # inside the fine-tuning's first last.pt, after pruned.pt
        ("prune_kd", "step", 14),  # fine-tuning from the unpruned teacher, epoch 2: resume= keeps the teacher
    ],
)
def test_a_killed_run_resumes_to_the_uninterrupted_result(task, fault, n, reference, tmp_path):
    _trial(task, fault, n, reference, tmp_path)


def test_a_requeued_job_killed_inside_its_teacher_continues_it(reference, tmp_path):
    _trial("distill", "step", 6, reference, tmp_path, requeue=True)


@pytest.mark.slow
@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("trial", range(TRIALS))
def test_random_kills_resume_to_the_uninterrupted_result(task, trial, reference, tmp_path):
    _, counts, wall = reference(task)
    rng = random.Random(f"{task}-{trial}")
    fault = FAULTS[trial % len(FAULTS)]
    n = rng.uniform(0.5, wall) if fault == "time" else rng.randint(1, counts[fault])
    print(f"{task}: SIGKILL at {fault} {n}")
    _trial(task, fault, n, reference, tmp_path)
