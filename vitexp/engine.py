"""The shared loops: one training epoch and one evaluation pass. Objects in, plain numbers out; no config."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from typing import NoReturn

import torch
from torch import nn
from tqdm import tqdm

from vitexp import VitexpError


def _reraise(e: BaseException, device: torch.device, batch: int, fix: str) -> NoReturn:
    """Raise `e`, as a one-line error naming the batch size and `fix` when it is a failed allocation (CUDA's
    OutOfMemoryError, the CPU allocator's RuntimeError, Python's MemoryError)."""
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(e):
        raise VitexpError(f"out of memory on {device} with batches of {batch} images; {fix}") from None
    raise e


def _limited(loader: Iterable, limit: int | None) -> tuple[Iterable, int]:
    total = len(loader)
    n = total if limit is None else min(limit, total)
    return (batch for i, batch in zip(range(n), loader)), n


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler,
    device: torch.device,
    step: int,
    *,
    autocast_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    accumulate: int = 1,
    clip_norm: float | None = None,
    mixup: Callable | None = None,
    ema=None,
    limit_batches: int | None = None,
    progress: bool = False,
    desc: str = "train",
    on_log: Callable[[int, dict[str, float]], None] | None = None,
    log_every: int = 50,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    skip_nonfinite: bool = False,
) -> tuple[dict[str, float], int]:
    """Train for one pass over `loader`; returns epoch metrics and the new optimizer-step count.

    `scheduler` is a timm scheduler stepped per optimizer step (`step_update`). Sums stay on the device
    and are read once per `log_every` optimizer steps (for `on_log(step, {train_loss, lr, grad_norm})`, the
    means over that interval) and once at the end, so the step does not wait for the host. Under DDP,
    accumulation micro-steps skip the gradient all-reduce (`no_sync`), and `reduce` sums the epoch's loss and
    image counts over the ranks (per-step figures are this rank's).

    A non-finite epoch loss is an error naming the epoch. With `skip_nonfinite`, an optimizer step whose
    gradient norm is not finite (a NaN/inf loss in one of its batches) is skipped instead, its batches are
    left out of the loss, and `skipped_steps` counts them (the norm is then read every step). Running out of
    memory is an error suggesting a smaller batch with gradient accumulation.
    """
    model.train()
    batches, n_batches = _limited(loader, limit_batches)
    loss_sum = torch.zeros((), device=device)
    norm_sum = torch.zeros((), device=device)
    n_seen, n_steps, skipped = 0, 0, 0
    counted = torch.zeros((), device=device)  # with skip_nonfinite: images whose loss is in loss_sum
    pending = torch.zeros(2, device=device)  # with skip_nonfinite: loss * images, images of the step being built
    interval = torch.zeros(3, device=device)  # loss * images, images, grad norm since the last on_log
    interval_steps = 0
    params = [p for p in model.parameters() if p.requires_grad]
    start = time.perf_counter()
    bar = tqdm(batches, total=n_batches, desc=desc, leave=False, disable=not progress, dynamic_ncols=True)
    batch = 0
    try:
        for i, (images, targets) in enumerate(bar):
            batch = images.shape[0]
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            if mixup is not None:
                images, targets = mixup(images, targets)
            stepping = (i + 1) % accumulate == 0 or i + 1 == n_batches
            with model.no_sync() if not stepping and hasattr(model, "no_sync") else contextlib.nullcontext():
                with torch.autocast(
                    device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
                ):
                    loss = loss_fn(model(images), targets)
                micro = min(accumulate, n_batches - (i // accumulate) * accumulate)
                (scaler.scale(loss / micro) if scaler else loss / micro).backward()
            if skip_nonfinite:
                pending[0] += loss.detach() * batch
                pending[1] += batch
            else:
                loss_sum += loss.detach() * batch
            n_seen += batch
            if on_log is not None:
                interval[0] += loss.detach() * batch
                interval[1] += batch
            if not stepping:
                continue
            if scaler:
                scaler.unscale_(optimizer)
            norm = (
                nn.utils.clip_grad_norm_(params, clip_norm)
                if clip_norm is not None
                else nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])  # logged, not applied
            )
            if skip_nonfinite:
                if not torch.isfinite(norm):  # one host read per step: the price of skipping
                    optimizer.zero_grad(set_to_none=True)
                    pending.zero_()
                    skipped += 1
                    step += 1
                    scheduler.step_update(step)
                    continue
                loss_sum += pending[0]
                counted += pending[1]
                pending.zero_()
            norm_sum += norm.detach()
            if on_log is not None:
                interval[2] += norm.detach()
                interval_steps += 1
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            n_steps += 1
            scheduler.step_update(step)
            if ema is not None:
                ema.update(model, step=step)
            if on_log is not None and step % log_every == 0:
                loss_images, images_seen, norms = interval.tolist()
                on_log(step, {"train_loss": loss_images / images_seen, "lr": optimizer.param_groups[0]["lr"],
                              "grad_norm": norms / interval_steps})  # fmt: skip
                interval.zero_()
                interval_steps = 0
            if progress and n_steps % 10 == 0:
                bar.set_postfix(
                    loss=f"{loss_sum.item() / max(counted.item() if skip_nonfinite else n_seen, 1):.4f}",
                    lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                )
    except (RuntimeError, MemoryError) as e:
        _reraise(e, device, batch, f"lower data.batch_size (e.g. data.batch_size={max(batch // 2, 1)}) and set "
                                   f"trainer.accumulate_grad_batches={accumulate * 2} to keep the effective batch")  # fmt: skip
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    if not skip_nonfinite:
        counted = torch.tensor(float(n_seen), device=device)
    totals = torch.stack([loss_sum, counted, torch.tensor(float(n_seen), device=device)])
    loss_total, n_counted, n_seen = (reduce(totals) if reduce else totals).tolist()
    train_loss = loss_total / n_counted if n_counted else math.nan
    if not math.isfinite(train_loss):
        raise VitexpError(
            f"train loss became {train_loss} in {desc} (by step {step}); the checkpoints of the last good epoch are "
            f"kept: lower optim.lr, set trainer.gradient_clip_val, or use trainer.precision=32"
            + ("" if skip_nonfinite else " (or skip such steps with trainer.skip_nonfinite=true)")
        )
    return {
        "train/loss": train_loss,
        "grad_norm": norm_sum.item() / max(n_steps, 1),
        "lr": optimizer.param_groups[0]["lr"],
        "throughput/img_s": n_seen / elapsed,
        **({"skipped_steps": skipped} if skip_nonfinite else {}),
    }, step


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    device: torch.device,
    num_classes: int,
    *,
    autocast_dtype: torch.dtype | None = None,
    limit_batches: int | None = None,
    progress: bool = False,
    desc: str = "val",
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[dict[str, float], torch.Tensor]:
    """Mean cross-entropy, top-1 and top-5 accuracy over `loader` and the number of images, and the confusion
    matrix (rows: true class); with `reduce`, over every rank's share of the split."""
    model.eval()
    batches, n_batches = _limited(loader, limit_batches)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    top1 = torch.zeros((), device=device, dtype=torch.long)
    top5 = torch.zeros((), device=device, dtype=torch.long)
    confusion = torch.zeros(num_classes * num_classes, device=device, dtype=torch.long)
    n = 0
    k = min(5, num_classes)
    batch = 0
    try:
        for images, targets in tqdm(batches, total=n_batches, desc=desc, leave=False, disable=not progress):
            batch = images.shape[0]
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                logits = model(images)
            logits = logits.float()
            loss_sum += nn.functional.cross_entropy(logits, targets, reduction="sum")
            topk = logits.topk(k, dim=1).indices
            top1 += (topk[:, 0] == targets).sum()
            top5 += (topk == targets[:, None]).any(dim=1).sum()
            confusion += torch.bincount(targets * num_classes + topk[:, 0], minlength=num_classes * num_classes)
            n += targets.shape[0]
    except (RuntimeError, MemoryError) as e:
        _reraise(e, device, batch, f"lower data.eval_batch_size (e.g. {max(batch // 2, 1)})")
    totals = torch.cat([torch.stack([loss_sum, top1.double(), top5.double(), torch.tensor(float(n), device=device,
                                                                                          dtype=torch.float64)]),
                        confusion.double()])  # fmt: skip
    totals = reduce(totals) if reduce else totals
    loss_total, top1_total, top5_total, n_total = totals[:4].tolist()
    n = max(n_total, 1)
    metrics = {"loss": loss_total / n, "acc1": top1_total / n, "acc5": top5_total / n, "images": int(n_total)}
    return metrics, totals[4:].round().long().view(num_classes, num_classes).cpu()
