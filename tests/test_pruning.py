"""Structural pruning: consistent shapes, exactness at ratio 0, global allocation and rounding, rebuilds in a fresh
process, fused attention, the CLI pipeline and the pruning benches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from tests.builders import model_of, prune_settings
from tests.conftest import TINY, compose_config, vitexp
from vitexp import VitexpError, checkpoint
from vitexp.bench import prune_speed, prune_vs_scratch
from vitexp.config import validate
from vitexp.models import arch_of, build_from_arch, count_macs, count_params, timm_model
from vitexp.pruning import global_layout, layout_of, prune, uniform_layout
from vitexp.tasks.recipe import read_recipe
from vitexp.training import _step_models

X = torch.randn(3, 3, 32, 32)


def _model():
    torch.manual_seed(0)
    return model_of(compose_config("data=cifar10", "model.depth=3").model).eval()


def _settings(ratio, importance="magnitude", **changes):
    """task=prune's settings: `ratio` by `importance` in one round, uniform, exact widths, unless `changes` say."""
    one = {"rounds": 1, "allocation": "uniform", "round_to": 1, "prune_embed": False}
    return prune_settings(ratio=ratio, importance=importance, **(one | changes))


def _pruned_arch(model, ratio):
    return replace(arch_of(model).with_kwargs(ratio=ratio, layout=layout_of(model)), name="pruned")


@pytest.mark.parametrize("importance", ["magnitude", "taylor", "random"])
def test_pruned_shapes_and_head_counts_are_consistent(importance):
    model = _model()
    calibration = [(X, torch.tensor([0, 1, 2]))]
    layouts = prune(model, _settings(0.5, importance, rounds=2), X[:1], calibration)
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
    prune(model, _settings(0.0), X[:1])
    torch.testing.assert_close(model(X), expected, rtol=0, atol=0)


def test_half_ratio_halves_params_and_macs():
    model = _model()
    params, macs = count_params(model), count_macs(model)
    prune(model, _settings(0.5), X[:1])
    # heads and MLP channels halve; the embeddings, norms and head keep theirs
    assert 0.45 * params <= count_params(model) <= 0.55 * params and 0.45 * macs <= count_macs(model) <= 0.55 * macs


def test_pruned_state_round_trips_through_arch_and_fused_attention_agrees():
    model = _model()
    prune(model, _settings(0.5), X[:1])
    clone = build_from_arch(_pruned_arch(model, 0.5)).eval()
    clone.load_state_dict(model.state_dict())
    fused = clone(X)
    torch.testing.assert_close(fused, model(X))
    for block in clone.blocks:
        block.attn.fused_attn = not block.attn.fused_attn
    torch.testing.assert_close(clone(X), fused, rtol=1e-5, atol=1e-5)


def test_model_pruned_is_uniform_and_trainable():
    model = model_of(compose_config("model=pruned", "model.ratio=0.5", "data=cifar10").model)
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
    assert arch["builder"] == "vit" and arch["kwargs"]["layout"] == [[1, 64], [1, 64]]


def test_pruned_checkpoint_evaluates_and_distils(pipeline, tmp_path):
    best = pipeline / "checkpoints" / "best.pt"
    vitexp(*TINY, "task=evaluate", f"ckpt_path={best}", cwd=tmp_path)
    (out,) = (tmp_path / "outputs" / "evaluate").glob("*/*")
    logged = torch.load(best, weights_only=True)["metrics"]["val/acc1"]
    assert json.loads((out / "results.json").read_text())["val_acc1"] == pytest.approx(logged)
    vitexp(*TINY, "task=distill", "model=pruned", f"ckpt_path={best}", f"task.teacher_ckpt={best}", cwd=tmp_path)


def test_bad_prune_input_is_one_line(tmp_path):
    path = tmp_path / "cnn.pt"
    model = timm_model("resnet10t", 16, 1, 10)
    checkpoint.save({"model": model.state_dict(), "arch": arch_of(model).to_dict(), "config": {}}, path)
    for args, fragment in (
        ([f"ckpt_path={path}"], "takes a ViT checkpoint"),
        ([f"ckpt_path={path}", "task.ratio=1.0"], "task.ratio=1.0 is not valid: it must be a number in [0, 1)"),
    ):
        proc = vitexp(*TINY, "task=prune", *args, cwd=tmp_path, check=False)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        assert fragment in proc.stderr.strip().splitlines()[-1]


def _globally_pruned(round_to=8):
    """A model whose block 0 has 3/4 dead MLP channels and block 1 three dead heads, pruned globally at 0.5."""
    model = _model()
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight[:384] = 0
        model.blocks[0].mlp.fc1.bias[:384] = 0
        model.blocks[1].attn.qkv.weight.view(3, 4, 64, -1)[:, :3] = 0
        model.blocks[1].attn.qkv.bias.view(3, 4, 64)[:, :3] = 0
    prune(model, _settings(0.5, allocation="global", round_to=round_to), X[:1])
    return model


