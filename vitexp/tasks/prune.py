"""task=prune: remove attention heads and MLP channels from a trained ViT, fine-tune it, measure both."""

from __future__ import annotations

import json
import logging
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from vitexp import VitexpError, __version__, checkpoint, distributed, engine, plots
from vitexp.data import make_loader
from vitexp.distill import DistillationLoss, Distiller
from vitexp.logging import RunLogger
from vitexp.models import build_from_arch, count_macs, count_params, inference_img_per_s
from vitexp.pruning import layout_of, prune
from vitexp.runtime import (
    autocast_dtype,
    build,
    derived_config,
    load_weights,
    open_run,
    resolve_device,
    seed_everything,
)
from vitexp.tasks.train import fit, train_in

log = logging.getLogger("vitexp")


def run(cfg: DictConfig) -> dict[str, Any]:
    """Prune `cfg.ckpt_path` (or a model trained here first) to `cfg.task.ratio`, fine-tune, report."""
    cfg, out, resume = open_run(cfg)
    if resume is not None:  # a resumed prune run continues its fine-tuning; the pruning itself is done
        done = json.loads((out / "prune.json").read_text())
        points, figures = done.pop("points", []), done
        return _finetune(cfg, out, resume, checkpoint.load(out / "checkpoints" / "pruned.pt")["arch"], figures,
                         [tuple(p) for p in points])  # fmt: skip
    if not 0 <= cfg.task.ratio < 1:
        raise VitexpError(f"task.ratio={cfg.task.ratio} must be in [0, 1): the fraction of heads and channels removed")
    seed_everything(cfg.seed)
    device = resolve_device(cfg.trainer.device)
    amp = autocast_dtype(cfg.trainer.precision, device)

    source = cfg.ckpt_path or train_in(cfg, out / "unpruned", cfg.model, cfg.task.train_epochs)
    trained = checkpoint.load(source)
    if trained["arch"]["builder"] not in ("vit", "pruned_vit"):
        raise VitexpError(f"{source} holds a {trained['arch']['builder']} model; task=prune takes a ViT checkpoint")
    model = build_from_arch(trained["arch"])
    load_weights(model, trained["model"], str(source))
    model.to(device)
    splits = build(cfg.data.splits)
    val_loader = make_loader(splits.val, cfg.data.eval_batch_size, cfg.data.num_workers, False, False, False)
    train_loader = make_loader(splits.train, cfg.data.batch_size, cfg.data.num_workers, False, True, False)

    def measure(model: nn.Module, stage: str) -> dict[str, Any]:
        return _measure(cfg, model, device, amp, stage, val_loader)

    before = measure(model, "before pruning")
    calibration = [
        (x.to(device), y.to(device)) for (x, y), _ in zip(train_loader, range(cfg.task.calibration_batches))
    ] if cfg.task.importance == "taylor" else None  # fmt: skip
    example = torch.zeros(1, cfg.data.in_chans, cfg.data.img_size, cfg.data.img_size, device=device)
    rounds = []
    prune(model, cfg.task.ratio, cfg.task.importance, example, cfg.task.steps, calibration,
          cfg.task.prune_embed, after_round=lambda r: rounds.append(measure(model, f"pruning round {r}")))  # fmt: skip
    pruned = rounds[-1]

    arch = {"builder": "pruned_vit", "name": "pruned",
            "kwargs": {**_vit_kwargs(trained["arch"]), "ratio": cfg.task.ratio, "layout": layout_of(model)}}  # fmt: skip
    pruned_path = out / "checkpoints" / "pruned.pt"
    if distributed.is_main():
        checkpoint.save({"model": model.state_dict(), "arch": arch, "epoch": 0, "step": 0, "version": __version__,
                         "config": OmegaConf.to_container(cfg, resolve=True), "metrics": pruned}, pruned_path)  # fmt: skip
    figures = {f"{stage}_{k}": v for stage, f in (("before", before), ("pruned", pruned)) for k, v in f.items()
               if k != "layout"}  # fmt: skip
    figures |= {"source_ckpt": str(source), "ratio": cfg.task.ratio, "importance": cfg.task.importance}
    points = [("unpruned", before), *((f"round {i + 1}", r) for i, r in enumerate(rounds))]
    if distributed.is_main():
        (out / "prune.json").write_text(json.dumps({**figures, "points": points}, indent=2) + "\n")
        plots.accuracy_vs_macs(points, out / "plots" / "accuracy_vs_macs.png", f"prune {cfg.task.importance}")
    distributed.barrier()  # pruned.pt is written before the fine-tuning reads it on every rank

    if cfg.task.finetune_epochs == 0:
        results = {"task": "prune", "model": "pruned", **figures, "status": "completed"}
        RunLogger(out).log_results(results)
        return results
    tune = derived_config(cfg, {
        "model": {"_target_": "vitexp.models.pruned_vit", "name": "pruned", **arch["kwargs"]},
        "trainer": {**OmegaConf.to_container(cfg.trainer, resolve=True), "max_epochs": cfg.task.finetune_epochs},
        "ckpt_path": str(pruned_path),
    })  # fmt: skip
    return _finetune(tune, out, None, arch, figures, points)


