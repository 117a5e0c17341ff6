"""Sweeps that continue in their folder: the command a sweep folder was started with, read as data, and the sweeper
that runs Optuna searches made known to Hydra. What each job of a sweep run again does with its own folder is
`runs.earlier_job`'s; the Optuna study a search keeps there is `vitexp.search`'s."""

from __future__ import annotations

import logging
from pathlib import Path

import yaml
from hydra.errors import HydraException

from vitexp import VitexpError, files
from vitexp.files import printable

log = logging.getLogger("vitexp")


def register_sweeper() -> None:
    """Make vitexp's Optuna sweeper known to Hydra (Hydra's public `Plugins.register`): Hydra 1.4 finds it by its
    entry point, Hydra 1.3 by scanning hydra_plugins, which cannot list an editable install (hydra issue 3252)."""
    from hydra.core.plugins import Plugins

    from hydra_plugins.vitexp_sweeper import OptunaSweeper

    Plugins.instance().register(OptunaSweeper)


def sweep_dir(argv: list[str]) -> Path | None:
    """The sweep folder the command line names (`hydra.sweep.dir=`), if any."""
    named = [a.split("=", 1)[1] for a in argv if a.startswith("hydra.sweep.dir=")]
    return Path(named[-1]) if named else None


def task_overrides(argv: list[str]) -> list[str]:
    """The command line's overrides of the config (not of Hydra's own settings), as Hydra records them."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    lines = [a for a in argv if not a.startswith("-") and ("=" in a or a.startswith("~"))]
    return [o.input_line for o in OverridesParser.create().parse_overrides(lines) if not o.is_hydra_override()]


def check_command(argv: list[str]) -> None:
    """Refuse to continue a sweep folder (`hydra.sweep.dir=<folder>`) that holds a symlink, a `multirun.yaml` that is
    not a regular file, or with other overrides than it was started with: job N goes back into folder N, so the jobs
    must be the same, in the same order. Hydra's own settings (`hydra.sweeper.n_trials`, the launcher's) may change."""
    folder = sweep_dir(argv)
    if folder is None or not folder.is_dir():
        return
    files.refuse_links(folder)  # before Hydra or a job writes there: a link would take the write elsewhere
    record = folder / "multirun.yaml"
    if not record.exists():  # a new sweep; a folder, FIFO or device in its place is refused by the read, never skipped
        return
    try:
        started = yaml.safe_load(files.read_text(record, root=folder))["hydra"]["overrides"]["task"]
    except (OSError, yaml.YAMLError, RecursionError, TypeError, KeyError, IndexError):
        started = None
    if not isinstance(started, list) or not all(isinstance(o, str) for o in started):
        raise VitexpError(
            f"{printable(record)} is unreadable (no hydra.overrides.task list of overrides); pick a new hydra.sweep.dir"
        )
    try:
        now = task_overrides(argv)
    except HydraException:  # an override Hydra cannot parse: Hydra says which, next
        return
    if now != started:
        raise VitexpError(
            f"{printable(folder)} holds a sweep of other overrides ({printable(' '.join(started))}); "
            f"continue it with exactly those, in that order, or pick a new hydra.sweep.dir"
        )
