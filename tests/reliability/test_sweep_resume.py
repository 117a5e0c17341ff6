"""Sweeps killed half-way and run again with the same command into their folder (`hydra.sweep.dir=<it>`): completed
jobs are kept as they are, the stopped one resumes from its last.pt, the rest run; an Optuna search continues its
study up to n_trials in all. Each trial kills a real sweep (tests/reliability/inject.py) and takes minutes here."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import yaml

from tests import cli
from tests.conftest import vitexp
from vitexp.search import JOURNAL_FILE as STUDY_FILE
from vitexp.search import load_study

# 2 epochs of 3 steps per job
BASE = ["debug=fast", "trainer.device=cpu", "logger=none"]
STEPS_PER_JOB = 6


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under `folder`: its modification time (ns) and bytes."""
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()
    }


def killed(args: list[str], step: int, cwd: Path) -> None:
    """Run `python -m vitexp ARGS`, SIGKILLed before its `step`-th optimizer step (counted over the whole sweep)."""
    proc = cli.run(["step", str(step), *args], cwd, entry="inject")
    assert proc.returncode == -signal.SIGKILL, f"step {step} was not reached:\n{proc.stderr[-3000:]}"


def status(job: Path) -> str | None:
    path = job / "results.json"
    return json.loads(path.read_text())["status"] if path.is_file() else None


@pytest.mark.slow
def test_a_killed_sweep_run_again_keeps_completed_jobs_resumes_the_stopped_one_and_runs_the_rest(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["--multirun", *BASE, "seed=0,1,2,3", f"hydra.sweep.dir={sweep}"]
    killed(args, STEPS_PER_JOB + 4, tmp_path)  # job 1, first step of its second epoch
    assert [status(sweep / j) for j in "01"] == ["completed", None] and not (sweep / "2").exists()
    assert (sweep / "1" / "checkpoints" / "last.pt").is_file()
    job0 = snapshot(sweep / "0")

    other = vitexp(*args[:-2], "seed=0,1,2,4", args[-1], cwd=tmp_path, check=False)  # not the sweep's command
    assert other.returncode == 2 and "seed=0,1,2,3" in other.stderr and not (sweep / "2").exists()
    assert other.stderr.strip().count("\n") == 0, other.stderr

    proc = vitexp(*args, cwd=tmp_path)
    assert [status(sweep / j) for j in "0123"] == ["completed"] * 4
    assert snapshot(sweep / "0") == job0, "the completed job's files changed"
    assert f"{sweep / '0'} completed before" in proc.stderr
    log = (sweep / "1" / "train_baseline.log").read_text()
    assert f"resuming {sweep / '1'} from epoch 1 (step 3)" in log
    assert [row.split(",")[0] for row in (sweep / "1" / "metrics.csv").read_text().splitlines()[1:]] == ["1", "2"]
    for job in "23":  # run from the start, once
        assert "resuming" not in (sweep / job / "train_baseline.log").read_text()
        assert [p.name for p in (sweep / job / ".hydra").iterdir() if p.is_dir()] == []
    overrides = [yaml.safe_load((sweep / j / ".hydra" / "overrides.yaml").read_text()) for j in "0123"]
    assert [o[-1] for o in overrides] == ["seed=0", "seed=1", "seed=2", "seed=3"]


@pytest.mark.slow
def test_a_killed_optuna_search_run_again_ends_with_all_its_trials_in_one_study(tmp_path):
    sweep = tmp_path / "search"
    args = ["hparams_search=optuna", "hydra.sweeper.n_trials=6", *BASE, f"hydra.sweep.dir={sweep}"]
    killed(args, 3 * STEPS_PER_JOB + 4, tmp_path)  # after 3 of 6 trials, inside the second epoch of the fourth
    study = load_study(sweep / STUDY_FILE)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3 + ["RUNNING"]
    done = {j: snapshot(sweep / j) for j in "012"}

    vitexp(*args, cwd=tmp_path)
    study = load_study(sweep / STUDY_FILE)
    assert [t.number for t in study.trials] == list(range(6)), "n_trials counts the trials of earlier starts"
    assert all(t.state.name == "COMPLETE" for t in study.trials)
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == [str(n) for n in range(6)]
    for trial in study.trials:  # trial N ran in job folder N, with its own parameters, and returned its figure
        job = sweep / str(trial.number)
        config = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
        assert config["optim"]["lr"] == trial.params["optim.lr"]
        assert trial.value == json.loads((job / "results.json").read_text())["best_val_acc1"]
    assert len({t.params["optim.lr"] for t in study.trials}) == 6  # the continued search drew new points
    assert {j: snapshot(sweep / j) for j in "012"} == done
    assert "resuming" in (sweep / "3" / "train_baseline.log").read_text()
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == max(t.value for t in study.trials)
