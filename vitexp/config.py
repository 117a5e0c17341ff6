"""The composed config, below the tasks: where it lives, the arguments vitexp gives Hydra (version, trusted targets),
building objects from `_target_`, its typed settings and their checks."""

from __future__ import annotations

import contextlib
import inspect
from pathlib import Path
from typing import Any

import hydra
import hydra.utils
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from vitexp import VitexpError, schema
from vitexp.files import printable

# The targets vitexp's config may name: its own builders, the torch, timm and Optuna classes its YAML names (and the
# torchvision transforms its builders return), and the sweeper and launcher plugins of its hydra/ and cluster/ groups. Where Hydra has an execution whitelist (1.4), a
# `_target_` outside these is refused as it is built, whatever a config or override names (docs/security.md).
TRUSTED_TARGETS = (
    "vitexp.*",
    "torch.optim.*",
    "torch.nn.*",
    "timm.*",
    "torchvision.transforms.*",
    "optuna.samplers.*",
    "optuna.pruners.*",
    "hydra_plugins.vitexp_sweeper.*",
    "hydra_plugins.hydra_submitit_launcher.*",
)


def config_dir() -> str:
    """The top-level conf/ in a source checkout, or the copy installed inside the package."""
    here = Path(__file__).resolve().parent
    source = here.parent / "conf"
    return str(source if (source / "config.yaml").is_file() else here / "conf")


def options(group: str) -> list[str]:
    """The options of a config group, as vitexp's own YAML files name them."""
    return sorted(p.stem for p in (Path(config_dir()) / group).glob("*.yaml"))


def version_base() -> dict[str, str]:
    """The `version_base` argument of `hydra.main` and of the compose API for the Hydra installed: 1.3's defaults
    on Hydra 1.3 (which warns without it), none on Hydra 1.4 (which deprecates it and has those defaults)."""
    major, minor = (int(part) for part in hydra.__version__.split(".")[:2])
    return {"version_base": "1.3"} if (major, minor) < (1, 4) else {}


def hydra_settings() -> dict[str, Any]:
    """The arguments of vitexp's `hydra.main` beside its config: `version_base`, and where Hydra has one (1.4), the
    execution whitelist that builds (and configures logging with) only `TRUSTED_TARGETS`."""
    whitelist = "execution_whitelist" in inspect.signature(hydra.main).parameters
    return {**version_base(), **({"execution_whitelist": TRUSTED_TARGETS} if whitelist else {})}


def trusted() -> Any:
    """The context in which `instantiate` builds only `TRUSTED_TARGETS` (Hydra 1.4's execution whitelist; nothing on
    Hydra 1.3, which has none)."""
    whitelist = getattr(hydra.utils, "execution_whitelist", None)
    return whitelist(TRUSTED_TARGETS) if whitelist is not None else contextlib.nullcontext()


def build(node: Any, *args: Any, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate`, with any failure turned into a one-line `VitexpError` naming the config key."""
    key = getattr(node, "_get_full_key", lambda _: "")("")
    try:
        if kwargs and isinstance(node, DictConfig) and OmegaConf.get_type(node) is not dict:
            # a schema node refuses the call site's objects (transforms, flags) as values of its own type
            node = OmegaConf.create(OmegaConf.to_container(node, resolve=True, throw_on_missing=True))
        with trusted():
            return instantiate(node, *args, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, VitexpError):
            raise cause from None
        # Hydra's own refusal (a target outside the execution whitelist) has no cause: its first line says why
        reason = f"{type(cause).__name__}: {cause}" if cause is not None else str(e).splitlines()[0]
        raise VitexpError(f"cannot build {printable(key or 'config node')}: {printable(reason)}") from None
    except MissingMandatoryValue as e:
        raise VitexpError(f"{e.full_key} must be set: pass {e.full_key}=...") from None


def plain(node: Any) -> Any:
    """A config node as plain, resolved Python data."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def typed(cfg: DictConfig) -> schema.Config:
    """The composed config as schema instances (`vitexp.schema`), interpolations resolved; a setting still ??? is
    refused in one line."""
    try:
        return OmegaConf.to_object(cfg)
    except MissingMandatoryValue as e:
        raise VitexpError(f"{e.full_key} must be set: pass {e.full_key}=...") from None


def validate(cfg: DictConfig) -> None:
    """Refuse, in one line, the first setting of `cfg` outside its field's choices or range (`vitexp.schema`)."""
    schema.check(typed(cfg))


def register_resolvers() -> None:
    """What every composition of vitexp's config needs: its schemas (`vitexp.schema`) in Hydra's ConfigStore.

    Here, not in `__main__`, so that launchers that pickle the config (submitit) can import it. The config has no
    resolvers of its own: run folders are decided once it is composed (`vitexp.runs`), never while it resolves."""
    schema.register()
