"""The run life cycle (`vitexp.runs`): the command line checked before Hydra starts, the config typed once per job,
and Hydra's errors in one line."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf.errors import ConfigAttributeError

from tests.conftest import REPO, TINY, compose_config
from vitexp.__main__ import _long_lived_frozen, _one_line

# `python -m vitexp ARGS` that records, per rank, each composition of the config, each job it runs and each typing
# of a config into its settings, in order.
COUNTING = """
import atexit, json, os, sys
from hydra._internal.config_loader_impl import ConfigLoaderImpl
import vitexp.__main__ as entry
import vitexp.runs, vitexp.tasks.recipe

events, out = [], sys.argv[1]
sys.argv = ["vitexp", *sys.argv[2:]]
compose, job, typed = ConfigLoaderImpl.load_configuration, entry._job, vitexp.runs.typed

def counted(name, function):
    def call(*args, **kwargs):
        events.append(name)
        return function(*args, **kwargs)
    return call

ConfigLoaderImpl.load_configuration = counted("compose", compose)
entry._job = counted("job", job)
vitexp.runs.typed = vitexp.tasks.recipe.typed = counted("typed", typed)
atexit.register(lambda: open(os.path.join(out, os.environ.get("RANK", "0") + ".json"), "w").write(json.dumps(events)))
entry.main()
"""


def _events(tmp_path: Path, *args: str, nproc: int = 1) -> dict[str, list[str]]:
    """Run the counting entry point (under torchrun with `nproc` > 1): each rank's compositions and jobs, in order."""
    script, out = tmp_path / "counting.py", tmp_path / "events"
    script.write_text(COUNTING)
    out.mkdir()
    launch = [sys.executable]
    if nproc > 1:
        launch += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    command = [*launch, str(script), str(out), *args]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json"))}


def _jobs(events: list[str]) -> list[list[str]]:
    """The events of each job, from its start to the next job's (or the end)."""
    starts = [i for i, event in enumerate(events) if event == "job"]
    return [events[i : (starts[n + 1] if n + 1 < len(starts) else len(events))] for n, i in enumerate(starts)]


@pytest.mark.slow  # two runs in fresh processes; each sweep job's count stays in the default suite
def test_a_plain_run_is_checked_before_its_job_which_types_its_config_once(tmp_path):
    (events,) = _events(tmp_path, *TINY, "trainer.max_epochs=1").values()
    before = events[: events.index("job")]
    assert set(before) == {"compose", "typed"} and before.count("typed") == 1  # the check before Hydra starts
    assert _jobs(events) == [["job", "typed"]]
    (run,) = (tmp_path / "outputs" / "train" / "baseline").iterdir()
    (tmp_path / "again").mkdir()
    resumed = _events(tmp_path / "again", f"resume={run}", "trainer.max_epochs=2")
    assert _jobs(resumed["0"]) == [["job", "typed"]]  # the resumed run's own settings, typed once


def test_each_sweep_job_types_its_config_once(tmp_path):
    (events,) = _events(tmp_path, "--multirun", *TINY, "trainer.max_epochs=1", "seed=0,1").values()
    # each job composed by Hydra's launcher before it starts, then typed once
    assert _jobs(events) == [["job", "typed", "compose"], ["job", "typed"]]
    (sweep,) = (tmp_path / "multirun_outputs").iterdir()
    assert all((sweep / job / ".hydra" / "config.yaml").is_file() for job in ("0", "1"))


def test_each_torchrun_rank_runs_its_job_once_in_one_folder(tmp_path):
    events = _events(tmp_path, *TINY, "trainer.max_epochs=1", nproc=2)
    assert [_jobs(rank) for rank in events.values()] == [[["job", "typed"]]] * 2
    (run,) = (tmp_path / "outputs" / "train" / "baseline").iterdir()  # one folder, picked by rank 0
    assert (run / ".hydra" / "config.yaml").is_file() and (run / "results.json").is_file()


def test_composing_the_config_creates_and_reads_no_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = compose_config(*TINY, "resume=null", hydra=True)
    folders = (cfg.hydra.run.dir, cfg.hydra.sweep.dir)  # resolved: plain interpolations, no resolver of vitexp's
    assert folders[0].startswith("outputs/train/baseline/") and folders[1].startswith("multirun_outputs/")
    assert cfg.hydra.output_subdir is None  # each job records its own start (vitexp.runs.record_start)
    assert not list(tmp_path.iterdir())


def _raised(exception: Exception, cause: Exception | None = None) -> Exception:
    exception.__cause__ = cause
    return exception


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (
            _raised(MissingConfigException("", missing_cfg_file="model/nope", options=["baseline", "patch8"])),
            "no config 'model/nope'; choose one of: baseline, patch8",
        ),
        (
            _raised(OverrideParseException(override="optim.lr=[1e-3", message="no viable alternative\nSee ...")),
            "cannot parse optim.lr=[1e-3: no viable alternative",
        ),
        (
            _raised(ConfigCompositionException("Could not override"), ConfigAttributeError("Key 'x' not in 'T'")),
            "Could not override Key 'x' not in 'T'",
        ),
        (
            _raised(ConfigCompositionException("Could not delete from config. 'nope' does not exist.")),
            "Could not delete from config. 'nope' does not exist.",
        ),
    ],
    ids=["missing-option", "unparsable", "no-key-field", "text-only"],
)
def test_composition_errors_are_one_line_from_their_fields(error, line):
    assert _one_line(error) == line


class _Node:
    """An object that can be weakly referenced and put in a cycle."""


@pytest.mark.parametrize("mode", ["RUN", "MULTIRUN"])
def test_a_job_runs_with_the_startup_objects_frozen_and_a_sweep_job_hands_them_back(mode):
    """`main` turns the collector off for the imports and the composition; a job freezes what they left (no
    collection walks it during training, in a forked loader worker or at exit) and turns the collector on; a job of a
    sweep run in this process unfreezes and collects its garbage after itself, so the next job does not freeze it."""
    hydra, before = HydraConfig.instance(), HydraConfig.instance().cfg
    hydra.set_config(compose_config(*TINY, f"hydra.mode={mode}", hydra=True))
    gc.disable()
    try:
        with _long_lived_frozen():
            assert gc.isenabled() and gc.get_freeze_count() > 0
            node = _Node()
            node.cycle, gone = node, weakref.ref(node)
            del node  # garbage now, freed only by a collection
        if mode == "MULTIRUN":
            assert gc.get_freeze_count() == 0 and gone() is None
        else:
            assert gc.get_freeze_count() > 0  # until the process exits
    finally:
        gc.unfreeze()
        gc.enable()
        hydra.cfg = before
