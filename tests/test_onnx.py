"""ONNX export: every model kind vitexp trains exports with a dynamic batch axis, passes onnx.checker and matches torch
in onnxruntime on validation images; pruned widths survive; a mismatch above the tolerance writes nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from tests.conftest import REPO, TINY, vitexp
from vitexp import VitexpError, onnx_export
from vitexp.checkpoint import load_model

# one epoch of a few batches: the weights only need to be trained ones, not good ones
SHORT = [*TINY, "trainer.max_epochs=1", "trainer.precision=32"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """One checkpoint of each kind, each made once: the baseline and its global pruning with a pruned embedding
    width (one command), a token-distilled student and its on-demand CNN teacher (one command), and, in slow runs,
    a uniformly pruned model, patch8 and a model=timm DeiT."""
    cwd = tmp_path_factory.mktemp("kinds")
    vitexp(*SHORT, "task=prune", "task.allocation=global", "task.prune_embed=true", "hydra.run.dir=pg", cwd=cwd)
    vitexp(
        *SHORT,
        "task=distill",
        "task.distill_type=token",
        "task.teacher.name=resnet10t",
        "hydra.run.dir=dt",
        cwd=cwd,
    )
    return {
        "baseline": cwd / "pg/unpruned/checkpoints/best.pt",
        "pruned_global_embed": cwd / "pg/checkpoints/best.pt",
        "distilled_token": cwd / "dt/checkpoints/best.pt",
        "cnn_teacher": cwd / "dt/teacher/checkpoints/best.pt",
    }


@pytest.fixture(scope="module")
def slow_checkpoints(checkpoints, tmp_path_factory) -> dict[str, Path]:
    """The kinds that add a run each: a uniform pruning of the baseline, patch8, a model=timm DeiT."""
    cwd = tmp_path_factory.mktemp("slow_kinds")
    vitexp(*SHORT, "task=prune", f"ckpt_path={checkpoints['baseline']}", "hydra.run.dir=pu", cwd=cwd)
    vitexp(*SHORT, "model=patch8", "hydra.run.dir=p8", cwd=cwd)
    vitexp(*SHORT, "model=timm", "model.name=deit_tiny_patch16_224", "model.patch_size=4", "hydra.run.dir=tm", cwd=cwd)
    return {
        "pruned_uniform": cwd / "pu/checkpoints/best.pt",
        "patch8": cwd / "p8/checkpoints/best.pt",
        "timm_deit": cwd / "tm/checkpoints/best.pt",
    }


def _check_export(ckpt: Path, out: Path) -> dict:
    """Export `ckpt` to `out` and check the file independently of the export's own verification."""
    report = onnx_export.export_onnx(ckpt, out)
    assert set(report.max_abs_diff) == {1, 5} and max(report.max_abs_diff.values()) <= report.limit
    return _check_files(ckpt, out)


def _check_files(ckpt: Path, out: Path) -> dict:
    """onnx.checker on the written file, its named batch axis, and onnxruntime against torch at batch 1, 5 and 3."""
    proto = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a named, dynamic batch axis
    card = json.loads((out / "model.json").read_text())
    model, _ = load_model(ckpt)
    runner = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 5, 3):
        x = torch.randn(batch, *card["input_size"], generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = model.eval()(x).numpy()
        got = runner.run(["logits"], {"images": x.numpy()})[0]
        assert got.shape == (batch, card["num_classes"])
        assert np.abs(got - expected).max() <= onnx_export.TOLERANCE * max(1.0, np.abs(expected).max())
    return card


@pytest.mark.parametrize("kind", ["pruned_global_embed", "distilled_token", "cnn_teacher"])
def test_each_model_kind_exports_checks_and_matches_torch_at_batch_1_and_5(checkpoints, kind, tmp_path):
    card = _check_export(checkpoints[kind], tmp_path / kind)
    assert card["classes"] == [str(d) for d in range(10)]  # digits: the class names the data set gives
    assert card["image_mode"] == "L" and card["input_size"][0] == 1 and card["mean"] == [0.5]
    assert card["verified"]["limit"] >= onnx_export.TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["pruned_uniform", "patch8", "timm_deit"])
def test_more_model_kinds_export(slow_checkpoints, kind, tmp_path):
    _check_export(slow_checkpoints[kind], tmp_path / kind)


def test_the_onnx_graph_holds_the_pruned_widths(checkpoints, tmp_path):
    onnx_export.export_onnx(checkpoints["pruned_global_embed"], tmp_path)
    initializers = {i.name: tuple(i.dims) for i in onnx.load(str(tmp_path / "model.onnx")).graph.initializer}
    pruned, saved = load_model(checkpoints["pruned_global_embed"])
    dense, _ = load_model(checkpoints["baseline"])
    kwargs = saved["arch"]["kwargs"]
    assert kwargs["embed_width"] < dense.embed_dim
    widths = {"cls_token": (1, 1, kwargs["embed_width"])}
    widths |= {f"blocks.{b}.mlp.fc1.bias": (w,) for b, (_, w) in enumerate(kwargs["layout"])}
    for name, shape in widths.items():
        assert initializers[name] == shape == tuple(pruned.state_dict()[name].shape)
    assert any(initializers[n] != tuple(dense.state_dict()[n].shape) for n in widths)


def test_a_mismatch_above_the_tolerance_writes_nothing(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export, "TOLERANCE", -1.0)  # no difference passes a negative limit
    with pytest.raises(VitexpError, match="differ from torch's.*nothing was written"):
        onnx_export.export_onnx(checkpoints["baseline"], tmp_path / "out")
    assert not (tmp_path / "out" / "model.onnx").exists()


def test_the_baseline_exports_from_the_command_line(checkpoints, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vitexp.export",
            str(checkpoints["baseline"]),
            "--format",
            "onnx",
            "--out",
            str(tmp_path / "o"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "max abs diff batch 1:" in proc.stdout and "batch 5:" in proc.stdout
    card = _check_files(checkpoints["baseline"], tmp_path / "o")
    assert card["classes"] == [str(d) for d in range(10)] and card["verified"]["max_abs_diff"].keys() == {"1", "5"}
    with pytest.raises(VitexpError, match="checkpoint not found"):
        onnx_export.export_onnx(tmp_path / "none.pt", tmp_path / "o2")
