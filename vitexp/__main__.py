"""`python -m vitexp`: compose the config with Hydra, run the task, return the sweep metric."""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from vitexp import VitexpError, distributed, files, stop, tracking
from vitexp.config import (
    command_line,
    config_dir,
    continues_its_folder,
    register_resolvers,
    resume_overrides,
    run_dir,
    validate,
)
from vitexp.files import printable
from vitexp.records import completed, write_results
from vitexp.rundir import earlier_job, ensure_new_run_dir
from vitexp.sweeps import check_command, register_sweeper

log = logging.getLogger("vitexp")


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def _main(cfg: DictConfig) -> float | None:
    stop.install()  # again here: a submitit job runs this function alone, and its requeue handler is chained
    distributed.from_slurm()
    distributed.init()
    if not distributed.is_main():
        logging.getLogger("vitexp").setLevel(logging.WARNING)  # rank 0 speaks for the run; others only warn
    failed = True
    name = HydraConfig.get().runtime.choices["task"]  # one of conf/task/*.yaml: the module of that name runs
    task = importlib.import_module(f"vitexp.tasks.{name}")
    earlier = _completed_before(cfg)
    if earlier is not None:
        return earlier.get(task.SWEEP_METRIC, earlier.get("val_acc1"))
    _refuse_linked_folder(cfg)
    try:
        if not cfg.resume:  # (a resumed run's config is checked when its saved values are in: open_run)
            validate(cfg)  # again here: sweep jobs and launchers do not pass through _preflight
        results = task.run(cfg)
        failed = False
    except VitexpError as e:
        # raised in a DataLoader worker, it comes back with the worker's traceback: keep the message alone
        message = str(e).rsplit("VitexpError: ", 1)[-1].strip() if "Original Traceback" in str(e) else str(e)
        log.error(f"error: {message}")
        if not completed(run_dir()):  # a finished run's results stand (a refused resume of it changes nothing)
            write_results(run_dir(), {"task": name, "status": "failed", "error": message})
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            return None  # the other jobs of the sweep go on; this one is marked failed in its results.json
        sys.exit(2)
    except KeyboardInterrupt as e:
        where = run_dir()
        since = "its last checkpoint" if (where / "checkpoints" / "last.pt").exists() else "where it stopped"
        log.error(f"interrupted ({str(e) or 'SIGINT'}); continue from {since} with: python -m vitexp resume={where}")
        sys.exit(130)
    finally:
        tracking.finish_wandb(failed)  # one W&B run per job, closed (as failed when it raised) before the next starts
    return results.get(task.SWEEP_METRIC, results.get("val_acc1"))


def _completed_before(cfg: DictConfig) -> dict | None:
    """The results of this sweep job's own earlier start when it completed (a sweep run again into its folder): the
    job is then skipped. Refuses, exit 2, a folder that holds another job's run. Either way the folder is
    left as it was: these lines go to the console only, not to the job's log."""
    if cfg.resume or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    try:
        earlier = earlier_job(run_dir(), command_line())
    except VitexpError as e:
        _console_only()
        log.error(f"error: {e}")
        sys.exit(2)
    if earlier is not None:
        _console_only()
        log.info(f"{run_dir()} completed before: kept as it is, its results returned to the sweep")
    return earlier


def _refuse_linked_folder(cfg: DictConfig) -> None:
    """A job that continues what its folder holds (requeued with `auto_resume`, a sweep job run again) refuses, exit 2,
    a folder with a symlink in it before it writes there; the line goes to the console only: the log may be the link."""
    if not continues_its_folder(cfg):
        return
    try:
        files.refuse_links(run_dir())
    except VitexpError as e:
        _console_only()
        log.error(f"error: {e}")
        sys.exit(2)


def _console_only() -> None:
    for handler in logging.getLogger().handlers[:]:  # Hydra configures the next job's logging afresh
        if isinstance(handler, logging.FileHandler):
            logging.getLogger().removeHandler(handler)
            handler.close()


