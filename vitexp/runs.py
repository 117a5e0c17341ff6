"""The run life cycle, in one place: a command line checked and its run or sweep folder decided before Hydra starts
(`prepare`); the folders runs live in and what an interrupted run left to resume from; what a job records of its
start and whether it continues its folder; the config a resumed run gets (vitexp's own YAML, with only plain values
taken from the run's files); and `start`, the one value every task runs from (`Run`: the config, its typed settings,
the run folder and the resume point)."""

from __future__ import annotations

import copy
import functools
import logging
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ValueType
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from vitexp import VitexpError, checkpoint, distributed, files, schema, tracking
from vitexp.config import config_dir, options, plain, typed, version_base
from vitexp.files import printable
from vitexp.schema import Logger
from vitexp.sweeps import check_command

log = logging.getLogger("vitexp")
MULTIRUN_FLAGS = ("-m", "--multirun")
# Config groups a resumed run takes from its first start; the first six define what the run is and cannot change.
FIXED_ON_RESUME = ("model", "task", "data", "optim", "experiment", "debug")
CARRIED_ON_RESUME = (*FIXED_ON_RESUME, "trainer", "logger")
# Keys through which a config node runs code when instantiated: never taken from a file.
CODE_KEYS = ("_target_", "_partial_", "_args_", "_recursive_", "_convert_")
# Nodes of free-form keyword arguments (timm's): a run's own keys are kept on resume, not checked against vitexp's.
FREE_FORM = ("model.kwargs", "task.teacher.kwargs")
# A folder Hydra is told as an override: as it is when the override grammar reads it so, else quoted.
PLAIN_VALUE = re.compile(r"[\w./+@-]+", re.ASCII)


# -- before Hydra starts: the command line checked, the run or sweep folder decided -------------------------------


def prepare(argv: list[str]) -> list[str]:
    """The command line `@hydra.main` runs, checked: a resumed run's group choices added, a linked folder or a sweep
    folder of other overrides refused, the config composed (a misspelled key, an unknown option, a value of the wrong
    type or out of range refused in one line), and the run's folder (a resumed run's own, or a fresh one) or the
    sweep's decided and added as `hydra.run.dir` / `hydra.sweep.dir`, so that Hydra writes nowhere else."""
    argv = resume_overrides(argv)
    refuse_linked_run_dir(argv)
    check_command(argv)
    overrides = [a for a in argv if a not in MULTIRUN_FLAGS]
    fixed = [_one_job(o) for o in overrides]
    cfg = _compose([o for o in fixed if o is not None])
    if any(a in MULTIRUN_FLAGS for a in argv) or cfg.hydra.mode == RunMode.MULTIRUN:
        # a search group sets hydra.mode, which Hydra 1.4 takes only from the command line or the primary config
        argv = argv if any(a in MULTIRUN_FLAGS for a in argv) else [*argv, "hydra.mode=MULTIRUN"]
        folder = place_sweep(cfg)
        return argv if _named(cfg, "hydra.sweep.dir") else [*argv, _override("hydra.sweep.dir", folder)]
    if fixed != overrides:
        _compose(overrides)  # Hydra's own refusal of a sweep without --multirun, in one line
    _refuse_missing(cfg)
    if not cfg.resume:  # a resumed run's settings come from its saved config, checked as it starts
        schema.check(typed(_without_hydra(cfg)))
    return [*argv, _override("hydra.run.dir", place_run(cfg))]


def _compose(overrides: list[str]) -> DictConfig:
    """The config of these overrides with Hydra's settings, composed by Hydra's compose API."""
    with initialize_config_dir(config_dir=config_dir(), job_name="__main__", **version_base()):
        return compose("config", overrides, return_hydra_config=True)


def _without_hydra(cfg: DictConfig) -> DictConfig:
    """The job's part of a config composed with Hydra's settings, as the job is handed it."""
    job = copy.deepcopy(cfg)
    with open_dict(job):
        del job["hydra"]
    return job


