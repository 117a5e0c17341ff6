"""Atomic save; weights-only load; every bad file is a one-line error."""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import TINY, vitexp
from vitexp import VitexpError, checkpoint
from vitexp.models import Arch

STATE = {"model": {"w": torch.arange(6.0)}, "arch": {"builder": "vit", "name": "x", "kwargs": {}}, "epoch": 3}


def test_save_is_atomic_and_loads_weights_only(tmp_path):
    path = tmp_path / "ckpt" / "last.pt"
    checkpoint.save(STATE, path)
    checkpoint.save({**STATE, "epoch": 4}, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]
    assert torch.load(path, weights_only=True)["epoch"] == 4
    assert torch.equal(checkpoint.load(path)["model"]["w"], STATE["model"]["w"])


def test_failed_save_keeps_the_previous_file(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save(STATE, path)
    with pytest.raises((AttributeError, pickle.PicklingError)):
        checkpoint.save({**STATE, "bad": lambda: None}, path)
    assert checkpoint.load(path)["epoch"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_missing_truncated_and_foreign_files(tmp_path):
    with pytest.raises(VitexpError, match="not found"):
        checkpoint.load(tmp_path / "nope.pt")
    path = tmp_path / "last.pt"
    checkpoint.save(STATE, path)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:300])
    with pytest.raises(VitexpError, match="truncated or corrupt"):
        checkpoint.load(truncated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(VitexpError, match="truncated or corrupt|refused"):
        checkpoint.load(garbage)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(VitexpError, match="not a vitexp checkpoint"):
        checkpoint.load(foreign)


class Payload:
    def __reduce__(self):
        return (Path.touch, (Path(MARKER),))


MARKER = ""


def test_pickle_that_runs_code_is_refused_and_never_runs(tmp_path):
    global MARKER
    MARKER = str(tmp_path / "payload_ran")
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "arch": {}, "x": Payload()}, evil)
    assert not Path(MARKER).exists()
    with pytest.raises(VitexpError, match="refused"):
        checkpoint.load(evil)
    assert not Path(MARKER).exists()
    with pytest.raises(pickle.UnpicklingError):
        torch.load(evil, weights_only=True)
    for args in (["task=evaluate", f"ckpt_path={evil}"], [*TINY, f"ckpt_path={evil}"], [f"resume={tmp_path}"]):
        if args[0].startswith("resume"):
            (tmp_path / "checkpoints").mkdir(exist_ok=True)
            (tmp_path / "checkpoints" / "last.pt").write_bytes(evil.read_bytes())
        proc = vitexp(*args, cwd=tmp_path, check=False)
        assert proc.returncode == 2 and "refused to load" in proc.stderr.strip().splitlines()[-1], proc.stderr
        assert not Path(MARKER).exists()
    torch.load(evil, weights_only=False)  # the payload is live: an unguarded load runs it
    assert Path(MARKER).exists()


def test_rng_state_round_trips_through_a_file(tmp_path):
    path = tmp_path / "rng.pt"
    checkpoint.save({**STATE, "rng": checkpoint.rng_state()}, path)
    expected = (random.random(), np.random.rand(), torch.rand(2))
    checkpoint.set_rng_state(checkpoint.load(path)["rng"])
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert expected[:2] == got[:2] and torch.equal(expected[2], got[2])


def test_the_training_state_is_the_layout_a_weights_only_load_reads(tmp_path):
    arch = Arch("vit", "x", {})
    state = checkpoint.TrainingState(model=STATE["model"], arch=arch, epoch=3, step=9, config={"seed": 0})
    saved = state.state_dict()
    assert type(saved["arch"]) is dict and saved["arch"] == STATE["arch"]  # plain data on disk, the typed arch here
    assert list(saved) == list(checkpoint.KEYS) and saved[checkpoint.FORMAT] == checkpoint.FORMAT_VERSION
    for key in ("model", "arch", "optimizer", "scheduler", "scaler", "ema", "epoch", "step", "rng", "config"):
        assert key in saved  # the layout DESIGN.md names
    assert {"metrics", "wandb_run_id", "version"} <= saved.keys()
    checkpoint.save(saved, tmp_path / "last.pt")
    loaded = torch.load(tmp_path / "last.pt", weights_only=True)
    again = checkpoint.TrainingState.from_state_dict(loaded, "last.pt")
    assert again.arch == arch and (again.epoch, again.step, again.config, again.version) == (
        3,
        9,
        {"seed": 0},
        saved["version"],
    )
    assert torch.equal(again.model["w"], STATE["model"]["w"])


def test_a_checkpoint_of_another_format_names_the_version_that_wrote_it(tmp_path):
    path = tmp_path / "old.pt"
    checkpoint.save({**STATE, "format": 1, "version": "0.0.9"}, path)
    with pytest.raises(VitexpError) as e:
        checkpoint.load(path)
    message = str(e.value)
    assert "\n" not in message and "checkpoint format 1" in message and "(0.0.9)" in message, message


def test_a_pickle_that_runs_code_is_refused_in_process(tmp_path):
    """The same refusal without a child process: the payload would create a file if unpickled."""
    global MARKER
    MARKER = str(tmp_path / "ran")
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "arch": {}, "x": Payload()}, path)
    with pytest.raises(VitexpError, match=rf"^refused to load {path}: it holds objects other than tensors"):
        checkpoint.load(path)
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("content", [{"model": {}}, {"arch": {}}, [1, 2]], ids=["no arch", "no model", "a list"])
def test_a_file_without_model_and_arch_is_not_a_checkpoint(content, tmp_path):
    path = tmp_path / "partial.pt"
    torch.save(content, path)
    with pytest.raises(VitexpError, match=r"is not a vitexp checkpoint \(no 'model' and 'arch' entries\)$"):
        checkpoint.load(path)


def test_a_failed_write_says_whether_the_previous_file_is_kept(tmp_path, monkeypatch):
    def full(obj, f):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(VitexpError, match=r"\(No space left on device\): free disk space .*hydra\.run\.dir$"):
        checkpoint.save(STATE, tmp_path / "first.pt")
    monkeypatch.undo()
    checkpoint.save(STATE, tmp_path / "last.pt")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(VitexpError, match=r"hydra\.run\.dir; the previous last\.pt is kept$"):
        checkpoint.save(STATE, tmp_path / "last.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_a_version_that_is_not_a_string_is_named(tmp_path):
    path = tmp_path / "v.pt"
    torch.save({**STATE, "version": 3}, path)
    with pytest.raises(VitexpError, match=r"v\.pt: version is a int, not a string; pass one vitexp wrote$"):
        checkpoint.load(path)
