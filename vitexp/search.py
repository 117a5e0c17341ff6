"""Optuna searches: the search space a command declares, the study in Optuna's storage (a journal file in the sweep
folder unless `hydra.sweeper.storage` names another) checked against it, the trials that workers sharing the study
claim, and the pruner a trial reports its epochs to. Run by vitexp's sweeper (`hydra_plugins/vitexp_sweeper`)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import socket
import stat
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from omegaconf import OmegaConf

from vitexp import VitexpError, files
from vitexp.files import printable

log = logging.getLogger("vitexp")

JOURNAL_FILE = "optuna_journal.log"
# What sqlite keeps beside a database file while it writes (rollback journal, write-ahead log, its index)
SQLITE_SIDE_FILES = ("journal", "wal", "shm")
# What a pruned trial's job returns to the sweeper.
PRUNED = "pruned"
SWEEPER = "hydra_plugins.vitexp_sweeper.OptunaSweeper"


@dataclass(frozen=True)
class Search:
    """What the command line declares of an Optuna search, all that a continued study may hold: the study's name
    and directions, the search space (name: distribution) and the fixed overrides (name: value)."""

    name: str
    directions: list[str]
    space: dict[str, Any]
    fixed: dict[str, str]


class Pruned(Exception):
    """A trial stopped by the pruner after `epoch`, its best validation top-1 so far `best`."""

    def __init__(self, epoch: int, best: float) -> None:
        super().__init__(f"pruned after epoch {epoch}")
        self.epoch, self.best = epoch, best


def declared_search(params: Mapping[str, Any] | None, arguments: list[str], name: str, direction: Any) -> Search:
    """The search of `hydra.sweeper.params` and the command line's `arguments` (a later override of a key wins; a
    sweep is searched, any other value fixed)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    lines = [*(f"{k!s}={v}" for k, v in (params or {}).items()), *arguments]
    space: dict[str, Any] = {}
    fixed: dict[str, str] = {}
    for override in OverridesParser.create().parse_overrides(lines):
        key = override.get_key_element()
        if override.is_sweep_override():
            space[key] = _distribution(override)
            fixed.pop(key, None)
        else:
            fixed[key] = override.get_value_element_as_str()
            space.pop(key, None)
    directions = [direction] if isinstance(direction, str) else list(direction)
    return Search(name, [str(d).lower() for d in directions], space, fixed)


def _distribution(override: Any) -> Any:
    """The Optuna distribution of a sweep: `choice` (and a shuffled range) a categorical one, `range(a, b, s)` the
    integers (or numbers) a, a+s, ... below b, `interval(a, b)` numbers from a to b, `tag(log, interval(...))` on a
    log scale (integers when both ends are)."""
    from hydra.core.override_parser.types import IntervalSweep, RangeSweep, Transformer
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    value = override.value()
    if isinstance(value, IntervalSweep):
        ints = isinstance(value.start, int) and isinstance(value.end, int)
        kind = IntDistribution if ints else FloatDistribution
        return kind(value.start, value.end, log="log" in value.tags)
    values = list(override.sweep_iterator(transformer=Transformer.encode))
    if isinstance(value, RangeSweep) and not value.shuffle and values:
        if all(isinstance(v, int) for v in (value.start, value.stop, value.step)):
            return IntDistribution(values[0], values[-1], step=value.step)
        return FloatDistribution(values[0], values[-1], step=value.step)
    if not values or not all(isinstance(v, (str, int, float, bool)) for v in values):
        raise VitexpError(f"{printable(override.input_line)}: search with choice, range or interval; pass one")
    return CategoricalDistribution(values)


def storage(url: str | None, folder: Path) -> Any:
    """The Optuna storage that `url` names, or by default the journal file in the sweep `folder` (safe for several
    processes on one file system; its lock a plain file, never a link); a sqlite file must be a regular file."""
    import optuna

    if url is None:
        return _journal(folder / JOURNAL_FILE)
    database = _sqlite_file(url)
    if database is not None:  # sqlite's side files too: a FIFO journal hangs the first write, a linked one is followed
        for each in (database, *(database.with_name(f"{database.name}-{side}") for side in SQLITE_SIDE_FILES)):
            _regular_or_absent(each)
    try:
        return optuna.storages.get_storage(url)
    except Exception as e:  # noqa: BLE001 - not a database, or one of another schema: the driver may raise anything
        raise _unreadable(where(url, folder), f"{type(e).__name__}: {printable(e)}") from None


