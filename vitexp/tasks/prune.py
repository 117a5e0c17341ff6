"""task=prune: remove attention heads and MLP channels from a trained ViT, fine-tune it, measure every stage."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vitexp import VitexpError, checkpoint, distributed, files, plots
from vitexp.data import make_loader
from vitexp.distill import DistillationLoss, Distiller
from vitexp.files import printable
from vitexp.hardware import seed_everything
from vitexp.models import Arch, arch_of, count_macs, count_params, inference_img_per_s, input_shape
from vitexp.pruning import embed_width, layout_of, prune
from vitexp.records import write_results
from vitexp.runs import Run
from vitexp.schema import Prune
from vitexp.tasks.recipe import read_recipe
from vitexp.training import Recipe, evaluate_on, fit, train_in

log = logging.getLogger("vitexp")

SWEEP_METRIC = "best_val_acc1"
Measure = Callable[[nn.Module, str], dict[str, Any]]


def run(run: Run) -> dict[str, Any]:
    """Prune `ckpt_path` (or a model trained here first) to `task.ratio`, fine-tune, report every stage."""
    recipe = read_recipe(run.cfg, settings=run.settings)
    settings, task, data = recipe.settings, recipe.settings.task, recipe.settings.data
    # measured at every stage (before, each pruning round, after): workers started once
    val = make_loader(
        recipe.splits.val,
        data.eval_batch_size,
        data.num_workers,
        train=False,
        persistent_workers=data.persistent_workers,
    )
    measure = functools.partial(measure_stage, recipe, val)
    pruned_path = run.out / "checkpoints" / "pruned.pt"
    if run.last is None:
        seed_everything(settings.seed)
        source = settings.ckpt_path or train_in(recipe, run.out / "unpruned", recipe.arch, task.train_epochs)
        figures, points = prune_checkpoint(recipe, source, task, measure, run.out)
        if task.finetune_epochs == 0:
            results = {"task": "prune", "model": "pruned", **figures, "status": "completed"}
            write_results(run.out, results)
            return results
    else:  # a resumed prune run continues its fine-tuning; the pruning itself is done
        figures, points = read_prune_json(run.out)
    teacher = figures["source_ckpt"] if task.finetune_distill else None
    tune = finetune_recipe(recipe, pruned_path, task.finetune_epochs, teacher, task.alpha)
    results = fit(tune, run.out, run.last, extra_results=figures, after_epoch=run.after_epoch)
    tuned, _ = checkpoint.load_model(run.out / "checkpoints" / "best.pt")
    after = measure(tuned.to(recipe.machine.device), "after fine-tuning (best.pt)")
    results |= {f"after_{k}": v for k, v in after.items() if k != "layout"}
    if distributed.is_main():
        plots.accuracy_vs_macs(
            [*points, ("fine-tuned", after)],
            run.out / "plots" / "accuracy_vs_macs.png",
            f"prune {task.importance}",
            root=run.out,
        )
    write_results(run.out, results)
    return results


def prune_checkpoint(
    recipe: Recipe, source: str | Path, pruning: Prune, measure: Measure, out: Path
) -> tuple[dict[str, Any], list[tuple[str, dict[str, Any]]]]:
    """Prune the ViT in `source`, measuring it before and after each round; writes checkpoints/pruned.pt,
    prune.json and the accuracy-vs-MACs plot. Returns the figures for results.json and the plot's points."""
    model, _ = checkpoint.load_model(source)
    if type(model) is not VisionTransformer:
        raise VitexpError(f"{source} holds a {type(model).__name__} model; task=prune takes a ViT checkpoint")
    model.to(recipe.machine.device)
    trained, before, width0 = arch_of(model), measure(model, "before pruning"), embed_width(model)
    rounds = _prune_rounds(recipe, model, pruning, measure)
    width = embed_width(model)
    arch = _pruned_arch(trained, pruning.ratio, layout_of(model), width if width != width0 else None)
    stages = (("before", before), ("pruned", rounds[-1]))
    figures = {f"{stage}_{k}": v for stage, f in stages for k, v in f.items() if k != "layout"}
    figures |= {
        "source_ckpt": str(source),
        "ratio": pruning.ratio,
        "importance": pruning.importance,
        "allocation": pruning.allocation,
        "round_to": pruning.round_to,
    }
    points = [("unpruned", before), *((f"round {i + 1}", r) for i, r in enumerate(rounds))]
    if distributed.is_main():
        pruned = checkpoint.TrainingState(model=model.state_dict(), arch=arch, config=recipe.config, metrics=rounds[-1])
        checkpoint.save(pruned.state_dict(resumable=False), out / "checkpoints" / "pruned.pt", out)
        files.write_text(out / "prune.json", json.dumps({**figures, "points": points}, indent=2) + "\n", out)
        plots.accuracy_vs_macs(points, out / "plots" / "accuracy_vs_macs.png", f"prune {pruning.importance}", root=out)
    distributed.barrier()  # pruned.pt is written before the fine-tuning reads it on every rank
    return figures, points


