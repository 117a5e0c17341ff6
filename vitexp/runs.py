"""The run life cycle: where a run or sweep goes (decided once the config is composed, before Hydra starts the job),
what a job records of its start, whether it continues its folder, and the run a task opens (new, resumed, requeued)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from vitexp import VitexpError, distributed, files, rundir, tracking
from vitexp.config import command_line, continues_its_folder, plain, resumed, run_dir, validate
from vitexp.files import printable
from vitexp.schema import Logger

log = logging.getLogger("vitexp")


def settle_mode(cfg: DictConfig, *, multirun: bool) -> RunMode:
    """The mode a composed command runs in, recorded in `cfg` as Hydra records it: the config's own (a search
    sets MULTIRUN), else MULTIRUN with `--multirun` and RUN without."""
    mode = cfg.hydra.mode
    if mode is None or (multirun and mode == RunMode.RUN):
        mode = RunMode.MULTIRUN if multirun else RunMode.RUN
        _set_hydra(cfg, "mode", mode)
        _add_override(cfg, f"hydra.mode={mode.name}")  # each job of a sweep is composed with it
    return mode


def place_run(cfg: DictConfig) -> Path:
    """Decide a plain run's folder in `cfg`: a resumed run's own, the named `hydra.run.dir`, or a fresh folder
    (`<time>_1` when another run took `<time>`), claimed by rank 0 alone under torchrun."""
    if cfg.resume:
        folder = rundir.resume_run_dir(cfg.resume)
    elif _named(cfg, "hydra.run.dir"):
        folder = Path(cfg.hydra.run.dir)
        _make(folder)
        if not cfg.auto_resume:
            rundir.ensure_new_run_dir(folder, before_hydra=True)
    else:
        folder = Path(_claim(cfg.hydra.run.dir) if distributed.is_main() else "")
    folder = Path(distributed.broadcast(str(folder.resolve() if distributed.launched() else folder)))
    _set_hydra(cfg, "run.dir", str(folder))
    return folder


def place_sweep(cfg: DictConfig) -> Path:
    """Decide a sweep's folder in `cfg` (the named `hydra.sweep.dir`, or a fresh one), recorded as an override so
    that each job, composed from the sweep's overrides, goes under it."""
    if _named(cfg, "hydra.sweep.dir"):
        return Path(cfg.hydra.sweep.dir)
    folder = str(distributed.broadcast(_claim(cfg.hydra.sweep.dir) if distributed.is_main() else ""))
    _set_hydra(cfg, "sweep.dir", folder)
    _add_override(cfg, f"hydra.sweep.dir={folder}")
    return Path(folder)


def _named(cfg: DictConfig, key: str) -> bool:
    return any(o.startswith(f"{key}=") for o in cfg.hydra.overrides.hydra)


def _add_override(cfg: DictConfig, override: str) -> None:
    with read_write(cfg.hydra):
        cfg.hydra.overrides.hydra.append(override)


def _set_hydra(cfg: DictConfig, key: str, value: Any) -> None:
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        OmegaConf.update(cfg.hydra, key, value, merge=False)


