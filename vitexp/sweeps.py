"""Sweeps that continue in their folder: the command a sweep folder was started with, and the Optuna study a search
keeps there (run by `hydra_plugins/vitexp_sweeper`), both read as data. What each job of a sweep run again does with
its own folder is `rundir.earlier_job`'s."""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from hydra.errors import HydraException

from vitexp import VitexpError, files
from vitexp.files import printable

log = logging.getLogger("vitexp")

STUDY_FILE = "optuna_study.json"
# What save_study writes, and all a study file may hold.
STUDY_KEYS = {"study_name", "directions", "trials"}
TRIAL_KEYS = {"number", "state", "values", "params", "distributions", "user_attrs"}
# The states hydra-optuna-sweeper leaves trials in (a WAITING trial is one enqueued by hand: never written here).
TRIAL_STATES = ("COMPLETE", "FAIL", "PRUNED", "RUNNING")


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
    """Refuse to continue a sweep folder (`hydra.sweep.dir=<folder>`) that holds a symlink, or with other overrides
    than it was started with: job N goes back into folder N, so the jobs must be the same, in the same order.
    Hydra's own settings (`hydra.sweeper.n_trials`, the launcher's) may change."""
    folder = sweep_dir(argv)
    if folder is None or not folder.is_dir():
        return
    files.refuse_links(folder)  # before Hydra or a job writes there: a link would take the write elsewhere
    record = folder / "multirun.yaml"
    if not record.is_file():
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


@dataclass(frozen=True)
class Search:
    """What the command line declares of an Optuna search, all that a continued study may hold: the study's name
    (None: any) and directions, the search space (name: distribution) and the fixed overrides (name: value)."""

    name: str | None
    directions: list[str]
    space: dict[str, Any]
    fixed: dict[str, str]


def declared_search(impl: Any, arguments: list[str]) -> Search:
    """The search that hydra-optuna-sweeper's `impl` runs for the command line's `arguments`, parsed as it parses
    them: `hydra.sweeper.params` (or the older `search_space`) and the sweeps among the arguments, less the fixed."""
    from hydra_plugins.hydra_optuna_sweeper._impl import (
        create_optuna_distribution_from_config,
        create_params_from_overrides,
    )

    space, fixed = create_params_from_overrides([*(f"{k!s}={v}" for k, v in (impl.params or {}).items()), *arguments])
    if impl.params is None and impl.search_space is not None:  # hydra.sweeper.search_space, deprecated
        older = {str(k): create_optuna_distribution_from_config(v) for k, v in impl.search_space.items()}
        space = {**older, **space}
    space = {k: d for k, d in space.items() if k not in fixed}
    directions = [d.lower() for d in impl._get_directions()]
    return Search(impl.study_name, directions, space, {k: str(v) for k, v in fixed.items()})


def continue_study(impl: Any, arguments: list[str], folder: Path, reseed: Callable[[int], Any] | None) -> None:
    """Run hydra-optuna-sweeper's search (`impl`) so that it continues the study of the sweep `folder`: trials an
    earlier start left running are finished first, each in its own job folder; `n_trials` counts every trial of the
    study; new trials take the job numbers after them (trial N runs in job folder N). Without an Optuna storage URL
    the study is kept in `folder`/optuna_study.json. The stored study is checked against this command's search
    before anything runs or is written; it gives only values of that search. `reseed(n)` gives a sampler seeded for
    a study of n trials, so that a continued search does not draw its first trials again."""
    from omegaconf import OmegaConf

    search = declared_search(impl, arguments)
    files.make_folder(folder, folder)  # sqlite creates its file, not the folder
    where = "the study in hydra.sweeper.storage"
    if impl.storage is None:
        where = str(folder / STUDY_FILE)
        impl.storage = _file_storage(folder / STUDY_FILE, search)
        impl.launcher = _SavingLauncher(impl.launcher, lambda: save_study(impl.storage, impl.study_name, folder))
    study = _stored_study(impl, search, where)
    # as Hydra's basic sweeper does: a search run again into this folder is checked against its command
    files.write_text(folder / "multirun.yaml", OmegaConf.to_yaml(impl.config), root=folder)
    if study is not None:
        for trial in study.get_trials(deepcopy=False, states=(_state("RUNNING"),)):
            _finish(study, trial, search.fixed, impl.launcher)
        done = len(study.trials)
        log.info(f"continuing Optuna study {impl.study_name}: {done} trials done, {max(impl.n_trials - done, 0)} to go")
        impl.n_trials = max(impl.n_trials - done, 0)
        impl.job_idx = done
        if reseed is not None and done:
            impl.sampler = reseed(done)
    try:
        impl.sweep(arguments)
    except ValueError:  # optuna's "No trials are completed yet", when it asks for the best trial
        _refuse_all_failed(impl, folder)
        raise
    finally:
        if isinstance(impl.launcher, _SavingLauncher):
            impl.launcher.save()


