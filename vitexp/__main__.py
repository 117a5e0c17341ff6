"""`python -m vitexp`: compose the config once, place the run, run the task, return the sweep metric."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import sys
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from vitexp import VitexpError, distributed, runs, search, stop, tracking
from vitexp.config import config_dir, register_resolvers, resume_overrides, run_dir
from vitexp.files import printable
from vitexp.records import completed, write_results
from vitexp.sweeps import check_command, register_sweeper

log = logging.getLogger("vitexp")
MULTIRUN_FLAGS = ("-m", "--multirun")
# The word a schema field's type gives in a one-line error.
TYPE_WORDS = {float: "a number", int: "a whole number", bool: "true or false", str: "text"}


def _job(cfg: DictConfig) -> float | str | None:
    """One job: its folder checked and recorded, its config checked, its task run; the sweep metric returned."""
    stop.install()  # again here: a submitit job runs this function alone, and its requeue handler is chained
    distributed.from_slurm()
    distributed.init()
    if not distributed.is_main():
        logging.getLogger("vitexp").setLevel(logging.WARNING)  # rank 0 speaks for the run; others only warn
    failed = True
    name = HydraConfig.get().runtime.choices["task"]  # one of conf/task/*.yaml: the module of that name runs
    task = importlib.import_module(f"vitexp.tasks.{name}")
    earlier = runs.completed_before(cfg)
    if earlier is not None:
        return earlier.get(task.SWEEP_METRIC, earlier.get("val_acc1"))
    runs.refuse_linked_folder(cfg)
    try:
        runs.record_start(cfg)
        with _trial(cfg):
            results = task.run(runs.job_config(cfg))
        failed = False
    except search.Pruned as e:
        failed = False
        log.info(f"trial pruned after epoch {e.epoch} (best val/acc1 {e.best:.4f})")
        write_results(run_dir(), {"task": name, "status": "pruned", "epochs": e.epoch, "best_val_acc1": e.best})
        return search.PRUNED
    except VitexpError as e:
        _job_failed(name, e)
        return None  # the other jobs of a sweep go on; this one is marked failed in its results.json
    except KeyboardInterrupt as e:
        where = run_dir()
        since = "its last checkpoint" if (where / "checkpoints" / "last.pt").exists() else "where it stopped"
        log.error(f"interrupted ({str(e) or 'SIGINT'}); continue from {since} with: python -m vitexp resume={where}")
        sys.exit(130)
    finally:
        # one W&B run per job, closed (as failed when it raised) before the next starts
        tracking.finish_wandb(failed=failed)
    return results.get(task.SWEEP_METRIC, results.get("val_acc1"))


def _trial(cfg: DictConfig) -> Any:
    """A search trial's report of its epochs to the study's pruner (nothing for other jobs)."""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN or cfg.resume:
        return contextlib.nullcontext()
    return search.reporting(hydra_cfg.sweeper, hydra_cfg.sweep.dir, hydra_cfg.job.num)


def _job_failed(name: str, e: VitexpError) -> None:
    """Log a job's refusal in one line and record it; a sweep goes on, a plain run exits 2."""
    # raised in a DataLoader worker, it comes back with the worker's traceback: keep the message alone
    message = str(e).rsplit("VitexpError: ", 1)[-1].strip() if "Original Traceback" in str(e) else str(e)
    log.error(f"error: {message}")
    if not completed(run_dir()):  # a finished run's results stand (a refused resume of it changes nothing)
        write_results(run_dir(), {"task": name, "status": "failed", "error": message})
    if HydraConfig.get().mode != RunMode.MULTIRUN:
        sys.exit(2)


# --cfg, --help, --info, ...: Hydra's own command line
_main = hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")(_job)


def _preflight(argv: list[str]) -> None:
    """What a command line is refused for before its config is composed: a named run folder holding a symlink
    (Hydra would write .hydra/ and the log through it)."""
    runs.refuse_linked_run_dir(argv)


