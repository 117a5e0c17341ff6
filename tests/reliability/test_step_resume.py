"""Mid-epoch checkpoints: train, distill and prune runs SIGKILLed at a random optimizer step with
`trainer.ckpt_every_n_steps=2`, or sent SIGTERM / SIGINT / SIGUSR1 / SIGUSR2 in the middle of an epoch, on the worker
loader (2 persistent workers) and the on-device loader; each resumes with `resume=` and ends bitwise equal to an
uninterrupted run without step checkpoints. A signalled run loses no optimizer step: the steps it completed are the
steps its checkpoints hold.

The default suite runs three chosen trials; `pytest -m slow tests/reliability` runs VITEXP_TRIALS (default 12)
trials per task, the fault, the loader and the step drawn from a seeded generator.
"""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path

import pytest

from tests import cli
from tests.conftest import vitexp
from tests.reliability.test_kill_resume import TASKS, assert_same_run
from vitexp import checkpoint

LOADERS = {
    "workers": ["data.num_workers=2", "data.persistent_workers=true"],
    "device": ["data.on_device=true", "data.augment.rotate=0"],
}
STEP_CHECKPOINTS = ["trainer.ckpt_every_n_steps=2"]
FAULTS = ("step", "SIGTERM", "SIGUSR1", "step", "SIGINT", "SIGUSR2")
TRIALS = int(os.environ.get("VITEXP_TRIALS", "12"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Each (task, loader) run once without a fault and without step checkpoints: its folder and its step count."""
    found = {}

    def get(task: str, loader: str) -> tuple[Path, int]:
        if (task, loader) not in found:
            root = tmp_path_factory.mktemp(f"reference_{task}_{loader}")
            counts = root / "counts.json"
            args = ["count", str(counts), *TASKS[task], *LOADERS[loader], f"hydra.run.dir={root / 'run'}"]
            proc = cli.run(args, root, entry="inject")
            assert proc.returncode == 0, proc.stderr[-3000:]
            found[task, loader] = (root / "run", json.loads(counts.read_text())["step"])
        return found[task, loader]

    return get


def saved_steps(run: Path) -> dict[str, int]:
    """The optimizer steps each last.pt of a run (its sub-runs' included) holds."""
    return {str(p.relative_to(run)): checkpoint.load(p)["step"] for p in sorted(run.rglob("last.pt"))}


def _trial(task: str, loader: str, fault: str, n: int, reference, tmp_path: Path) -> None:
    """Kill (`step`: SIGKILL before optimizer step `n`) or signal (in step `n`) a run with step checkpoints, resume
    it, and compare with the uninterrupted run."""
    ref, _ = reference(task, loader)
    run = tmp_path / "run"
    proc = cli.run(
        [fault, str(n), *TASKS[task], *LOADERS[loader], *STEP_CHECKPOINTS, f"hydra.run.dir={run}"],
        tmp_path,
        entry="inject",
    )
    if fault == "step":
        assert proc.returncode == -signal.SIGKILL, f"step {n} was not reached:\n{proc.stderr[-3000:]}"
        print(f"{task}/{loader}: SIGKILL before step {n}; resuming from {saved_steps(run)}")
    else:
        assert proc.returncode == 130, proc.stderr[-3000:]
        last_line = proc.stderr.strip().splitlines()[-1]
        assert f"interrupted ({fault})" in last_line and f"resume={run}" in last_line, last_line
        completed = json.loads((tmp_path / "inject_steps.json").read_text())["completed"]
        saved = saved_steps(run)
        print(
            f"{task}/{loader}: {fault} in step {n}: {completed} steps completed, {saved} saved, "
            f"{completed - sum(saved.values())} lost"
        )
        assert completed - sum(saved.values()) <= 1
    vitexp(f"resume={run}", cwd=tmp_path)
    assert_same_run(run, ref, task)


@pytest.mark.parametrize(
    "task, loader, fault, n",
    [
        ("train", "workers", "step", 7),  # epoch 2, one step after its mid-epoch checkpoint at step 6
        ("train", "device", "SIGUSR1", 6),  # epoch 2, batch 2 of 4, on the device loader (distill's: -m slow)
        ("prune", "workers", "SIGTERM", 11),  # the fine-tuning's first epoch, batch 3 of 4
    ],
)
def test_a_run_stopped_mid_epoch_resumes_to_the_uninterrupted_result(task, loader, fault, n, reference, tmp_path):
    _trial(task, loader, fault, n, reference, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["train", "distill", "prune"])
@pytest.mark.parametrize("trial", range(TRIALS))
def test_random_mid_epoch_stops_resume_to_the_uninterrupted_result(task, trial, reference, tmp_path):
    rng = random.Random(f"step-{task}-{trial}")
    loader = ("workers", "device")[trial % 2]
    fault = FAULTS[trial % len(FAULTS)]
    _, steps = reference(task, loader)
    _trial(task, loader, fault, rng.randint(1, steps), reference, tmp_path)