def _state(name: str) -> Any:
    from optuna.trial import TrialState

    return TrialState[name]


def _stored_study(impl: Any, search: Search, where: str) -> Any:
    """The study that `impl.storage` holds (None: a new one), each of its trials checked against `search`."""
    import optuna

    try:
        study = optuna.load_study(study_name=impl.study_name, storage=impl.storage)
    except KeyError:  # a new study
        return None
    _check_directions(where, [d.name for d in study.directions], search)
    for t in study.trials:
        _check_trial(where, _trial_record(t), search)
    return study


def _trial_record(trial: Any) -> dict[str, Any]:
    """An Optuna trial as plain data, as optuna_study.json holds it: number, state, values, parameters with their
    distributions, user attributes."""
    from optuna.distributions import distribution_to_json

    return {
        "number": trial.number,
        "state": trial.state.name,
        "values": trial.values,
        "params": trial.params,
        "distributions": {k: distribution_to_json(d) for k, d in trial.distributions.items()},
        "user_attrs": trial.user_attrs,
    }


def _refuse_all_failed(impl: Any, folder: Path) -> None:
    """One line instead of optuna's error when no trial of the study completed (the study is saved all the same)."""
    import optuna

    study = optuna.load_study(study_name=impl.study_name, storage=impl.storage)
    ended = {_state("FAIL"), _state("PRUNED")}  # a trial still running: the error came from elsewhere
    if not all(t.state in ended for t in study.trials) or len(study.directions) > 1:
        return
    failed = [t.number for t in study.trials]
    if not failed:
        raise VitexpError(f"study {printable(study.study_name)} has no trials; raise hydra.sweeper.n_trials")
    raise VitexpError(
        f"all {len(failed)} trials of study {printable(study.study_name)} failed; see "
        f"{printable(folder / str(failed[-1]) / 'results.json')}"
    )


def _finish(study: Any, trial: Any, fixed: dict[str, str], launcher: Any) -> None:
    """Run a trial that an earlier start left running (killed) in its own job folder, and tell the study its value:
    its own values of the search space (checked), this command's fixed overrides."""
    overrides: Sequence[str] = [f"{k}={v}" for k, v in {**trial.params, **fixed}.items()]
    log.info(f"finishing trial {trial.number}, stopped by an earlier start")
    (ret,) = launcher.launch([overrides], initial_job_idx=trial.number)
    try:
        study.tell(trial.number, float(ret.return_value))
    except Exception as e:  # noqa: BLE001 - as the sweeper does: a failed job is a failed trial, the search goes on
        log.warning(f"trial {trial.number} failed: {e}")
        study.tell(trial.number, state=_state("FAIL"))


class _SavingLauncher:
    """A sweeper's launcher that first writes the study to its file: before each batch of trials runs, the trials
    asked so far (running, with their parameters) and every earlier one (with its value) are on disk."""

    def __init__(self, launcher: Any, save: Callable[[], None]) -> None:
        self.launcher, self.save = launcher, save

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Any:
        self.save()
        return self.launcher.launch(job_overrides, initial_job_idx)


def save_study(storage: Any, name: str, folder: Path) -> None:
    """Write the study `name` of `storage` to `folder`/optuna_study.json (through the one writer): every trial's
    number, state, parameters with their distributions, values and user attributes."""
    import optuna

    study = optuna.load_study(study_name=name, storage=storage)
    trials = [_trial_record(t) for t in study.trials]
    record = {"study_name": name, "directions": [d.name for d in study.directions], "trials": trials}
    files.write_text(folder / STUDY_FILE, json.dumps(record, indent=1) + "\n", root=folder)