def _one_job(override: str) -> str | None:
    """A sweep's override as its first job's (`a=1,2`: `a=1`); a range the sweeper samples from, or a glob: None.
    Composing the first job refuses a misspelled key or option in a sweep before any job runs, as Hydra's basic
    sweeper would."""
    try:
        (parsed,) = OverridesParser.create().parse_overrides([override])
    except HydraException:
        return override  # Hydra says what it cannot parse as the command is composed
    if not parsed.is_sweep_override():
        return override
    if parsed.value_type not in (ValueType.CHOICE_SWEEP, ValueType.SIMPLE_CHOICE_SWEEP, ValueType.RANGE_SWEEP):
        return None
    first = next(iter(parsed.sweep_string_iterator()), None)
    return None if first is None else f"{parsed.get_key_element()}={first}"


def _override(key: str, folder: Path | str) -> str:
    """`key=<folder>` as Hydra's override grammar reads it back: plain, or quoted (a backslash before a quote, or at
    the end, doubled; a quote escaped)."""
    value = str(folder)
    if "${" in value:  # OmegaConf would read it as an interpolation
        raise VitexpError(f"{printable(value)} holds '${{'; rename the folder or pick another {key}")
    if PLAIN_VALUE.fullmatch(value):
        return f"{key}={value}"
    escaped = re.sub(r"(\\+)('|$)", lambda m: m.group(1) * 2 + m.group(2), value).replace("'", "\\'")
    return f"{key}='{escaped}'"


def _refuse_missing(cfg: DictConfig) -> None:
    """Refuse a new run with a setting still ??? (a resumed run's come from its saved config, checked as it opens)."""
    if cfg.resume:
        return
    for group, node in cfg.items():
        if isinstance(node, DictConfig) and group != "hydra":
            missing = [key for key in node if OmegaConf.is_missing(node, key)]
            if missing:
                raise VitexpError(f"{group}.{missing[0]} must be set: pass {group}.{missing[0]}=...")


def resume_overrides(argv: list[str]) -> list[str]:
    """The command line of a plain run with `resume=<folder>`, plus the group choices the run started with that it
    does not name itself, so that Hydra composes the run's own structure (and task) from vitexp's YAML."""
    resume = next((a.split("=", 1)[1] for a in reversed(argv) if a.startswith("resume=")), None)
    if any(a.startswith("-") for a in argv) or resume in (None, "", "null"):
        return argv
    folder = resume_run_dir(resume)
    # before the job records its start in .hydra/resume_<time>/ and appends to its log: a link would take them elsewhere
    files.refuse_links(folder)
    if not resumable(folder):
        raise VitexpError(
            f"resume={printable(resume)}: no run there (no checkpoints/last.pt, no .hydra/config.yaml); "
            f"pass a run folder vitexp wrote"
        )
    overrides, saved = first_start(folder)
    named = {a.split("=", 1)[0].lstrip("+~") for a in argv}
    return argv + [f"{g}={o}" for g, o in saved_choices(saved, overrides).items() if g not in named]


def place_run(cfg: DictConfig) -> Path:
    """A plain run's folder: a resumed run's own, the named `hydra.run.dir`, or a fresh folder (`<time>_1` when
    another run took `<time>`), claimed by rank 0 alone under torchrun."""
    if cfg.resume:
        folder = resume_run_dir(cfg.resume)
    elif _named(cfg, "hydra.run.dir"):
        folder = Path(cfg.hydra.run.dir)
        _make(folder)
        if not cfg.auto_resume:
            ensure_new_run_dir(folder, before_hydra=True)
    else:
        folder = Path(_claim(cfg.hydra.run.dir) if distributed.is_main() else "")
    return Path(distributed.broadcast(str(folder.resolve() if distributed.launched() else folder)))


def place_sweep(cfg: DictConfig) -> Path:
    """A sweep's folder: the named `hydra.sweep.dir`, or a fresh one (claimed by rank 0 under torchrun); each job,
    composed from the sweep's overrides, goes under it."""
    if _named(cfg, "hydra.sweep.dir"):
        return Path(cfg.hydra.sweep.dir)
    return Path(distributed.broadcast(_claim(cfg.hydra.sweep.dir) if distributed.is_main() else ""))


def _named(cfg: DictConfig, key: str) -> bool:
    return any(o.startswith(f"{key}=") for o in cfg.hydra.overrides.hydra)


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
        return fresh_dir(default)
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


