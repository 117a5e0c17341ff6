"""Model builders over timm: one registry of them (`BUILDERS`) that model configs and checkpoints name, the typed `Arch`
a module is rebuilt from, one way from a config node (`arch_from_config`) or a checkpoint's `arch` to a module
(`build_from_arch`), and model statistics."""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import timm
import torch
from timm.models import build_model_with_cfg, get_pretrained_cfg, split_model_name_tag
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vitexp import VitexpError, schema
from vitexp import pretrained as pretrained_weights
from vitexp.files import printable
from vitexp.pretrained import load as load_pretrained

# timm's keyword arguments that load or fetch weights or files: never taken from a file, nor from model.kwargs (weights
# come from `pretrained`, and a checkpoint brings its own)
TIMM_FETCHES = frozenset(
    {
        "pretrained",
        "pretrained_cfg",
        "pretrained_cfg_overlay",
        "pretrained_model_args",
        "pretrained_filter_fn",
        "pretrained_strict",
        "checkpoint_path",
        "cache_dir",
        "proxy",
    }
)
# The rest of timm's factory arguments (create_model's, build_model_with_cfg's and the keys the latter pops): they are
# not the model's, and turn it into something else (a feature extractor, a pruned variant) or place it
_TIMM_FACTORY = (
    set(inspect.signature(timm.create_model).parameters)
    | set(inspect.signature(build_model_with_cfg).parameters)
    | {"pruned", "features_only", "out_indices", "feature_cls", "device", "dtype"}
) - {"model_name", "model_cls", "variant", "kwargs"}
# What a timm builder sets from data.*: never in its timm keyword arguments
_FROM_DATA = frozenset({"img_size", "in_chans", "num_classes"})