def load_study(path: Path, storage: Any = None, name: str | None = None, search: Search | None = None) -> Any:
    """The Optuna study that `save_study` wrote to `path`, rebuilt in `storage` (default: a new in-memory one). The
    file is data, read as JSON and checked against what save_study writes; with `search` (a search continued), each
    trial may hold only values of its search space and its fixed overrides, else it is refused."""
    import optuna
    from optuna.trial import create_trial

    record = _read_study(path, search)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "a new study created in memory": it is the old one
    number = None
    try:
        storage = storage or optuna.storages.InMemoryStorage()
        study = optuna.create_study(
            study_name=name or record["study_name"],
            storage=storage,
            directions=[d.lower() for d in record["directions"]],
        )
        with warnings.catch_warnings():  # add_trial and create_trial are "experimental" in Optuna 2
            warnings.simplefilter("ignore")
            for t in record["trials"]:
                number = t["number"]
                study.add_trial(
                    create_trial(
                        state=_state(t["state"]),
                        values=t["values"],
                        params=t["params"],
                        distributions=_distributions(t, search),
                        user_attrs=t["user_attrs"],
                    )
                )
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        where = f"{printable(path)}: trial {number}" if number is not None else printable(path)
        raise VitexpError(
            f"{where} is unreadable ({type(e).__name__}: {printable(e)}); pick a new hydra.sweep.dir"
        ) from None
    finally:
        optuna.logging.set_verbosity(verbosity)
    return study


def _distributions(trial: dict[str, Any], search: Search | None) -> dict[str, Any]:
    """A stored trial's distributions: the declared ones of a continued search (the stored ones equal them), else
    Optuna's own classes rebuilt from their JSON (plain numbers and choices)."""
    from optuna.distributions import json_to_distribution

    if search is not None:
        return {k: search.space[k] for k in trial["params"]}
    return {k: json_to_distribution(d) for k, d in trial["distributions"].items()}


def _file_storage(path: Path, search: Search) -> Any:
    """An in-memory Optuna storage holding the study `path` keeps, checked against `search` (an empty one when
    there is no file yet)."""
    import optuna

    storage = optuna.storages.InMemoryStorage()
    if path.is_file() or path.is_symlink():
        load_study(path, storage, search.name, search)
    return storage


def _unreadable(where: str, what: str) -> VitexpError:
    return VitexpError(f"{printable(where)} is unreadable ({what}); pick a new hydra.sweep.dir")


def _refused(where: str, what: str) -> VitexpError:
    return VitexpError(
        f"{printable(where)}: {what}; refused: continue the search with the command it started with, "
        f"or pick a new hydra.sweep.dir"
    )


def _read_study(path: Path, search: Search | None) -> dict[str, Any]:
    """A study file as plain data, its shape checked (and each trial against `search`, when given)."""
    try:
        record = json.loads(files.read_text(path))
    except (OSError, ValueError, RecursionError) as e:
        raise VitexpError(f"{printable(path)} is unreadable ({type(e).__name__}); pick a new hydra.sweep.dir") from None
    if not isinstance(record, dict) or set(record) != STUDY_KEYS:
        raise _unreadable(str(path), f"not a study file (an object of {', '.join(sorted(STUDY_KEYS))})")
    name, directions, trials = record["study_name"], record["directions"], record["trials"]
    if not isinstance(name, str) or not 0 < len(name) <= 100 or printable(name) != name:
        raise _unreadable(str(path), "its study_name is not a short name")
    if not isinstance(directions, list) or not directions or not all(d in ("MAXIMIZE", "MINIMIZE") for d in directions):
        raise _unreadable(str(path), "its directions are not a list of MAXIMIZE, MINIMIZE")
    if search is not None:
        _check_directions(str(path), directions, search)
    if not isinstance(trials, list):
        raise _unreadable(str(path), "its trials are not a list")
    for number, trial in enumerate(trials):
        _check_shape(str(path), number, trial)
        if search is not None:
            _check_trial(str(path), trial, search)
    return record