# -- run folders and what they hold --------------------------------------------------------------------------------


def resume_run_dir(resume: str) -> Path:
    """The run folder named by `resume=`: the folder itself, or the one holding checkpoints/last.pt."""
    path = Path(resume).expanduser()
    return path.parent.parent if path.suffix == ".pt" else path


@functools.cache  # one claim per process and path: asked again, the folder it claimed, not a new one
def fresh_dir(path: str) -> str:
    """`path`, created now, or `path_1`, `path_2`, ... when another run took it (two runs in the same second)."""
    candidate, n = Path(path), 0
    while True:
        try:
            candidate.mkdir(parents=True)
            return str(candidate)
        except FileExistsError:
            n += 1
            candidate = Path(f"{path}_{n}")


def output_subdir(resume: str | None, output_dir: str, mode: Any = None, overrides: Any = ()) -> str | None:
    """Where in `output_dir` a job records its start (None: nowhere). A run folder keeps the .hydra/ of its first
    start; each resume (or auto-resume) records its own beside it. A sweep job run again into its folder records
    nothing when the folder holds a completed run (the job is skipped) or another job's (it is refused), nor does a
    folder with a symlink: that folder stays as it was."""
    folder = Path(output_dir)
    try:
        files.refuse_links(folder)
    except VitexpError:  # the record would go through the link: the job itself refuses the folder, in one line
        return None
    if not resume and getattr(mode, "name", mode) == "MULTIRUN":
        try:
            if earlier_job(folder, [str(o) for o in overrides]) is not None:
                return None
        except VitexpError:  # another job's, or unreadable: refused by the job itself, with the reason
            return None
    again = resume or (folder / ".hydra" / "config.yaml").is_file()
    return f".hydra/resume_{datetime.now():%Y-%m-%d_%H-%M-%S}" if again else ".hydra"


def ensure_new_run_dir(path: Path, *, before_hydra: bool = False) -> None:
    """A new run never writes over an existing one (checked again `before_hydra` writes its .hydra/ there)."""
    if resumable(path) if before_hydra else (path / "checkpoints").exists():
        raise VitexpError(f"{path} already holds a run; continue it with resume={path} or pick a new hydra.run.dir")


def resumable(folder: Path) -> bool:
    """Whether `folder` holds a run that `resume=` can continue: one with checkpoints/last.pt, or one stopped
    before its first checkpoint (its first start's .hydra/config.yaml is there; a distill or prune run may be
    inside its teacher or unpruned sub-run)."""
    return (folder / "checkpoints" / "last.pt").is_file() or (folder / ".hydra" / "config.yaml").is_file()


def started(folder: Path) -> bool:
    """Whether a run (or one of its sub-runs) in `folder` has written a checkpoint: a requeued job continues it."""
    return (folder / "checkpoints" / "last.pt").is_file() or bool(_sub_run_checkpoints(folder))


def _sub_run_checkpoints(folder: Path) -> list[Path]:
    return sorted(folder.glob("*/checkpoints/last.pt"))


def other_job(folder: Path, overrides: list[str]) -> list[str] | None:
    """The first-start overrides of the run `folder` holds when they are not `overrides` (in any order): another
    job's run. None when they are the same, or the folder holds none."""
    path = folder / ".hydra" / "overrides.yaml"
    if not (path.is_file() or path.is_symlink()):  # a link is refused as it is read, not taken for no run
        return None
    theirs = _first_overrides(folder)
    return theirs if sorted(theirs) != sorted(overrides) else None


