"""task=train: train a model on a data set, keep best/last/periodic checkpoints, report."""

from __future__ import annotations

from typing import Any

from vitexp.runs import Run
from vitexp.tasks.recipe import read_recipe
from vitexp.training import fit

SWEEP_METRIC = "best_val_acc1"  # what a sweep job returns to Hydra's sweeper


def run(run: Run) -> dict[str, Any]:
    """Train `model` on `data`; returns the figures written to results.json."""
    recipe = read_recipe(run.cfg, settings=run.settings)
    return fit(recipe, run.out, run.last, after_epoch=run.after_epoch)
