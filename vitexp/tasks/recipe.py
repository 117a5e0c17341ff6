"""The config read once, at the top of a task: the training recipe (the typed settings and the objects built from
them). Below this, nothing sees the config."""

from __future__ import annotations

import functools

from omegaconf import DictConfig

from vitexp import VitexpError
from vitexp.config import build, plain, typed
from vitexp.data import LoaderSettings, loaders
from vitexp.hardware import choose
from vitexp.models import arch_from_config
from vitexp.schema import Config
from vitexp.training import Recipe

# Augmentations that only the worker path (data.on_device=false) runs.
WORKER_ONLY = ("rotate", "auto_augment", "re_prob")


def loader_settings(data: DictConfig, *, compile: bool) -> LoaderSettings:
    """What the loaders take from `data` (its device augmentation built, torch.compiled when the model is)."""
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


def read_recipe(cfg: DictConfig, *, with_data: bool = True, settings: Config | None = None) -> Recipe:
    """The training recipe `cfg` describes: its typed settings (`settings` when the job typed them already) and the
    machine's choices for them, the model's arch, data (splits and loaders, built once; without them for a step
    timed on synthetic batches), optimizer, schedule, mixup and loss."""
    settings = settings or typed(cfg)
    machine = choose(settings.trainer, fused=settings.optim.fused)
    splits = build(cfg.data.splits) if with_data else None
    if splits is not None and len(splits.classes) != settings.data.num_classes:
        raise VitexpError(
            f"data has {len(splits.classes)} classes but data.num_classes={settings.data.num_classes}; set it"
        )
    fused = {"fused": True} if machine.fused else {}
    data = loader_settings(cfg.data, compile=machine.compile)
    return Recipe(
        settings=settings,
        machine=machine,
        arch=arch_from_config(plain(cfg.model)),
        data=data,
        splits=splits,
        loaders=loaders(data, splits, machine.device) if splits is not None else (None, None),
        optimizer=functools.partial(build(cfg.optim.optimizer), **fused),
        scheduler=build(cfg.optim.scheduler),
        mixup=build(cfg.data.mixup) if settings.data.mixup.prob > 0 else None,
        loss=build(cfg.task.loss),
    )
