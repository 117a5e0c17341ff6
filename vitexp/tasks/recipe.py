"""The config read once, at the top of a task: the training recipe (the typed settings and the objects built from
them). Below this, nothing sees the config."""

from __future__ import annotations

import functools
import logging
from dataclasses import replace

from omegaconf import DictConfig
from timm.data import Mixup

from vitexp import VitexpError, checkpoint
from vitexp.augment import device_augment
from vitexp.config import build, plain, typed
from vitexp.data import eval_transform, loaders, make_splits, train_transform
from vitexp.hardware import choose
from vitexp.models import arch_from_config
from vitexp.schema import Config, Data, Loss
from vitexp.training import Recipe

log = logging.getLogger("vitexp")


def mixup(data: Data, loss: Loss) -> Mixup | None:
    """timm's Mixup/CutMix of `data.mixup` (None when off); its mixed targets carry `loss.label_smoothing`."""
    m = data.mixup
    if m.prob == 0:
        return None
    return Mixup(
        mixup_alpha=m.mixup_alpha,
        cutmix_alpha=m.cutmix_alpha,
        prob=m.prob,
        switch_prob=m.switch_prob,
        label_smoothing=loss.label_smoothing,
        num_classes=data.num_classes,
    )


def held_out(settings: Config) -> Config:
    """`settings` with the validation split of `ckpt_path`'s run when that run trained on the same data set (its
    split seed and val_size), so that a run started from a checkpoint (fine-tuning, pruning, a student's start) never
    validates on images the checkpoint trained on, whatever its own `seed`; as they are otherwise."""
    if not settings.ckpt_path:
        return settings
    data = settings.data
    split_seed, val_size = checkpoint.trained_split(checkpoint.load(settings.ckpt_path), data)
    own = settings.seed if data.split_seed is None else data.split_seed
    if split_seed is None or (split_seed, val_size) == (own, data.val_size):
        return settings
    log.info(
        f"validating on the images {settings.ckpt_path} held out: data.split_seed={split_seed} "
        f"data.val_size={val_size} (this config's split: seed {own}, val_size {data.val_size})"
    )
    return replace(settings, data=replace(data, split_seed=split_seed, val_size=val_size))


def read_recipe(cfg: DictConfig, *, with_data: bool = True, settings: Config | None = None) -> Recipe:
    """The training recipe `cfg` describes: its typed settings (`settings` when the job typed them already) and the
    machine's choices for them, the model's arch, data (splits and loaders, built once; without them for a step
    timed on synthetic batches), optimizer, schedule, mixup and loss."""
    settings = held_out(settings or typed(cfg))
    data, machine = settings.data, choose(settings.trainer, fused=settings.optim.fused)
    splits = make_splits(data, settings.seed, train_transform(data), eval_transform(data)) if with_data else None
    if splits is not None and len(splits.classes) != data.num_classes:
        raise VitexpError(f"data has {len(splits.classes)} classes but data.num_classes={data.num_classes}; set it")
    fused = {"fused": True} if machine.fused else {}
    mixer = mixup(data, settings.task.loss)
    augment = device_augment(data, compile=machine.compile)
    return Recipe(
        settings=settings,
        machine=machine,
        arch=arch_from_config(plain(cfg.model)),
        splits=splits,
        loaders=loaders(data, splits, machine.device, augment) if splits is not None else (None, None),
        optimizer=functools.partial(build(cfg.optim.optimizer), **fused),
        scheduler=build(cfg.optim.scheduler),
        mixup=mixer,
        # with mixup the mixed targets carry the smoothing: the loss adds none of its own
        loss=build(cfg.task.loss, label_smoothing=0.0) if mixer else build(cfg.task.loss),
    )
