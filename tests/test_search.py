"""Optuna searches on Optuna's own storage: two workers sharing one study, a worker killed and started again, and
trials stopped early by a pruner."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import TINY, vitexp
from vitexp.search import JOURNAL_FILE, load_study

PRUNER = "hydra.sweeper.pruner={_target_:optuna.pruners.MedianPruner,n_startup_trials:2}"


def search_args(sweep: Path, *extra: str) -> list[str]:
    return ["hparams_search=optuna", "hydra.sweeper.n_trials=8", *TINY, *extra, f"hydra.sweep.dir={sweep}"]


def worker(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    """`python -m vitexp ARGS` started in a process of its own (its output in `log`)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, "-m", "vitexp", *args], cwd=cwd, env=env, stdout=out, stderr=out)


def finished(procs: list[subprocess.Popen], logs: list[Path]) -> None:
    for proc, log in zip(procs, logs):
        assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]


def assert_one_study_of_8(sweep: Path) -> list:
    """The study holds trials 0 to 7, each completed once, with distinct parameters, trial N in job folder N."""
    study = load_study(sweep / JOURNAL_FILE)
    assert [t.number for t in study.trials] == list(range(8))
    assert all(t.state.name == "COMPLETE" for t in study.trials)
    assert len({t.params["optim.lr"] for t in study.trials}) == 8
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == [str(n) for n in range(8)]
    for trial in study.trials:
        job = sweep / str(trial.number)
        results = json.loads((job / "results.json").read_text())
        assert results["status"] == "completed" and results["best_val_acc1"] == trial.value
        lr = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())["optim"]["lr"]
        assert lr == trial.params["optim.lr"]
    return study.trials


def test_two_workers_share_one_study_of_8_trials(tmp_path):
    sweep = tmp_path / "search"
    args = search_args(sweep, "trainer.max_epochs=1")
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [worker(args, tmp_path, log) for log in logs]
    finished(procs, logs)
    assert_one_study_of_8(sweep)
    assert all("Launching 1 jobs locally" in log.read_text() for log in logs), "each worker ran trials"


@pytest.mark.slow
def test_a_worker_killed_mid_trial_and_started_again_finishes_its_trial(tmp_path):
    sweep = tmp_path / "search"
    args = search_args(sweep, "trainer.max_epochs=6")
    first = worker(args, tmp_path, tmp_path / "killed.log")
    last = sweep / "0" / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 300
    while not last.exists() and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert not (sweep / "0" / "results.json").exists(), "trial 0 ended before the kill"
    logs = [tmp_path / "again.log", tmp_path / "other.log"]
    finished([worker(args, tmp_path, log) for log in logs], logs)
    assert_one_study_of_8(sweep)
    epochs = [line.split(",")[0] for line in (sweep / "0" / "metrics.csv").read_text().splitlines()[1:]]
    assert epochs == [str(e) for e in range(1, 7)], "trial 0 went on from its checkpoint, each epoch once"
    assert any(p.name.startswith("resume_") for p in (sweep / "0" / ".hydra").iterdir())
    assert sum("\t#0 : " in log.read_text() for log in logs) == 1, "trial 0 ran once more, in one worker"


def test_a_pruner_stops_the_trials_of_learning_rates_far_too_large(tmp_path):
    sweep = tmp_path / "search"
    lrs = "optim.lr=choice(0.001,0.003,5.0,20.0)"  # half of them far too large
    args = ["--multirun", *search_args(sweep, "trainer.max_epochs=4", lrs, PRUNER), "hydra.sweeper.n_trials=12"]
    vitexp(*args, cwd=tmp_path)
    study = load_study(sweep / JOURNAL_FILE)
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    early = [t for t in pruned if max(t.intermediate_values) < 4]
    assert len(study.trials) == 12 and early, [t.state.name for t in study.trials]
    # the pruned trials are mostly the bad learning rates (a median pruner may stop a slow good one too)
    bad = {t.number for t in study.trials if t.params["optim.lr"] in (5.0, 20.0)}
    good = {t.number for t in study.trials} - bad
    share = {
        name: len({t.number for t in pruned} & group) / max(len(group), 1)
        for name, group in (("bad", bad), ("good", good))
    }
    assert bad and good and share["bad"] > share["good"], share
    assert study.best_trial.params["optim.lr"] in (0.001, 0.003)
    for trial in pruned:
        results = json.loads((sweep / str(trial.number) / "results.json").read_text())
        assert results["status"] == "pruned" and results["epochs"] == max(trial.intermediate_values)
    report = subprocess.run(
        [sys.executable, "-m", "vitexp.report", str(sweep)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert report.returncode == 0 and "pruned" in report.stdout, report.stderr
    print(f"{len(pruned)} of 12 trials pruned, {len(early)} before their last epoch")


@pytest.mark.parametrize("sweeps", ["1e-3,3e-3"])
def test_a_search_space_on_the_command_line_takes_the_place_of_the_configs(sweeps):
    from tests.conftest import compose_config
    from vitexp.search import declared_search

    node = compose_config("hparams_search=optuna", hydra=True).hydra.sweeper
    search = declared_search(
        node.params, [f"optim.lr={sweeps}", "model.drop_path_rate=0.1", "seed=range(0,6,2)"], "s", "maximize"
    )
    assert search.space["optim.lr"].choices == (1e-3, 3e-3)
    assert (search.space["seed"].low, search.space["seed"].high, search.space["seed"].step) == (0, 4, 2)
    assert search.space["optim.weight_decay"].high == 0.1 and "model.drop_path_rate" not in search.space
    assert search.fixed == {"model.drop_path_rate": "0.1"}
