"""Models for tests, built as the tasks build them: a model config node or a builder's name and arguments, turned
into the `arch` dict that `vitexp.models.build_from_arch` takes."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from vitexp.models import arch_from_config, build_from_arch


def build(builder: str, name: str, **kwargs: Any) -> nn.Module:
    """The module `builder` (one of `vitexp.models.BUILDERS`) makes from `name` and its arguments."""
    return build_from_arch({"builder": builder, "name": name, "kwargs": kwargs})


def model_of(node: DictConfig) -> nn.Module:
    """The module a composed model config node (`cfg.model`, `cfg.task.teacher`) describes."""
    return build_from_arch(arch_from_config(OmegaConf.to_container(node, resolve=True)))
