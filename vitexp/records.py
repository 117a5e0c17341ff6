"""A run folder's records: one log line and one metrics.csv row per epoch, and results.json (mirrored to W&B)."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from pathlib import Path
from typing import Any

from vitexp import VitexpError, distributed, files, tracking
from vitexp.files import printable

log = logging.getLogger("vitexp")

EPOCH_FIELDS = [
    "epoch",
    "train/loss",
    "val/loss",
    "val/acc1",
    "val/acc5",
    "lr",
    "grad_norm",
    "time/epoch_s",
    "throughput/img_s",
    "val_ema/acc1",
    "val/acc1_cls",
    "val/acc1_dist",
]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value and abs(value) < 1e-2:
            return f"{value:.3e}"
        return f"{value:.1f}" if abs(value) >= 100 else f"{value:.4f}"
    return str(value)


def completed(run_dir: Path) -> bool:
    """Whether the run in `run_dir` finished (its results.json, a real file in it, says so)."""
    try:
        results = files.read_json(Path(run_dir) / "results.json", root=run_dir)
    except (OSError, VitexpError):
        return False
    return isinstance(results, dict) and results.get("status") == "completed"


def write_results(run_dir: Path, results: dict[str, Any], prefix: str = "", root: Path | None = None) -> None:
    """results.json in the run folder (one flat object, through the one writer) and the W&B run summary; rank 0
    only. `root`: the job's run folder when `run_dir` is a sub-run's."""
    if not distributed.is_main():
        return
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in results.items()}
    files.write_text(Path(run_dir) / "results.json", json.dumps(clean, indent=2) + "\n", root or run_dir)
    tracking.summarize({f"{prefix}{k}": v for k, v in clean.items()})


def read_metrics(csv_path: Path, root: Path | None = None) -> list[dict[str, float]]:
    """metrics.csv as a list of rows with float values (empty cells and unknown columns dropped); a symlink or a
    cell that is not a number is refused with one line."""
    reader, rows = csv.DictReader(io.StringIO(files.read_text(csv_path, root), newline="")), []
    try:
        for row in reader:
            rows.append({k: float(v) for k, v in row.items() if k in EPOCH_FIELDS and v not in ("", None)})
            epoch = rows[-1].get("epoch", -1.0)
            if not (epoch >= 0 and epoch.is_integer()):
                raise ValueError("no epoch number")
    except (TypeError, ValueError, csv.Error):
        where = f"{printable(csv_path)} line {reader.line_num}"
        raise VitexpError(
            f"{where} holds a value that is not a number (or no epoch); metrics.csv holds numbers only: move it away "
            f"to start its records afresh"
        ) from None
    return rows


class EpochLog:
    """One (sub-)run's epoch records: the log line, the metrics.csv row and the W&B step.

    A sub-run (e.g. the teacher trained before distillation) logs to W&B under `prefix` ("teacher/"), with its
    own epoch and step axes, so the job stays one W&B run. Rows past `resume_epoch` (written by an interrupted
    attempt) are dropped, since those epochs run again. metrics.csv is rewritten whole through the one writer at
    each epoch (a few hundred rows at most): a link planted there is replaced, never written through.
    """

    def __init__(self, run_dir: Path, resume_epoch: int = 0, prefix: str = "", root: Path | None = None) -> None:
        self.csv_path = Path(run_dir) / "metrics.csv"
        self.root = Path(root or run_dir)
        self.prefix = prefix
        self.main = distributed.is_main()  # under torchrun only rank 0 writes; the others' calls do nothing
        self.rows: list[dict[str, Any]] = []
        if not self.main:
            return
        if self.csv_path.exists() or self.csv_path.is_symlink():
            self.rows = [r for r in read_metrics(self.csv_path, self.root) if r["epoch"] <= resume_epoch]
            self._write_csv()
        tracking.define_axes(prefix, EPOCH_FIELDS[1:])

    def _write_csv(self) -> None:
        # a row read back holds floats: its epoch is written as the integer it was, the others as they were
        rows = ({**row, "epoch": int(row["epoch"])} for row in self.rows)
        files.write_csv(self.csv_path, EPOCH_FIELDS, rows, self.root)

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
        self.rows.append(metrics)
        self._write_csv()
        tracking.log_metrics({f"{self.prefix}{k}": v for k, v in metrics.items()})
