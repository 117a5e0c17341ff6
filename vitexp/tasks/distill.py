"""task=distill: train the student from labels and a frozen teacher (trained first when none is given)."""

from __future__ import annotations

import logging
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from torch import nn

from vitexp import VitexpError, checkpoint
from vitexp.data import make_loader
from vitexp.distill import DistillationLoss, Distiller, TeacherOnly, TokenHead
from vitexp.files import printable
from vitexp.models import Arch, arch_from_config, arch_of, build_from_arch, count_macs, count_params, input_shape
from vitexp.runs import Run
from vitexp.schema import Data
from vitexp.tasks.recipe import read_recipe
from vitexp.training import Recipe, evaluate_on, fit, train_in

log = logging.getLogger("vitexp")

SWEEP_METRIC = "best_val_acc1"


def run(run: Run) -> dict[str, Any]:
    """Distil `task.teacher_ckpt` (or a teacher trained here first) into `model`."""
    settings = run.settings
    task, data = settings.task, settings.data
    token = task.distill_type == "token"
    if token and settings.model.builder not in ("vit", "vit_distilled"):
        raise VitexpError(
            f"distill_type=token needs a ViT student, not a {printable(settings.model.builder)}; use soft or hard"
        )
    given = _teacher(task.teacher_ckpt, data) if task.teacher_ckpt else None  # a bad teacher fails first
    if given is None and task.teacher_epochs == 0:  # the teacher as built, e.g. from task.teacher.pretrained
        given = _built_teacher(arch_from_config(asdict(task.teacher)), data)
    recipe = read_recipe(run.cfg, settings=settings)
    if given:
        teacher_path = task.teacher_ckpt or f"{task.teacher.name} ({task.teacher.pretrained or 'random init'})"
    else:
        arch = arch_from_config(asdict(task.teacher))
        teacher_path = train_in(recipe, run.out / "teacher", arch, task.teacher_epochs, model_key="task.teacher")
    teacher, statistics, size = given or _teacher(teacher_path, data)
    teacher = teacher.to(recipe.machine.device)

    def with_teacher(student: nn.Module) -> Distiller:
        return Distiller(student, teacher, recipe.settings.data.mean, recipe.settings.data.std, *statistics, size)

    teacher_acc = score_teacher(recipe, TeacherOnly(with_teacher(nn.Identity())))
    log.info(f"teacher {printable(arch_of(teacher).name)} ({teacher_path}): val/acc1 {teacher_acc:.4f}")
    student = replace(
        recipe,
        arch=replace(recipe.arch, builder="vit_distilled") if token else recipe.arch,
        loss=DistillationLoss(recipe.loss, task.distill_type, task.alpha, task.tau),
        wrap=with_teacher,
        views=lambda m: {"val/acc1_cls": TokenHead(m, "cls"), "val/acc1_dist": TokenHead(m, "dist")} if token else {},
    )
    figures = {
        "teacher": arch_of(teacher).name,
        "teacher_ckpt": str(teacher_path),
        "teacher_val_acc1": teacher_acc,
        "teacher_params": count_params(teacher),
        "teacher_macs": count_macs(teacher),
    }
    return fit(student, run.out, run.last, extra_results=figures, after_epoch=run.after_epoch)


def _teacher(path: str | Path, data: Data) -> tuple[nn.Module, tuple, int]:
    """The teacher in `path`, the normalisation it was trained with and its input size; a teacher for other classes
    or channels than `data` is a one-line error."""
    teacher, saved = checkpoint.load_model(path)
    return teacher, checkpoint.recorded_statistics(saved, f"teacher {path}"), _fits(teacher, path, data)


def _built_teacher(arch: Arch, data: Data) -> tuple[nn.Module, tuple, int]:
    """`task.teacher` as built, without training (`teacher_epochs=0`): its own weights (`pretrained`) and this
    data's normalisation."""
    teacher = build_from_arch(arch, where="task.teacher")
    statistics = tuple(map(float, data.mean)), tuple(map(float, data.std))
    return teacher, statistics, _fits(teacher, "task.teacher", data)


def _fits(teacher: nn.Module, where: str | Path, data: Data) -> int:
    """The teacher's input size; a teacher for other classes or channels than `data` is a one-line error."""
    chans, size, _ = input_shape(teacher)
    if teacher.num_classes != data.num_classes or chans != data.in_chans:
        raise VitexpError(
            f"teacher {where} predicts {teacher.num_classes} classes from {chans}-channel images but data={data.name} "
            f"has {data.num_classes} and {data.in_chans}; pick a teacher for this data"
        )
    return size


def score_teacher(recipe: Recipe, scorer: nn.Module) -> float:
    """The teacher's top-1 accuracy on this run's validation split, through the student's preprocessing."""
    loader = make_loader(
        recipe.splits.val, recipe.settings.data.eval_batch_size, recipe.settings.data.num_workers, train=False
    )
    return evaluate_on(recipe, scorer, loader)[0]["acc1"]
