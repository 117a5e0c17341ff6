"""The config read once, at the top of a task: the run's folder, resume point and W&B run, and the training recipe
as plain objects. Below this, nothing sees the config."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from vitexp import VitexpError, distributed, rundir, tracking
from vitexp.config import build, command_line, continues_its_folder, plain, resumed, run_dir, validate
from vitexp.data import LoaderSettings, loaders
from vitexp.hardware import (
    autocast_dtype,
    resolve_device,
    show_progress,
    use_compile,
    use_deterministic,
    use_fused,
)
from vitexp.models import arch_from_config
from vitexp.training import Loop, Recipe

# Augmentations that only the worker path (data.on_device=false) runs.
WORKER_ONLY = ("rotate", "auto_augment", "re_prob")


@dataclass
class Run:
    """A run about to start or continue: its config (a resumed run's own), its folder, and the loaded last.pt it
    continues from (None for a new run, or one stopped before its first checkpoint)."""

    cfg: DictConfig
    out: Path
    last: dict[str, Any] | None


def open_run(cfg: DictConfig) -> Run:
    """This job's run: a new one in a fresh folder, or, with `resume=` (or in a folder that has a checkpoint: a job
    requeued with `auto_resume`, a sweep run again into its folder), the interrupted run with its own config; opens
    the job's W&B run."""
    out = run_dir()
    if cfg.resume:
        folder = rundir.resume_run_dir(cfg.resume)
    else:
        folder = out if continues_its_folder(cfg) and rundir.started(out) else None
    if folder is None:
        rundir.ensure_new_run_dir(out)
        start_tracking(cfg, out)
        return Run(cfg, out, None)
    point = rundir.resume_point(folder)
    cfg = resumed(cfg, point.config, point.overrides, str(folder))
    validate(cfg)
    start_tracking(cfg, out, point.wandb_run_id)
    return Run(cfg, out, point.last)


def start_tracking(cfg: DictConfig, out: Path, run_id: str | None = None) -> None:
    """Open the job's W&B run (unless `logger.mode` is disabled; rank 0 only): named from the task, model and
    command-line overrides, grouped by sweep, with the resolved config; `run_id` continues a resumed run's."""
    if not distributed.is_main():
        return
    hydra_cfg = HydraConfig.get()
    sweep = Path(hydra_cfg.sweep.dir).name if hydra_cfg.mode == RunMode.MULTIRUN else None
    logger = cfg.logger
    tracking.start_wandb(
        out,
        mode=logger.mode,
        project=logger.project,
        entity=logger.entity,
        group=logger.group or (f"sweep-{sweep}" if sweep else None),
        tags=list(logger.tags),
        name=logger.name or tracking.run_name(cfg.task.name, cfg.model.name, command_line()),
        job_type=cfg.task.name,
        config=plain(cfg),
        run_id=run_id,
        init_timeout=logger.init_timeout,
    )


def loader_settings(data: DictConfig, compile: bool = False) -> LoaderSettings:
    """The `data.*` settings the loaders read (most under their own names); `compile`: torch.compile the device
    augmentation (when the model is compiled)."""
    augment = data.splits.train_transform
    same = ("batch_size", "eval_batch_size", "num_workers", "persistent_workers", "on_device", "img_size")
    return LoaderSettings(
        **{key: data[key] for key in same},
        mean=tuple(map(float, data.mean)),
        std=tuple(map(float, data.std)),
        crop_padding=augment.crop_padding,
        hflip=augment.hflip,
        worker_only=tuple(key for key in WORKER_ONLY if augment[key]),
        transform=data.transform,
        device_augment=build(data.device_augment, compile=compile) if data.device_augment.policy else None,
    )


def loop_settings(cfg: DictConfig) -> Loop:
    """The `trainer.*` settings, with the `auto` choices made for this machine."""
    t = cfg.trainer
    device = resolve_device(t.device)
    use_deterministic(t.deterministic)
    return Loop(
        max_epochs=t.max_epochs,
        device=device,
        amp=autocast_dtype(t.precision, device),
        fp16_scaler=str(t.precision) == "16",
        compile=use_compile(t.compile, device),
        compile_mode=t.compile_mode,
        accumulate=t.accumulate_grad_batches,
        clip_norm=t.gradient_clip_val,
        skip_nonfinite=t.skip_nonfinite,
        limit_train_batches=t.limit_train_batches,
        limit_val_batches=t.limit_val_batches,
        ckpt_every=t.ckpt_every_n_epochs,
        ckpt_every_steps=t.ckpt_every_n_steps or 0,
        ckpt_every_minutes=t.ckpt_every_n_minutes,
        ema_decay=t.ema_decay,
        progress=show_progress(t.progress),
        log_every=cfg.logger.log_every_n_steps,
    )


def read_recipe(cfg: DictConfig, *, with_data: bool = True) -> Recipe:
    """The training recipe `cfg` describes: model, data (splits and loaders, built once; without them for a step
    timed on synthetic batches), optimizer and schedule, loss and loop."""
    loop = loop_settings(cfg)
    splits = build(cfg.data.splits) if with_data else None
    if splits is not None and len(splits.classes) != cfg.data.num_classes:
        raise VitexpError(f"data has {len(splits.classes)} classes but data.num_classes={cfg.data.num_classes}; set it")
    fused = {"fused": True} if use_fused(cfg.optim.fused, loop.device) else {}
    data = loader_settings(cfg.data, loop.compile)
    return Recipe(
        task=cfg.task.name,
        seed=cfg.seed,
        arch=arch_from_config(plain(cfg.model)),
        init_weights=cfg.ckpt_path,
        data_name=cfg.data.name,
        data=data,
        splits=splits,
        loaders=loaders(data, splits, loop.device) if splits is not None else (None, None),
        num_classes=cfg.data.num_classes,
        optimizer=functools.partial(build(cfg.optim.optimizer), **fused),
        scheduler=build(cfg.optim.scheduler),
        weight_decay=cfg.optim.weight_decay,
        warmup_epochs=cfg.optim.warmup_epochs,
        mixup=build(cfg.data.mixup) if cfg.data.mixup.prob > 0 else None,
        loss=build(cfg.task.loss),
        loop=loop,
        config=plain(cfg),
        log_checkpoints=cfg.logger.log_checkpoints,
        layer_decay=cfg.optim.layer_decay,
        head_only_epochs=cfg.optim.head_only_epochs,
    )
