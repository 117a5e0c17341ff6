"""The shared loops: one training epoch and one evaluation pass. Objects in, plain numbers out; no config."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
from torch import nn
from tqdm import tqdm

from vitexp import VitexpError, distributed

Reduce = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class StepSettings:
    """How each batch is computed and each optimizer step taken.

    `accumulate_grad_batches` batches make one optimizer step (DDP's all-reduce runs on the last one only); `gradient_clip_val` caps
    the gradient norm (null: logged, not applied); with `skip_nonfinite` a step whose gradient norm is not finite
    is skipped instead of ending the epoch with an error; `reduce` sums the epoch's figures over the ranks.
    """

    device: torch.device
    autocast_dtype: torch.dtype | None
    accumulate_grad_batches: int
    gradient_clip_val: float | None
    skip_nonfinite: bool
    reduce: Reduce | None


@dataclass
class Optimization:
    """What a training step updates: the optimizer, its per-step timm schedule, the fp16 GradScaler, the weight
    EMA, and the batch mixer (timm's Mixup) applied before the forward pass."""

    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler | None = None
    ema: Any = None
    mixup: Callable | None = None


@dataclass(frozen=True)
class Monitor:
    """What the loop shows while it runs: a progress bar, and `on_log(step, {train_loss, lr, grad_norm})` every
    `log_every_n_steps` optimizer steps (means over that interval)."""

    progress: bool = False
    desc: str = "train"
    on_log: Callable[[int, dict[str, float]], None] | None = None
    log_every_n_steps: int | None = None  # with `on_log`: logger.log_every_n_steps


def _autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def _reraise(e: BaseException, device: torch.device, batch: int, fix: str) -> NoReturn:
    """Raise `e`, as a one-line error naming the batch size and `fix` when it is a failed allocation (CUDA's
    OutOfMemoryError, the CPU allocator's RuntimeError, Python's MemoryError)."""
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(e):
        raise VitexpError(f"out of memory on {device} with batches of {batch} images; {fix}") from None
    raise e


def base_lr(optimizer: torch.optim.Optimizer) -> float:
    """The schedule's rate: with layer decay a group's rate is this times its `lr_scale`."""
    group = optimizer.param_groups[0]
    return group["lr"] / group.get("lr_scale", 1.0)


def _limited(loader: Iterable, limit: int | None, start: int = 0) -> tuple[Iterable, int]:
    """The batches `start` to the epoch's last (`limit`: at most that many in all), and how many the epoch has.
    A loader placed at `start` (`data.set_epoch`) yields the batches from there."""
    total = start + len(loader)
    n = total if limit is None else min(limit, total)
    return (batch for i, batch in zip(range(start, n), loader)), n


class EpochSums:
    """An epoch's running figures, kept on the device so that the step never waits for the host.

    With `skip_nonfinite` a step's batch losses wait in `pending` until its gradient norm is known to be finite.
    `interval` holds loss * images, images and the summed norm since the last per-step log.
    """

    def __init__(self, device: torch.device, *, skip_nonfinite: bool) -> None:
        self.device, self.skip_nonfinite = device, skip_nonfinite
        self.loss = torch.zeros((), device=device)
        self.norm = torch.zeros((), device=device)
        self.counted = torch.zeros((), device=device)
        self.pending = torch.zeros(2, device=device)
        self.interval = torch.zeros(3, device=device)
        self.seen = self.steps = self.skipped = self.interval_steps = 0

    def add_batch(self, loss: torch.Tensor, images: int, *, logging: bool) -> None:
        """Count one batch's mean loss over its `images`."""
        if self.skip_nonfinite:
            self.pending[0] += loss * images
            self.pending[1] += images
        else:
            self.loss += loss * images
        self.seen += images
        if logging:
            self.interval[0] += loss * images
            self.interval[1] += images

    def drop_step(self) -> None:
        """Forget the losses of a step skipped for a non-finite gradient."""
        self.pending.zero_()
        self.skipped += 1

    def add_step(self, norm: torch.Tensor, *, logging: bool) -> None:
        """Count one optimizer step with gradient norm `norm`, and the losses waiting for it."""
        if self.skip_nonfinite:
            self.loss += self.pending[0]
            self.counted += self.pending[1]
            self.pending.zero_()
        self.norm += norm
        if logging:
            self.interval[2] += norm
            self.interval_steps += 1

    def interval_means(self) -> tuple[float, float]:
        """Mean train loss and gradient norm since the last call."""
        loss_images, images, norms = self.interval.tolist()
        means = loss_images / images, norms / self.interval_steps
        self.interval.zero_()
        self.interval_steps = 0
        return means

    def state_dict(self) -> dict[str, Any]:
        """The running figures as plain values and CPU tensors (for a mid-epoch checkpoint)."""
        tensors = {k: getattr(self, k).detach().cpu().clone() for k in _SUMS_TENSORS}
        return tensors | {k: getattr(self, k) for k in _SUMS_COUNTS}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from the figures `state_dict` saved."""
        for k in _SUMS_TENSORS:
            getattr(self, k).copy_(state[k])
        for k in _SUMS_COUNTS:
            setattr(self, k, int(state[k]))

    def running_loss(self) -> float:
        """Mean train loss so far on this rank (for the progress bar)."""
        return self.loss.item() / max(self.counted.item() if self.skip_nonfinite else self.seen, 1)

    def totals(self, reduce: Reduce | None) -> tuple[float, float, float]:
        """Summed loss, images counted in it and images seen, over every rank."""
        counted = self.counted if self.skip_nonfinite else torch.tensor(float(self.seen), device=self.device)
        totals = torch.stack([self.loss, counted, torch.tensor(float(self.seen), device=self.device)])
        return tuple((reduce(totals) if reduce else totals).tolist())


_SUMS_TENSORS = ("loss", "norm", "counted", "pending", "interval")
_SUMS_COUNTS = ("seen", "steps", "skipped", "interval_steps")


def sums_for_rank(states: list[dict[str, Any]], rank: int) -> dict[str, Any]:
    """This rank's share of the running figures that `states` (one per rank of the run that saved them) hold.

    On as many ranks as saved them, each takes its own. On another number, rank 0 takes the images and losses
    summed over the saved ranks and the others none; gradient norms and step counts are those of the global
    gradient, the same on every rank."""
    if len(states) == distributed.world_size():
        return states[rank]
    first, additive = states[0], rank == 0
    merged = {
        k: (sum(s[k] for s in states) if additive else torch.zeros_like(first[k]))
        for k in ("loss", "counted", "pending")
    }
    interval = sum(s["interval"] for s in states) if additive else torch.zeros_like(first["interval"])
    interval[2] = first["interval"][2]
    seen = sum(s["seen"] for s in states) if additive else 0
    return {**first, **merged, "interval": interval, "seen": seen}


@dataclass(frozen=True)
class EpochStart:
    """Where an epoch begins: its first batch (0, or where a mid-epoch checkpoint left it) and the running figures
    (`EpochSums.state_dict`) summed up to there."""

    batch: int = 0
    sums: dict[str, Any] | None = None


# called after each optimizer step but an epoch's last: (step count, batches done in the epoch, the running figures)
AfterStep = Callable[[int, int, "EpochSums"], None]


def _optimizer_step(
    params: list[nn.Parameter], opt: Optimization, s: StepSettings, sums: EpochSums, *, logging: bool
) -> bool:
    """Unscale, measure (and clip) the gradient norm and step the optimizer; False when the step was skipped for a
    non-finite gradient. The schedule, the EMA and the step count are the caller's."""
    if opt.scaler:
        opt.scaler.unscale_(opt.optimizer)
    norm = (
        nn.utils.clip_grad_norm_(params, s.gradient_clip_val)
        if s.gradient_clip_val is not None
        else nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])  # logged, not applied
    )
    if s.skip_nonfinite and not torch.isfinite(norm):  # one host read per step: the price of skipping
        opt.optimizer.zero_grad(set_to_none=True)
        sums.drop_step()
        return False
    sums.add_step(norm.detach(), logging=logging)
    if opt.scaler:
        opt.scaler.step(opt.optimizer)
        opt.scaler.update()
    else:
        opt.optimizer.step()
    opt.optimizer.zero_grad(set_to_none=True)
    return True


