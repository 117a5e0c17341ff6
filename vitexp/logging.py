"""Where metrics go: the run log (one line per epoch), metrics.csv, results.json, plots and, optionally, W&B."""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger("vitexp")

EPOCH_FIELDS = ["epoch", "train/loss", "val/loss", "val/acc1", "val/acc5", "lr", "grad_norm", "time/epoch_s",
                "throughput/img_s", "val_ema/acc1", "val/acc1_cls", "val/acc1_dist"]  # fmt: skip


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value and abs(value) < 1e-2:
            return f"{value:.3e}"
        return f"{value:.1f}" if abs(value) >= 100 else f"{value:.4f}"
    return str(value)


class RunLogger:
    """Writes one run's metrics to its folder and, when `wandb_mode` is not "disabled", to Weights & Biases."""

    def __init__(
        self,
        run_dir: Path,
        config: dict[str, Any],
        resume_epoch: int | None = None,
        wandb_mode: str = "disabled",
        wandb_project: str = "vitexp",
        wandb_entity: str | None = None,
        wandb_group: str | None = None,
        wandb_tags: list[str] | None = None,
        wandb_name: str | None = None,
        wandb_id: str | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.run_dir / "metrics.csv"
        self.wandb_run = None
        if resume_epoch is not None:
            self._truncate_csv(resume_epoch)
        if wandb_mode != "disabled":
            import wandb

            self.wandb_run = wandb.init(
                project=wandb_project, entity=wandb_entity, group=wandb_group, tags=wandb_tags, name=wandb_name,
                config=config, dir=str(self.run_dir), mode=wandb_mode, id=wandb_id, resume="allow" if wandb_id else None,
            )  # fmt: skip

    @property
    def wandb_id(self) -> str | None:
        """The W&B run id, stored in checkpoints so that a resumed run continues the same W&B run."""
        return self.wandb_run.id if self.wandb_run is not None else None

    def _truncate_csv(self, last_epoch: int) -> None:
        # Rows past the checkpoint's epoch were written by the interrupted run and will be written again.
        if not self.csv_path.exists():
            return
        with self.csv_path.open(newline="") as f:
            rows = [row for row in csv.DictReader(f) if int(row["epoch"]) <= last_epoch]
        self._write_csv(rows, "w")

    def _write_csv(self, rows: list[dict[str, Any]], mode: str) -> None:
        new = mode == "w" or not self.csv_path.exists()
        with self.csv_path.open(mode, newline="") as f:
            writer = csv.DictWriter(f, fieldnames=EPOCH_FIELDS, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerows(rows)

    def log_epoch(self, metrics: dict[str, Any], max_epochs: int) -> None:
        """One line in the log and on the console, one row in metrics.csv, one W&B step."""
        parts = [f"epoch {metrics['epoch']}/{max_epochs}"]
        parts += [f"{k} {_fmt(metrics[k])}" for k in EPOCH_FIELDS[1:] if k in metrics]
        log.info(" | ".join(parts))
        self._write_csv([metrics], "a")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in metrics.items() if k != "epoch"} | {"epoch": metrics["epoch"]})

    def log_results(self, results: dict[str, Any]) -> None:
        """results.json in the run folder (one flat object) and the W&B run summary."""
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in results.items()}
        tmp = self.run_dir / ".results.json.tmp"
        tmp.write_text(json.dumps(clean, indent=2) + "\n")
        tmp.replace(self.run_dir / "results.json")
        if self.wandb_run is not None:
            self.wandb_run.summary.update(clean)

    def finish(self, failed: bool = False) -> None:
        """Close the W&B run, marking it failed when the task raised."""
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=1 if failed else 0)
            self.wandb_run = None


def read_metrics(csv_path: Path) -> list[dict[str, float]]:
    """metrics.csv as a list of rows with float values (empty cells dropped)."""
    with Path(csv_path).open(newline="") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]
