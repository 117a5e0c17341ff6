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