def _micro_step(model: nn.Module, images, targets, loss_fn, micro: int, opt, s, *, sync: bool) -> torch.Tensor:
    """Forward and backward of one batch, its loss scaled for `micro` accumulated batches; returns the loss."""
    images = images.to(s.device, non_blocking=True)
    targets = targets.to(s.device, non_blocking=True)
    if opt.mixup is not None:
        images, targets = opt.mixup(images, targets)
    with contextlib.nullcontext() if sync or not hasattr(model, "no_sync") else model.no_sync():
        with _autocast(s.device, s.autocast_dtype):
            loss = loss_fn(model(images), targets)
        (opt.scaler.scale(loss / micro) if opt.scaler else loss / micro).backward()
    return loss.detach()


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
    opt: Optimization,
    step: int,
    settings: StepSettings,
    *,
    limit_batches: int | None = None,
    monitor: Monitor = Monitor(),
    start: EpochStart = EpochStart(),
    after_step: AfterStep | None = None,
) -> tuple[dict[str, float], int]:
    """Train for one pass over `loader` (from `start`); returns the epoch's figures and the new optimizer-step count.

    The schedule is stepped per optimizer step (`step_update`). A non-finite epoch loss is an error naming the
    epoch; running out of memory is an error suggesting a smaller batch with gradient accumulation.
    """
    model.train()
    batches, n_batches = _limited(loader, limit_batches, start.batch)
    s, logging = settings, monitor.on_log is not None
    sums = EpochSums(s.device, skip_nonfinite=s.skip_nonfinite)
    if start.sums is not None:
        sums.load_state_dict(start.sums)
    params = [p for p in model.parameters() if p.requires_grad]
    time_start, batch = time.perf_counter(), 0
    bar = _progress_bar(batches, n_batches, start.batch, monitor)
    try:
        for i, (images, targets) in enumerate(bar, start.batch):
            batch = images.shape[0]
            stepping = (i + 1) % s.accumulate_grad_batches == 0 or i + 1 == n_batches
            micro = min(
                s.accumulate_grad_batches, n_batches - (i // s.accumulate_grad_batches) * s.accumulate_grad_batches
            )
            loss = _micro_step(model, images, targets, loss_fn, micro, opt, s, sync=stepping)
            sums.add_batch(loss, batch, logging=logging)
            if not stepping:
                continue
            stepped = _optimizer_step(params, opt, s, sums, logging=logging)
            step += 1
            opt.scheduler.step_update(step)
            if stepped:
                sums.steps += 1
                if opt.ema is not None:
                    opt.ema.update(model, step=step)
                _report(monitor, bar, sums, step, base_lr(opt.optimizer), logging=logging)
            if after_step is not None and i + 1 < n_batches:
                after_step(step, i + 1, sums)
    except (RuntimeError, MemoryError) as e:
        _reraise(e, s.device, batch, _smaller_batch(batch, s.accumulate_grad_batches))
    return _epoch_figures(sums, opt, s, time_start, monitor.desc, step), step


def _progress_bar(batches: Iterable, total: int, initial: int, monitor: Monitor) -> tqdm:
    """The epoch's progress bar (off unless `monitor.progress`), counting from batch `initial`."""
    return tqdm(
        batches,
        total=total,
        initial=initial,
        desc=monitor.desc,
        leave=False,
        disable=not monitor.progress,
        dynamic_ncols=True,
    )


def _smaller_batch(batch: int, accumulate: int) -> str:
    """How to fit in memory with the same effective batch: half the batch, twice the accumulation."""
    return (
        f"lower data.batch_size (e.g. data.batch_size={max(batch // 2, 1)}) and set "
        f"trainer.accumulate_grad_batches={accumulate * 2} to keep the effective batch"
    )


def _report(monitor: Monitor, bar: Any, sums: EpochSums, step: int, lr: float, *, logging: bool) -> None:
    """The per-step log every `log_every_n_steps` steps and the progress bar's figures every 10."""
    if logging and step % monitor.log_every_n_steps == 0:
        loss, norm = sums.interval_means()
        monitor.on_log(step, {"train_loss": loss, "lr": lr, "grad_norm": norm})
    if monitor.progress and sums.steps % 10 == 0:
        bar.set_postfix(loss=f"{sums.running_loss():.4f}", lr=f"{lr:.2e}")


def _epoch_figures(sums: EpochSums, opt: Optimization, s: StepSettings, start: float, desc: str, step: int) -> dict:
    if s.device.type == "cuda":
        torch.cuda.synchronize(s.device)
    elapsed = time.perf_counter() - start
    loss_total, n_counted, n_seen = sums.totals(s.reduce)
    train_loss = loss_total / n_counted if n_counted else math.nan
    if not math.isfinite(train_loss):
        raise VitexpError(
            f"train loss became {train_loss} in {desc} (by step {step}); the checkpoints of the last good epoch are "
            f"kept: lower optim.lr, set trainer.gradient_clip_val, or use trainer.precision=32"
            + ("" if s.skip_nonfinite else " (or skip such steps with trainer.skip_nonfinite=true)")
        )
    return {
        "train/loss": train_loss,
        "grad_norm": sums.norm.item() / max(sums.steps, 1),
        "lr": base_lr(opt.optimizer),
        "throughput/img_s": n_seen / elapsed,
        **({"skipped_steps": sums.skipped} if s.skip_nonfinite else {}),
    }


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
    reduce: Reduce | None = None,
    on_batch: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> tuple[dict[str, float], torch.Tensor]:
    """Mean cross-entropy, top-1 and top-5 accuracy over `loader` and the number of images, and the confusion
    matrix (rows: true class); with `reduce`, over every rank's share of the split. `on_batch(b, logits, targets)`
    sees each batch's float logits (e.g. to collect the mistakes), so that nothing needs a second pass.
    `forward_img_per_s` in the figures: this rank's images a second in the model's forward passes, loading left out
    (after the first batch, which sets up the kernels of its shape, when there is more than one)."""
    model.eval()
    batches, n_batches = _limited(loader, limit_batches)
    # loss, top-1, top-5, images, then the confusion matrix: one tensor, so that one reduce sums them all
    totals = torch.zeros(4 + num_classes * num_classes, device=device, dtype=torch.float64)
    k, batch, timed = min(5, num_classes), 0, []
    try:
        bar = tqdm(batches, total=n_batches, desc=desc, leave=False, disable=not progress)
        # one autocast region for the pass: each weight is cast to the autocast dtype once a pass, not once a batch
        with _autocast(device, autocast_dtype):
            for b, (images, targets) in enumerate(bar):
                batch = images.shape[0]
                images = images.to(device, non_blocking=True)
                targets = targets.to(device, non_blocking=True)
                tick = time.perf_counter()
                logits = model(images).float()
                timed.append((batch, _settled(logits) - tick))
                topk = logits.topk(k, dim=1).indices
                # each image's loss summed in float64: exact for any grouping, so the mean does not depend on the batch
                totals[0] += nn.functional.cross_entropy(logits, targets, reduction="none").double().sum()
                totals[1] += (topk[:, 0] == targets).sum()
                totals[2] += (topk == targets[:, None]).any(dim=1).sum()
                totals[3] += targets.shape[0]
                totals[4:] += torch.bincount(targets * num_classes + topk[:, 0], minlength=num_classes * num_classes)
                if on_batch is not None:
                    on_batch(b, logits, targets)
    except (RuntimeError, MemoryError) as e:
        _reraise(e, device, batch, f"lower data.eval_batch_size (e.g. {max(batch // 2, 1)})")
    totals = reduce(totals) if reduce else totals
    loss_total, top1, top5, n_total = totals[:4].tolist()
    n = max(n_total, 1)
    metrics = {"loss": loss_total / n, "acc1": top1 / n, "acc5": top5 / n, "images": int(n_total)}
    metrics["forward_img_per_s"] = _img_per_s(timed[1:] or timed)
    return metrics, totals[4:].round().long().view(num_classes, num_classes).cpu()


def _settled(output: torch.Tensor) -> float:
    """The clock once `output` is computed (a GPU's queued work waited for)."""
    if output.device.type == "cuda":
        torch.cuda.synchronize(output.device)
    return time.perf_counter()


def _img_per_s(timed: list[tuple[int, float]]) -> float:
    """Images a second over (images, seconds) pairs; 0.0 for none."""
    seconds = sum(s for _, s in timed)
    return sum(n for n, _ in timed) / seconds if seconds > 0 else 0.0