def earlier_job(folder: Path, overrides: list[str], *, metric: str | None = None) -> dict[str, Any] | None:
    """What an earlier start of this sweep job left in `folder` when it completed: the numbers of its results.json
    (what goes back to the sweep), `metric` among them when named. Else None, and the job runs again: a stopped or
    failed start, or a results.json that is half-written, not a JSON object or not a completed run's (a folder never
    used is started). A folder that holds a run started with other `overrides` belongs to another job: refused."""
    theirs = other_job(folder, overrides)
    if theirs is not None:
        raise VitexpError(
            f"{printable(folder)} holds a run of {printable(' '.join(theirs) or 'no overrides')}, not of this job's "
            f"{printable(' '.join(overrides) or 'no overrides')}; continue a sweep with the command it started with, "
            f"or pick a new hydra.sweep.dir"
        )
    path = folder / "results.json"
    if not (path.is_file() or path.is_symlink()):
        return None
    try:
        results = files.read_json(path, root=folder)
    except (OSError, files.Malformed):  # garbage or half-written: that start did not complete (a link is refused)
        return None
    if not isinstance(results, dict) or results.get("status") != "completed":
        return None
    numbers = {
        k: v for k, v in results.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }
    return numbers if metric is None or metric in numbers else None


def _read_yaml(path: Path, what: str) -> Any:
    """A YAML file as plain data (safe loader: no tags, no objects)."""
    try:
        return files.read_yaml(path)
    except OSError as e:
        raise VitexpError(f"{printable(path)} is unreadable ({printable(e.strerror)}); {what}") from None
    except VitexpError as e:
        raise VitexpError(f"{e}; {what}") from None


@dataclass
class ResumePoint:
    """What an interrupted run left: its folder, its last.pt (None when stopped before its first checkpoint), and
    its config and first start's overrides as plain, untrusted data (never instantiated or resolved as read)."""

    folder: Path
    last: checkpoint.TrainingState | None
    config: dict[str, Any]
    overrides: list[str]
    wandb_run_id: str | None


def first_start(folder: Path) -> tuple[list[str], dict[str, Any]]:
    """A run's first-start overrides, or, in a folder without them, its saved config (both untrusted data)."""
    if os.path.lexists(folder / ".hydra" / "overrides.yaml"):
        return _first_overrides(folder), {}
    point = resume_point(folder)
    return point.overrides, point.config


def _first_overrides(folder: Path) -> list[str]:
    """The overrides of the run's first start (none in a folder without .hydra/), checked to be a list of strings."""
    path = folder / ".hydra" / "overrides.yaml"
    if not (path.exists() or path.is_symlink()):  # a FIFO or folder there is refused by the reader, not skipped
        return []
    try:
        value = files.read_yaml(path, root=folder)
    except OSError as e:
        raise VitexpError(
            f"{printable(path)} is unreadable ({printable(e.strerror)}); start the run again instead"
        ) from None
    except VitexpError as e:
        raise VitexpError(f"{e}; start the run again instead") from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise VitexpError(
            f"resume={printable(folder)}: its .hydra/overrides.yaml is not a list of overrides; start the run again"
        )
    return value


def resume_point(folder: Path) -> ResumePoint:
    """Read what `folder` holds to resume from: last.pt if there is one, else its first start's .hydra/ files (its
    sub-runs, a teacher or an unpruned model, continue from their own last.pt)."""
    last_pt, subs = folder / "checkpoints" / "last.pt", _sub_run_checkpoints(folder)
    last = checkpoint.load_training_state(last_pt) if last_pt.is_file() else None
    overrides = _first_overrides(folder)
    if last is not None:
        config, run_id = last.config, last.wandb_run_id
    else:
        config = _read_yaml(folder / ".hydra" / "config.yaml", "start the run again instead")
        # sub-runs log to the job's W&B run
        run_id = checkpoint.load(subs[-1]).get(checkpoint.WANDB_RUN_ID) if subs else None
    if not isinstance(config, dict):
        raise VitexpError(f"resume={folder}: its saved config is not a vitexp config; start the run again instead")
    safe_id = isinstance(run_id, str) and re.fullmatch(r"[A-Za-z0-9_-]{1,64}", run_id)
    return ResumePoint(folder, last, config, overrides, run_id if safe_id else None)


# -- a job: its folder, its start, the run it opens -----------------------------------------------------------------


def run_dir() -> Path:
    """This job's output folder, as Hydra made it."""
    return Path(HydraConfig.get().runtime.output_dir)


def continues_its_folder(cfg: DictConfig) -> bool:
    """Whether this job continues what its folder already holds: a sweep job run again into its sweep's folder, or a
    job requeued with `auto_resume` (`resume=` names the run to continue itself)."""
    return not cfg.resume and (cfg.auto_resume or HydraConfig.get().mode == RunMode.MULTIRUN)


