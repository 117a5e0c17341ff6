"""Distillation step overhead: the same student and batch, trained plainly and with a frozen teacher.

    python -m vitexp.bench.distill_overhead                          # patch8 student, ResNet-18 teacher, CIFAR size
    python -m vitexp.bench.distill_overhead model=baseline task.teacher.small_input=true

Overrides are Hydra overrides of the real config (task=distill is implied). Prints one JSON line.
"""

from __future__ import annotations

import json
import sys
import time

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from timm.scheduler import CosineLRScheduler
from torch import nn

from vitexp import engine
from vitexp.config import config_dir, version_base
from vitexp.distill import DistillationLoss, Distiller
from vitexp.models import arch_from_config, build_from_arch, count_macs

DEFAULTS = ["task=distill", "data=cifar10", "model=patch8", "task.distill_type=hard", "task.teacher.small_input=false"]


def time_steps(model: nn.Module, loss_fn, batch, steps: int) -> float:
    """Seconds per optimizer step, warm-up excluded."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    scheduler = CosineLRScheduler(optimizer, t_initial=10_000, t_in_epochs=False)
    cpu = torch.device("cpu")
    engine.train_one_epoch(model, [batch] * 2, loss_fn, optimizer, scheduler, cpu, 0)
    start = time.perf_counter()
    engine.train_one_epoch(model, [batch] * steps, loss_fn, optimizer, scheduler, cpu, 0)
    return (time.perf_counter() - start) / steps


def main() -> None:
    """Time both steps and print one JSON line."""
    with initialize_config_dir(config_dir=config_dir(), **version_base()):
        cfg = compose(config_name="config", overrides=DEFAULTS + sys.argv[1:])
    torch.manual_seed(0)
    student, teacher = (
        build_from_arch(arch_from_config(OmegaConf.to_container(node, resolve=True)))
        for node in (cfg.model, cfg.task.teacher)
    )
    batch_size, steps = cfg.data.batch_size, 10
    batch = (
        torch.randn(batch_size, cfg.data.in_chans, cfg.data.img_size, cfg.data.img_size),
        torch.randint(0, cfg.data.num_classes, (batch_size,)),
    )
    ce = nn.CrossEntropyLoss()
    distiller = Distiller(student, teacher, cfg.data.mean, cfg.data.std, cfg.data.mean, cfg.data.std, cfg.data.img_size)
    loss = DistillationLoss(ce, cfg.task.distill_type, cfg.task.alpha, cfg.task.tau)
    # Interleave the two so that machine noise hits both alike; keep each one's best round.
    plain, distilled = [], []
    for _ in range(3):
        plain.append(time_steps(student, ce, batch, steps))
        distilled.append(time_steps(distiller, loss, batch, steps))
    with torch.no_grad():
        teacher.eval()
        start = time.perf_counter()
        for _ in range(steps):
            teacher(batch[0])
        teacher_fwd = (time.perf_counter() - start) / steps
    print(
        json.dumps(
            {
                "student": cfg.model.name,
                "teacher": cfg.task.teacher.model_name,
                "batch_size": batch_size,
                "student_macs": count_macs(student),
                "teacher_macs": count_macs(teacher),
                "plain_step_ms": round(1000 * min(plain), 1),
                "distill_step_ms": round(1000 * min(distilled), 1),
                "teacher_forward_ms": round(1000 * teacher_fwd, 1),
                "overhead_ratio": round(min(distilled) / min(plain), 3),
                "device": "cpu",
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