def _finetune(
    tune: DictConfig,
    out,
    resume: dict[str, Any] | None,
    arch: dict[str, Any],
    figures: dict[str, Any],
    points: list[tuple[str, dict[str, Any]]],
) -> dict[str, Any]:
    """Fine-tune the pruned model (`tune` is its config; `resume` a loaded last.pt), with the unpruned model as
    teacher when `task.finetune_distill`, then measure best.pt and report."""
    device = resolve_device(tune.trainer.device)
    amp = autocast_dtype(tune.trainer.precision, device)
    wrap = loss_fn = None
    if tune.task.finetune_distill:
        unpruned = checkpoint.load(figures["source_ckpt"])
        teacher = build_from_arch(unpruned["arch"])
        load_weights(teacher, unpruned["model"], figures["source_ckpt"])
        mean, std, size = tune.data.mean, tune.data.std, tune.data.img_size
        wrap = lambda student: Distiller(student, teacher.to(device), mean, std, mean, std, size)  # noqa: E731
        loss_fn = DistillationLoss(build(tune.task.loss), "hard", tune.task.alpha, 1.0)
    results = fit(tune, out, resume, wrap=wrap, loss_fn=loss_fn, extra_results=figures)
    tuned = build_from_arch(arch).to(device)
    load_weights(tuned, checkpoint.load(out / "checkpoints" / "best.pt")["model"], "best.pt")
    val_loader = make_loader(build(tune.data.splits).val, tune.data.eval_batch_size, tune.data.num_workers, False,
                             False, False)  # fmt: skip
    after = _measure(tune, tuned, device, amp, "after fine-tuning (best.pt)", val_loader)
    results |= {f"after_{k}": v for k, v in after.items() if k != "layout"}
    if distributed.is_main():
        plots.accuracy_vs_macs([*points, ("fine-tuned", after)], out / "plots" / "accuracy_vs_macs.png",
                               f"prune {tune.task.importance}")  # fmt: skip
    RunLogger(out).log_results(results)
    return results


def _measure(cfg: DictConfig, model: nn.Module, device: torch.device, amp, stage: str, val_loader) -> dict[str, Any]:
    """Val top-1, size, MACs, throughput and latency of `model`, logged as one line."""
    val, _ = engine.evaluate(model, val_loader, device, cfg.data.num_classes, autocast_dtype=amp,
                             limit_batches=cfg.trainer.limit_val_batches)  # fmt: skip
    figures = {
        "val_acc1": val["acc1"],
        "params": count_params(model),
        "macs": count_macs(model),
        "infer_img_per_s": inference_img_per_s(model, 256, amp),
        "latency_ms": 1000 / inference_img_per_s(model, 1, amp, iters=20),
        "layout": layout_of(model),
    }
    log.info(f"{stage}: val/acc1 {figures['val_acc1']:.4f} | {figures['params'] / 1e6:.2f}M params | "
             f"{figures['macs'] / 1e6:.1f}M MACs | {figures['infer_img_per_s']:.0f} img/s at batch 256 | "
             f"{figures['latency_ms']:.2f} ms at batch 1")  # fmt: skip
    return figures


def _vit_kwargs(arch: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in arch["kwargs"].items() if k not in ("ratio", "layout")}