def test_global_allocation_takes_from_the_weakest_blocks_at_uniforms_macs():
    uniform = _model()
    prune(uniform, _settings(0.5), X[:1])
    model = _globally_pruned()
    layout = layout_of(model)
    assert layout[0][1] <= 136 and layout[1][0] == 1, layout  # the dead channels and heads went first
    assert sum(h for h, _ in layout) == 6 and sum(w for _, w in layout) == 768  # the uniform totals
    assert all(h >= 1 and w % 8 == 0 for h, w in layout)
    assert count_macs(model) == count_macs(uniform)
    model.train()
    model(X).sum().backward()


def test_global_taylor_ranks_blocks_by_loss_change_not_by_each_blocks_own_spread():
    """Block 1's MLP output scaled by 1e-3 changes the loss 1000x less when a channel goes: unnormalised Taylor
    scores rank all of its channels last, so it keeps the floor (8); a per-block normaliser would hide the scale.
    Block 2's heads are scaled alike (value rows), so it keeps one head. Totals and MACs stay uniform's."""
    torch.manual_seed(0)
    model, uniform = _model(), _model()
    with torch.no_grad():
        model.blocks[1].mlp.fc2.weight.mul_(1e-3)
        model.blocks[2].attn.qkv.weight.view(3, 4, 64, -1)[2].mul_(1e-3)
        model.blocks[2].attn.proj.weight.mul_(1e-3)
    calibration = [(torch.randn(8, 3, 32, 32), torch.arange(8))]
    prune(model, _settings(0.5, "taylor", allocation="global", round_to=8), X[:1], calibration)
    prune(uniform, _settings(0.5, round_to=8), X[:1])
    layout = layout_of(model)
    assert layout[1][1] == 8 and layout[2][0] == 1, layout
    assert sum(h for h, _ in layout) == 6 and sum(w for _, w in layout) == 768
    assert count_macs(model) == count_macs(uniform)


def test_global_taylor_ranks_again_after_each_step_of_a_round(monkeypatch):
    """Each of a round's `GLOBAL_STEPS` steps scores the model as the steps before left it and removes a further
    quarter of the round's share; magnitude, and uniform allocation, rank once a round."""
    from vitexp import pruning

    seen, scores = [], pruning.block_scores

    def spy(model, *args):
        seen.append([list(map(int, block)) for block in layout_of(model)])
        return scores(model, *args)

    monkeypatch.setattr(pruning, "block_scores", spy)
    calibration = [(torch.randn(8, 3, 32, 32), torch.arange(8))]
    rounds = []
    layouts = prune(
        _model(),
        _settings(0.5, "taylor", allocation="global", rounds=2),
        X[:1],
        calibration,
        after_round=rounds.append,
    )
    assert pruning.GLOBAL_STEPS == 4 and len(seen) == 8 and rounds == [1, 2] and len(layouts) == 2
    # each step starts from uniform's totals at its share so far: 1/16 of the heads and channels more at every step
    totals = [[sum(column) for column in zip(*layout)] for layout in seen]
    assert totals == [[sum(c) for c in zip(*uniform_layout(3, 4, 512, 0.5 * s / 8))] for s in range(8)]
    assert totals[0] == [12, 1536] and [sum(c) for c in zip(*layouts[-1])] == [6, 768]
    seen.clear()
    prune(_model(), _settings(0.5, "magnitude", allocation="global", rounds=2), X[:1])
    assert len(seen) == 2


def test_rounding_gives_multiples_and_keeps_the_budget():
    torch.manual_seed(1)
    scores = [(torch.rand(4), torch.rand(512) * (i + 1)) for i in range(5)]
    for multiple in (1, 8, 16, 64):
        layout = global_layout(scores, 10, 5 * 300, multiple)
        widths = [w for _, w in layout]
        assert all(w % multiple == 0 and multiple <= w <= 512 for w in widths), (multiple, widths)
        assert sum(widths) == (5 * 300) // multiple * multiple and sum(h for h, _ in layout) == 10
    assert uniform_layout(2, 4, 512, 0.3, 8) == [[3, 360]] * 2 and uniform_layout(1, 4, 512, 0.3)[0][1] == 358
    model = _model()
    calibration = [(X, torch.tensor([0, 1, 2]))]
    prune(model, _settings(0.3, "taylor", allocation="global", round_to=8), X[:1], calibration)
    assert all(w % 8 == 0 for _, w in layout_of(model))
    assert sum(w for _, w in layout_of(model)) == 3 * 360


def test_fused_and_unfused_attention_agree_after_global_pruning():
    model = _globally_pruned()
    assert len({h for h, _ in layout_of(model)}) > 1  # blocks keep different head counts
    fused = model(X)
    for block in model.blocks:
        block.attn.fused_attn = not block.attn.fused_attn
    torch.testing.assert_close(model(X), fused, rtol=1e-5, atol=1e-5)


