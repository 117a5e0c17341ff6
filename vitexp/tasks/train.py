"""task=train: train a model on a data set, keep best/last/periodic checkpoints, report."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from timm.optim import param_groups_weight_decay
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vitexp import VitexpError, __version__, checkpoint, distributed, engine, plots
from vitexp.data import DeviceLoader, Splits, make_loader, set_epoch, to_device
from vitexp.logging import RunLogger, completed, read_metrics, wandb_run_id
from vitexp.models import arch_of, count_macs, count_params, inference_img_per_s
from vitexp.runtime import (
    autocast_dtype,
    build,
    check_stop,
    derived_config,
    fused_option,
    load_weights,
    open_run,
    precision_name,
    resolve_device,
    seed_everything,
    show_progress,
    use_compile,
)

log = logging.getLogger("vitexp")


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train `cfg.model` on `cfg.data`; returns the figures written to results.json."""
    cfg, out, resume = open_run(cfg)
    return fit(cfg, out, resume)


def train_in(cfg: DictConfig, folder: Path, model: DictConfig, epochs: int) -> Path:
    """Train `model` with this run's data, optimizer and trainer for `epochs` in `folder` (a sub-run, e.g. a
    teacher to distil or a model to prune); resumes or skips it when an earlier attempt got that far.
    Returns its best.pt."""
    best = folder / "checkpoints" / "best.pt"
    if completed(folder):
        return best
    sub_cfg = derived_config(cfg, {
        "model": model,
        "trainer": {**OmegaConf.to_container(cfg.trainer, resolve=True), "max_epochs": epochs},
        "task": {"name": "train", "loss": OmegaConf.to_container(cfg.task.loss, resolve=True)},
        "ckpt_path": None,
    })  # fmt: skip
    last = folder / "checkpoints" / "last.pt"
    log.info(f"training {sub_cfg.model.name} for {epochs} epochs in {folder}")
    fit(sub_cfg, folder, checkpoint.load(last) if last.exists() else None, prefix=f"{folder.name}/")
    return best


def loaders(data: DictConfig, splits: Splits, device: torch.device) -> tuple[Iterable, Iterable]:
    """Train and val loaders: worker processes over the transforms, or with `data.on_device` the splits held
    on the device as uint8 and augmented there (crop and flip; mixup/cutmix run on the device either way).
    Under torchrun each rank reads its share: `data.batch_size` is the global batch."""
    rank, world = distributed.rank(), distributed.world_size()
    if len(splits.train) < data.batch_size:
        raise VitexpError(
            f"{len(splits.train)} train images make no full batch of {data.batch_size}; lower data.batch_size"
        )
    if not data.on_device:
        pin = device.type == "cuda"
        return (make_loader(splits.train, data.batch_size, data.num_workers, data.persistent_workers, True, pin, rank, world),
                make_loader(splits.val, data.eval_batch_size, data.num_workers, data.persistent_workers, False, pin, rank,
                            world))  # fmt: skip
    augment = data.splits.train_transform
    for key in ("rotate", "randaugment", "random_erasing"):
        if augment[key]:
            raise VitexpError(f"data.on_device=true augments with crop and flip only; set data.splits.train_transform.{key}=0 "
                              f"(or null), or data.on_device=false")  # fmt: skip
    train = DeviceLoader(*to_device(splits.train, data.img_size, device, data.num_workers), data.batch_size, True,
                         data.mean, data.std, augment.crop_padding, augment.hflip, rank, world)  # fmt: skip
    val = DeviceLoader(*to_device(splits.val, data.img_size, device, data.num_workers), data.eval_batch_size, False,
                       data.mean, data.std, rank=rank, world=world)  # fmt: skip
    return train, val


def training_objects(
    cfg: DictConfig, model: nn.Module, batches_per_epoch: int, device: torch.device
) -> tuple[torch.optim.Optimizer, Any, torch.amp.GradScaler | None, ModelEmaV3 | None, Any]:
    """The optimizer (no weight decay on norms, biases and tokens), its per-step schedule, the GradScaler
    (fp16), the weight EMA and mixup/cutmix that `cfg` asks for: what `engine.train_one_epoch` takes."""
    params = param_groups_weight_decay(model, cfg.optim.weight_decay, getattr(model, "no_weight_decay", set)())
    optimizer = build(cfg.optim.optimizer)(params, **fused_option(cfg.optim.fused, device))
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.trainer.accumulate_grad_batches)
    scheduler = build(cfg.optim.scheduler)(
        optimizer,
        t_initial=cfg.trainer.max_epochs * steps_per_epoch,
        warmup_t=round(cfg.optim.warmup_epochs * steps_per_epoch),
    )
    scaler = torch.amp.GradScaler(device.type) if str(cfg.trainer.precision) == "16" else None
    ema = ModelEmaV3(model, decay=cfg.trainer.ema_decay) if cfg.trainer.ema_decay else None
    mixup = build(cfg.data.mixup) if cfg.data.mixup.prob > 0 else None
    return optimizer, scheduler, scaler, ema, mixup


