"""task=distill: train the student from labels and a frozen teacher (trained first when none is given)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from omegaconf import DictConfig, open_dict
from torch import nn

from vitexp import VitexpError, checkpoint, engine
from vitexp.data import make_loader
from vitexp.distill import DistillationLoss, Distiller, TeacherOnly, TokenHead
from vitexp.models import build_from_arch, count_macs, count_params
from vitexp.runtime import (
    autocast_dtype,
    build,
    load_weights,
    open_run,
    resolve_device,
)
from vitexp.tasks.train import fit, train_in

log = logging.getLogger("vitexp")


def run(cfg: DictConfig) -> dict[str, Any]:
    """Distil `cfg.task.teacher_ckpt` (or a teacher trained here first) into `cfg.model`."""
    cfg, out, resume = open_run(cfg)
    token = cfg.task.distill_type == "token"
    if token and cfg.model._target_ not in ("vitexp.models.vit", "vitexp.models.vit_distilled"):
        raise VitexpError(f"distill_type=token needs a ViT student, not {cfg.model._target_}; use soft or hard")

    teacher_path = cfg.task.teacher_ckpt or train_in(cfg, out / "teacher", cfg.task.teacher, cfg.task.teacher_epochs)
    teacher_ckpt = checkpoint.load(teacher_path)
    teacher = build_from_arch(teacher_ckpt["arch"])
    load_weights(teacher, teacher_ckpt["model"], str(teacher_path))
    teacher_data = teacher_ckpt["config"]["data"]
    if teacher.num_classes != cfg.data.num_classes or teacher_data["in_chans"] != cfg.data.in_chans:
        raise VitexpError(
            f"teacher {teacher_path} predicts {teacher.num_classes} classes from {teacher_data['in_chans']}-channel "
            f"images but data={cfg.data.name} has {cfg.data.num_classes} and {cfg.data.in_chans}; pick a teacher for this data"
        )

    device = resolve_device(cfg.trainer.device)

    def with_teacher(student: nn.Module) -> Distiller:
        return Distiller(student, teacher.to(device), cfg.data.mean, cfg.data.std,
                         teacher_data["mean"], teacher_data["std"], teacher_data["img_size"])  # fmt: skip

    teacher_acc = score_teacher(cfg, TeacherOnly(with_teacher(nn.Identity())), device)
    log.info(f"teacher {teacher_ckpt['arch']['name']} ({teacher_path}): val/acc1 {teacher_acc:.4f}")
    if token:
        with open_dict(cfg):
            cfg.model._target_ = "vitexp.models.vit_distilled"
    loss_fn = DistillationLoss(build(cfg.task.loss), cfg.task.distill_type, cfg.task.alpha, cfg.task.tau)
    heads = (lambda m: {"val/acc1_cls": TokenHead(m, "cls"), "val/acc1_dist": TokenHead(m, "dist")}) if token else None
    teacher_figures = {
        "teacher": teacher_ckpt["arch"]["name"],
        "teacher_ckpt": str(teacher_path),
        "teacher_val_acc1": teacher_acc,
        "teacher_params": count_params(teacher),
        "teacher_macs": count_macs(teacher),
    }
    return fit(cfg, out, resume, wrap=with_teacher, loss_fn=loss_fn, views=heads, extra_results=teacher_figures)


def score_teacher(cfg: DictConfig, scorer: nn.Module, device: torch.device) -> float:
    """The teacher's top-1 accuracy on this run's validation split, through the student's preprocessing."""
    splits = build(cfg.data.splits)
    loader = make_loader(splits.val, cfg.data.eval_batch_size, cfg.data.num_workers, False, False, False)
    metrics, _ = engine.evaluate(
        scorer, loader, device, cfg.data.num_classes,
        autocast_dtype=autocast_dtype(cfg.trainer.precision, device), limit_batches=cfg.trainer.limit_val_batches,
    )  # fmt: skip
    return metrics["acc1"]