def command_line() -> list[str]:
    """This job's overrides (the command line's, and a sweep's for this job)."""
    return list(HydraConfig.get().overrides.task)


def record_start(cfg: DictConfig) -> None:
    """Write the job's .hydra/ (config, Hydra's settings, overrides): a first start's in .hydra/, each later start
    (resume, requeue, a sweep run again) beside it in .hydra/resume_<time>/; nothing for a folder the job leaves
    as it was (a completed sweep job, another job's folder, a symlink). Rank 0 only."""
    hydra_cfg = HydraConfig.get()
    subdir = output_subdir(cfg.resume, hydra_cfg.runtime.output_dir, hydra_cfg.mode, command_line())
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
        earlier = earlier_job(run_dir(), command_line())
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


@dataclass(frozen=True)
class Run:
    """What a task runs from: the job's config (a resumed run's own), its typed settings (typed once and checked, as
    the job starts), its folder, the last.pt it continues from (None for a new run, or one stopped before its first
    checkpoint), and what `fit` calls after each epoch (a search trial's report to its pruner; None otherwise)."""

    cfg: DictConfig
    settings: schema.Config
    out: Path
    last: checkpoint.TrainingState | None = None
    after_epoch: Callable[[int, dict[str, Any]], None] | None = None


def start(cfg: DictConfig, after_epoch: Callable[[int, dict[str, Any]], None] | None = None) -> Run:
    """This job's run: a new one in a fresh folder, or the run it continues (`resume=`, a requeued job with
    `auto_resume`, a sweep job run again) with its own saved settings merged in and the last.pt it left (read once);
    its settings checked against the schema; the job's W&B run opened."""
    out, folder = run_dir(), _continued(cfg)
    if folder is None:
        settings = typed(cfg)
        schema.check(settings)
        ensure_new_run_dir(out)
        start_tracking(cfg, out)
        return Run(cfg, settings, out, None, after_epoch)
    point = resume_point(folder)
    cfg, settings = _resumed(cfg, point.config, point.overrides, str(folder))
    start_tracking(cfg, out, point.wandb_run_id)
    return Run(cfg, settings, out, point.last, after_epoch)


def _continued(cfg: DictConfig) -> Path | None:
    """The folder of the run this job continues, if any."""
    if cfg.resume:
        return resume_run_dir(cfg.resume)
    out = run_dir()
    return out if continues_its_folder(cfg) and started(out) else None


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


# -- the config of a resumed run ----------------------------------------------------------------------------------


def saved_choices(config: dict[str, Any], overrides: list[str]) -> dict[str, str]:
    """The group choices a run started with: from its first start's overrides, or, in a folder without them, from
    the names its config records. Only options of vitexp's own groups count; anything else in the files is ignored."""
    choices = {}
    for override in overrides:
        group, _, option = override.partition("=")
        if group in CARRIED_ON_RESUME and option in options(group):
            choices[group] = option
    if not overrides:
        for group in ("task", "model", "data"):
            name = config.get(group, {}).get("name") if isinstance(config.get(group), dict) else None
            if name in options(group):
                choices[group] = name
    return choices


def resumed(
    cfg: DictConfig, saved: dict[str, Any], overrides: list[str], source: str, command: list[str] | None = None
) -> DictConfig:
    """The config of a resumed run (`_resumed`'s), checked."""
    return _resumed(cfg, saved, overrides, source, command)[0]


