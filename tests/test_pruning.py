"""Structural pruning: consistent shapes, exactness at ratio 0, rebuilds, fused attention, the CLI pipeline."""

from __future__ import annotations

import json

import pytest
import torch
from hydra.utils import instantiate

from tests.conftest import TINY, compose_config, vitexp
from vitexp import checkpoint
from vitexp.models import arch_of, build_from_arch, cnn, count_macs, count_params
from vitexp.pruning import layout_of, prune

X = torch.randn(3, 3, 32, 32)


def _model():
    torch.manual_seed(0)
    return instantiate(compose_config("data=cifar10", "model.depth=3").model).eval()


def _pruned_arch(model, ratio):
    kwargs = dict(arch_of(model)["kwargs"])
    return {"builder": "pruned_vit", "name": "pruned", "kwargs": {**kwargs, "ratio": ratio, "layout": layout_of(model)}}


@pytest.mark.parametrize("importance", ["magnitude", "taylor", "random"])
def test_pruned_shapes_and_head_counts_are_consistent(importance):
    model = _model()
    calibration = [(X, torch.tensor([0, 1, 2]))]
    layouts = prune(model, 0.5, importance, X[:1], steps=2, calibration=calibration)
    assert layouts[-1] == [[2, 256]] * 3 and layouts[0] == [[3, 384]] * 3
    for block in model.blocks:
        attn = block.attn
        assert attn.qkv.out_features == 3 * attn.num_heads * attn.head_dim == 3 * attn.attn_dim
        assert attn.proj.in_features == attn.attn_dim and attn.head_dim == 64
        assert block.mlp.fc1.out_features == block.mlp.fc2.in_features == 256
    assert model.embed_dim == model.blocks[0].attn.qkv.in_features == 256  # the embedding width is kept
    model.train()
    model(X).sum().backward()  # backward works


def test_ratio_zero_is_the_identity():
    model = _model()
    expected = model(X)
    prune(model, 0.0, "magnitude", X[:1])
    torch.testing.assert_close(model(X), expected, rtol=0, atol=0)


def test_half_ratio_halves_params_and_macs():
    model = _model()
    params, macs = count_params(model), count_macs(model)
    prune(model, 0.5, "magnitude", X[:1])
    assert count_params(model) <= 0.55 * params and count_macs(model) <= 0.55 * macs


def test_pruned_state_round_trips_through_arch_and_fused_attention_agrees():
    model = _model()
    prune(model, 0.5, "magnitude", X[:1])
    clone = build_from_arch(_pruned_arch(model, 0.5)).eval()
    clone.load_state_dict(model.state_dict())
    fused = clone(X)
    torch.testing.assert_close(fused, model(X))
    for block in clone.blocks:
        block.attn.fused_attn = not block.attn.fused_attn
    torch.testing.assert_close(clone(X), fused, rtol=1e-5, atol=1e-5)


def test_model_pruned_is_uniform_and_trainable():
    model = instantiate(compose_config("model=pruned", "model.ratio=0.5", "data=cifar10").model)
    assert layout_of(model) == [[2, 256]] * 7
    model(X).sum().backward()


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """One command: train the tiny baseline, prune half of it, fine-tune."""
    cwd = tmp_path_factory.mktemp("prune")
    vitexp(*TINY, "task=prune", "task.ratio=0.5", "task.importance=taylor", "task.rounds=2", cwd=cwd)
    (run,) = (cwd / "outputs" / "prune" / "baseline").iterdir()
    return run


def test_one_command_pipeline_reports_before_pruned_after(pipeline):
    results = json.loads((pipeline / "results.json").read_text())
    for stage in ("before", "pruned", "after"):
        for key in ("val_acc1", "params", "macs", "infer_img_per_s", "latency_ms"):
            assert f"{stage}_{key}" in results, f"{stage}_{key}"
    assert results["pruned_params"] < results["before_params"] and results["after_macs"] == results["pruned_macs"]
    assert (pipeline / "unpruned" / "checkpoints" / "best.pt").is_file()
    assert (pipeline / "plots" / "accuracy_vs_macs.png").is_file()
    arch = torch.load(pipeline / "checkpoints" / "best.pt", weights_only=True)["arch"]
    assert arch["builder"] == "pruned_vit" and arch["kwargs"]["layout"] == [[1, 64], [1, 64]]


def test_pruned_checkpoint_evaluates_and_distils(pipeline, tmp_path):
    best = pipeline / "checkpoints" / "best.pt"
    vitexp(*TINY, "task=evaluate", f"ckpt_path={best}", cwd=tmp_path)
    (out,) = (tmp_path / "outputs" / "evaluate").glob("*/*")
    logged = torch.load(best, weights_only=True)["metrics"]["val/acc1"]
    assert json.loads((out / "results.json").read_text())["val_acc1"] == pytest.approx(logged)
    vitexp(*TINY, "task=distill", "model=pruned", f"ckpt_path={best}", f"task.teacher_ckpt={best}", cwd=tmp_path)


def test_bad_prune_input_is_one_line(tmp_path):
    path = tmp_path / "cnn.pt"
    model = cnn("resnet10t", "resnet10t", 16, 1, 10, False)
    checkpoint.save({"model": model.state_dict(), "arch": model.vitexp_arch, "config": {}}, path)
    for args, fragment in (([f"ckpt_path={path}"], "takes a ViT checkpoint"),
                           ([f"ckpt_path={path}", "task.ratio=1.0"], "task.ratio=1.0 is not valid: it must be a number in [0, 1)")):  # fmt: skip
        proc = vitexp(*TINY, "task=prune", *args, cwd=tmp_path, check=False)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        assert fragment in proc.stderr.strip().splitlines()[-1]