def _prune_rounds(recipe: Recipe, model: nn.Module, pruning: Prune, measure: Measure) -> list[dict[str, Any]]:
    """Prune `model` in place over `pruning.rounds` rounds; the figures measured after each."""
    device = recipe.machine.device
    calibration = None
    if pruning.importance == "taylor":  # first-order importance needs a few real batches
        train = make_loader(
            recipe.splits.train, recipe.settings.data.batch_size, recipe.settings.data.num_workers, train=True
        )
        calibration = [(x.to(device), y.to(device)) for (x, y), _ in zip(train, range(pruning.calibration_batches))]
    rounds: list[dict[str, Any]] = []
    example = torch.zeros(1, *input_shape(model), device=device)
    prune(
        model, pruning, example, calibration, after_round=lambda r: rounds.append(measure(model, f"pruning round {r}"))
    )
    return rounds


def read_prune_json(out: Path) -> tuple[dict[str, Any], list[tuple[str, dict[str, Any]]]]:
    """The figures and plot points an interrupted prune run wrote to prune.json (a real file in `out`), checked to
    be what `prune_checkpoint` writes: plain data, a source checkpoint's path, points of a label and figures."""
    path = out / "prune.json"
    try:
        figures = files.read_json(path, out)
    except OSError as e:
        raise VitexpError(f"{printable(path)} is unreadable ({printable(e.strerror)}); start the run again") from None
    except VitexpError as e:
        raise VitexpError(f"{e}; start the run again") from None
    points = figures.pop("points", []) if isinstance(figures, dict) else None
    valid = isinstance(figures, dict) and isinstance(figures.get("source_ckpt"), str) and isinstance(points, list)
    if not (valid and all(_is_point(p) for p in points)):
        raise VitexpError(
            f"{printable(path)} is not what task=prune writes (figures, source_ckpt, points); start again"
        )
    return figures, [tuple(p) for p in points]


def _is_point(point: Any) -> bool:
    """[label, figures] with the numbers the accuracy-vs-MACs plot reads."""
    if not (isinstance(point, list) and len(point) == 2 and isinstance(point[0], str) and isinstance(point[1], dict)):
        return False
    numbers = [point[1].get("macs"), point[1].get("val_acc1")]
    return all(isinstance(n, (int, float)) and not isinstance(n, bool) for n in numbers)


def finetune_recipe(recipe: Recipe, pruned: Path, epochs: int, teacher: str | None, alpha: float) -> Recipe:
    """The fine-tuning of the model in `pruned` (a pruned.pt) for `epochs`, distilling `teacher` (the unpruned
    checkpoint) with weight `alpha` when given."""
    settings = recipe.settings
    settings = replace(settings, ckpt_path=str(pruned), trainer=replace(settings.trainer, max_epochs=epochs))
    tune = replace(recipe, settings=settings, arch=checkpoint.load_arch(pruned))
    return _distilled_from(tune, teacher, alpha) if teacher else tune


def _pruned_arch(trained: Arch, ratio: float, layout: list[list[int]], width: int | None = None) -> Arch:
    """The pruned model's arch: the trained one with the `layout`, and `width` when `task.prune_embed` narrowed the
    residual stream; a vitexp ViT is named `pruned` and records the `ratio` (a timm model keeps its name)."""
    narrowed = {"embed_width": width} if width else {}
    kwargs = {k: v for k, v in trained.kwargs.items() if k not in ("ratio", "layout")}
    if trained.builder == "timm":
        return replace(trained, kwargs={**kwargs, "layout": layout, **narrowed})
    return Arch("vit", "pruned", {**kwargs, "ratio": ratio, "layout": layout, **narrowed})


def _distilled_from(tune: Recipe, source: str, alpha: float) -> Recipe:
    """The fine-tuning recipe with the unpruned model as a frozen teacher (hard distillation, weight `alpha`)."""
    teacher, _ = checkpoint.load_model(source)
    teacher.to(tune.machine.device)
    mean, std = tune.settings.data.mean, tune.settings.data.std
    return replace(
        tune,
        wrap=lambda student: Distiller(student, teacher, mean, std, mean, std, tune.settings.data.img_size),
        loss=DistillationLoss(tune.loss, "hard", alpha, 1.0),
    )


def measure_stage(recipe: Recipe, val: Any, model: nn.Module, stage: str) -> dict[str, Any]:
    """Val top-1, size, MACs, throughput at the eval batch size and latency at batch 1, logged as one line."""
    machine, batch = recipe.machine, recipe.settings.data.eval_batch_size
    metrics, _ = evaluate_on(recipe, model, val)
    figures = {
        "val_acc1": metrics["acc1"],
        "params": count_params(model),
        "macs": count_macs(model),
        "infer_img_per_s": inference_img_per_s(model, batch, machine.amp),
        "latency_ms": 1000 / inference_img_per_s(model, 1, machine.amp, iters=20),
        "layout": layout_of(model),
    }
    log.info(
        f"{stage}: val/acc1 {figures['val_acc1']:.4f} | {figures['params'] / 1e6:.2f}M params | "
        f"{figures['macs'] / 1e6:.1f}M MACs | {figures['infer_img_per_s']:.0f} img/s at batch {batch} | "
        f"{figures['latency_ms']:.2f} ms at batch 1"
    )
    return figures