def _resumed(
    cfg: DictConfig, saved: dict[str, Any], overrides: list[str], source: str, command: list[str] | None = None
) -> tuple[DictConfig, schema.Config]:
    """The config of a resumed run: `cfg` (composed from vitexp's YAML with the run's group choices and this command
    line) with the plain values of the run's `saved` config on top, except the keys this command line changes.

    The file is data: a `_target_` (or another key that runs code) that differs from vitexp's own, a node vitexp
    does not have that holds one, or an interpolation is refused with one line naming the key; nothing is built.
    Returned with its typed settings, checked against the schema."""
    started_with = saved_choices(saved, overrides)
    changed = []
    for override in command_line() if command is None else command:
        key, _, option = override.partition("=")
        key = key.lstrip("+~")
        if key in ("resume", "auto_resume") or key.startswith("hydra") or override in overrides:
            continue
        if key in FIXED_ON_RESUME and started_with.get(key) != option:
            raise VitexpError(f"{override} cannot change on resume; start a new run (with ckpt_path=...) instead")
        if started_with.get(key) != option:
            changed.append(key)
    ours = OmegaConf.to_container(cfg, resolve=False)
    _overlay(ours, saved, "", changed, source)
    merged = cfg.copy()
    try:
        merged.merge_with(ours)  # the schema refuses a value of the wrong type
        for key in FREE_FORM:  # replaced, not merged: the run's own arguments, as it ran
            if (value := _at(ours, key)) is not _ABSENT:
                OmegaConf.update(merged, key, value, merge=False)
        OmegaConf.resolve(merged)
        settings = typed(merged)
        schema.check(settings)
    except OmegaConfBaseException as e:
        first = str(e.msg).splitlines()[0] if str(e.msg).strip() else type(e).__name__
        raise VitexpError(
            f"cannot resume from {printable(source)}: {printable(e.full_key)}: {printable(first)}"
        ) from None
    except VitexpError as e:
        raise VitexpError(f"cannot resume from {printable(source)}: {printable(e, 1000)}") from None
    OmegaConf.set_struct(merged, True)
    return merged, settings


def _refuse(source: str, key: str, why: str) -> VitexpError:
    return VitexpError(
        f"refused to resume from {printable(source)}: {printable(key, 120)} {printable(why, 120)}; a run folder is "
        f"data, never code. Start a new "
        f"run (ckpt_path=<its best.pt> keeps the weights, which load as tensors only)"
    )


def _check_data(value: Any, key: str, source: str) -> None:
    """Refuse a value from a file that holds a key that runs code or an interpolation, at any depth."""
    if isinstance(value, dict):
        for k, v in value.items():
            if k in CODE_KEYS:
                raise _refuse(source, f"{key}.{k}", "would name code to run, which vitexp's own config does not")
            _check_data(v, f"{key}.{k}", source)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_data(v, f"{key}[{i}]", source)
    elif isinstance(value, str) and "${" in value:
        raise _refuse(source, key, f"holds an interpolation ({value[:40]}) that vitexp's own config does not")
    elif not (value is None or isinstance(value, (bool, int, float, str))):
        raise _refuse(source, key, f"holds a {type(value).__name__}, not plain data")


def _overlay(ours: dict, theirs: dict, path: str, changed: list[str], source: str) -> None:
    """Copy the plain values of `theirs` (a file's config) into `ours` (composed from vitexp's YAML), in place."""
    for key, value in theirs.items():
        where = f"{path}{key}"
        if not isinstance(key, str):
            raise _refuse(source, f"{path}{key!r}", "is not a config key")
        if where in ("resume", "auto_resume") or any(where == k or where.startswith(f"{k}.") for k in changed):
            continue
        mine = ours.get(key, _ABSENT)
        if key in CODE_KEYS:
            if value != mine:
                raise _refuse(source, where, "names code to run that vitexp's own config does not")
        elif where in FREE_FORM and isinstance(value, dict):
            _check_data(value, where, source)
            ours[key] = value
        elif isinstance(value, dict) and isinstance(mine, dict):
            _overlay(mine, value, f"{where}.", changed, source)
        elif isinstance(value, str) and "${" in value and value == mine:
            continue  # the same interpolation as vitexp's own YAML (a first start's .hydra/config.yaml)
        else:
            _check_data(value, where, source)
            if mine is _ABSENT:
                raise VitexpError(
                    f"cannot resume from {printable(source)}: {printable(where)} is not a setting of this vitexp's "
                    f"config; the run was "
                    f"written by another version, start a new run (ckpt_path=<its best.pt> keeps the weights)"
                )
            ours[key] = value


def _at(config: dict, key: str) -> Any:
    """The value at dotted `key` of a plain config, or _ABSENT."""
    for part in key.split("."):
        if not isinstance(config, dict) or part not in config:
            return _ABSENT
        config = config[part]
    return config


_ABSENT = object()
