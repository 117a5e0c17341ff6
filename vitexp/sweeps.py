"""Sweeps that continue in their folder: the command a sweep folder was started with, and the Optuna study a search
keeps there (run by `hydra_plugins/vitexp_sweeper`). What each job of a sweep run again does with its own folder is
`rundir.earlier_job`'s."""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from hydra.errors import HydraException

from vitexp import VitexpError

log = logging.getLogger("vitexp")

STUDY_FILE = "optuna_study.json"


def register_sweeper() -> None:
    """Make vitexp's Optuna sweeper known to Hydra, also where Hydra's scan of hydra_plugins cannot list it (an
    editable install, hydra issue 3252)."""
    from hydra.core.plugins import Plugins

    try:
        from hydra_plugins.vitexp_sweeper import ResumingOptunaSweeper
    except ImportError:  # an install from before it existed: `hparams_search=optuna` then names the missing plugin
        return
    Plugins.instance().register(ResumingOptunaSweeper)


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
    """Refuse to continue a sweep folder (`hydra.sweep.dir=<folder>`) with other overrides than it was started with:
    job N goes back into folder N, so the jobs must be the same, in the same order. Hydra's own settings
    (`hydra.sweeper.n_trials`, the launcher's) may change."""
    folder = sweep_dir(argv)
    record = folder / "multirun.yaml" if folder else None
    if record is None or not record.is_file():
        return
    try:
        started = yaml.safe_load(record.read_text())["hydra"]["overrides"]["task"]
    except (OSError, yaml.YAMLError, TypeError, KeyError):
        started = None
    if not isinstance(started, list):
        raise VitexpError(f"{record} is unreadable (no hydra.overrides.task list); pick a new hydra.sweep.dir")
    try:
        now = task_overrides(argv)
    except HydraException:  # an override Hydra cannot parse: Hydra says which, next
        return
    if now != started:
        raise VitexpError(f"{folder} holds a sweep of other overrides ({' '.join(map(str, started))}); continue it with "
                          f"exactly those, in that order, or pick a new hydra.sweep.dir")  # fmt: skip


def continue_study(impl: Any, arguments: list[str], folder: Path, reseed: Callable[[int], Any] | None) -> None:
    """Run hydra-optuna-sweeper's search (`impl`) so that it continues the study of the sweep `folder`: trials an
    earlier start left running are finished first, each in its own job folder; `n_trials` counts every trial of the
    study; new trials take the job numbers after them (trial N runs in job folder N). Without an Optuna storage URL
    the study is kept in `folder`/optuna_study.json. `reseed(n)` gives a sampler seeded for a study of n trials, so
    that a continued search does not draw its first trials again."""
    import optuna

    if impl.storage is None:
        impl.storage = _file_storage(folder / STUDY_FILE, impl.study_name)
        impl.launcher = _SavingLauncher(impl.launcher, lambda: save_study(impl.storage, impl.study_name, folder))
    try:
        study = optuna.load_study(study_name=impl.study_name, storage=impl.storage)
    except KeyError:  # a new study
        study = None
    if study is not None:
        for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            _finish(study, trial, impl.launcher)
        done = len(study.trials)
        log.info(f"continuing Optuna study {impl.study_name}: {done} trials done, {max(impl.n_trials - done, 0)} to go")
        impl.n_trials = max(impl.n_trials - done, 0)
        impl.job_idx = done
        if reseed is not None and done:
            impl.sampler = reseed(done)
    impl.sweep(arguments)
    if isinstance(impl.launcher, _SavingLauncher):
        impl.launcher.save()


def _finish(study: Any, trial: Any, launcher: Any) -> None:
    """Run a trial that an earlier start left running (killed) in its own job folder, and tell the study its value."""
    from optuna.trial import TrialState

    overrides: Sequence[str] = [f"{k}={v}" for k, v in {**trial.params, **trial.user_attrs}.items()]
    log.info(f"finishing trial {trial.number}, stopped by an earlier start")
    (ret,) = launcher.launch([overrides], initial_job_idx=trial.number)
    try:
        study.tell(trial.number, float(ret.return_value))
    except Exception as e:  # noqa: BLE001 - as the sweeper does: a failed job is a failed trial, the search goes on
        log.warning(f"trial {trial.number} failed: {e}")
        study.tell(trial.number, state=TrialState.FAIL)


class _SavingLauncher:
    """A sweeper's launcher that first writes the study to its file: before each batch of trials runs, the trials
    asked so far (running, with their parameters) and every earlier one (with its value) are on disk."""

    def __init__(self, launcher: Any, save: Callable[[], None]) -> None:
        self.launcher, self.save = launcher, save

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Any:
        self.save()
        return self.launcher.launch(job_overrides, initial_job_idx)


def save_study(storage: Any, name: str, folder: Path) -> None:
    """Write the study `name` of `storage` to `folder`/optuna_study.json (atomically): every trial's number, state,
    parameters with their distributions, values and user attributes."""
    import optuna
    from optuna.distributions import distribution_to_json

    study = optuna.load_study(study_name=name, storage=storage)
    trials = [{"number": t.number, "state": t.state.name, "values": t.values, "params": t.params,
               "distributions": {k: distribution_to_json(d) for k, d in t.distributions.items()},
               "user_attrs": t.user_attrs} for t in study.trials]  # fmt: skip
    record = {"study_name": name, "directions": [d.name for d in study.directions], "trials": trials}
    tmp = folder / f".{STUDY_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(folder / STUDY_FILE)


def load_study(path: Path, storage: Any = None, name: str | None = None) -> Any:
    """The Optuna study that `save_study` wrote to `path`, rebuilt in `storage` (default: a new in-memory one). The
    file is data, read as JSON."""
    import optuna
    from optuna.distributions import json_to_distribution
    from optuna.trial import TrialState, create_trial

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "a new study created in memory": it is the old one
    try:
        record = json.loads(path.read_text())
        storage = storage or optuna.storages.InMemoryStorage()
        study = optuna.create_study(study_name=name or record["study_name"], storage=storage,
                                    directions=[d.lower() for d in record["directions"]])  # fmt: skip
        with warnings.catch_warnings():  # add_trial and create_trial are "experimental" in Optuna 2
            warnings.simplefilter("ignore")
            for t in sorted(record["trials"], key=lambda t: t["number"]):
                distributions = {k: json_to_distribution(d) for k, d in t["distributions"].items()}
                study.add_trial(create_trial(state=TrialState[t["state"]], values=t["values"], params=t["params"],
                                             distributions=distributions, user_attrs=t["user_attrs"]))  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise VitexpError(f"{path} is unreadable ({type(e).__name__}: {e}); pick a new hydra.sweep.dir") from None
    finally:
        optuna.logging.set_verbosity(verbosity)
    return study


def _file_storage(path: Path, name: str) -> Any:
    """An in-memory Optuna storage holding the study `path` keeps (an empty one when there is no file yet)."""
    import optuna

    storage = optuna.storages.InMemoryStorage()
    if path.is_file():
        load_study(path, storage, name)
    return storage