def where(url: str | None, folder: Path) -> str:
    """The study's place, as an error line names it (a sqlite file by its path; another URL not at all, since it may
    hold a password)."""
    if url is None:
        return str(folder / JOURNAL_FILE)
    database = _sqlite_file(url)
    return f"{database} (hydra.sweeper.storage)" if database is not None else "the study in hydra.sweeper.storage"


def _sqlite_file(url: str) -> Path | None:
    """The file of a `sqlite:///<path>` storage URL (None for another database or an in-memory one)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        return None
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def _regular_or_absent(path: Path) -> None:
    """Refuse a study's file (or its lock) that exists and is not a regular file: a FIFO would hang Optuna's read, a
    folder or a device is no study."""
    if os.path.lexists(path):
        files.open_regular(path).close()  # non-blocking open, fstat: refused at once, a link too


def checked_study(store: Any, search: Search, place: str) -> Any:
    """The study `search.name` of `store` (None: there is none yet), each of its trials checked against `search`."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=search.name, storage=store)
        trials = study.get_trials(deepcopy=False)
    except KeyError:  # a new study
        return None
    except Exception as e:  # noqa: BLE001 - a damaged file: Optuna's replay of it may raise anything
        raise _unreadable(place, f"{type(e).__name__}: {printable(e)}") from None
    _check_directions(place, [d.name for d in study.directions], search)
    check_trials(place, trials, search)
    return study


def check_trials(place: str, trials: list[Any], search: Search) -> None:
    """Refuse a study whose trials hold anything but values of `search` (parameters, the fixed parameters of a
    waiting trial, fixed overrides) and, when completed, one number per direction."""
    for t in trials:
        _check_trial(place, _trial_record(t), search)


def launch_check(place: str, number: int, values: Any, search: Search, *, complete: bool = True) -> list[str]:
    """The overrides of the job of trial `number` of the study in `place`: `values` (name: value) of this command's
    search space only, each one that its declared distribution draws, then this command's fixed overrides; anything
    else refused in one line. `complete`: every parameter of the space must have its value (a job about to be
    launched), else only those given are checked (the fixed parameters of a waiting trial)."""
    if not isinstance(values, Mapping):
        raise _refused(place, f"trial {number}: its parameters are {printable(type(values).__name__)}, not names")
    for key, value in values.items():
        declared = search.space.get(key)
        if declared is None:
            raise _refused(
                place,
                f"trial {number} has parameter {printable(key)}, which this command's search "
                f"space (hydra.sweeper.params) does not declare",
            )
        if not _allowed(value, declared):
            raise _refused(
                place,
                f"trial {number}: parameter {printable(key)}={printable(value)} is not in this command's {declared}",
            )
    missing = [key for key in search.space if key not in values]
    if complete and missing:
        raise _refused(place, f"trial {number} has no value of parameter {printable(missing[0])}")
    return [f"{k}={v}" for k, v in {**values, **search.fixed}.items()]


@contextlib.contextmanager
def study_errors(place: str) -> Iterator[None]:
    """Optuna's reads and writes of the study in `place`: a storage damaged meanwhile (Optuna replays it on every
    call, and that may raise anything) is one line."""
    try:
        yield
    except VitexpError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged file: Optuna's replay of it may raise anything
        raise _unreadable(place, f"{type(e).__name__}: {printable(e)}") from None


def refuse_cut_journal(path: Path) -> None:
    """Refuse a journal whose last record is cut short (no newline at its end): Optuna would append the next record
    to it, and the study could not be read again."""
    if not os.path.lexists(path):
        return
    with files.open_regular(path) as f:
        size = f.seek(0, os.SEEK_END)
        last = f.seek(size - 1) >= 0 and f.read(1) if size else b"\n"
    if last != b"\n":
        raise _unreadable(str(path), "its last record is cut short")


