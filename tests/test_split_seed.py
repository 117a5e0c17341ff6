"""The validation split's seed: `data.split_seed` (null: the run's seed), and a run from `ckpt_path` on the same data
keeps the split its checkpoint's run held out, so that no seed validates on images the checkpoint trained on."""

from __future__ import annotations

import logging
import re
from dataclasses import replace

import pytest
import torch

from tests.builders import splits_of
from tests.conftest import compose_config
from vitexp import VitexpError, checkpoint
from vitexp.config import typed
from vitexp.data import split_indices
from vitexp.tasks.recipe import held_out


def _checkpoint(path, config):
    state = {"model": {"w": torch.zeros(1)}, "arch": {"builder": "vit", "name": "x", "kwargs": {}}, "config": config}
    checkpoint.save(state, path)
    return path


def test_the_split_seed_sets_the_validation_images_whatever_the_run_seed():
    val = splits_of(compose_config("seed=1", "data.split_seed=7")).val.indices
    assert val == split_indices(1797, 360, None, 7)[1] and val != split_indices(1797, 360, None, 1)[1]
    assert splits_of(compose_config("seed=7")).val.indices == val  # null: the run's seed


def test_a_run_from_a_checkpoint_validates_on_the_images_its_run_held_out(tmp_path, caplog):
    ckpt = _checkpoint(tmp_path / "a.pt", {"seed": 0, "data": {"name": "digits", "val_size": 360, "split_seed": None}})
    settings = typed(compose_config("seed=1", f"ckpt_path={ckpt}"))
    with caplog.at_level(logging.INFO, logger="vitexp"):
        kept = held_out(settings)
    assert (kept.seed, kept.data.split_seed, kept.data.val_size) == (1, 0, 360)
    assert "validating on the images" in caplog.text and "held out: data.split_seed=0" in caplog.text
    assert held_out(replace(settings, seed=0)) == replace(settings, seed=0)  # the same split already: unchanged
    recorded = _checkpoint(tmp_path / "b.pt", {"seed": 3, "data": {"name": "digits", "val_size": 0.3, "split_seed": 5}})
    kept = held_out(replace(settings, ckpt_path=str(recorded)))
    assert (kept.data.split_seed, kept.data.val_size) == (5, 0.3)  # its split seed wins over its run seed
    other = _checkpoint(tmp_path / "c.pt", {"seed": 3, "data": {"name": "cifar10", "val_size": 0.5}})
    assert held_out(replace(settings, ckpt_path=str(other))) == replace(settings, ckpt_path=str(other))
    assert held_out(replace(settings, ckpt_path=None)) == replace(settings, ckpt_path=None)


@pytest.mark.parametrize(
    "config",
    [
        {"seed": "0", "data": {"name": "digits", "val_size": 360}},
        {"seed": -1, "data": {"name": "digits", "val_size": 360}},
        {"seed": True, "data": {"name": "digits", "val_size": 360}},
        {"seed": 0, "data": {"name": "digits", "val_size": [1]}},
        {"seed": 0, "data": {"name": "digits", "val_size": 0}},
        {"data": {"name": "digits", "val_size": 360}},
    ],
)
def test_a_checkpoint_whose_split_is_not_plain_numbers_is_one_line(tmp_path, config):
    data = typed(compose_config()).data
    with pytest.raises(VitexpError, match=r"^digits split settings in the checkpoint are not plain numbers \(seed "):
        checkpoint.trained_split({"config": config}, data)
    assert checkpoint.trained_split({}, data) == (None, 360)  # no record: this config's own


def test_the_refusal_names_both_values_as_data(tmp_path):
    data = typed(compose_config()).data
    record = {"seed": "s\x1b" + "x" * 60, "data": {"name": "digits", "val_size": [1]}}
    message = "digits split settings in the checkpoint are not plain numbers (seed s\\x1b" + "x" * 32
    with pytest.raises(
        VitexpError, match=rf"^{re.escape(message)}\.\.\., val_size \[1\]\); pass a checkpoint vitexp wrote$"
    ):
        checkpoint.trained_split({"config": record}, data)
