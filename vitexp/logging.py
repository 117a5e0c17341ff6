"""Where metrics go: the run log (one line per epoch), metrics.csv, results.json, plots and, optionally, W&B."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import secrets
from pathlib import Path
from typing import Any

from vitexp import distributed

log = logging.getLogger("vitexp")

EPOCH_FIELDS = ["epoch", "train/loss", "val/loss", "val/acc1", "val/acc5", "lr", "grad_norm", "time/epoch_s",
                "throughput/img_s", "val_ema/acc1", "val/acc1_cls", "val/acc1_dist"]  # fmt: skip


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value and abs(value) < 1e-2:
            return f"{value:.3e}"
        return f"{value:.1f}" if abs(value) >= 100 else f"{value:.4f}"
    return str(value)


# The job's one W&B run, shared by the main run and its sub-runs (a teacher, a model trained to be pruned);
# module state like `wandb.run` itself, opened by `start_wandb` and closed by `finish_wandb`.
_wandb_run = None


def start_wandb(
    run_dir: Path,
    *,
    mode: str,
    project: str,
    entity: str | None,
    group: str | None,
    tags: list[str],
    name: str | None,
    job_type: str,
    config: dict[str, Any],
    run_id: str | None = None,
    init_timeout: float = 60.0,
) -> None:
    """Open the job's W&B run, its files in `run_dir`/wandb; `run_id` continues an earlier run (resume).

    Online mode that cannot reach W&B (no network, no or bad API key) warns once and logs offline instead,
    so training never stops for the dashboard.
    """
    global _wandb_run
    if mode == "disabled":
        return
    import wandb

    finish_wandb(failed=False)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    options = dict(project=project, entity=entity, group=group, tags=tags, job_type=job_type, config=config,
                   dir=str(run_dir), id=run_id or secrets.token_hex(4), resume="allow" if run_id else None,
                   name=None if run_id else name)  # fmt: skip
    try:
        _wandb_run = wandb.init(**options, mode=mode, settings=wandb.Settings(init_timeout=init_timeout))
    except Exception as e:  # wandb raises CommError, UsageError, TimeoutError, ... depending on what failed
        if mode != "online":
            raise
        wandb.teardown()  # releases the run id held by the failed attempt
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        log.warning(
            f"W&B online is not available ({reason}); training goes on and logs offline to {run_dir / 'wandb'}: "
            f"upload it later with: wandb sync {run_dir / 'wandb'}/offline-run-*"
        )
        _wandb_run = wandb.init(**options, mode="offline")


def wandb_run_id() -> str | None:
    """The job's W&B run id (None without W&B), stored in checkpoints so that resume continues that run."""
    return _wandb_run.id if _wandb_run is not None else None


def finish_wandb(failed: bool) -> None:
    """Close the job's W&B run, marked failed when the task raised."""
    global _wandb_run
    if _wandb_run is not None:
        _wandb_run.finish(exit_code=1 if failed else 0)
        _wandb_run = None


def completed(run_dir: Path) -> bool:
    """Whether the run in `run_dir` finished (its results.json says so)."""
    path = Path(run_dir) / "results.json"
    try:
        return json.loads(path.read_text()).get("status") == "completed"
    except (OSError, ValueError):
        return False


class RunLogger:
    """Writes one run's metrics to its folder and to the job's W&B run, if one is open.

    A sub-run (e.g. the teacher trained before distillation) logs to W&B under `prefix` ("teacher/"), with its
    own epoch and step axes, so the job stays one W&B run.
    """

    def __init__(self, run_dir: Path, resume_epoch: int | None = None, prefix: str = "") -> None:
        self.run_dir = Path(run_dir)
        self.csv_path = self.run_dir / "metrics.csv"
        self.prefix = prefix
        self.wandb_run = _wandb_run
        self.main = distributed.is_main()  # under torchrun only rank 0 writes; the others' calls do nothing
        if not self.main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_epoch is not None:
            self._truncate_csv(resume_epoch)
        if self.wandb_run is not None:
            self.wandb_run.define_metric(f"{prefix}epoch")
            self.wandb_run.define_metric(f"{prefix}step")
            for key in EPOCH_FIELDS[1:]:
                self.wandb_run.define_metric(f"{prefix}{key}", step_metric=f"{prefix}epoch")
            self.wandb_run.define_metric(f"{prefix}step/*", step_metric=f"{prefix}step")

    @property
    def tracks_steps(self) -> bool:
        """Whether per-step metrics have somewhere to go (W&B); the run folder keeps one row per epoch."""
        return self.wandb_run is not None

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

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        """Per-step figures (train loss, lr, grad norm over the last log interval), W&B only."""
        if self.main and self.wandb_run is not None:
            p = self.prefix
            self.wandb_run.log({f"{p}step/{k}": v for k, v in metrics.items()} | {f"{p}step": step})

    def log_epoch(self, metrics: dict[str, Any], max_epochs: int) -> None:
        """One line in the log and on the console, one row in metrics.csv, one W&B step."""
        if not self.main:
            return
        parts = [f"epoch {metrics['epoch']}/{max_epochs}"]
        parts += [f"{k} {_fmt(metrics[k])}" for k in EPOCH_FIELDS[1:] if k in metrics]
        log.info(" | ".join(parts))
        self._write_csv([metrics], "a")
        if self.wandb_run is not None:
            self.wandb_run.log({f"{self.prefix}{k}": v for k, v in metrics.items()})

    def log_results(self, results: dict[str, Any]) -> None:
        """results.json in the run folder (one flat object) and the W&B run summary."""
        if not self.main:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in results.items()}
        tmp = self.run_dir / ".results.json.tmp"
        tmp.write_text(json.dumps(clean, indent=2) + "\n")
        tmp.replace(self.run_dir / "results.json")
        if self.wandb_run is not None:
            self.wandb_run.summary.update({f"{self.prefix}{k}": v for k, v in clean.items()})

    def log_checkpoint(self, path: Path, aliases: list[str], metadata: dict[str, Any]) -> None:
        """`path` as a W&B model artifact of this run (uploaded now online, with `wandb sync` offline)."""
        if not self.main or self.wandb_run is None:
            return
        import wandb

        artifact = wandb.Artifact(f"model-{self.wandb_run.id}", type="model", metadata=metadata)
        # W&B stages a copy until it is uploaded (offline: until `wandb sync`); keep it in the run folder
        previous = os.environ.get("WANDB_DATA_DIR")
        os.environ["WANDB_DATA_DIR"] = str(self.run_dir / "wandb")
        try:
            artifact.add_file(str(path))
        finally:
            if previous is None:
                del os.environ["WANDB_DATA_DIR"]
            else:
                os.environ["WANDB_DATA_DIR"] = previous
        self.wandb_run.log_artifact(artifact, aliases=aliases)


def read_metrics(csv_path: Path) -> list[dict[str, float]]:
    """metrics.csv as a list of rows with float values (empty cells dropped)."""
    with Path(csv_path).open(newline="") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]
