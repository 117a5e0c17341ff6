"""A run folder's records: one log line and one metrics.csv row per epoch, and results.json (mirrored to W&B)."""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import Any

from vitexp import distributed, tracking

log = logging.getLogger("vitexp")

EPOCH_FIELDS = ["epoch", "train/loss", "val/loss", "val/acc1", "val/acc5", "lr", "grad_norm", "time/epoch_s",
                "throughput/img_s", "val_ema/acc1", "val/acc1_cls", "val/acc1_dist"]  # fmt: skip


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value and abs(value) < 1e-2:
            return f"{value:.3e}"
        return f"{value:.1f}" if abs(value) >= 100 else f"{value:.4f}"
    return str(value)


def completed(run_dir: Path) -> bool:
    """Whether the run in `run_dir` finished (its results.json says so)."""
    path = Path(run_dir) / "results.json"
    try:
        return json.loads(path.read_text()).get("status") == "completed"
    except (OSError, ValueError):
        return False


def write_results(run_dir: Path, results: dict[str, Any], prefix: str = "") -> None:
    """results.json in the run folder (one flat object, written atomically) and the W&B run summary; rank 0 only."""
    if not distributed.is_main():
        return
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in results.items()}
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / ".results.json.tmp"
    tmp.write_text(json.dumps(clean, indent=2) + "\n")
    tmp.replace(run_dir / "results.json")
    tracking.summarize({f"{prefix}{k}": v for k, v in clean.items()})


def read_metrics(csv_path: Path) -> list[dict[str, float]]:
    """metrics.csv as a list of rows with float values (empty cells dropped)."""
    with Path(csv_path).open(newline="") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


class EpochLog:
    """One (sub-)run's epoch records: the log line, the metrics.csv row and the W&B step.

    A sub-run (e.g. the teacher trained before distillation) logs to W&B under `prefix` ("teacher/"), with its
    own epoch and step axes, so the job stays one W&B run. Rows past `resume_epoch` (written by an interrupted
    attempt) are dropped, since those epochs run again.
    """

    def __init__(self, run_dir: Path, resume_epoch: int = 0, prefix: str = "") -> None:
        self.csv_path = Path(run_dir) / "metrics.csv"
        self.prefix = prefix
        self.main = distributed.is_main()  # under torchrun only rank 0 writes; the others' calls do nothing
        if not self.main:
            return
        self.csv_path.parent.mkdir(parents=True, exist_ok=True)
        if self.csv_path.exists():
            with self.csv_path.open(newline="") as f:
                kept = [row for row in csv.DictReader(f) if int(row["epoch"]) <= resume_epoch]
            self._write_csv(kept, "w")
        tracking.define_axes(prefix, EPOCH_FIELDS[1:])

    def _write_csv(self, rows: list[dict[str, Any]], mode: str) -> None:
        new = mode == "w" or not self.csv_path.exists()
        with self.csv_path.open(mode, newline="") as f:
            writer = csv.DictWriter(f, fieldnames=EPOCH_FIELDS, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerows(rows)

    def step(self, step: int, metrics: dict[str, float]) -> None:
        """Per-step figures (train loss, lr, grad norm over the last log interval), W&B only."""
        if self.main:
            tracking.log_metrics(
                {f"{self.prefix}step/{k}": v for k, v in metrics.items()} | {f"{self.prefix}step": step}
            )

    def epoch(self, metrics: dict[str, Any], max_epochs: int) -> None:
        """One line in the log and on the console, one row in metrics.csv, one W&B step."""
        if not self.main:
            return
        parts = [f"epoch {metrics['epoch']}/{max_epochs}"]
        parts += [f"{k} {_fmt(metrics[k])}" for k in EPOCH_FIELDS[1:] if k in metrics]
        log.info(" | ".join(parts))
        self._write_csv([metrics], "a")
        tracking.log_metrics({f"{self.prefix}{k}": v for k, v in metrics.items()})