@dataclass(frozen=True)
class Arch:
    """What a fresh process rebuilds a module from: a builder of `BUILDERS`, the name that labels the model in runs
    and checkpoints, and the builder's keyword arguments (plain values, never objects or code to run). A checkpoint
    holds it as the plain dict `to_dict` writes and `from_dict` checks."""

    builder: str
    name: str
    kwargs: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint's `arch` entry (builder, name, kwargs): plain containers, a copy of this arch's."""
        return asdict(self)

    @classmethod
    def from_dict(cls, arch: Any, source: str) -> Arch:
        """A checkpoint's `arch` entry, checked field by field (a builder of `BUILDERS`, a name, the arguments it
        takes as plain values, no timm argument that loads files) before anything is built; `source` names the file
        in errors."""
        if not isinstance(arch, dict):
            raise VitexpError(f"{source}: arch is {_kind(arch)}, not a dict of builder, name and kwargs; refused")
        builder, name, kwargs = arch.get("builder"), arch.get("name"), arch.get("kwargs")
        if not isinstance(builder, str) or builder not in BUILDERS:
            raise VitexpError(
                f"{source}: arch.builder={printable(repr(builder))} names an unknown architecture; known builders: "
                f"{', '.join(BUILDERS)}"
            )
        extra = sorted(map(str, set(arch) - {"builder", "name", "kwargs"}))
        if extra:
            raise VitexpError(f"{source}: arch.{printable(extra[0])} is not a field of arch (builder, name, kwargs)")
        if not isinstance(name, str):
            raise VitexpError(f"{source}: arch.name is {_kind(name)}, not a string; refused")
        if not isinstance(kwargs, dict):
            what = "missing" if "kwargs" not in arch else f"{_kind(kwargs)}, not a dict"
            raise VitexpError(f"{source}: arch.kwargs is {what}; refused")
        if builder == "timm" and kwargs.get("model_name") is None:  # else `name` only labels the model
            check_timm_name(name, f"{source}: arch.name")
        check_arguments(builder, name, kwargs, f"{source}: arch.kwargs")
        return cls(builder, name, kwargs)

    def with_kwargs(self, **changes: Any) -> Arch:
        """This arch with the builder arguments `changes` set (the others kept)."""
        return replace(self, kwargs={**self.kwargs, **changes})

    def without_weights_source(self) -> Arch:
        """This arch with its pretrained weights left out (a resumed run or `ckpt_path` brings the weights)."""
        return self.with_kwargs(pretrained=False) if "pretrained" in self.kwargs else self

    def config_node(self) -> dict[str, Any]:
        """The model config node that `arch_from_config` turns into this arch (builder, name and the arguments)."""
        return {"builder": self.builder, "name": self.name, **self.kwargs}


def vit(
    name: str,
    *,
    ratio: float | None = None,
    layout: list[list[int]] | None = None,
    embed_width: int | None = None,
    where: str = "model",
    **kwargs: Any,
) -> VisionTransformer:
    """A timm VisionTransformer; `kwargs` are its own argument names, `name` labels runs and checkpoints.

    A pruned ViT has fewer attention heads and MLP channels per block: `layout` ([heads, MLP width] per block, as a
    prune run records it) or, when null, `ratio` of both removed uniformly; `embed_width`: a residual stream narrower
    than `embed_dim` (`task.prune_embed=true`; heads keep `embed_dim / num_heads` channels). `where`: the config node
    errors name."""
    model = VisionTransformer(**kwargs)
    recorded = dict(kwargs)
    if ratio is not None or layout:
        from vitexp.pruning import uniform_layout

        blocks, hidden = len(model.blocks), model.blocks[0].mlp.fc1.out_features
        layout = (
            [list(map(int, b)) for b in layout]
            if layout
            else uniform_layout(blocks, model.blocks[0].attn.num_heads, hidden, ratio)
        )
        recorded |= {"ratio": ratio, "layout": layout} if ratio is not None else {"layout": layout}
    _prune(model, layout, embed_width, name, where)
    if embed_width:
        recorded["embed_width"] = int(embed_width)
    model.vitexp_arch = Arch("vit", name, recorded)
    return model


def vit_distilled(name: str, **kwargs: Any) -> VisionTransformerDistilled:
    """DeiT's ViT with a distillation token and second head (timm); in training it returns both heads' logits,
    in eval mode their average."""
    model = VisionTransformerDistilled(**kwargs)
    model.set_distilled_training(True)
    model.vitexp_arch = Arch("vit_distilled", name, dict(kwargs))
    return model


def timm_model(
    name: str,
    img_size: int,
    in_chans: int,
    num_classes: int,
    *,
    model_name: str | None = None,
    small_input: bool = False,
    pretrained: bool | str = False,
    drop_rate: float | None = None,
    drop_path_rate: float | None = None,
    patch_size: int | None = None,
    embed_dim: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
    kwargs: dict[str, Any] | None = None,
    layout: list[list[int]] | None = None,
    embed_width: int | None = None,
    where: str = "model",
) -> nn.Module:
    """Any timm model by registered name (`model_name`, or `name`, which labels runs) with timm's keyword arguments
    `kwargs`, from `pretrained` weights when given (`vitexp.pretrained`: a file, a timm model folder whose model
    arguments are the defaults of `kwargs`, or true for timm's tag). The ViT sizes and drop rates, when not None,
    take precedence over `kwargs`; `small_input` fits a ResNet stem to 32x32 images; `layout` and `embed_width` are
    a pruned ViT's (as `vit`'s). The `arch` it records rebuilds the module without the weights' source: a checkpoint
    brings its own weights. `where`: the config node errors name."""
    architecture = model_name or name
    args = _with_folder_arguments(architecture, dict(kwargs or {}), pretrained, where, model_name=model_name)
    # the ViT sizes debug=fast shrinks, and the drop rates; None: timm's default (create_model drops None values)
    named = {
        "drop_rate": drop_rate,
        "drop_path_rate": drop_path_rate,
        "patch_size": patch_size,
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": num_heads,
    }
    sizes = {k: v for k, v in named.items() if v is not None}
    model = _create(architecture, img_size, in_chans, num_classes, {**args, **sizes}, where)
    if pretrained:
        load_pretrained(model, pretrained, where=where)
    if small_input:
        _small_stem(model, in_chans)
    layout = [list(map(int, b)) for b in layout] if layout else None
    _prune(model, layout, embed_width, name, where)
    given = {"model_name": model_name, "small_input": small_input, "embed_width": embed_width}
    kept = {k: v for k, v in given.items() if v}
    recorded = {"img_size": img_size, "in_chans": in_chans, "num_classes": num_classes, "pretrained": False}
    model.vitexp_arch = Arch("timm", name, recorded | named | {"kwargs": args, "layout": layout} | kept)
    return model


def _with_folder_arguments(
    architecture: str, args: dict[str, Any], pretrained: bool | str, where: str, *, model_name: str | None
) -> dict[str, Any]:
    """`args` over the model arguments of the timm model folder `pretrained` is (none when it is not one); a folder
    of another architecture than the one asked for is refused."""
    if not pretrained_weights.is_folder(pretrained):
        return args
    saved_architecture, saved, _ = pretrained_weights.folder_config(pretrained, where=where)
    if split_model_name_tag(architecture)[0] != saved_architecture:
        field = "model_name" if model_name else "name"
        raise VitexpError(
            f"{where}.pretrained={pretrained} holds a {printable(saved_architecture)}, not a {architecture}; set "
            f"{where}.{field}={printable(saved_architecture)}"
        )
    saved = {k: v for k, v in saved.items() if k not in _FROM_DATA}
    check_timm_kwargs(architecture, saved, f"{pretrained}/config.json: model_args")
    return {**saved, **args}


def _small_stem(model: nn.Module, in_chans: int) -> None:
    """A ResNet-style stem fit for 32x32 images as CIFAR ResNets have it: a 3x3 stride-1 first convolution and no
    max-pool, so that the last stage still sees 4x4 feature maps. Other models are left as they are."""
    if isinstance(getattr(model, "conv1", None), nn.Conv2d) and hasattr(model, "maxpool"):
        model.conv1 = nn.Conv2d(in_chans, model.conv1.out_channels, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()


def _prune(model: nn.Module, layout: list[list[int]] | None, width: int | None, name: str, where: str) -> None:
    """Shrink a ViT to a pruned `layout` and residual stream `width` (fresh weights), when given."""
    if not (layout or width):
        return
    from vitexp.pruning import apply_layout, set_embed_width  # torch-pruning: only for a pruned model

    if not isinstance(model, VisionTransformer):
        raise VitexpError(f"{where}.layout is for pruned ViTs; {name} is a {type(model).__name__}")
    if layout:
        apply_layout(model, layout)
    if width:
        set_embed_width(model, int(width))


def _create(
    model_name: str, img_size: int, in_chans: int, num_classes: int, args: dict[str, Any], where: str
) -> nn.Module:
    """`timm.create_model` without weights; `img_size` is passed to models whose input size is fixed (ViT, DeiT,
    Swin, ...), convolutional networks take any size."""
    if not timm.is_model(model_name):
        raise VitexpError(f"{printable(repr(model_name))} is not a timm model name; pick one of timm.list_models()")
    cfg = get_pretrained_cfg(model_name)
    if cfg is not None and cfg.fixed_input_size:
        args = {**args, "img_size": img_size}
    try:
        return timm.create_model(model_name, pretrained=False, in_chans=in_chans, num_classes=num_classes, **args)
    except TypeError as e:
        raise VitexpError(f"timm's {model_name} refused its arguments ({printable(e)}); fix {where}.kwargs") from None


def train_only_head(model: nn.Module, head_only: bool) -> None:
    """Freeze every parameter but the classifier's (timm's `get_classifier()`: a linear probe), or none."""
    heads = model.get_classifier() if hasattr(model, "get_classifier") else None
    if heads is None:
        raise VitexpError(f"{type(model).__name__} has no get_classifier(); optim.head_only_epochs needs a timm model")
    model.requires_grad_(not head_only)
    for head in heads if isinstance(heads, tuple) else (heads,):
        head.requires_grad_(True)


# The only constructors a model config or a checkpoint may name: a file selects one of these, it never names code to
# run. `vit`: a vitexp ViT, pruned when it has a layout; `vit_distilled`: DeiT's; `timm`: any timm model by name.
BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "vit": vit,
    "vit_distilled": vit_distilled,
    "timm": timm_model,
}


def arch_of(model: nn.Module) -> Arch:
    """The arch from which `build_from_arch` rebuilds `model` in a fresh process."""
    arch = getattr(model, "vitexp_arch", None)
    if arch is None:
        raise VitexpError(f"{type(model).__name__} was not built by a vitexp builder; build models with vitexp.models")
    return arch


# The timm class whose keyword arguments a builder that takes `**kwargs` passes on
_FORWARDS_TO: dict[str, type[nn.Module]] = {
    "vit": VisionTransformer,
    "vit_distilled": VisionTransformerDistilled,
}
_PLAIN = "not plain values (numbers, strings, bools, lists of them, null)"


def _plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def _kind(value: Any) -> str:
    return f"a {type(value).__name__} ({printable(repr(value), 60)})"


@functools.cache
def _class_arguments(cls: type) -> frozenset[str] | None:
    """The keyword arguments `cls(...)` takes, following `**kwargs` to the base class it is passed on to; None where
    they end in an `nn.Module` that would take anything."""
    names: set[str] = set()
    for base in cls.__mro__:
        if base in (nn.Module, object):
            return None
        if "__init__" in vars(base):
            params = inspect.signature(base.__init__).parameters.values()
            names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self"}
            if not any(p.kind is p.VAR_KEYWORD for p in params):
                return frozenset(names)
    return None


@functools.cache
def _timm_class(model_name: str) -> type | None:
    """The class timm builds for `model_name`, built on the meta device (no memory, no weights, no random numbers
    drawn); None where that fails (timm itself then refuses an argument its class does not take)."""
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            return type(timm.create_model(model_name, pretrained=False))
    except Exception:  # noqa: BLE001 - a model that cannot be built on the meta device is left to timm's own check
        return None


def check_timm_name(model_name: Any, field: str) -> None:
    """Refuse a timm model name that timm would resolve elsewhere (`hf-hub:`, `local-dir:`, a path) or does not know."""
    if not isinstance(model_name, str) or any(c in model_name for c in ":/\\") or not timm.is_model(model_name):
        raise VitexpError(
            f"{field}={printable(repr(model_name))} is not a timm model name (names of hubs, URLs and folders are "
            f"refused: weights come from pretrained=); pick one of timm.list_models()"
        )


def check_timm_kwargs(model_name: str, kwargs: Any, at: str) -> None:
    """Refuse timm keyword arguments (`kwargs`, read at `at`) that are not plain values, that timm's factory takes
    rather than the model (those that load or fetch files above all), or that the class of `model_name` does not."""
    if kwargs is None:
        return
    if not isinstance(kwargs, dict):
        raise VitexpError(f"{at} is {_kind(kwargs)}, not a dict of timm's keyword arguments; refused")
    cls = _timm_class(model_name)
    accepted = _class_arguments(cls) if cls is not None else None
    for key, value in kwargs.items():
        field = f"{at}.{printable(key)}"
        if not isinstance(key, str):
            raise VitexpError(f"{at} has a key {printable(repr(key))} that is not a string; refused")
        if key in TIMM_FETCHES:
            raise VitexpError(
                f"{field} would have timm load or fetch weights or files; refused: a checkpoint brings its own "
                f"weights, others are given as pretrained=<weights file or timm model folder> (model.pretrained, "
                f"task.teacher.pretrained)"
            )
        if key in _FROM_DATA:
            raise VitexpError(f"{field}: {key} comes from data.{key}, not from timm's keyword arguments; refused")
        if key in _TIMM_FACTORY:
            raise VitexpError(
                f"{field} is an argument of timm's create_model, not of the model: vitexp builds and places the "
                f"classifier itself; refused"
            )
        if accepted is not None and key not in accepted:
            raise VitexpError(
                f"{field} is not an argument of timm's {model_name} ({cls.__name__}); it takes "
                f"{', '.join(sorted(accepted - _TIMM_FACTORY - _FROM_DATA))}"
            )
        if not _plain(value):
            raise VitexpError(f"{field} holds {_kind(value)}, {_PLAIN}; refused")


def check_arguments(builder: str, name: str, kwargs: dict[str, Any], where: str = "model") -> None:
    """Refuse arguments `BUILDERS[builder]` does not take, misses or cannot take from a file (not plain values, timm
    arguments that load files); `where` prefixes the fields errors name (`model`, `<file>: arch.kwargs`)."""
    params = inspect.signature(BUILDERS[builder]).parameters
    own = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"name", "where"}
    forwarded = _class_arguments(_FORWARDS_TO[builder]) - {"device", "dtype"} if builder in _FORWARDS_TO else set()
    for key, value in kwargs.items():
        if not isinstance(key, str):
            raise VitexpError(f"{where} has a key {printable(repr(key))} that is not a string; refused")
        if key not in own | forwarded:
            takes = [", ".join(sorted(own))] if own else []
            takes += (
                [f"the arguments of timm's {_FORWARDS_TO[builder].__name__} except device and dtype"]
                if forwarded
                else []
            )
            raise VitexpError(
                f"{where}.{printable(key)} is not an argument of builder {builder!r}; it takes {' and '.join(takes)}"
            )
        if not _plain(value) and not (key == "kwargs" and key in own):
            raise VitexpError(f"{where}.{key} holds {_kind(value)}, {_PLAIN}; refused")
    missing = sorted(n for n in own if params[n].default is inspect.Parameter.empty and n not in kwargs)
    if missing:
        raise VitexpError(f"{where}.{missing[0]} is missing: builder {builder!r} needs {', '.join(missing)}")
    if "kwargs" in own:  # a timm model by name (model_name, else name) with timm's keyword arguments
        named = kwargs.get("model_name") is not None
        field, model_name = ("model_name", kwargs["model_name"]) if named else ("name", name)
        check_timm_name(model_name, f"{where}.{field}")
        check_timm_kwargs(model_name, kwargs.get("kwargs"), f"{where}.kwargs")


def build_from_arch(arch: Arch, *, where: str = "model") -> nn.Module:
    """Rebuild the exact module an `arch` describes (a checkpoint's, or `arch_from_config`'s): one of `BUILDERS`, a
    name, and keyword arguments that are plain values, never objects or code to run. `where`: the config node (or
    checkpoint field) the arguments come from, as errors name it."""
    builder, name, kwargs = arch.builder, arch.name, arch.kwargs
    if builder not in BUILDERS:
        raise VitexpError(
            f"{where} names an unknown architecture {printable(repr(builder))}; known builders: {', '.join(BUILDERS)}"
        )
    check_arguments(builder, name, kwargs, where)
    if kwargs.get("ratio") is not None:  # model.ratio's rule, for an arch from a file too
        schema.check_value(schema.PrunedModel, "ratio", kwargs["ratio"], f"{where}.ratio")
    size, patch = kwargs.get("img_size"), kwargs.get("patch_size")
    if isinstance(size, int) and isinstance(patch, int) and patch > 0 and size % patch:
        fit = sorted({max(patch, size // patch * patch), size // patch * patch + patch})
        raise VitexpError(
            f"data.img_size={size} is not divisible by {where}.patch_size={patch}; use data.img_size="
            f"{' or '.join(map(str, fit))}"
        )
    takes_where = "where" in inspect.signature(BUILDERS[builder]).parameters
    try:
        return BUILDERS[builder](name=name, **kwargs, **({"where": where} if takes_where else {}))
    except (TypeError, ValueError, AssertionError, ArithmeticError, LookupError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise VitexpError(
            f"{where}: builder {builder!r} cannot build {printable(name)} from these arguments ({type(e).__name__}: "
            f"{printable(first, 160)}); fix them, or pass a checkpoint vitexp wrote"
        ) from None


def arch_from_config(node: dict[str, Any]) -> Arch:
    """The arch of a model config node (`builder`, `name` and the builder's arguments): `Arch.config_node`'s
    inverse."""
    kwargs = {k: v for k, v in node.items() if k not in ("builder", "name")}
    return Arch(node["builder"], node["name"], kwargs)


def count_params(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


def input_shape(model: nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) the model expects."""
    arch = arch_of(model)
    size, chans = arch.kwargs.get("img_size"), arch.kwargs.get("in_chans")
    size = [size, size] if type(size) is int else size
    if type(chans) is not int or not isinstance(size, (list, tuple)) or [type(s) for s in size] != [int, int]:
        raise VitexpError(
            f"the arch of {printable(arch.name)} records no img_size and in_chans as integers; pass a "
            f"checkpoint vitexp wrote"
        )
    return chans, size[0], size[1]


@torch.no_grad()
def count_macs(model: nn.Module) -> int:
    """Multiply-accumulates of one forward pass on one image, from torch's FLOP counter."""
    device = next(model.parameters()).device
    x = torch.zeros(1, *input_shape(model), device=device)
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    return counter.get_total_flops() // 2


@torch.no_grad()
def inference_img_per_s(
    model: nn.Module, batch_size: int, autocast_dtype: torch.dtype | None = None, iters: int = 5
) -> float:
    """Measured forward throughput in images/s on the model's device, warm-up excluded."""
    device = next(model.parameters()).device
    # a generator of its own: a measurement never moves the random state that later steps (augmentation, random
    # or Taylor pruning) draw from
    x = torch.randn(batch_size, *input_shape(model), generator=torch.Generator().manual_seed(0)).to(device)
    was_training = model.training
    model.eval()

    def forward() -> None:
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            model(x)

    forward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        forward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    model.train(was_training)
    return batch_size * iters / elapsed