def _one_line(e: Exception) -> str:
    """A composition error in one line, from the fields Hydra and OmegaConf give it."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    cause = e.__cause__
    if isinstance(e, MissingConfigException) and e.missing_cfg_file:
        return f"no config '{printable(e.missing_cfg_file)}'; choose one of: {', '.join(e.options or [])}"
    if isinstance(e, OverrideParseException):
        reason = e.message.splitlines()[0] if e.message else "not an override"
        return f"cannot parse {printable(e.override)}: {printable(reason)}"
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and cause.full_key:
        return f"{cause.full_key} is not a config key (misspelled?); list the keys with: python -m vitexp --cfg job"
    if isinstance(cause, ValidationError) and cause.full_key:
        return f"{cause.full_key}={cause.value!r} must be {_type_word(cause)}; pass one"
    lines = [*str(e).splitlines(), *str(cause or "").splitlines()[:1]]
    return " ".join(line.strip() for line in lines if line.strip())


def _type_word(error: Any) -> str:
    """What a schema field holds, in a word or two (the field's declared type)."""
    fields = dataclasses.fields(error.object_type) if dataclasses.is_dataclass(error.object_type) else ()
    kind = next((f.type for f in fields if f.name == error.key), None)
    kind = {"float": float, "int": int, "bool": bool, "str": str}.get(kind, kind) if isinstance(kind, str) else kind
    return TYPE_WORDS.get(kind, f"of type {printable(kind)}")


def _compose(argv: list[str]) -> tuple[Any, DictConfig, RunMode]:
    """The config of a command line, composed once, with its run or sweep folder decided in it."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_automatic_config_search_path

    search = create_automatic_config_search_path(None, "vitexp.__main__", config_dir())
    app = Hydra.create_main_hydra2(task_name="__main__", config_search_path=search)
    multirun = any(a in MULTIRUN_FLAGS for a in argv)
    overrides = [a for a in argv if a not in MULTIRUN_FLAGS]
    cfg = app.compose_config(
        "config", overrides, run_mode=RunMode.MULTIRUN if multirun else RunMode.RUN, from_shell=True
    )
    mode = runs.settle_mode(cfg, multirun=multirun)
    if mode == RunMode.RUN:
        _refuse_missing(cfg)
        runs.place_run(cfg)
    else:
        runs.place_sweep(cfg)
    return app, cfg, mode


def _refuse_missing(cfg: DictConfig) -> None:
    """Refuse a new run with a setting still ??? (a resumed run's come from its saved config, checked as it opens)."""
    if cfg.resume:
        return
    for group, node in cfg.items():
        if isinstance(node, DictConfig):
            missing = [key for key in node if OmegaConf.is_missing(node, key)]
            if missing:
                raise VitexpError(f"{group}.{missing[0]} must be set: pass {group}.{missing[0]}=...")


def _run(app: Any, cfg: DictConfig) -> None:
    """Hydra's run of one job, with the config composed already."""
    from hydra._internal.callbacks import Callbacks
    from hydra.core.utils import run_job
    from hydra.types import HydraContext

    callbacks = Callbacks(cfg)
    callbacks.on_run_start(config=cfg, config_name="config")
    context = HydraContext(config_loader=app.config_loader, callbacks=callbacks)
    ret = run_job(
        hydra_context=context, task_function=_job, config=cfg, job_dir_key="hydra.run.dir", job_subdir_key=None
    )
    callbacks.on_run_end(config=cfg, config_name="config", job_return=ret)
    _ = ret.return_value  # raises what the job raised


def _sweep(app: Any, cfg: DictConfig) -> None:
    """Hydra's sweep, with the sweep's config composed already (each job is composed by the launcher)."""
    from hydra._internal.callbacks import Callbacks
    from hydra.core.plugins import Plugins
    from hydra.types import HydraContext
    from omegaconf import OmegaConf

    callbacks = Callbacks(cfg)
    callbacks.on_multirun_start(config=cfg, config_name="config")
    context = HydraContext(config_loader=app.config_loader, callbacks=callbacks)
    sweeper = Plugins.instance().instantiate_sweeper(config=cfg, hydra_context=context, task_function=_job)
    sweeper.sweep(arguments=OmegaConf.to_container(cfg.hydra.overrides.task, resolve=False))
    callbacks.on_multirun_end(config=cfg, config_name="config")


def main() -> None:
    """Console entry point (`vitexp`, `python -m vitexp`)."""
    from hydra._internal.utils import run_and_report
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    stop.install()
    register_resolvers()
    register_sweeper()
    argv = sys.argv[1:]
    if any(a.startswith("-") and a not in MULTIRUN_FLAGS for a in argv):
        _main()  # --cfg, --help, ...: Hydra's own handling
        return
    distributed.init()  # under torchrun, rank 0 picks the run folder for all
    try:
        argv = resume_overrides(argv)  # a resumed run is composed with the group choices it started with
        _preflight(argv)
        check_command(argv)
        app, cfg, mode = _compose(argv)
    except VitexpError as e:
        _refuse(str(e))
    except (HydraException, OmegaConfBaseException) as e:
        _refuse(_one_line(e))
    run_and_report(lambda: (_run if mode == RunMode.RUN else _sweep)(app, cfg))


def _refuse(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
