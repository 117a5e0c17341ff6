"""task=prune: remove attention heads and MLP channels from a trained ViT, fine-tune it, measure every stage."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vitexp import VitexpError, __version__, checkpoint, distributed, engine, files, plots
from vitexp.data import make_loader
from vitexp.distill import DistillationLoss, Distiller
from vitexp.files import printable
from vitexp.hardware import seed_everything
from vitexp.models import count_macs, count_params, inference_img_per_s, input_shape
from vitexp.pruning import embed_width, layout_of, prune
from vitexp.records import write_results
from vitexp.tasks.recipe import open_run, read_recipe
from vitexp.training import Recipe, fit, train_in

log = logging.getLogger("vitexp")

SWEEP_METRIC = "best_val_acc1"
Measure = Callable[[nn.Module, str], dict[str, Any]]


@dataclass(frozen=True)
class Pruning:
    """What to remove: `ratio` of the heads and MLP channels, ranked by `importance`, in `rounds`, from every block
    alike or across blocks (`allocation`), MLP widths multiples of `round_to`."""

    ratio: float
    importance: str
    rounds: int
    prune_embed: bool
    calibration_batches: int  # train batches whose gradients Taylor importance reads
    allocation: str
    round_to: int


def run(cfg: DictConfig) -> dict[str, Any]:
    """Prune `ckpt_path` (or a model trained here first) to `task.ratio`, fine-tune, report every stage."""
    run = open_run(cfg)
    cfg, task = run.cfg, run.cfg.task
    recipe = read_recipe(cfg)
    val = make_loader(recipe.splits.val, recipe.data.eval_batch_size, recipe.data.num_workers, False, False, False)
    measure = functools.partial(measure_stage, recipe, val)
    pruned_path = run.out / "checkpoints" / "pruned.pt"
    if run.last is None:
        seed_everything(cfg.seed)
        source = cfg.ckpt_path or train_in(recipe, run.out / "unpruned", recipe.arch, task.train_epochs)
        pruning = Pruning(task.ratio, task.importance, task.rounds, task.prune_embed, task.calibration_batches,
                          task.allocation, task.round_to)  # fmt: skip
        figures, points = prune_checkpoint(recipe, source, pruning, measure, run.out)
        if task.finetune_epochs == 0:
            results = {"task": "prune", "model": "pruned", **figures, "status": "completed"}
            write_results(run.out, results)
            return results
    else:  # a resumed prune run continues its fine-tuning; the pruning itself is done
        figures, points = read_prune_json(run.out)
    teacher = figures["source_ckpt"] if task.finetune_distill else None
    tune = finetune_recipe(recipe, pruned_path, task.finetune_epochs, teacher, task.alpha)
    results = fit(tune, run.out, run.last, extra_results=figures)
    tuned, _ = checkpoint.load_model(run.out / "checkpoints" / "best.pt")
    after = measure(tuned.to(recipe.loop.device), "after fine-tuning (best.pt)")
    results |= {f"after_{k}": v for k, v in after.items() if k != "layout"}
    if distributed.is_main():
        plots.accuracy_vs_macs([*points, ("fine-tuned", after)], run.out / "plots" / "accuracy_vs_macs.png",
                               f"prune {task.importance}", root=run.out)  # fmt: skip
    write_results(run.out, results)
    return results


def prune_checkpoint(
    recipe: Recipe, source: str | Path, pruning: Pruning, measure: Measure, out: Path
) -> tuple[dict[str, Any], list[tuple[str, dict[str, Any]]]]:
    """Prune the ViT in `source`, measuring it before and after each round; writes checkpoints/pruned.pt,
    prune.json and the accuracy-vs-MACs plot. Returns the figures for results.json and the plot's points."""
    model, trained = checkpoint.load_model(source)
    builder = trained["arch"]["builder"]
    if not (builder in ("vit", "pruned_vit") or builder == "timm" and type(model) is VisionTransformer):
        raise VitexpError(f"{source} holds a {trained['arch']['builder']} model; task=prune takes a ViT checkpoint")
    device = recipe.loop.device
    model.to(device)
    before, width0 = measure(model, "before pruning"), embed_width(model)
    train = make_loader(recipe.splits.train, recipe.data.batch_size, recipe.data.num_workers, False, True, False)
    calibration = [(x.to(device), y.to(device)) for (x, y), _ in zip(train, range(pruning.calibration_batches))
                   ] if pruning.importance == "taylor" else None  # fmt: skip
    example = torch.zeros(1, *input_shape(model), device=device)
    rounds = []
    prune(model, pruning.ratio, pruning.importance, example, pruning.rounds, calibration, pruning.prune_embed,
          after_round=lambda r: rounds.append(measure(model, f"pruning round {r}")), allocation=pruning.allocation,
          round_to=pruning.round_to)  # fmt: skip
    width = embed_width(model)
    arch = _pruned_arch(trained["arch"], pruning.ratio, layout_of(model), width if width != width0 else None)
    figures = {f"{stage}_{k}": v for stage, f in (("before", before), ("pruned", rounds[-1])) for k, v in f.items()
               if k != "layout"}  # fmt: skip
    figures |= {"source_ckpt": str(source), "ratio": pruning.ratio, "importance": pruning.importance,
                "allocation": pruning.allocation, "round_to": pruning.round_to}  # fmt: skip
    points = [("unpruned", before), *((f"round {i + 1}", r) for i, r in enumerate(rounds))]
    if distributed.is_main():
        checkpoint.save({"model": model.state_dict(), "arch": arch, "epoch": 0, "step": 0, "version": __version__,
                         "format": checkpoint.FORMAT_VERSION, "config": recipe.config, "metrics": rounds[-1]},
                        out / "checkpoints" / "pruned.pt", out)  # fmt: skip
        files.write_text(out / "prune.json", json.dumps({**figures, "points": points}, indent=2) + "\n", out)
        plots.accuracy_vs_macs(points, out / "plots" / "accuracy_vs_macs.png", f"prune {pruning.importance}", root=out)
    distributed.barrier()  # pruned.pt is written before the fine-tuning reads it on every rank
    return figures, points


