"""task=train: train a model on a data set, keep best/last/periodic checkpoints, report."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from vitexp.runs import open_run
from vitexp.tasks.recipe import read_recipe
from vitexp.training import fit

SWEEP_METRIC = "best_val_acc1"  # what a sweep job returns to Hydra's sweeper


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train `cfg.model` on `cfg.data`; returns the figures written to results.json."""
    run = open_run(cfg)
    return fit(read_recipe(run.cfg), run.out, run.last)
