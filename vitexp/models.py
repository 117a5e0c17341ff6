"""Model builders over timm, one registry of them (`BUILDERS`) for configs and checkpoints, and model statistics."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import timm
import torch
from timm.models import get_pretrained_cfg, split_model_name_tag
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vitexp import VitexpError
from vitexp import pretrained as pretrained_weights
from vitexp.pretrained import load as load_pretrained


def vit(name: str, **kwargs: Any) -> VisionTransformer:
    """A timm VisionTransformer; `kwargs` are its own argument names. `name` labels runs and checkpoints."""
    model = VisionTransformer(**kwargs)
    model.vitexp_arch = {"builder": "vit", "name": name, "kwargs": dict(kwargs)}
    return model


def vit_distilled(name: str, **kwargs: Any) -> VisionTransformerDistilled:
    """DeiT's ViT with a distillation token and second head (timm); in training it returns both heads' logits,
    in eval mode their average."""
    model = VisionTransformerDistilled(**kwargs)
    model.set_distilled_training(True)
    model.vitexp_arch = {"builder": "vit_distilled", "name": name, "kwargs": dict(kwargs)}
    return model


def cnn(
    name: str,
    model_name: str,
    img_size: int,
    in_chans: int,
    num_classes: int,
    small_input: bool,
    pretrained: bool | str = False,
    kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Any timm model by name (e.g. a ResNet teacher for distillation), randomly initialised or from `pretrained`
    weights (as `timm_model`), with timm's keyword arguments `kwargs`.

    `small_input` adapts ResNet-style stems to 32x32 images as CIFAR ResNets do: a 3x3 stride-1 first
    convolution and no max-pool, so the last stage still sees 4x4 feature maps.
    """
    model = _create(model_name, img_size, in_chans, num_classes, dict(kwargs or {}))
    if pretrained:
        load_pretrained(model, pretrained)
    if small_input and isinstance(getattr(model, "conv1", None), nn.Conv2d) and hasattr(model, "maxpool"):
        model.conv1 = nn.Conv2d(in_chans, model.conv1.out_channels, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    model.vitexp_arch = {
        "builder": "cnn",
        "name": name,
        "kwargs": {"model_name": model_name, "img_size": img_size, "in_chans": in_chans,
                   "num_classes": num_classes, "small_input": small_input, "kwargs": dict(kwargs or {})},
    }  # fmt: skip
    return model


def timm_model(name: str, img_size: int, in_chans: int, num_classes: int, pretrained: bool | str = False,
               drop_rate: float | None = None, drop_path_rate: float | None = None, patch_size: int | None = None,
               embed_dim: int | None = None, depth: int | None = None, num_heads: int | None = None,
               kwargs: dict[str, Any] | None = None, layout: list[list[int]] | None = None,
               embed_width: int | None = None) -> nn.Module:  # fmt: skip
    """Any timm model by registered `name` (`model=timm`) with timm's own keyword arguments `kwargs`, from
    `pretrained` weights when given (`vitexp.pretrained`: a file, a timm model folder whose model arguments it takes
    as defaults, or true for timm's tag); `patch_size`, `embed_dim`, `depth`, `num_heads` and the drop rates, when
    not None, take precedence over `kwargs`; `layout` ([heads, MLP width] per block) and `embed_width` (a narrower
    residual stream) are a pruned ViT's. The `arch` it records rebuilds the module without the weights' source: a
    checkpoint brings its own weights."""
    args = dict(kwargs or {})
    if pretrained_weights.is_folder(pretrained):
        architecture, saved, _ = pretrained_weights.folder_config(pretrained)
        if split_model_name_tag(name)[0] != architecture:
            raise VitexpError(f"model.pretrained={pretrained} holds a {architecture}, not a {name}; set "
                              f"model.name={architecture}")  # fmt: skip
        args = {**{k: v for k, v in saved.items() if k not in ("img_size", "in_chans", "num_classes")}, **args}
    # the ViT sizes debug=fast shrinks, and the drop rates; None: timm's default (create_model drops None values)
    named = {"drop_rate": drop_rate, "drop_path_rate": drop_path_rate, "patch_size": patch_size,
             "embed_dim": embed_dim, "depth": depth, "num_heads": num_heads}  # fmt: skip
    model = _create(
        name, img_size, in_chans, num_classes, {**args, **{k: v for k, v in named.items() if v is not None}}
    )
    if pretrained:
        load_pretrained(model, pretrained)
    if layout or embed_width:
        from vitexp.pruning import apply_layout, set_embed_width

        if not isinstance(model, VisionTransformer):
            raise VitexpError(f"model.layout is for pruned ViTs; {name} is a {type(model).__name__}")
        if layout:
            apply_layout(model, [list(map(int, b)) for b in layout])
        if embed_width:
            set_embed_width(model, int(embed_width))
    model.vitexp_arch = {"builder": "timm", "name": name, "kwargs": {
        "img_size": img_size, "in_chans": in_chans, "num_classes": num_classes, "pretrained": False, **named,
        "kwargs": args, "layout": [list(map(int, b)) for b in layout] if layout else None,
        **({"embed_width": int(embed_width)} if embed_width else {})}}  # fmt: skip
    return model


def _create(model_name: str, img_size: int, in_chans: int, num_classes: int, args: dict[str, Any]) -> nn.Module:
    """`timm.create_model` without weights; `img_size` is passed to models whose input size is fixed (ViT, DeiT,
    Swin, ...), convolutional networks take any size."""
    if not timm.is_model(model_name):
        raise VitexpError(f"{model_name!r} is not a timm model name; pick one of timm.list_models()")
    cfg = get_pretrained_cfg(model_name)
    if cfg is not None and cfg.fixed_input_size:
        args = {**args, "img_size": img_size}
    try:
        return timm.create_model(model_name, pretrained=False, in_chans=in_chans, num_classes=num_classes, **args)
    except TypeError as e:
        raise VitexpError(f"timm's {model_name} refused its arguments ({e}); fix model.kwargs") from None


def without_weights_source(arch: dict[str, Any]) -> dict[str, Any]:
    """`arch` with its pretrained weights left out (a resumed run or `ckpt_path` brings the weights)."""
    if "pretrained" not in arch["kwargs"]:
        return arch
    return {**arch, "kwargs": {**arch["kwargs"], "pretrained": False}}


def train_only_head(model: nn.Module, head_only: bool) -> None:
    """Freeze every parameter but the classifier's (timm's `get_classifier()`: a linear probe), or none."""
    heads = model.get_classifier() if hasattr(model, "get_classifier") else None
    if heads is None:
        raise VitexpError(f"{type(model).__name__} has no get_classifier(); optim.head_only_epochs needs a timm model")
    model.requires_grad_(not head_only)
    for head in heads if isinstance(heads, tuple) else (heads,):
        head.requires_grad_(True)


def pruned_vit(name: str, ratio: float, layout: list[list[int]] | None = None, embed_width: int | None = None,
               **kwargs: Any) -> VisionTransformer:  # fmt: skip
    """A timm ViT with fewer attention heads and MLP channels per block: `layout` ([heads, MLP width] per
    block, as a prune run records it) or, when null, `ratio` of both removed uniformly; `embed_width`: a residual
    stream narrower than `embed_dim` (`task.prune_embed=true`; heads keep `embed_dim / num_heads` channels)."""
    from vitexp.pruning import apply_layout, set_embed_width, uniform_layout

    if not 0 <= ratio < 1:
        raise VitexpError(f"model.ratio={ratio} must be in [0, 1)")
    model = VisionTransformer(**kwargs)
    hidden = model.blocks[0].mlp.fc1.out_features
    layout = (
        [list(map(int, b)) for b in layout]
        if layout
        else uniform_layout(len(model.blocks), model.blocks[0].attn.num_heads, hidden, ratio)
    )
    apply_layout(model, layout)
    if embed_width:
        set_embed_width(model, int(embed_width))
    narrowed = {"embed_width": int(embed_width)} if embed_width else {}
    model.vitexp_arch = {"builder": "pruned_vit", "name": name,
                         "kwargs": {**kwargs, "ratio": ratio, "layout": layout, **narrowed}}  # fmt: skip
    return model


# The only constructors a checkpoint may name: a file selects one of these, it never names code to run.
BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "vit": vit,
    "vit_distilled": vit_distilled,
    "pruned_vit": pruned_vit,
    "cnn": cnn,
    "timm": timm_model,
}