def read_prune_json(out: Path) -> tuple[dict[str, Any], list[tuple[str, dict[str, Any]]]]:
    """The figures and plot points an interrupted prune run wrote to prune.json (a real file in `out`), checked to
    be what `prune_checkpoint` writes: plain data, a source checkpoint's path, points of a label and figures."""
    path = out / "prune.json"
    try:
        figures = json.loads(files.read_text(path, out))
    except (OSError, ValueError) as e:
        raise VitexpError(f"{printable(path)} is unreadable ({type(e).__name__}); start the run again") from None
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
    tune = replace(recipe, arch=checkpoint.load(pruned)["arch"], init_weights=str(pruned),
                   loop=replace(recipe.loop, max_epochs=epochs))  # fmt: skip
    return _distilled_from(tune, teacher, alpha) if teacher else tune


def _pruned_arch(trained: dict[str, Any], ratio: float, layout: list[list[int]], width: int | None = None
                 ) -> dict[str, Any]:  # fmt: skip
    """The pruned model's `arch`: a timm model (model=timm) keeps its name and arguments and gains the layout;
    `width`: the residual stream's, when `task.prune_embed` narrowed it."""
    narrowed = {"embed_width": width} if width else {}
    if trained["builder"] == "timm":
        return {**trained, "kwargs": {**trained["kwargs"], "layout": layout, **narrowed}}
    kwargs = {k: v for k, v in trained["kwargs"].items() if k not in ("ratio", "layout")}
    return {"builder": "pruned_vit", "name": "pruned", "kwargs": {**kwargs, "ratio": ratio, "layout": layout,
                                                                  **narrowed}}  # fmt: skip


def _distilled_from(tune: Recipe, source: str, alpha: float) -> Recipe:
    """The fine-tuning recipe with the unpruned model as a frozen teacher (hard distillation, weight `alpha`)."""
    teacher, _ = checkpoint.load_model(source)
    teacher.to(tune.loop.device)
    mean, std = tune.data.mean, tune.data.std
    return replace(tune, wrap=lambda student: Distiller(student, teacher, mean, std, mean, std, tune.data.img_size),
                   loss=DistillationLoss(tune.loss, "hard", alpha, 1.0))  # fmt: skip


def measure_stage(recipe: Recipe, val: Any, model: nn.Module, stage: str) -> dict[str, Any]:
    """Val top-1, size, MACs, throughput at the eval batch size and latency at batch 1, logged as one line."""
    loop, batch = recipe.loop, recipe.data.eval_batch_size
    metrics, _ = engine.evaluate(model, val, loop.device, recipe.num_classes, autocast_dtype=loop.amp,
                                 limit_batches=loop.limit_val_batches)  # fmt: skip
    figures = {
        "val_acc1": metrics["acc1"],
        "params": count_params(model),
        "macs": count_macs(model),
        "infer_img_per_s": inference_img_per_s(model, batch, loop.amp),
        "latency_ms": 1000 / inference_img_per_s(model, 1, loop.amp, iters=20),
        "layout": layout_of(model),
    }
    log.info(f"{stage}: val/acc1 {figures['val_acc1']:.4f} | {figures['params'] / 1e6:.2f}M params | "
             f"{figures['macs'] / 1e6:.1f}M MACs | {figures['infer_img_per_s']:.0f} img/s at batch {batch} | "
             f"{figures['latency_ms']:.2f} ms at batch 1")  # fmt: skip
    return figures