def load_study(path: Path, search: Search | None = None, name: str = "vitexp") -> Any:
    """The study that a journal file holds (read, never run), checked against `search` when given."""
    import optuna

    store = _journal(path)
    if not path.is_file():
        raise VitexpError(f"{printable(path)} is not a file; name an Optuna journal file")
    try:
        study = checked_study(store, search, str(path)) if search else optuna.load_study(study_name=name, storage=store)
    except VitexpError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged file: Optuna's replay of it may raise anything
        raise _unreadable(str(path), f"{type(e).__name__}: {printable(e)}") from None
    if study is None:
        raise _unreadable(str(path), f"it holds no study {printable(search.name if search else name)}")
    return study


def _journal(path: Path) -> Any:
    """A journal storage on the file `path` (refused when it, or its lock, is a symlink)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    for each in (path, path.with_name(path.name + ".lock")):
        if each.is_symlink():
            raise VitexpError(f"{printable(each)} is a symlink; remove it or pick a new hydra.sweep.dir")
        try:
            _regular_or_absent(each)
        except VitexpError:
            raise VitexpError(
                f"{printable(each)} is not a regular file; move it away or pick a new hydra.sweep.dir"
            ) from None
        except OSError as e:
            raise _unreadable(str(each), printable(e.strerror)) from None
    try:
        return optuna.storages.JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
    except Exception as e:  # noqa: BLE001 - a damaged file: Optuna's replay of it may raise anything
        raise _unreadable(str(path), f"{type(e).__name__}: {printable(e)}") from None


def _trial_record(trial: Any) -> dict[str, Any]:
    """An Optuna trial as plain data: number, state, values, parameters with their distributions (JSON text),
    user attributes, and the fixed parameters that `study.enqueue_trial` gave it (empty when none)."""
    from optuna.distributions import distribution_to_json

    return {
        "number": trial.number,
        "state": trial.state.name,
        "values": trial.values,
        "params": trial.params,
        "distributions": {k: distribution_to_json(d) for k, d in trial.distributions.items()},
        "user_attrs": trial.user_attrs,
        "fixed_params": trial.system_attrs.get("fixed_params", {}),
    }


def _unreadable(place: str, what: str) -> VitexpError:
    return VitexpError(f"{printable(place)} is unreadable ({what}); pick a new hydra.sweep.dir")


def _refused(place: str, what: str) -> VitexpError:
    return VitexpError(
        f"{printable(place)}: {what}; refused: continue the search with the command it started with, "
        f"or pick a new hydra.sweep.dir"
    )


def _check_directions(place: str, directions: list[str], search: Search) -> None:
    if [d.lower() for d in directions] != search.directions:
        raise _refused(
            place, f"its study goes in directions {printable(directions)}, this command's search in {search.directions}"
        )


def _check_trial(place: str, trial: dict[str, Any], search: Search) -> None:
    """A stored trial of a continued search holds values of this command's search space only (each within its
    declared distribution, stored with it; a waiting trial's fixed parameters too), this command's fixed overrides
    (which a stopped trial runs with) and, when completed, one number per direction."""
    from optuna.distributions import distribution_to_json

    number = trial["number"]
    launch_check(place, number, trial["fixed_params"], search, complete=False)
    launch_check(place, number, trial["params"], search, complete=False)
    for key in trial["params"]:
        same = json.loads(trial["distributions"][key]) == json.loads(distribution_to_json(search.space[key]))
        if not same:
            raise _refused(
                place,
                f"trial {number}: parameter {printable(key)} was drawn from another distribution "
                f"than this command's {search.space[key]}",
            )
    values = trial["values"]
    numbers = isinstance(values, list) and all(_number(v) and not math.isnan(v) for v in values)
    if trial["state"] == "COMPLETE" and not (numbers and len(values) == len(search.directions)):
        raise _unreadable(place, f"trial {number} is completed with the value {printable(values)}, not numbers")
    for key, value in trial["user_attrs"].items():
        if search.fixed.get(key) != value:
            ours = f"has {printable(key)}={printable(search.fixed[key])}" if key in search.fixed else "has none"
            raise _refused(
                place, f"trial {number} has the override {printable(key)}={printable(value)}; this command {ours}"
            )


def _allowed(value: Any, distribution: Any) -> bool:
    """Whether `value` is one that `distribution` draws: one of its choices (of the same type), or a number within
    its interval (an integer for an integer distribution, on its step)."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(distribution, CategoricalDistribution):
        return any(type(value) is type(c) and value == c for c in distribution.choices)
    if not _number(value) or not math.isfinite(value):
        return False
    if isinstance(distribution, IntDistribution):
        return type(value) is int and distribution.low <= value <= distribution.high and _on_step(value, distribution)
    return distribution.low <= value <= distribution.high and _on_step(value, distribution)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _on_step(value: float, distribution: Any) -> bool:
    """Whether `value` is low + k * step for a whole k (any value when the distribution has no step); Optuna's own
    tolerance for floats."""
    if distribution.step is None:
        return True
    k = (value - distribution.low) / distribution.step
    return abs(k - round(k)) < 1e-8