def arch_of(model: nn.Module) -> dict[str, Any]:
    """The plain dict from which `build_from_arch` rebuilds `model` in a fresh process."""
    arch = getattr(model, "vitexp_arch", None)
    if arch is None:
        raise VitexpError(f"{type(model).__name__} was not built by a vitexp builder; build models with vitexp.models")
    return arch


def _plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def _timm_kwargs(value: Any) -> bool:
    # timm's keyword arguments (model.kwargs): a flat dict of plain values
    return isinstance(value, dict) and all(isinstance(k, str) and _plain(v) for k, v in value.items())


def build_from_arch(arch: dict[str, Any]) -> nn.Module:
    """Rebuild the exact module an `arch` dict describes (a checkpoint's, or `arch_from_config`'s): one of
    `BUILDERS`, a name, and keyword arguments that are plain values, never objects or code to run."""
    builder = BUILDERS.get(arch.get("builder")) if isinstance(arch, dict) else None
    if builder is None:
        raise VitexpError(f"checkpoint names an unknown architecture {arch!r}; known builders: {', '.join(BUILDERS)}")
    kwargs = arch.get("kwargs")
    if (
        not isinstance(arch.get("name"), str)
        or not isinstance(kwargs, dict)
        or not all(_plain(v) or k == "kwargs" and _timm_kwargs(v) for k, v in kwargs.items())
    ):
        raise VitexpError(f"architecture {arch.get('name')!r} has arguments that are not plain values; refused")
    size, patch = kwargs.get("img_size"), kwargs.get("patch_size")
    if isinstance(size, int) and isinstance(patch, int) and size % patch:
        fit = sorted({max(patch, size // patch * patch), size // patch * patch + patch})
        raise VitexpError(f"data.img_size={size} is not divisible by model.patch_size={patch}; use data.img_size="
                          f"{' or '.join(map(str, fit))}")  # fmt: skip
    return builder(name=arch["name"], **kwargs)


def arch_from_config(node: dict[str, Any]) -> dict[str, Any]:
    """The `arch` dict of a model config node (`builder`, `name` and the builder's arguments)."""
    kwargs = {k: v for k, v in node.items() if not k.startswith("_") and k not in ("builder", "name")}
    return {"builder": node["builder"], "name": node["name"], "kwargs": kwargs}


def build(builder: str, name: str, **kwargs: Any) -> nn.Module:
    """The `_target_` of every model config: `builder` names one of `BUILDERS`, as a checkpoint's `arch` does."""
    return build_from_arch({"builder": builder, "name": name, "kwargs": kwargs})


def count_params(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


def input_shape(model: nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) the model expects."""
    kwargs = arch_of(model)["kwargs"]
    size = kwargs["img_size"]
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return kwargs["in_chans"], h, w


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
