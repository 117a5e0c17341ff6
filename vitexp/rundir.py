"""Run folders: a fresh one per run, never two runs in one, and what an interrupted run left to resume from."""

from __future__ import annotations

import functools
import math
import os
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from vitexp import VitexpError, checkpoint, files
from vitexp.files import printable


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
    last: dict[str, Any] | None
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
    return ResumePoint(folder, last.state_dict() if last else None, config, overrides, run_id if safe_id else None)