def _lock(path: Path, *, wait: bool) -> IO[bytes] | None:
    """A POSIX lock on `path` (a plain file in the sweep folder), held until the file is closed or the process
    ends (a killed worker's locks are released with it); None when another process holds it and `wait` is off."""
    try:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError as e:
        raise VitexpError(
            f"{printable(path)} cannot be a lock file ({e.strerror}); move it away or pick a new hydra.sweep.dir"
        ) from None
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise VitexpError(f"{printable(path)} is not a regular file; move it away or pick a new hydra.sweep.dir")
    os.set_blocking(descriptor, True)
    handle = os.fdopen(descriptor, "r+b")
    try:
        fcntl.lockf(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    return handle


@contextlib.contextmanager
def study_lock(folder: Path) -> Iterator[None]:
    """Held while a worker claims trials: what one sees RUNNING without its trial lock is stopped, never claimed."""
    handle = _lock(folder / ".study.lock", wait=True)
    try:
        yield
    finally:
        if handle is not None:
            handle.close()


def trial_lock(folder: Path, number: int) -> IO[bytes] | None:
    """The lock of trial `number`, held by the worker that runs it (None: another worker runs it)."""
    return _lock(folder / f".trial_{number}.lock", wait=False)


def worker_file(folder: Path) -> Path:
    """This worker's lock file in the sweep folder."""
    return folder / f".worker_{socket.gethostname()}_{os.getpid()}.lock"


def register_worker(folder: Path) -> IO[bytes] | None:
    """This worker's lock in the sweep folder, held while it runs: the live workers on this machine are counted."""
    return _lock(worker_file(folder), wait=True)


def release(handle: IO[bytes] | None, path: Path) -> None:
    """Remove a lock file this process holds, then let the lock go (no one waits on it: its trial is told)."""
    path.unlink(missing_ok=True)
    if handle is not None:
        handle.close()


def live_workers(folder: Path) -> int:
    """The workers on this machine that run trials of the sweep `folder` now (this one included)."""
    own = worker_file(folder).name
    count = 1
    for path in folder.glob(f".worker_{socket.gethostname()}_*.lock"):
        if path.name == own or path.is_symlink():
            continue
        handle = _lock(path, wait=False)
        if handle is None:
            count += 1
        else:  # its worker is gone
            handle.close()
            path.unlink(missing_ok=True)
    return count


@contextlib.contextmanager
def reporting(sweeper: Any, sweep_dir: str, number: int) -> Iterator[Callable[[int, dict[str, Any]], None] | None]:
    """While a job of a search with a pruner runs, the epoch callback of its run (`training.fit`'s `after_epoch`):
    its trial (`number`) reports the validation top-1 after each epoch and stops (`Pruned`) when the pruner says so;
    the study is reached through its storage, so a job in another process reports too. None for other sweeps."""
    if OmegaConf.select(sweeper, "_target_") != SWEEPER or OmegaConf.select(sweeper, "pruner") is None:
        yield None
        return
    import optuna
    from hydra.utils import instantiate

    store = storage(sweeper.storage, Path(sweep_dir))
    study = optuna.load_study(study_name=sweeper.study_name, storage=store, pruner=instantiate(sweeper.pruner))
    trial_id = store.get_trial_id_from_study_id_trial_number(store.get_study_id_from_name(sweeper.study_name), number)
    trial = optuna.trial.Trial(study, trial_id)

    def report(epoch: int, metrics: dict[str, Any]) -> None:
        trial.report(float(metrics["val/acc1"]), epoch)
        if trial.should_prune():
            raise Pruned(epoch, float(metrics["best_val_acc1"]))

    yield report
