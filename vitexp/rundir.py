"""Run folders: a fresh one per run, never two runs in one, and what an interrupted run left to resume from."""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from vitexp import VitexpError, checkpoint
from vitexp.records import completed


def resume_run_dir(resume: str) -> Path:
    """The run folder named by `resume=`: the folder itself, or the one holding checkpoints/last.pt."""
    path = Path(resume).expanduser()
    return path.parent.parent if path.suffix == ".pt" else path


@functools.cache  # Hydra resolves the folder more than once per job; the claim is made once per process
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


def run_dir_for(resume: str | None, default: str) -> str:
    """A resumed run goes back into its own folder; a new one gets a fresh folder."""
    return str(resume_run_dir(resume)) if resume else fresh_dir(default)


def output_subdir(resume: str | None, output_dir: str, mode: Any = None, overrides: Any = ()) -> str | None:
    """A run folder keeps the .hydra/ of its first start; each resume (or auto-resume) records its own beside it. A
    sweep job run again into its folder records nothing when the folder holds a completed run (the job is skipped)
    or another job's (it is refused): that folder stays as it was."""
    folder = Path(output_dir)
    if not resume and getattr(mode, "name", mode) == "MULTIRUN":
        try:
            other = other_job(folder, [str(o) for o in overrides])
        except VitexpError:  # unreadable: refused by the job itself, with the reason
            other = []
        if completed(folder) or other is not None:
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
    if not (folder / ".hydra" / "overrides.yaml").is_file():
        return None
    theirs = _first_overrides(folder)
    return theirs if sorted(theirs) != sorted(overrides) else None


def earlier_job(folder: Path, overrides: list[str]) -> dict[str, Any] | None:
    """What an earlier start of this sweep job left in `folder`: its results.json when it completed, else None (a
    stopped or failed start is continued, a folder never used is started). A folder that holds a run started with
    other `overrides` belongs to another job: refused."""
    theirs = other_job(folder, overrides)
    if theirs is not None:
        raise VitexpError(f"{folder} holds a run of {' '.join(theirs) or 'no overrides'}, not of this job's "
                          f"{' '.join(overrides) or 'no overrides'}; continue a sweep with the command it started "
                          f"with, or pick a new hydra.sweep.dir")  # fmt: skip
    return json.loads((folder / "results.json").read_text()) if completed(folder) else None


def _read_yaml(path: Path, what: str) -> Any:
    """A YAML file as plain data (safe loader: no tags, no objects)."""
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise VitexpError(f"{path} is unreadable ({type(e).__name__}); {what}") from None


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
    if (folder / ".hydra" / "overrides.yaml").is_file():
        return _first_overrides(folder), {}
    point = resume_point(folder)
    return point.overrides, point.config


def _first_overrides(folder: Path) -> list[str]:
    """The overrides of the run's first start (none in a folder without .hydra/), checked to be a list of strings."""
    path = folder / ".hydra" / "overrides.yaml"
    value = _read_yaml(path, "start the run again instead") if path.is_file() else []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise VitexpError(f"resume={folder}: its .hydra/overrides.yaml is not a list of overrides; start the run again")
    return value


def resume_point(folder: Path) -> ResumePoint:
    """Read what `folder` holds to resume from: last.pt if there is one, else its first start's .hydra/ files (its
    sub-runs, a teacher or an unpruned model, continue from their own last.pt)."""
    last_pt, subs = folder / "checkpoints" / "last.pt", _sub_run_checkpoints(folder)
    last = checkpoint.load(last_pt) if last_pt.is_file() else None
    overrides = _first_overrides(folder)
    if last is not None:
        config, run_id = last["config"], last.get("wandb_run_id")
    else:
        config = _read_yaml(folder / ".hydra" / "config.yaml", "start the run again instead")
        run_id = checkpoint.load(subs[-1]).get("wandb_run_id") if subs else None  # sub-runs log to the job's run
    if not isinstance(config, dict):
        raise VitexpError(f"resume={folder}: its saved config is not a vitexp config; start the run again instead")
    safe_id = isinstance(run_id, str) and re.fullmatch(r"[A-Za-z0-9_-]{1,64}", run_id)
    return ResumePoint(folder, last, config, overrides, run_id if safe_id else None)
