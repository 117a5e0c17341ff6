"""The job's one Weights & Biases run: opened per run or sweep job, shared by its sub-runs, closed at the end."""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path
from typing import Any

from vitexp import files
from vitexp.schema import Logger

log = logging.getLogger("vitexp")

# The job's W&B run, shared by the main run and its sub-runs (a teacher, a model trained to be pruned); module
# state like `wandb.run` itself, opened by `start_wandb` and closed by `finish_wandb`.
_wandb_run = None


def start_wandb(
    run_dir: Path, logger: Logger, *, job_type: str, config: dict[str, Any], run_id: str | None = None
) -> None:
    """Open the job's W&B run as `logger` says, its files in `run_dir`/wandb; `run_id` continues an earlier run
    (resume).

    Online mode that cannot reach W&B (no network, no or bad API key) warns once and logs offline instead,
    so training never stops for the dashboard.
    """
    global _wandb_run
    mode = logger.mode
    if mode == "disabled":
        return
    import wandb

    finish_wandb(failed=False)
    run_dir = Path(run_dir)
    files.make_folder(run_dir / "wandb", root=run_dir)  # wandb writes its files there: a link would take them away
    options = dict(
        project=logger.project,
        entity=logger.entity,
        group=logger.group,
        tags=list(logger.tags),
        job_type=job_type,
        config=config,
        dir=str(run_dir),
        id=run_id or secrets.token_hex(4),
        resume="allow" if run_id else None,
        name=None if run_id else logger.name,
    )
    try:
        _wandb_run = wandb.init(**options, mode=mode, settings=wandb.Settings(init_timeout=logger.init_timeout))
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


def finish_wandb(*, failed: bool) -> None:
    """Close the job's W&B run, marked failed when the task raised."""
    global _wandb_run
    if _wandb_run is not None:
        _wandb_run.finish(exit_code=1 if failed else 0)
        _wandb_run = None


def active() -> bool:
    """Whether a W&B run is open (per-step figures have somewhere to go)."""
    return _wandb_run is not None


def define_axes(prefix: str, epoch_keys: list[str]) -> None:
    """Epoch figures against `<prefix>epoch`, per-step ones against `<prefix>step` (a sub-run has its own axes)."""
    if _wandb_run is None:
        return
    _wandb_run.define_metric(f"{prefix}epoch")
    _wandb_run.define_metric(f"{prefix}step")
    for key in epoch_keys:
        _wandb_run.define_metric(f"{prefix}{key}", step_metric=f"{prefix}epoch")
    _wandb_run.define_metric(f"{prefix}step/*", step_metric=f"{prefix}step")


def log_metrics(metrics: dict[str, Any]) -> None:
    """One W&B step of figures (nothing without a run)."""
    if _wandb_run is not None:
        _wandb_run.log(metrics)


def log_images(key: str, images: list[tuple[Any, str]]) -> None:
    """Images (H x W x 3 uint8 arrays) with their captions as one W&B step under `key` (nothing without a run)."""
    if _wandb_run is not None:
        import wandb

        _wandb_run.log({key: [wandb.Image(image, caption=caption) for image, caption in images]})


def summarize(figures: dict[str, Any]) -> None:
    """Final figures into the run summary."""
    if _wandb_run is not None:
        _wandb_run.summary.update(figures)


def log_checkpoint(path: Path, aliases: list[str], metadata: dict[str, Any]) -> None:
    """`path` as a W&B model artifact of this run (uploaded now online, with `wandb sync` offline)."""
    if _wandb_run is None:
        return
    import wandb

    artifact = wandb.Artifact(f"model-{_wandb_run.id}", type="model", metadata=metadata)
    # W&B stages a copy until it is uploaded (offline: until `wandb sync`); keep it in the run folder
    previous = os.environ.get("WANDB_DATA_DIR")
    os.environ["WANDB_DATA_DIR"] = str(files.make_folder(path.parents[1] / "wandb", root=path.parents[1]))
    try:
        artifact.add_file(str(path))
    finally:
        if previous is None:
            del os.environ["WANDB_DATA_DIR"]
        else:
            os.environ["WANDB_DATA_DIR"] = previous
    _wandb_run.log_artifact(artifact, aliases=aliases)


def run_name(task: str, model: str, overrides: list[str]) -> str:
    """A readable run name: task, model and what the command line changed (`train-baseline-optim.lr=0.001`)."""
    shown = [
        o
        for o in overrides
        if o.split("=", 1)[0].lstrip("+~") not in ("task", "model", "resume", "logger")
        and not o.lstrip("+~").startswith(("hydra.", "logger."))
    ]
    return "-".join([task, model, *shown])[:128]
