"""The recipes' pieces in-process, on a tiny model and the embedded digits: fit, the checkpoint state, an exact
resume, sub-runs, the results, and the pruning and distillation steps."""

from __future__ import annotations

import functools
import json
import os
from dataclasses import replace

import pytest
import torch
from torch import nn

from tests.builders import prune_settings
from tests.conftest import TINY, compose_config, metric_rows
from vitexp import VitexpError, checkpoint, engine, stop, training
from vitexp.config import validate
from vitexp.distill import Distiller, TeacherOnly
from vitexp.models import build_from_arch
from vitexp.tasks.distill import score_teacher
from vitexp.tasks.prune import finetune_recipe, measure_stage, prune_checkpoint
from vitexp.tasks.recipe import read_recipe
from vitexp.training import RunState, checkpoint_state, fit, optimization, restore, sub_run, train_in


@pytest.fixture(scope="module")
def recipe():
    """The tiny recipe: a 2-block ViT, 3 train and 2 val batches per epoch, 2 epochs, CPU."""
    return read_recipe(compose_config(*TINY))


@pytest.fixture(scope="module")
def trained(recipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("fit")
    return out, fit(recipe, out)


def test_fit_leaves_checkpoints_metrics_plots_and_results(trained):
    out, results = trained
    assert results["status"] == "completed" and results["task"] == "train" and results["epochs"] == 2
    assert results["val_images"] == 128 and 0 <= results["best_val_acc1"] <= 1  # 2 val batches of 64
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    assert len(metric_rows(out / "metrics.csv")) == 2 and (out / "plots" / "learning_curves.png").is_file()
    last = checkpoint.load(out / "checkpoints" / "last.pt")
    assert (last["epoch"], last["step"], last["format"]) == (2, 6, checkpoint.FORMAT_VERSION)
    assert last["arch"] == {**last["arch"], "builder": "vit", "name": "baseline"}
    assert checkpoint.load(out / "checkpoints" / "best.pt")["metrics"]["val/acc1"] == results["best_val_acc1"]


def test_a_fit_stopped_in_its_first_epoch_and_resumed_equals_an_uninterrupted_one(
    recipe, trained, tmp_path, monkeypatch
):
    monkeypatch.setattr(stop, "_requested", ["SIGTERM"])  # as if the signal arrived during epoch 1's first step
    with pytest.raises(KeyboardInterrupt):
        fit(recipe, tmp_path)
    saved = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    assert (saved["epoch"], saved["step"], saved["position"]["batch"]) == (0, 1, 1)  # saved after that step
    monkeypatch.setattr(stop, "_requested", [])
    fit(recipe, tmp_path, checkpoint.load_training_state(tmp_path / "checkpoints" / "last.pt"))
    reference, _ = trained
    assert metric_rows(tmp_path / "metrics.csv") == metric_rows(reference / "metrics.csv")
    ours, theirs = (checkpoint.load(f / "checkpoints" / "last.pt") for f in (tmp_path, reference))
    assert all(torch.equal(ours["model"][k], theirs["model"][k]) for k in theirs["model"])
    assert ours["step"] == theirs["step"]


def test_the_inference_figure_is_the_last_validation_passs_own(recipe, tmp_path, monkeypatch):
    def no_second_measurement(*args, **kwargs):
        raise AssertionError("the model was timed again after training")

    passes, evaluate = [], engine.evaluate

    def spy(*args, **kwargs):
        metrics, confusion = evaluate(*args, **kwargs)
        passes.append(metrics["forward_img_per_s"])
        return metrics, confusion

    monkeypatch.setattr(training, "inference_img_per_s", no_second_measurement)
    monkeypatch.setattr(engine, "evaluate", spy)
    results = fit(recipe, tmp_path)
    assert len(passes) == 2 and results["infer_img_per_s"] == passes[-1] > 0
    assert all("forward" not in key for key in metric_rows(tmp_path / "metrics.csv")[0])
    # resumed from the last checkpoint of a finished run, nothing is validated: two batches are timed instead
    monkeypatch.setattr(training, "inference_img_per_s", lambda *args, **kwargs: 123.0)
    again = fit(recipe, tmp_path, checkpoint.load_training_state(tmp_path / "checkpoints" / "last.pt"))
    assert again["infer_img_per_s"] == 123.0 and len(passes) == 2


def test_the_checkpoint_state_restores_model_optimizer_schedule_and_run_state(recipe, tmp_path):
    model = build_from_arch(recipe.arch)
    opt = optimization(recipe, model, batches_per_epoch=3)
    model(torch.randn(2, 1, 16, 16)).sum().backward()
    opt.optimizer.step()
    state = RunState(epoch=3, step=9, best_acc1=0.5, val_images=100, metrics={"best_val_acc1": 0.5, "epoch": 3})
    checkpoint.save(checkpoint_state(model, opt, state, recipe.config).state_dict(), tmp_path / "last.pt")
    again = build_from_arch(recipe.arch)
    again_opt = optimization(recipe, again, batches_per_epoch=3)
    assert restore(checkpoint.load_training_state(tmp_path / "last.pt"), again, again_opt, tmp_path) == state
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert again_opt.optimizer.state_dict()["state"].keys() == opt.optimizer.state_dict()["state"].keys()


def test_a_sub_run_trains_another_model_as_task_train_and_is_skipped_once_done(recipe, tmp_path):
    arch = replace(recipe.arch.with_kwargs(depth=1), name="helper")
    best = train_in(recipe, tmp_path / "teacher", arch, 1)
    saved = checkpoint.load(best)
    assert saved["arch"]["kwargs"]["depth"] == 1 and saved["config"]["trainer"]["max_epochs"] == 1
    assert saved["config"]["task"]["name"] == "train" and saved["config"]["model"]["name"] == "helper"
    assert sub_run(recipe, arch, 1).settings.task.name == "train" and recipe.settings.task.name == "train"
    saved = checkpoint.load(best)["config"]  # the settings it ran with, derived from them: they cannot drift
    assert (saved["trainer"]["max_epochs"], saved["ckpt_path"], saved["model"]["depth"]) == (1, None, 1)
    written = best.stat().st_mtime_ns
    assert train_in(recipe, tmp_path / "teacher", arch, 1) == best and best.stat().st_mtime_ns == written


def test_prune_checkpoint_reports_each_stage_and_writes_a_rebuildable_pruned_model(recipe, trained, tmp_path):
    out, _ = trained
    val = recipe.loaders[1]
    measure = functools.partial(measure_stage, recipe, val)
    pruning = prune_settings(
        ratio=0.5, importance="magnitude", rounds=2, prune_embed=False, allocation="global", round_to=8
    )
    figures, points = prune_checkpoint(recipe, out / "checkpoints" / "best.pt", pruning, measure, tmp_path)
    assert [label for label, _ in points] == ["unpruned", "round 1", "round 2"]
    assert figures["pruned_params"] < figures["before_params"] and figures["pruned_macs"] < figures["before_macs"]
    pruned, saved = checkpoint.load_model(tmp_path / "checkpoints" / "pruned.pt")
    assert saved["arch"]["builder"] == "vit" and [h for h, _ in saved["arch"]["kwargs"]["layout"]] == [1, 1]
    assert json.loads((tmp_path / "prune.json").read_text())["ratio"] == 0.5
    assert pruned(torch.randn(2, 1, 16, 16)).shape == (2, 10)


def test_a_narrowed_embedding_rebuilds_fine_tunes_and_prunes_again(recipe, trained, tmp_path):
    """`task.prune_embed=true` narrows the residual stream: its `arch` records the width, rebuilds the same function
    from `weights_only` files, fine-tunes, and keeps the width when the pruned model is pruned again."""
    out, _ = trained
    measure = functools.partial(measure_stage, recipe, recipe.loaders[1])
    figures, _ = prune_checkpoint(
        recipe,
        out / "checkpoints" / "best.pt",
        prune_settings(ratio=0.5, importance="magnitude", rounds=1, prune_embed=True, allocation="uniform", round_to=8),
        measure,
        tmp_path / "a",
    )
    pruned, saved = checkpoint.load_model(tmp_path / "a" / "checkpoints" / "pruned.pt")
    rebuilt = measure(pruned, "rebuilt")
    assert (rebuilt["val_acc1"], rebuilt["macs"]) == (figures["pruned_val_acc1"], figures["pruned_macs"])
    assert saved["arch"]["kwargs"]["embed_width"] == 32 and pruned.patch_embed.proj.out_channels == 32
    assert pruned.blocks[0].attn.head_dim == 32  # heads keep their width: embed_dim / num_heads of the original
    x = torch.randn(3, 1, 16, 16)
    assert pruned.eval()(x).shape == (3, 10)
    tune = finetune_recipe(recipe, tmp_path / "a" / "checkpoints" / "pruned.pt", 1, None, 0.5)
    assert fit(tune, tmp_path / "tuned")["status"] == "completed"
    prune_checkpoint(
        recipe,
        tmp_path / "a" / "checkpoints" / "pruned.pt",
        prune_settings(
            ratio=0.5, importance="magnitude", rounds=1, prune_embed=False, allocation="uniform", round_to=8
        ),
        measure,
        tmp_path / "b",
    )
    again, saved = checkpoint.load_model(tmp_path / "b" / "checkpoints" / "pruned.pt")
    assert saved["arch"]["kwargs"]["embed_width"] == 32 and again.eval()(x).shape == (3, 10)


def test_score_teacher_is_the_teachers_accuracy_through_the_students_preprocessing(recipe, trained):
    out, results = trained
    teacher, _ = checkpoint.load_model(out / "checkpoints" / "best.pt")
    distiller = Distiller(
        nn.Identity(),
        teacher,
        recipe.settings.data.mean,
        recipe.settings.data.std,
        recipe.settings.data.mean,
        recipe.settings.data.std,
        16,
    )
    # the same statistics on both sides: the teacher sees exactly what it was trained on, so its score is best.pt's
    assert score_teacher(recipe, TeacherOnly(distiller)) == pytest.approx(results["best_val_acc1"])


def test_trainer_matmul_precision_sets_torchs_and_is_checked():
    try:
        read_recipe(compose_config(*TINY, "trainer.matmul_precision=medium"), with_data=False)
        assert torch.get_float32_matmul_precision() == "medium"
        read_recipe(compose_config(*TINY), with_data=False)
        assert torch.get_float32_matmul_precision() == "highest"  # the default: full fp32, as torch's own
    finally:
        torch.set_float32_matmul_precision("highest")
    with pytest.raises(
        VitexpError, match="trainer.matmul_precision='tf32' is not valid: choose one of highest, high, medium"
    ):
        validate(compose_config(*TINY, "trainer.matmul_precision=tf32"))


def test_trainer_deterministic_selects_deterministic_kernels_and_is_checked(tmp_path, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        fit(read_recipe(compose_config(*TINY, "trainer.deterministic=true", "trainer.max_epochs=1")), tmp_path)
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"  # before cuBLAS starts
        read_recipe(compose_config(*TINY, "trainer.deterministic=warn"))
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        read_recipe(compose_config(*TINY))
        assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
    with pytest.raises(
        VitexpError, match="trainer.deterministic='sometimes' is not valid: choose one of true, false, warn"
    ):
        validate(compose_config(*TINY, "trainer.deterministic=sometimes"))
