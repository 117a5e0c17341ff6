"""task=evaluate: score a checkpoint on the test split (or the run's own validation split)."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from vitexp import VitexpError, checkpoint, engine, explain, plots
from vitexp.checkpoint import check_resume_fields
from vitexp.data import eval_transform, make_loader, make_splits
from vitexp.files import printable
from vitexp.hardware import Machine, choose, seed_everything
from vitexp.models import arch_of, count_macs, count_params, inference_img_per_s, input_shape
from vitexp.records import write_results
from vitexp.runs import Run
from vitexp.schema import Config, Data

log = logging.getLogger("vitexp")

SWEEP_METRIC = "test_acc1"


def run(run: Run) -> dict[str, Any]:
    """Rebuild the model from `ckpt_path` alone and report accuracy, per-class accuracy, params, MACs, img/s."""
    started, out, settings = time.perf_counter(), run.out, run.settings
    data, ckpt_path = settings.data, settings.ckpt_path
    if not ckpt_path:
        raise VitexpError("task=evaluate needs a checkpoint: pass ckpt_path=<run>/checkpoints/best.pt")
    model, saved = checkpoint.load_model(ckpt_path)
    check_resume_fields(saved, ckpt_path, [checkpoint.EPOCH])  # a number, reported as the checkpoint's epoch
    chans, size, _ = input_shape(model)
    if (chans, model.num_classes) != (data.in_chans, data.num_classes):
        raise VitexpError(
            f"{ckpt_path} expects {chans}-channel images and {model.num_classes} classes but data={data.name} "
            f"has {data.in_chans} and {data.num_classes}; pass data={printable(_trained_on(saved).get('name'))} "
            f"(and data.root)"
        )
    split_seed, val_size = checkpoint.trained_split(saved, data)  # the images its run held out
    mean, std = _normalisation(saved, str(ckpt_path), data, chans)
    seed_everything(settings.seed if split_seed is None else split_seed)
    machine = choose(settings.trainer, fused=settings.optim.fused)
    model.to(machine.device)
    # the size and the normalisation it was trained with
    seen = replace(data, split_seed=split_seed, val_size=val_size, img_size=size, mean=mean, std=std)
    transform = eval_transform(seen)
    splits = make_splits(seen, settings.seed, transform, transform)
    split, dataset = ("test", splits.test) if splits.test is not None else ("val", splits.val)
    pin = machine.device.type == "cuda"
    loader = make_loader(dataset, data.eval_batch_size, data.num_workers, train=False, pin_memory=pin)
    wrong = explain.Mistakes(loader.batch_size)
    metrics, confusion = engine.evaluate(
        model,
        loader,
        machine.device,
        data.num_classes,
        autocast_dtype=machine.amp,
        limit_batches=settings.trainer.limit_val_batches,
        progress=machine.progress,
        on_batch=wrong,
    )
    name = arch_of(model).name
    plots.confusion_matrix(
        confusion, splits.classes, out / "plots" / "confusion_matrix.png", f"{name} on {split}", root=out
    )
    explain.plot_mistakes(
        model,
        dataset,
        wrong.order(),
        splits.classes,
        (seen.mean, seen.std),
        out / "plots" / "mistakes.png",
        title=f"{name} on {split}",
        root=out,
    )
    results = _results(settings, machine, model, saved, split, metrics, confusion, splits.classes)
    results |= {"wall_s": time.perf_counter() - started, "status": "completed"}
    write_results(out, results)
    _report(results, data, split, metrics, confusion, splits.classes)
    return results


def _results(
    settings: Config,
    machine: Machine,
    model: nn.Module,
    saved: dict[str, Any],
    split: str,
    metrics: dict[str, float],
    confusion: torch.Tensor,
    classes: list[str],
) -> dict[str, Any]:
    """The figures of results.json: accuracy overall and per class, size, MACs and inference speed."""
    per_class = _per_class(confusion)
    return {
        "task": settings.task.name,
        "model": arch_of(model).name,
        "data": settings.data.name,
        "split": split,
        "ckpt_path": str(settings.ckpt_path),
        "ckpt_epoch": saved[checkpoint.EPOCH],
        f"{split}_loss": metrics["loss"],
        f"{split}_acc1": metrics["acc1"],
        f"{split}_acc5": metrics["acc5"],
        "images": int(confusion.sum()),
        **{f"{split}_acc1/{c}": a for c, a in zip(classes, per_class)},
        "params": count_params(model),
        "macs": count_macs(model),
        "infer_img_per_s": inference_img_per_s(model, settings.data.eval_batch_size, machine.amp),
        "device": str(machine.device),
    }


def _per_class(confusion: torch.Tensor) -> list[float]:
    return (confusion.diag().float() / confusion.sum(dim=1).clamp(min=1)).tolist()


def _report(
    results: dict[str, Any],
    data: Data,
    split: str,
    metrics: dict[str, float],
    confusion: torch.Tensor,
    classes: list[str],
) -> None:
    """One log line: the scores, size, speed and the three weakest classes."""
    worst = ", ".join(f"{c} {a:.3f}" for a, c in sorted(zip(_per_class(confusion), classes))[:3])
    log.info(
        f"{results['model']} epoch {results['ckpt_epoch']} on {data.name} {split} ({results['images']} images): loss "
        f"{metrics['loss']:.4f} | acc1 {metrics['acc1']:.4f} | acc5 {metrics['acc5']:.4f} | "
        f"{results['params'] / 1e6:.2f}M params | {results['macs'] / 1e6:.1f}M MACs | "
        f"{results['infer_img_per_s']:.0f} img/s | weakest: {worst}"
    )


def _trained_on(saved: dict[str, Any]) -> dict[str, Any]:
    config = saved.get("config")
    data = config.get("data") if isinstance(config, dict) else None
    return data if isinstance(data, dict) else {}


def _normalisation(saved: dict[str, Any], ckpt_path: str, data: Data, chans: int) -> tuple[list[float], list[float]]:
    """The mean and std the checkpoint's model was trained with, as timm's validate takes a model's pretrained cfg:
    this config's data.mean and data.std, where they differ, are not applied, and one line says so."""
    mean, std = (list(values) for values in checkpoint.recorded_statistics(saved, ckpt_path))
    if len(mean) not in (1, chans):
        raise VitexpError(
            f"{ckpt_path} records data.mean for {len(mean)} channels but its model takes {chans}; pass a checkpoint "
            f"vitexp wrote"
        )
    given = [float(m) for m in data.mean], [float(s) for s in data.std]
    if given != (mean, std):
        log.warning(
            f"normalising with the data.mean={mean} and data.std={std} that {ckpt_path} was trained with, not this "
            f"config's {given[0]} and {given[1]}"
        )
    return mean, std
