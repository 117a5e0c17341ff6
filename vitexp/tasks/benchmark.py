"""task=benchmark: time the real training step (and inference) of the configured model, beside the reference loop."""

from __future__ import annotations

import json
import logging
import resource
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vitexp import VitexpError, __version__, engine
from vitexp.bench.anchor import anchor_img_per_s
from vitexp.data import set_epoch
from vitexp.files import printable
from vitexp.hardware import precision_name, seed_everything
from vitexp.models import arch_of, build_from_arch, count_macs, count_params, inference_img_per_s
from vitexp.records import write_results
from vitexp.runs import Run
from vitexp.tasks.recipe import read_recipe
from vitexp.training import Recipe, grad_checkpointing, optimization, step_settings

log = logging.getLogger("vitexp")

SWEEP_METRIC = "img_per_s"


class SyntheticBatches:
    """`n` times the same batch, already on the device: the step alone, as the reference loop measures it."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, n: int) -> None:
        self.images, self.targets, self.n = images, targets, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return ((self.images, self.targets) for _ in range(self.n))


def run(run: Run) -> dict[str, Any]:
    """Time `model`'s training step with this data, optimizer and trainer, and its inference; print one JSON line
    (images/s, step ms, MFU, peak memory, ...) and write it to results.json."""
    recipe = read_recipe(run.cfg, with_data=run.settings.task.mode == "real", settings=run.settings)
    settings, machine = recipe.settings, recipe.machine
    task, batch, data_settings = settings.task, settings.data.batch_size, settings.data
    seed_everything(settings.seed)
    model = build_from_arch(recipe.arch).to(machine.device)
    if settings.trainer.grad_checkpointing:
        grad_checkpointing(model)
    shape = (data_settings.in_chans, data_settings.img_size, data_settings.img_size)
    data = recipe.loaders[0] or SyntheticBatches(*_batch(batch, shape, recipe), task.steps)
    if len(data) < task.warmup_steps + task.steps and task.mode == "real":
        raise VitexpError(f"{len(data)} batches are fewer than task.warmup_steps + task.steps; lower them")
    opt = optimization(recipe, model, len(data))
    flops_per_batch = train_flops(model, recipe.loss, *_batch(batch, shape, recipe), machine.amp)
    compile_mode = settings.trainer.compile_mode
    step_model = torch.compile(model, mode=compile_mode, dynamic=False) if machine.compile else model
    step = step_settings(settings.trainer, machine)

    def timed(n: int, epoch: int) -> float:
        if isinstance(data, SyntheticBatches):
            data.n = n
        else:
            set_epoch(data, settings.seed, epoch)
        figures, _ = engine.train_one_epoch(step_model, data, recipe.loss, opt, 0, step, limit_batches=n)
        return figures["throughput/img_s"]

    plain_vit = arch_of(model).builder == "vit"
    if task.anchor and not plain_vit:
        log.warning(f"model={printable(recipe.arch.name)} is not a plain ViT; the reference loop is skipped")
    if machine.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(machine.device)
    timed(task.warmup_steps, 0)  # compilation, allocator and cache warm-up
    ours, anchor = [], []
    for r in range(task.repeats):  # interleaved, so that drifting clocks or neighbours hit both alike
        if task.anchor and plain_vit:
            kwargs, bf16 = dict(arch_of(model).kwargs), machine.amp == torch.bfloat16
            anchor.append(
                anchor_img_per_s(
                    kwargs,
                    batch,
                    machine.device,
                    bf16=bf16,
                    compile=machine.compile,
                    warmup=task.warmup_steps,
                    steps=task.steps,
                )
            )
        ours.append(timed(task.steps, r + 1))
    results = _figures(recipe, model, step_model, ours, anchor, flops_per_batch)
    write_results(run.out, results)
    log.info(
        f"{printable(recipe.arch.name)} {task.mode} batch {batch}: {results['img_per_s']:.1f} img/s "
        f"({results['step_ms']} ms/step, peak memory {results['peak_mem_mb']} MB), MFU {100 * results['mfu']:.1f}% of a measured {results['peak_tflops']} TFLOP/s"
        + (f", reference loop {results['anchor_img_per_s']} img/s (ratio {results['ratio']})" if anchor else "")
    )
    print(json.dumps(results), flush=True)
    return results


def _batch(batch: int, shape: tuple[int, ...], recipe: Recipe) -> tuple[torch.Tensor, torch.Tensor]:
    device, classes = recipe.machine.device, recipe.settings.data.num_classes
    return torch.randn(batch, *shape, device=device), torch.randint(0, classes, (batch,), device=device)


def _figures(
    recipe: Recipe,
    model: nn.Module,
    step_model: nn.Module,
    ours: list[float],
    anchor: list[float],
    flops_per_batch: int,
) -> dict[str, Any]:
    """The benchmark's one JSON object."""
    settings, machine, device = recipe.settings, recipe.machine, recipe.machine.device
    batch = settings.data.batch_size
    img_per_s, peak = max(ours), measured_peak_flops(device, machine.amp or torch.float32)
    achieved = flops_per_batch / batch * img_per_s
    infer = inference_img_per_s(step_model, settings.data.eval_batch_size, machine.amp, iters=settings.task.steps)
    return {
        "task": "benchmark",
        "mode": settings.task.mode,
        "model": recipe.arch.name,
        "img_per_s": round(img_per_s, 1),
        "step_ms": round(1000 * batch / round(img_per_s, 1), 2),
        "train_tflops": round(achieved / 1e12, 4),
        "peak_tflops": round(peak / 1e12, 3),
        "mfu": round(achieved / peak, 4),
        "peak_mem_mb": round(peak_memory_mb(device), 1),
        "grad_checkpointing": settings.trainer.grad_checkpointing,
        "params": count_params(model),
        "macs": count_macs(model),
        "infer_img_per_s": round(infer, 1),
        "anchor_img_per_s": round(max(anchor), 1) if anchor else None,
        "ratio": round(img_per_s / max(anchor), 3) if anchor else None,
        "rounds_img_per_s": [round(x, 1) for x in ours],
        "rounds_anchor_img_per_s": [round(x, 1) for x in anchor],
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "batch_size": batch,
        "precision": precision_name(machine.amp),
        "compile": machine.compile,
        "fused": bool(recipe.optimizer.keywords.get("fused")),
        "torch": torch.__version__,
        "version": __version__,
        "status": "completed",
    }


def train_flops(
    model: nn.Module, loss_fn: nn.Module, images: torch.Tensor, targets: torch.Tensor, amp: torch.dtype | None
) -> int:
    """FLOPs of one forward and backward pass on this batch, from torch's FLOP counter."""
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(images.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = loss_fn(model(images), targets)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def measured_peak_flops(device: torch.device, dtype: torch.dtype, seconds: float = 0.5) -> float:
    """What this device reaches on large square matmuls in `dtype`: the ceiling MFU is measured against."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(10 if device.type == "cuda" else 1):
            a @ b
            done += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return 2 * n**3 * done / (time.perf_counter() - start)


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or on CPU the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