def _make(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise VitexpError(
            f"cannot create {printable(folder)} ({e.strerror}); run from a writable folder or pick a writable "
            f"hydra.run.dir"
        ) from None


def _claim(default: str) -> str:
    try:
        return rundir.fresh_dir(default)
    except OSError as e:
        raise VitexpError(
            f"cannot create {printable(default)} ({e.strerror}); run from a writable folder or pick a writable "
            f"hydra.run.dir"
        ) from None


def refuse_linked_run_dir(argv: list[str]) -> None:
    """Refuse a `hydra.run.dir=` on the command line that holds a symlink, before anything is written there."""
    named = [a.split("=", 1)[1] for a in argv if a.startswith("hydra.run.dir=")]
    if named:
        files.refuse_links(Path(named[-1]))


def record_start(cfg: DictConfig) -> None:
    """Write the job's .hydra/ (config, Hydra's settings, overrides): a first start's in .hydra/, each later start
    (resume, requeue, a sweep run again) beside it in .hydra/resume_<time>/; nothing for a folder the job leaves
    as it was (a completed sweep job, another job's folder, a symlink). Rank 0 only."""
    hydra_cfg = HydraConfig.get()
    subdir = rundir.output_subdir(cfg.resume, hydra_cfg.runtime.output_dir, hydra_cfg.mode, command_line())
    if subdir is None or not distributed.is_main():
        return
    out = run_dir()
    records = {
        "config.yaml": cfg,
        "hydra.yaml": HydraConfig.instance().cfg,
        "overrides.yaml": hydra_cfg.overrides.task,
    }
    for name, node in records.items():
        files.write_text(out / subdir / name, OmegaConf.to_yaml(node), root=out)


def completed_before(cfg: DictConfig) -> dict | None:
    """The results of this sweep job's own earlier start when it completed (a sweep run again into its folder): the
    job is then skipped. Refuses, exit 2, a folder that holds another job's run. Either way the folder is left as it
    was: these lines go to the console only, not to the job's log."""
    if cfg.resume or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    try:
        earlier = rundir.earlier_job(run_dir(), command_line())
    except VitexpError as e:
        console_only()
        log.error(f"error: {e}")
        raise SystemExit(2) from None
    if earlier is not None:
        console_only()
        log.info(f"{run_dir()} completed before: kept as it is, its results returned to the sweep")
    return earlier


def refuse_linked_folder(cfg: DictConfig) -> None:
    """A job that continues what its folder holds (requeued with `auto_resume`, a sweep job run again) refuses, exit
    2, a folder with a symlink in it before it writes there; the line goes to the console only: the log may be the
    link."""
    if not continues_its_folder(cfg):
        return
    try:
        files.refuse_links(run_dir())
    except VitexpError as e:
        console_only()
        log.error(f"error: {e}")
        raise SystemExit(2) from None


def console_only() -> None:
    """Close the job's log file: what follows goes to the console alone."""
    for handler in logging.getLogger().handlers[:]:  # Hydra configures the next job's logging afresh
        if isinstance(handler, logging.FileHandler):
            logging.getLogger().removeHandler(handler)
            handler.close()


@dataclass
class Run:
    """A run about to start or continue: its config (a resumed run's own), its folder, and the loaded last.pt it
    continues from (None for a new run, or one stopped before its first checkpoint)."""

    cfg: DictConfig
    out: Path
    last: dict[str, Any] | None


# The resume point each job read for its config, taken by the task as it opens the run: last.pt is read once.
_points: dict[Path, rundir.ResumePoint] = {}


def job_config(cfg: DictConfig) -> DictConfig:
    """The config this job runs with, checked against the schema: a run that continues (`resume=`, a requeued job
    with `auto_resume`, a sweep job run again) gets its own saved values, merged into this one."""
    folder = _continued(cfg)
    if folder is not None:
        point = rundir.resume_point(folder)
        _points[folder] = point
        cfg = resumed(cfg, point.config, point.overrides, str(folder))
    validate(cfg)
    return cfg


def _continued(cfg: DictConfig) -> Path | None:
    """The folder of the run this job continues, if any."""
    if cfg.resume:
        return rundir.resume_run_dir(cfg.resume)
    out = run_dir()
    return out if continues_its_folder(cfg) and rundir.started(out) else None


def open_run(cfg: DictConfig) -> Run:
    """This job's run (`cfg` from `job_config`): a new one in a fresh folder, or the interrupted run it continues,
    with the last.pt it left; opens the job's W&B run."""
    out = run_dir()
    folder = _continued(cfg)
    if folder is None:
        rundir.ensure_new_run_dir(out)
        start_tracking(cfg, out)
        return Run(cfg, out, None)
    if folder not in _points:  # a task run on its own, not as a job of `python -m vitexp`
        cfg = job_config(cfg)
    point = _points.pop(folder)
    start_tracking(cfg, out, point.wandb_run_id)
    return Run(cfg, out, point.last)


def start_tracking(cfg: DictConfig, out: Path, run_id: str | None = None) -> None:
    """Open the job's W&B run (unless `logger.mode` is disabled; rank 0 only): named from the task, model and
    command-line overrides, grouped by sweep, with the resolved config; `run_id` continues a resumed run's."""
    if not distributed.is_main():
        return
    hydra_cfg = HydraConfig.get()
    sweep = Path(hydra_cfg.sweep.dir).name if hydra_cfg.mode == RunMode.MULTIRUN else None
    logger: Logger = OmegaConf.to_object(cfg.logger)
    logger = replace(
        logger,
        group=logger.group or (f"sweep-{sweep}" if sweep else None),
        name=logger.name or tracking.run_name(cfg.task.name, cfg.model.name, command_line()),
    )
    tracking.start_wandb(out, logger, job_type=cfg.task.name, config=plain(cfg), run_id=run_id)