def test_global_layout_rebuilds_in_a_fresh_process_and_loads_weights_only(tmp_path):
    model = _globally_pruned()
    path = tmp_path / "pruned.pt"
    checkpoint.save(
        {"model": model.state_dict(), "arch": _pruned_arch(model, 0.5).to_dict(), "x": X, "y": model(X).detach()}, path
    )
    code = (
        "import sys, torch\n"
        "from vitexp.models import Arch, build_from_arch\n"
        "saved = torch.load(sys.argv[1], weights_only=True)\n"
        "model = build_from_arch(Arch.from_dict(saved['arch'], sys.argv[1])).eval()\n"
        "model.load_state_dict(saved['model'])\n"
        "torch.testing.assert_close(model(saved['x']), saved['y'])\n"
        "print([[b.attn.num_heads, b.mlp.fc1.out_features] for b in model.blocks])\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(layout_of(model))


def test_bad_allocation_and_rounding_are_one_line_errors():
    with pytest.raises(VitexpError, match="task.allocation='best' is not valid: choose one of uniform, global"):
        validate(compose_config("task=prune", "task.allocation=best"))
    with pytest.raises(VitexpError, match="task.round_to=1024 must be at most the MLP width"):
        prune(_model(), _settings(0.5, round_to=1024), X[:1])


def test_prune_speed_bench_times_every_shape(capsys):
    prune_speed.main(
        [
            "--no-compile",
            "--repeats",
            "1",
            "--min-s",
            "0",
            "--batches",
            "1,4",
            "data=digits",
            "model.depth=2",
            "task.round_to=8",
            "trainer.device=cpu",
        ]
    )
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]
    assert [r["model"] for r in rows][:3] == ["dense", "uniform_r8", "global_r8"]
    for row in rows:
        assert row["img_per_s_eager_b4"] > 0 and row["latency_ms_eager"] > 0
    assert rows[1]["mac_ratio"] > 1.5 and rows[0]["speedup_eager_b1"] == 1.0


@pytest.mark.slow
def test_prune_vs_scratch_bench_runs_end_to_end(pipeline, tmp_path):
    dense = pipeline / "unpruned" / "checkpoints" / "best.pt"
    prune_vs_scratch.main(
        [*TINY, "trainer.compile=false", f"ckpt_path={dense}", "--budgets", "1", "--seeds", "2", "--out", str(tmp_path)]
        + ["--target_model", "model.depth=1", "--no-distill"]
    )
    results = json.loads((tmp_path / "results.json").read_text())
    methods = [(r["method"], r["allocation"]) for r in results["summary"]]
    assert methods[0] == ("dense", "-") and ("scratch", "uniform") in methods
    assert ("prune + fine-tune", "uniform") in methods and ("prune + fine-tune", "global") in methods
    # the 2-block dense model pruned to a 1-block model's MACs, against that model trained 2 + 1 epochs
    target = {r["method"]: r for r in results["summary"] if "target" in r["method"]}
    assert target["wide pruned to target + fine-tune"]["macs"] <= target["target from scratch (2 + N epochs)"]["macs"]
    assert (tmp_path / "seed0" / "target_scratch_3ep" / "checkpoints" / "best.pt").is_file()
    assert all(r["n"] == 2 for r in results["summary"]) and {r["seed"] for r in results["runs"]} == {0, 1}
    assert all(0 <= r["val_acc1"] <= 1 and r["img_per_s_eager_b256"] > 0 for r in results["runs"])
    assert (tmp_path / "plots" / "prune_vs_scratch.png").is_file() and (tmp_path / "table.md").is_file()
    assert (tmp_path / "seed1" / "global_ft_1ep" / "checkpoints" / "best.pt").is_file()


def test_a_pruned_model_compiled_after_its_unpruned_one_gets_static_shapes(monkeypatch):
    """torch.compile in the training step specializes every shape: a pruned model compiled in the process that
    trained its unpruned one gets the same (static) kernels as a resumed process compiling it first, so the
    fine-tuning resumes exactly. Recorded with a backend that notes whether dynamo handed it symbolic shapes."""
    symbolic = []

    def recording(gm, example_inputs):
        sizes = [s for x in example_inputs for s in (x.shape if isinstance(x, torch.Tensor) else [x])]
        symbolic.append(any(isinstance(s, torch.SymInt) for s in sizes))
        return gm.forward

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, **{**kw, "backend": recording}))
    torch._dynamo.reset()
    recipe = read_recipe(compose_config(*TINY, "trainer.compile=true"), with_data=False)
    x = torch.randn(4, 1, 16, 16)
    for width in (64, 48, 32):  # the unpruned model, then pruned ones (new sizes of the same dimensions)
        model = build_from_arch(recipe.arch.with_kwargs(embed_dim=width))
        train_step, evaluate = _step_models(recipe, model)
        train_step(x).sum().backward()
        with torch.no_grad():
            evaluate(x[:3])  # a last, smaller evaluation batch
    torch._dynamo.reset()
    assert symbolic and not any(symbolic)
