"""trainer.early_stopping: Lightning's rule epoch by epoch, a run that stops completed with its epoch and reason, the
counter in the checkpoint so that a resumed run stops where an uninterrupted one does, and the settings checked."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch

from tests.conftest import TINY, compose_config, metric_rows, vitexp
from vitexp import VitexpError, checkpoint, early_stopping
from vitexp.config import validate
from vitexp.schema import EarlyStopping
from vitexp.tasks.recipe import read_recipe
from vitexp.training import fit

# val/loss must fall by more than 10 (it never does): the first epoch sets the best, the run stops after 1 + patience
NEVER_BETTER = ["trainer.early_stopping.monitor=val/loss", "trainer.early_stopping.min_delta=10"]


def _run(settings: EarlyStopping, values: list[float]) -> list[tuple[int, bool]]:
    state, seen = {}, []
    for epoch, value in enumerate(values, 1):
        state = early_stopping.update(settings, state, {"val/loss": value, "val/acc1": 0.5}, epoch)
        seen.append((state["wait"], state["reason"] is not None))
    return seen


def test_an_improvement_is_a_change_beyond_min_delta_in_modes_direction():
    # by hand, as Lightning counts: min mode, min_delta 0.1, patience 2
    settings = EarlyStopping(monitor="val/loss", mode="min", patience=2, min_delta=0.1)
    assert _run(settings, [1.0, 0.95, 0.85, 0.9, 0.8]) == [(0, False), (1, False), (0, False), (1, False), (2, True)]
    rising = EarlyStopping(monitor="val/loss", mode="max", patience=1, min_delta=0.0)
    assert _run(rising, [1.0, 1.5, 1.5]) == [(0, False), (0, False), (1, True)]  # equal is no improvement
    assert _run(rising, [float("nan"), 1.0]) == [(1, True), (0, False)]  # NaN never improves
    off = EarlyStopping(monitor=None, mode="min", patience=1, min_delta=0.0)
    assert early_stopping.update(off, {}, {"val/loss": 1.0}, 1) == {}
    with pytest.raises(VitexpError, match=r"monitor=val_ema/acc1 is not a figure this run logs \(val/loss, val/acc1\)"):
        early_stopping.update(EarlyStopping("val_ema/acc1", "max", 1, 0.0), {}, {"val/loss": 1.0, "val/acc1": 0.5}, 1)


@pytest.fixture(scope="module")
def recipe():
    """The tiny recipe for up to 6 epochs, stopping after 2 epochs without a fall of val/loss by 10."""
    return read_recipe(
        compose_config(*TINY, "trainer.max_epochs=6", *NEVER_BETTER, "trainer.early_stopping.patience=2")
    )


@pytest.fixture(scope="module")
def stopped(recipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("stopped")
    return out, fit(recipe, out)


def test_a_run_stops_completed_with_the_epoch_and_the_reason(stopped, caplog):
    out, results = stopped
    assert results["status"] == "completed" and results["epochs"] == 3 and results["stopped_early"] is True
    assert results["stop_reason"].startswith("val/loss did not fall by more than 10.0 for 2 epochs (best ")
    assert json.loads((out / "results.json").read_text())["stop_reason"] == results["stop_reason"]
    assert len(metric_rows(out / "metrics.csv")) == 3
    last = checkpoint.load(out / "checkpoints" / "last.pt")
    assert last["epoch"] == 3 and last["early_stopping"]["wait"] == 2 and last["early_stopping"]["best_epoch"] == 1


def test_a_run_interrupted_before_it_stops_resumes_and_stops_at_the_same_epoch(recipe, stopped, tmp_path, monkeypatch):
    def interrupt(epoch: int, metrics: dict) -> None:
        if epoch == 2:  # the counter is at 1: without it in the checkpoint, the resumed run would stop at epoch 4
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(recipe, tmp_path, after_epoch=interrupt)
    results = fit(recipe, tmp_path, checkpoint.load_training_state(tmp_path / "checkpoints" / "last.pt"))
    reference, theirs = stopped
    assert results["epochs"] == 3 and results["stop_reason"] == theirs["stop_reason"]
    assert metric_rows(tmp_path / "metrics.csv") == metric_rows(reference / "metrics.csv")
    ours, uninterrupted = (checkpoint.load(f / "checkpoints" / "last.pt") for f in (tmp_path, reference))
    assert all(torch.equal(ours["model"][k], uninterrupted["model"][k]) for k in uninterrupted["model"])
    # resumed from the checkpoint of the epoch it stopped at, it trains no further
    again = fit(recipe, tmp_path, checkpoint.load_training_state(tmp_path / "checkpoints" / "last.pt"))
    assert again["epochs"] == 3 and len(metric_rows(tmp_path / "metrics.csv")) == 3


def test_off_by_default_and_the_settings_are_checked(caplog):
    settings = compose_config(*TINY).trainer.early_stopping
    assert settings.monitor is None
    bad = {
        "monitor=val/acc2": "monitor='val/acc2' is not valid: it must be null (off) or one of val/loss",
        "mode=up": "mode='up' is not valid: choose one of min, max",
        "patience=0": "patience=0 is not valid: it must be a whole number >= 1",
        "min_delta=-1": "min_delta=-1.0 is not valid: it must be a number >= 0",
    }
    for override, message in bad.items():
        with pytest.raises(VitexpError, match="^" + re.escape(f"trainer.early_stopping.{message}")):
            validate(compose_config(*TINY, f"trainer.early_stopping.{override}"))


def test_the_log_says_where_and_why(tmp_path, caplog):
    recipe = read_recipe(
        compose_config(*TINY, "trainer.max_epochs=3", *NEVER_BETTER, "trainer.early_stopping.patience=1")
    )
    with caplog.at_level(logging.INFO, logger="vitexp"):
        results = fit(recipe, tmp_path)
    assert results["epochs"] == 2
    assert "stopped early at epoch 2: val/loss did not fall by more than 10.0 for 1 epochs" in caplog.text


def test_a_search_trial_stopped_early_is_a_completed_trial_with_its_best_value(tmp_path):
    from vitexp.search import JOURNAL_FILE, load_study

    sweep = tmp_path / "search"
    args = ["--multirun", "hparams_search=optuna", "hydra.sweeper.n_trials=2", *TINY, "trainer.max_epochs=4"]
    vitexp(*args, *NEVER_BETTER, "trainer.early_stopping.patience=1", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    study = load_study(sweep / JOURNAL_FILE)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    for trial in study.trials:
        results = json.loads((sweep / str(trial.number) / "results.json").read_text())
        assert results["status"] == "completed" and results["stopped_early"] and results["epochs"] == 2
        assert trial.value == results["best_val_acc1"]
