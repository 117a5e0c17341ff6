"""task=benchmark: time the real training step (and inference) of the configured model, beside the reference loop."""

from __future__ import annotations

import json
import logging
import resource
import time
from collections.abc import Iterator
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vitexp import VitexpError, __version__, engine
from vitexp.bench.anchor import anchor_img_per_s
from vitexp.data import set_epoch
from vitexp.logging import RunLogger
from vitexp.models import arch_of, count_macs, count_params, inference_img_per_s
from vitexp.runtime import (
    autocast_dtype,
    build,
    fused_option,
    precision_name,
    resolve_device,
    run_dir,
    seed_everything,
    use_compile,
)
from vitexp.tasks.train import loaders, training_objects

log = logging.getLogger("vitexp")


class SyntheticBatches:
    """`n` times the same batch, already on the device: the step alone, as the reference loop measures it."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, n: int) -> None:
        self.images, self.targets, self.n = images, targets, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return ((self.images, self.targets) for _ in range(self.n))


def run(cfg: DictConfig) -> dict[str, Any]:
    """Time `cfg.model`'s training step with this data, optimizer and trainer, and its inference; print one JSON
    line (images/s, step ms, MFU, peak memory, ...) and write it to results.json."""
    if cfg.task.mode not in ("synthetic", "real"):
        raise VitexpError(f"task.mode={cfg.task.mode} is not one of synthetic, real")
    seed_everything(cfg.seed)
    device = resolve_device(cfg.trainer.device)
    amp = autocast_dtype(cfg.trainer.precision, device)
    compiled = use_compile(cfg.trainer.compile, device)
    batch = cfg.data.batch_size
    shape = (cfg.data.in_chans, cfg.data.img_size, cfg.data.img_size)

    model = build(cfg.model).to(device)
    if cfg.task.mode == "real":
        data, _ = loaders(cfg.data, build(cfg.data.splits), device)
        if len(data) < cfg.task.warmup_steps + cfg.task.steps:
            raise VitexpError(f"{len(data)} batches are fewer than task.warmup_steps + task.steps; lower them")
    else:
        data = SyntheticBatches(torch.randn(batch, *shape, device=device),
                                torch.randint(0, cfg.data.num_classes, (batch,), device=device), cfg.task.steps)  # fmt: skip
    optimizer, scheduler, scaler, ema, mixup = training_objects(cfg, model, len(data), device)
    loss_fn = build(cfg.task.loss)
    flops_per_batch = train_flops(model, loss_fn, torch.randn(batch, *shape, device=device),
                                  torch.randint(0, cfg.data.num_classes, (batch,), device=device), amp)  # fmt: skip
    step_model = torch.compile(model, mode=cfg.trainer.compile_mode) if compiled else model

    def timed(n: int, epoch: int) -> float:
        if isinstance(data, SyntheticBatches):
            data.n = n
        else:
            set_epoch(data, cfg.seed, epoch)
        metrics, _ = engine.train_one_epoch(
            step_model, data, loss_fn, optimizer, scheduler, device, 0, autocast_dtype=amp, scaler=scaler,
            accumulate=cfg.trainer.accumulate_grad_batches, clip_norm=cfg.trainer.gradient_clip_val, mixup=mixup,
            ema=ema, limit_batches=n,
        )  # fmt: skip
        return metrics["throughput/img_s"]

    anchor_kwargs = _plain_vit_kwargs(model) if cfg.task.anchor else None
    if cfg.task.anchor and anchor_kwargs is None:
        log.warning(f"model={cfg.model.name} is not a plain ViT; the reference loop is skipped")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timed(cfg.task.warmup_steps, 0)  # compilation, allocator and cache warm-up
    ours, anchor = [], []
    for r in range(cfg.task.repeats):  # interleaved, so that drifting clocks or neighbours hit both alike
        if anchor_kwargs is not None:
            anchor.append(anchor_img_per_s(anchor_kwargs, batch, device, amp == torch.bfloat16, compiled,
                                           cfg.task.warmup_steps, cfg.task.steps))  # fmt: skip
        ours.append(timed(cfg.task.steps, r + 1))
    img_per_s = max(ours)
    peak = measured_peak_flops(device, amp or torch.float32)
    achieved = flops_per_batch / batch * img_per_s
    results = {
        "task": "benchmark",
        "mode": cfg.task.mode,
        "model": cfg.model.name,
        "img_per_s": round(img_per_s, 1),
        "step_ms": round(1000 * batch / img_per_s, 2),
        "train_tflops": round(achieved / 1e12, 4),
        "peak_tflops": round(peak / 1e12, 3),
        "mfu": round(achieved / peak, 4),
        "peak_mem_mb": round(peak_memory_mb(device), 1),
        "params": count_params(model),
        "macs": count_macs(model),
        "infer_img_per_s": round(
            inference_img_per_s(step_model if compiled else model, cfg.data.eval_batch_size, amp, iters=cfg.task.steps),
            1,
        ),  # fmt: skip
        "anchor_img_per_s": round(max(anchor), 1) if anchor else None,
        "ratio": round(img_per_s / max(anchor), 3) if anchor else None,
        "rounds_img_per_s": [round(x, 1) for x in ours],
        "rounds_anchor_img_per_s": [round(x, 1) for x in anchor],
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "batch_size": batch,
        "precision": precision_name(amp),
        "compile": compiled,
        "fused": bool(fused_option(cfg.optim.fused, device)),
        "torch": torch.__version__,
        "version": __version__,
        "status": "completed",
    }
    RunLogger(run_dir()).log_results(results)
    log.info(
        f"{cfg.model.name} {cfg.task.mode} batch {batch}: {img_per_s:.1f} img/s ({results['step_ms']} ms/step), "
        f"MFU {100 * results['mfu']:.1f}% of a measured {results['peak_tflops']} TFLOP/s"
        + (f", reference loop {results['anchor_img_per_s']} img/s (ratio {results['ratio']})" if anchor else "")
    )
    print(json.dumps(results), flush=True)
    return results


def train_flops(model: nn.Module, loss_fn: nn.Module, images: torch.Tensor, targets: torch.Tensor,
                amp: torch.dtype | None) -> int:  # fmt: skip
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


def _plain_vit_kwargs(model: nn.Module) -> dict[str, Any] | None:
    arch = arch_of(model)
    return dict(arch["kwargs"]) if arch["builder"] == "vit" else None
