"""Models, data splits and settings for tests, built as the tasks build them: a model config node or a builder's
name and arguments turned into the `Arch` that `vitexp.models.build_from_arch` takes; a composed config's data
splits and typed settings."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from vitexp.config import typed
from vitexp.data import Splits, eval_transform, make_splits, train_transform
from vitexp.models import Arch, arch_from_config, build_from_arch
from vitexp.schema import Data, Prune


def build(builder: str, name: str, **kwargs: Any) -> nn.Module:
    """The module `builder` (one of `vitexp.models.BUILDERS`) makes from `name` and its arguments."""
    return build_from_arch(Arch(builder, name, kwargs))


def model_of(node: DictConfig) -> nn.Module:
    """The module a composed model config node (`cfg.model`, `cfg.task.teacher`) describes."""
    return build_from_arch(arch_from_config(OmegaConf.to_container(node, resolve=True)))


def splits_of(cfg: DictConfig) -> Splits:
    """The splits of a composed config's data, with its transforms, as the tasks build them."""
    settings = typed(cfg)
    data = settings.data
    return make_splits(data, settings.seed, train_transform(data), eval_transform(data))


def data_of(*overrides: str) -> Data:
    """The typed data settings of the config composed with `overrides`."""
    from tests.conftest import compose_config

    return typed(compose_config(*overrides)).data


def prune_settings(**changes: Any) -> Prune:
    """task=prune's typed settings with `changes`."""
    from tests.conftest import compose_config

    return replace(typed(compose_config("task=prune")).task, **changes)
