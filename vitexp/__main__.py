"""`python -m vitexp`: one `@hydra.main`. The command line is checked and its run or sweep folder decided before
Hydra starts (`vitexp.runs.prepare`); each job runs its task and returns the sweep metric."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib
import logging
import sys
from collections.abc import Callable, Iterator
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from vitexp import VitexpError, distributed, hardware, runs, search, stop, tracking
from vitexp.config import config_dir, hydra_settings, register_resolvers
from vitexp.files import printable
from vitexp.records import completed, write_results
from vitexp.sweeps import register_sweeper

log = logging.getLogger("vitexp")
# The word a schema field's type gives in a one-line error.
TYPE_WORDS = {float: "a number", int: "a whole number", bool: "true or false", str: "text"}


def _job(cfg: DictConfig) -> float | str | None:
    """One job: its folder checked and recorded, its config checked, its task run; the sweep metric returned."""
    stop.install()  # again here: a submitit job runs this function alone, and its requeue handler is chained
    hardware.keep_freed_memory()
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
        with _trial(cfg) as after_epoch, _long_lived_frozen():
            results = task.run(runs.start(cfg, after_epoch))
        failed = False
    except search.Pruned as e:
        failed = False
        log.info(f"trial pruned after epoch {e.epoch} (best val/acc1 {e.best:.4f})")
        write_results(runs.run_dir(), {"task": name, "status": "pruned", "epochs": e.epoch, "best_val_acc1": e.best})
        return search.PRUNED
    except VitexpError as e:
        _job_failed(name, e)
        return None  # the other jobs of a sweep go on; this one is marked failed in its results.json
    except KeyboardInterrupt as e:
        where = runs.run_dir()
        since = "its last checkpoint" if (where / "checkpoints" / "last.pt").exists() else "where it stopped"
        log.error(f"interrupted ({str(e) or 'SIGINT'}); continue from {since} with: python -m vitexp resume={where}")
        sys.exit(130)
    finally:
        # one W&B run per job, closed (as failed when it raised) before the next starts
        tracking.finish_wandb(failed=failed)
    return results.get(task.SWEEP_METRIC, results.get("val_acc1"))


def _trial(cfg: DictConfig) -> Any:
    """A search trial's report of its epochs to the study's pruner (None for other jobs), as `fit`'s epoch callback."""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN or cfg.resume:
        return contextlib.nullcontext()
    return search.reporting(hydra_cfg.sweeper, hydra_cfg.sweep.dir, hydra_cfg.job.num)


@contextlib.contextmanager
def _long_lived_frozen() -> Iterator[None]:
    """The job with the objects the imports and the config left (most of the process's) frozen out of the cyclic
    garbage collector's reach, as Python advises for a process that forks: no collection walks them during training,
    in a loader worker (which shares their memory pages until one is written) or at exit (1.2 s at exit alone with
    torch and timm imported). `main` keeps the collector off until here. A job of a sweep run in this process hands
    them back and collects after itself, so the next job does not freeze this one's garbage."""
    gc.freeze()
    gc.enable()
    try:
        yield
    finally:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            gc.unfreeze()
            gc.collect()


def _job_failed(name: str, e: VitexpError) -> None:
    """Log a job's refusal in one line and record it; a sweep goes on, a plain run exits 2."""
    # raised in a DataLoader worker, it comes back with the worker's traceback: keep the message alone
    message = str(e).rsplit("VitexpError: ", 1)[-1].strip() if "Original Traceback" in str(e) else str(e)
    log.error(f"error: {message}")
    if not completed(runs.run_dir()):  # a finished run's results stand (a refused resume of it changes nothing)
        write_results(runs.run_dir(), {"task": name, "status": "failed", "error": message})
    if HydraConfig.get().mode != RunMode.MULTIRUN:
        sys.exit(2)


def app() -> Callable[[], Any]:
    """The `@hydra.main` of vitexp: Hydra's own command line (--multirun, --cfg, --help, shell completion), runs,
    sweeps and callbacks, with vitexp's config and trusted targets (`vitexp.config.hydra_settings`)."""
    return hydra.main(config_path=config_dir(), config_name="config", **hydra_settings())(_job)


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


def main() -> None:
    """Console entry point (`vitexp`, `python -m vitexp`): a command that runs is checked and placed first (one
    line and exit 2 for a bad one, before any folder is written), then Hydra runs it."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    gc.disable()  # the imports and the composition build long-lived objects: no collection walks them (see _job)
    stop.install()
    register_resolvers()
    register_sweeper()
    argv = sys.argv[1:]
    if not any(a.startswith("-") and a not in runs.MULTIRUN_FLAGS for a in argv):  # --cfg, --help: Hydra's alone
        distributed.init()  # under torchrun, rank 0 picks the run folder for all
        try:
            sys.argv = [sys.argv[0], *runs.prepare(argv)]  # hydra.main reads the command line from sys.argv
        except VitexpError as e:
            _refuse(str(e))
        except (HydraException, OmegaConfBaseException) as e:
            _refuse(_one_line(e))
    app()()


def _refuse(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
