"""trainer.grad_checkpointing: timm's set_grad_checkpointing on the model a run trains (pruned ones too, compiled or
not), with the same losses as without it, drop path on."""

from __future__ import annotations

import pytest
import torch
import torch.utils.checkpoint
from torch import nn

from tests.conftest import TINY, compose_config, metric_rows
from vitexp import VitexpError
from vitexp.tasks.recipe import read_recipe
from vitexp.training import fit, grad_checkpointing

DROP_PATH = ["trainer.max_epochs=1", "model.drop_path_rate=0.3", "trainer.precision=32"]


def _fit(tmp_path, name: str, *overrides: str) -> list[dict[str, str]]:
    fit(read_recipe(compose_config(*TINY, *DROP_PATH, *overrides)), tmp_path / name)
    return metric_rows(tmp_path / name / "metrics.csv")


@pytest.mark.parametrize("model", ["baseline", "pruned"])
def test_the_losses_are_those_of_the_run_without_it(model, tmp_path, monkeypatch):
    calls = []
    real = torch.utils.checkpoint.checkpoint

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    without = _fit(tmp_path, "without", f"model={model}")
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counted)  # timm calls it through the module
    with_it = _fit(tmp_path, "with", f"model={model}", "trainer.grad_checkpointing=true")
    assert calls  # the blocks ran under torch's checkpoint
    assert with_it == without
    # drop path draws from the generator in these runs: the same runs without it have other losses
    assert _fit(tmp_path, "no_drop", f"model={model}", "model.drop_path_rate=0") != without


@pytest.mark.slow
def test_the_losses_are_the_same_under_torch_compile(tmp_path):
    compiled = ["trainer.compile=true"]
    assert _fit(tmp_path, "with", *compiled, "trainer.grad_checkpointing=true") == _fit(tmp_path, "without", *compiled)


def test_a_model_without_it_is_a_one_line_error():
    with pytest.raises(VitexpError, match=r"^model \(Linear\) has no timm set_grad_checkpointing; set trainer"):
        grad_checkpointing(nn.Linear(2, 2))