def _preflight(argv: list[str]) -> None:
    """Compose a plain run's config before Hydra does, to turn composition errors into one line."""
    if any(arg.startswith("-") for arg in argv):
        return  # --multirun, --cfg, --help, ...: Hydra's own handling
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose(config_name="config", overrides=argv)
    except OverrideParseException as e:
        raise VitexpError(f"cannot parse {printable(_unparsable(argv))}: {printable(_one_line(e))}") from None
    except (HydraException, OmegaConfBaseException) as e:
        raise VitexpError(_one_line(e)) from None
    missing = [f"{group}.{key}" for group, node in cfg.items() if isinstance(node, DictConfig)
               for key in node if OmegaConf.is_missing(node, key)]  # fmt: skip
    if not cfg.resume:  # a resumed run's values (data.root, ...) come from its saved config, checked as it opens
        if missing:
            raise VitexpError(f"{missing[0]} must be set: pass {missing[0]}=...")
        validate(cfg)
    explicit = [a.split("=", 1)[1] for a in argv if a.startswith("hydra.run.dir=")]
    folder = Path(explicit[-1] if explicit else "outputs")  # a new run goes there (Hydra would create it next)
    if explicit:  # Hydra writes .hydra/ and appends the log there next, through any link; a requeued job's too
        files.refuse_links(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise VitexpError(f"cannot create {printable(folder)} ({e.strerror}); run from a writable folder or pick a "
                          f"writable hydra.run.dir") from None  # fmt: skip
    if explicit and not (cfg.resume or cfg.auto_resume):
        ensure_new_run_dir(folder, before_hydra=True)


def _unparsable(argv: list[str]) -> str:
    """The first command-line override Hydra's grammar rejects."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    for arg in argv:
        try:
            parser.parse_override(arg)
        except HydraException:
            return arg
    return " ".join(argv)


def _one_line(e: Exception) -> str:
    text = f"{e}\n{e.__cause__ or ''}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "Could not find" in text and "Available options" in text:
        group = text.split("Could not find '")[1].split("'")[0]
        options = [line for line in lines[lines.index(next(x for x in lines if x.startswith("Available"))) + 1 :]
                   if not line.startswith("Config search path")][:20]  # fmt: skip
        options = options[: options.index(next((o for o in options if ":" in o), options[-1])) + 1] if options else []
        return f"no config '{group}'; choose one of: {', '.join(o for o in options if ':' not in o)}"
    if "not in struct" in text:
        key = text.split("Could not override '")[1].split("'")[0] if "Could not override" in text else lines[0]
        return f"{key} is not a config key (misspelled?); list the keys with: python -m vitexp --cfg job"
    return " ".join(lines[:2])


def _share_run_dir(argv: list[str]) -> list[str]:
    """Under torchrun: the overrides that put every rank in the one folder rank 0 picks (a new run folder is named
    by the time, which differs between processes), with only rank 0 writing .hydra/."""
    from hydra import compose, initialize_config_dir

    sweep = any(arg in ("-m", "--multirun") for arg in argv)
    key = "hydra.sweep.dir" if sweep else "hydra.run.dir"
    folder = None
    if distributed.is_main():
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose(config_name="config", overrides=[a for a in argv if not a.startswith("-")],
                          return_hydra_config=True)  # fmt: skip
        folder = str(Path(OmegaConf.select(cfg, key)).resolve())
    folder = distributed.broadcast(folder)
    return [f"{key}={folder}"] + ([] if distributed.is_main() else ["hydra.output_subdir=null"])


def main() -> None:
    """Console entry point (`vitexp`, `python -m vitexp`)."""
    stop.install()
    register_resolvers()
    register_sweeper()
    try:
        sys.argv[1:] = resume_overrides(
            sys.argv[1:]
        )  # a resumed run is composed with the group choices it started with
        _preflight(sys.argv[1:])
        check_command(sys.argv[1:])
    except VitexpError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if distributed.launched():
        distributed.init()
        sys.argv += _share_run_dir(sys.argv[1:])
    _main()


if __name__ == "__main__":
    main()