def fit(
    cfg: DictConfig,
    out: Path,
    resume: dict[str, Any] | None = None,
    *,
    wrap: Callable[[nn.Module], nn.Module] | None = None,
    loss_fn: Callable | None = None,
    views: Callable[[nn.Module], dict[str, nn.Module]] | None = None,
    extra_results: dict[str, Any] | None = None,
    prefix: str = "",
) -> dict[str, Any]:
    """The training recipe, writing into `out`; `resume` is a loaded last.pt to continue from.

    Distillation reuses it: `wrap` turns the model into what the training step calls (e.g. student plus
    frozen teacher), `loss_fn` replaces `cfg.task.loss`, `views(model)` names extra modules whose val
    accuracy is logged each epoch under that name, and `extra_results` go into results.json. A sub-run
    (a teacher, a model trained to be pruned) logs to the job's W&B run under `prefix`.
    """
    started = time.perf_counter()
    if resume is not None:
        log.info(f"resuming {out} from epoch {resume['epoch']} (step {resume['step']})")
    seed_everything(cfg.seed)
    device = resolve_device(cfg.trainer.device)
    amp = autocast_dtype(cfg.trainer.precision, device)
    progress = show_progress(cfg.trainer.progress)

    splits = build(cfg.data.splits)
    if len(splits.classes) != cfg.data.num_classes:
        raise VitexpError(f"data has {len(splits.classes)} classes but data.num_classes={cfg.data.num_classes}; set it")
    train_loader, val_loader = loaders(cfg.data, splits, device)

    model = build(cfg.model).to(device)
    if cfg.ckpt_path and resume is None:
        load_weights(model, checkpoint.load(cfg.ckpt_path)["model"], cfg.ckpt_path)
    batches = min(len(train_loader), cfg.trainer.limit_train_batches or len(train_loader))
    optimizer, scheduler, scaler, ema, mixup = training_objects(cfg, model, batches, device)
    loss_fn = loss_fn or build(cfg.task.loss)
    train_model = wrap(model) if wrap else model
    if distributed.world_size() > 1:
        train_model = DistributedDataParallel(train_model, device_ids=[device.index] if device.type == "cuda" else None)
    compiled = use_compile(cfg.trainer.compile, device)
    train_model, eval_model = (
        (torch.compile(train_model, mode=cfg.trainer.compile_mode), torch.compile(model, mode=cfg.trainer.compile_mode))
        if compiled
        else (train_model, model)
    )

    start_epoch, step, best_acc, val_images = 1, 0, -1.0, None
    if resume is not None:
        load_weights(model, resume["model"], f"{out}/checkpoints/last.pt")
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        if scaler is not None:
            scaler.load_state_dict(resume["scaler"])
        if ema is not None:
            ema.load_state_dict(resume["ema"])
        start_epoch, step = resume["epoch"] + 1, resume["step"]
        best_acc = resume["metrics"]["best_val_acc1"]
        val_images = resume.get("val_images")
        checkpoint.set_rng_state(resume["rng"])

    config = OmegaConf.to_container(cfg, resolve=True)
    # rows past the resumed epoch (all of them when starting over in a stopped run's folder) are written again
    logger = RunLogger(out, resume_epoch=resume["epoch"] if resume else 0, prefix=prefix)
    reduce = distributed.sum_all if distributed.world_size() > 1 else None
    n_params, macs = count_params(model), count_macs(model)
    log.info(
        f"{cfg.model.name}: {n_params / 1e6:.2f}M params, {macs / 1e6:.1f}M MACs/img | {cfg.data.name}: "
        f"{len(splits.train)} train, {len(splits.val)} val | {device}, {precision_name(amp)}"
        f"{', compiled' if compiled else ''}{', data on device' if cfg.data.on_device else ''} | {out}"
    )
    for epoch in range(start_epoch, cfg.trainer.max_epochs + 1):
        epoch_start = time.perf_counter()
        set_epoch(train_loader, cfg.seed, epoch)
        train_metrics, step = engine.train_one_epoch(
            train_model, train_loader, loss_fn, optimizer, scheduler, device, step,
            autocast_dtype=amp, scaler=scaler, accumulate=cfg.trainer.accumulate_grad_batches,
            clip_norm=cfg.trainer.gradient_clip_val, mixup=mixup, ema=ema,
            limit_batches=cfg.trainer.limit_train_batches, progress=progress, desc=f"epoch {epoch}",
            on_log=logger.log_step if logger.tracks_steps else None, log_every=cfg.logger.log_every_n_steps,
            reduce=reduce, skip_nonfinite=cfg.trainer.get("skip_nonfinite", False),
        )  # fmt: skip
        if skipped := train_metrics.pop("skipped_steps", 0):
            log.warning(f"epoch {epoch}: skipped {skipped} optimizer steps with a non-finite loss or gradient")
        val, _ = engine.evaluate(
            eval_model, val_loader, device, cfg.data.num_classes,
            autocast_dtype=amp, limit_batches=cfg.trainer.limit_val_batches, progress=progress, reduce=reduce,
        )  # fmt: skip
        val_images = val["images"]
        metrics = {"epoch": epoch, **train_metrics, "val/loss": val["loss"], "val/acc1": val["acc1"],
                   "val/acc5": val["acc5"]}  # fmt: skip
        extra = {"val_ema/acc1": ema.module} if ema is not None else {}
        for name, view in {**extra, **(views(model) if views else {})}.items():
            view_val, _ = engine.evaluate(
                view, val_loader, device, cfg.data.num_classes,
                autocast_dtype=amp, limit_batches=cfg.trainer.limit_val_batches, reduce=reduce,
            )  # fmt: skip
            metrics[name] = view_val["acc1"]
        # logged before the checkpoints: a run killed in between repeats this epoch on resume, never loses its row
        metrics["time/epoch_s"] = time.perf_counter() - epoch_start
        logger.log_epoch(metrics, cfg.trainer.max_epochs)

        is_best = val["acc1"] > best_acc
        best_acc = max(best_acc, val["acc1"])
        state = {
            "model": model.state_dict(),
            "arch": arch_of(model),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "ema": ema.state_dict() if ema is not None else None,
            "epoch": epoch,
            "step": step,
            "rng": checkpoint.rng_state(),
            "config": config,
            "metrics": {**metrics, "best_val_acc1": best_acc},
            "val_images": val_images,
            "wandb_run_id": wandb_run_id(),
            "version": __version__,
        }
        ckpt_dir = out / "checkpoints"
        if distributed.is_main():
            if is_best:
                checkpoint.save(state, ckpt_dir / "best.pt")
            if cfg.trainer.ckpt_every_n_epochs and epoch % cfg.trainer.ckpt_every_n_epochs == 0:
                checkpoint.save(state, ckpt_dir / f"epoch_{epoch:04d}.pt")
            checkpoint.save(state, ckpt_dir / "last.pt")
        check_stop()

    distributed.barrier()  # rank 0's metrics.csv and checkpoints are complete before anyone reads them

    rows = read_metrics(out / "metrics.csv")
    if distributed.is_main():
        plots.learning_curves(
            rows, out / "plots" / "learning_curves.png", f"{cfg.task.name} {cfg.model.name} {out.name}"
        )
    results = {
        "task": cfg.task.name,
        "model": cfg.model.name,
        "data": cfg.data.name,
        "epochs": rows[-1]["epoch"] if rows else 0,
        "best_val_acc1": best_acc,
        "val_acc1": rows[-1]["val/acc1"] if rows else None,
        "val_acc5": rows[-1]["val/acc5"] if rows else None,
        "val_images": val_images,  # a run killed after its last checkpoint has it from there
        "processes": distributed.world_size(),
        "params": n_params,
        "macs": macs,
        "infer_img_per_s": inference_img_per_s(model, cfg.data.eval_batch_size, amp),
        "train_img_per_s": rows[-1]["throughput/img_s"] if rows else None,
        "device": str(device),
        "precision": precision_name(amp),
        "wall_s": time.perf_counter() - started,
        **(extra_results or {}),
        "status": "completed",
    }
    logger.log_results(results)
    if cfg.logger.log_checkpoints and not prefix and distributed.is_main():
        best = checkpoint.load(out / "checkpoints" / "best.pt")
        logger.log_checkpoint(out / "checkpoints" / "best.pt", ["best", f"epoch-{best['epoch']}"],
                              {"epoch": best["epoch"], "val_acc1": best_acc, "arch": best["arch"]})  # fmt: skip
    log.info(
        f"done: best val/acc1 {best_acc:.4f}, {results['infer_img_per_s']:.0f} img/s inference, "
        f"{results['wall_s']:.0f} s | checkpoints in {out / 'checkpoints'}"
    )
    return results