def _check_directions(where: str, directions: list[str], search: Search) -> None:
    if [d.lower() for d in directions] != search.directions:
        raise _refused(
            where, f"its study goes in directions {printable(directions)}, this command's search in {search.directions}"
        )


def _check_shape(where: str, number: int, trial: Any) -> None:
    """A stored trial holds what save_study writes: its number (trials in order), a state, values (numbers),
    parameters (plain values) with their distributions (JSON text) and user attributes (strings)."""
    if not isinstance(trial, dict) or set(trial) != TRIAL_KEYS:
        raise _unreadable(where, f"trial {number} is not an object of {', '.join(sorted(TRIAL_KEYS))}")
    if type(trial["number"]) is not int or trial["number"] != number:
        raise _unreadable(
            where, f"trial {number} has number {printable(trial['number'])} (trials are numbered in order)"
        )
    if trial["state"] not in TRIAL_STATES:
        raise _unreadable(where, f"trial {number} has state {printable(trial['state'])}, not one of {TRIAL_STATES}")
    values = trial["values"]
    if values is not None and (not isinstance(values, list) or not all(_number(v) for v in values)):
        raise _unreadable(where, f"trial {number}: its values are not a list of numbers")
    params, distributions, attrs = trial["params"], trial["distributions"], trial["user_attrs"]
    if not isinstance(params, dict) or not all(
        v is None or isinstance(v, (str, int, float, bool)) for v in params.values()
    ):
        raise _unreadable(where, f"trial {number}: its params are not an object of plain values")
    if not isinstance(distributions, dict) or set(distributions) != set(params):
        raise _unreadable(where, f"trial {number}: its distributions are not one per parameter")
    if not all(isinstance(d, str) for d in distributions.values()):
        raise _unreadable(where, f"trial {number}: its distributions are not JSON text")
    if not isinstance(attrs, dict) or not all(isinstance(v, str) for v in attrs.values()):
        raise _unreadable(where, f"trial {number}: its user_attrs are not an object of strings")


def _check_trial(where: str, trial: dict[str, Any], search: Search) -> None:
    """A stored trial of a continued search holds values of this command's search space only (each within its
    declared distribution, stored with it) and this command's fixed overrides (which a stopped trial runs with)."""
    from optuna.distributions import distribution_to_json

    number = trial["number"]
    for key, value in trial["params"].items():
        declared = search.space.get(key)
        if declared is None:
            raise _refused(
                where,
                f"trial {number} has parameter {printable(key)}, which this command's search "
                f"space (hydra.sweeper.params) does not declare",
            )
        try:
            same = json.loads(trial["distributions"][key]) == json.loads(distribution_to_json(declared))
        except (TypeError, ValueError, RecursionError):
            same = False
        if not same:
            raise _refused(
                where,
                f"trial {number}: parameter {printable(key)} was drawn from another distribution "
                f"than this command's {declared}",
            )
        if not _allowed(value, declared):
            raise _refused(
                where,
                f"trial {number}: parameter {printable(key)}={printable(value)} is not in this command's {declared}",
            )
    for key, value in trial["user_attrs"].items():
        if search.fixed.get(key) != value:
            ours = f"has {printable(key)}={printable(search.fixed[key])}" if key in search.fixed else "has none"
            raise _refused(
                where, f"trial {number} has the override {printable(key)}={printable(value)}; this command {ours}"
            )


def _allowed(value: Any, distribution: Any) -> bool:
    """Whether `value` is one that `distribution` draws: one of its choices (of the same type), or a number within
    its interval (an integer for an integer distribution, on its step)."""
    from optuna.distributions import CategoricalDistribution, IntLogUniformDistribution, IntUniformDistribution

    if isinstance(distribution, CategoricalDistribution):
        return any(type(value) is type(c) and value == c for c in distribution.choices)
    if not _number(value):
        return False
    if isinstance(distribution, (IntUniformDistribution, IntLogUniformDistribution)) and type(value) is not int:
        return False
    return bool(distribution._contains(value))


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
