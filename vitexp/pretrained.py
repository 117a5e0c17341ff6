"""Pretrained weights for timm models, loaded through timm's own path (`timm.models.load_pretrained`): a weights file,
a timm model folder, or timm's tag from the local Hugging Face cache."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import torch
from timm.models import load_pretrained
from torch import nn

from vitexp import VitexpError, files
from vitexp.files import printable

# Files timm reads as a state dict (`.npz`: timm/big_vision JAX weights, read by the model's own `load_pretrained`).
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz", ".tar")


def folder_config(folder: str | Path, *, where: str = "model") -> tuple[str, dict[str, Any], dict[str, Any]]:
    """The architecture, model arguments and pretrained config of a timm model folder (`config.json`), checked to be
    of the types timm and vitexp read; `where`: the config node whose `pretrained` named the folder."""
    from timm.models._hub import load_model_config_from_path

    for name in ("config.json", "model.safetensors"):  # timm opens them blocking: a FIFO there is refused first
        if os.path.lexists(Path(folder) / name):
            files.open_regular(Path(folder) / name, follow=True).close()
    try:
        pretrained_cfg, architecture, model_args = load_model_config_from_path(folder)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise VitexpError(
            f"{where}.pretrained={folder} is not a timm model folder ({type(e).__name__}: {printable(e, 120)}); "
            f"pass a folder with config.json and model.safetensors, as python -m vitexp.export writes"
        ) from None
    for field, value, ok in (
        ("architecture", architecture, isinstance(architecture, str)),
        ("model_args", model_args, isinstance(model_args, dict)),
        ("pretrained_cfg", pretrained_cfg, isinstance(pretrained_cfg, dict)),
        *((f"pretrained_cfg.{k}", pretrained_cfg.get(k), ok) for k, ok in _cfg_fields(pretrained_cfg)),
    ):
        if not ok:
            raise VitexpError(
                f"{folder}/config.json: {field} is a {type(value).__name__} ({printable(value, 60)}), not what timm "
                f"writes there; pass a folder python -m vitexp.export or timm wrote"
            )
    return architecture, dict(model_args), dict(pretrained_cfg)


def _cfg_fields(cfg: Any) -> list[tuple[str, bool]]:
    """Whether each pretrained_cfg field that vitexp and timm's loader read has the type timm writes."""
    if not isinstance(cfg, dict):
        return []

    def names(value: Any) -> bool:
        return value is None or isinstance(value, str) or _list_of(value, str)

    size = cfg.get("input_size")
    return [
        ("classifier", names(cfg.get("classifier"))),
        ("first_conv", names(cfg.get("first_conv"))),
        ("input_size", size is None or _list_of(size, int) and len(size) == 3),
        ("num_classes", cfg.get("num_classes") is None or type(cfg.get("num_classes")) is int),
    ]


def _list_of(value: Any, kind: type) -> bool:
    return isinstance(value, (list, tuple)) and all(type(v) is kind for v in value)


def is_folder(source: Any) -> bool:
    """Whether `model.pretrained` names a timm model folder (rather than `true`, `false` or a weights file)."""
    return isinstance(source, str) and Path(source).is_dir()


def load(model: nn.Module, source: bool | str, *, where: str = "model") -> None:
    """Load pretrained weights into the timm `model` as `timm.create_model(..., pretrained=True)` would: the
    classifier re-initialised for another class count, position embeddings resampled for another image size, the
    patch embedding adapted to other input channels (timm's `checkpoint_filter_fn` and `adapt_input_conv`); `where`:
    the config node whose `pretrained` names `source`, as errors name it (`model`, `task.teacher`)."""
    cfg = {k: v for k, v in model.pretrained_cfg.items() if k not in ("source", "state_dict")}
    from_file = isinstance(source, str) and not is_folder(source)
    if is_folder(source):
        cfg |= folder_config(source, where=where)[2] | {"source": "local-dir", "file": str(source)}
    elif from_file:
        if not Path(source).is_file() or not source.endswith(WEIGHT_SUFFIXES):
            raise VitexpError(
                f"{where}.pretrained={source} is not a weights file or a timm model folder; pass a "
                f"{', '.join(WEIGHT_SUFFIXES)} file or a folder with config.json"
            )
        cfg |= {"file": source, "custom_load": source.endswith(".npz")}
    found: dict[str, list[str]] = {}
    hook = model.register_load_state_dict_post_hook(
        lambda _, keys: found.update(missing=list(keys.missing_keys), unexpected=list(keys.unexpected_keys))
    )
    try:
        filter_fn = _filter(model, cfg, from_file)
        load_pretrained(
            model, cfg, num_classes=model.num_classes, in_chans=_in_chans(model), filter_fn=filter_fn, strict=False
        )
    except VitexpError:
        raise
    except Exception as e:  # noqa: BLE001 - timm, torch and the hub raise many types; each becomes one line
        raise _error(model, source, cfg, e, where) from None
    finally:
        hook.remove()
    classifier = cfg.get("classifier") or ()
    dropped = {
        f"{c}.{p}" for c in ([classifier] if isinstance(classifier, str) else classifier) for p in ("weight", "bias")
    }
    missing = [k for k in found.get("missing", []) if k not in dropped]
    if missing or found.get("unexpected"):
        raise _mismatch(model, source, missing, found.get("unexpected", []), [], where)


def _in_chans(model: nn.Module) -> int:
    conv = getattr(model, "pretrained_cfg", {}).get("first_conv")
    module = model.get_submodule(conv) if isinstance(conv, str) else None
    return module.in_channels if isinstance(module, nn.Conv2d) else 3


def _filter(model: nn.Module, cfg: dict[str, Any], from_file: bool):
    """The model's own timm checkpoint filter (position embeddings, patch size, old layouts); for a bare weights
    file it also records in `cfg` the class count and input channels the file has, where timm's default config
    would assume ImageNet's (timm reads both from `cfg` right after filtering)."""
    base = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)

    def filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        state_dict = base(state_dict, model) if base is not None else state_dict
        if from_file:
            classifier = cfg.get("classifier")
            head = state_dict.get(f"{classifier if isinstance(classifier, str) else (classifier or ('',))[0]}.weight")
            if head is not None:
                cfg["num_classes"] = head.shape[0]
            conv = state_dict.get(f"{cfg.get('first_conv')}.weight") if isinstance(cfg.get("first_conv"), str) else None
            if conv is not None and conv.ndim == 4:
                cfg["input_size"] = (conv.shape[1], *cfg.get("input_size", (3, 224, 224))[1:])
        return state_dict

    return filter_fn


def _mismatch(
    model: nn.Module, source: Any, missing: list[str], unexpected: list[str], shapes: list[str], where: str
) -> VitexpError:
    def some(keys: list[str]) -> str:
        return f" (e.g. {keys[0]})" if keys else ""

    name = model.pretrained_cfg.get("architecture", type(model).__name__)
    return VitexpError(
        f"{where}.pretrained={source} holds weights of another architecture than {name}: {len(missing)} keys missing"
        f"{some(missing)}, {len(unexpected)} unexpected{some(unexpected)}, {len(shapes)} of another shape"
        f"{some(shapes)}; pass weights of this model, or set {where}'s model name (and kwargs) to the model they "
        f"are for"
    )


def _error(model: nn.Module, source: Any, cfg: dict[str, Any], e: Exception, where: str) -> VitexpError:
    """One line for a failed load: another architecture's tensors, or, for `true`, weights that are neither in the
    local cache nor downloadable."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    shapes = re.findall(r"size mismatch for ([\w.]+)", str(e))
    if shapes:
        return _mismatch(model, source, [], [], shapes, where)
    if source is True:
        from huggingface_hub.constants import HF_HUB_CACHE

        tag = cfg.get("hf_hub_id") or cfg.get("url") or cfg.get("architecture")
        return VitexpError(
            f"{where}.pretrained=true: timm's weights {tag} are not in the local Hugging Face cache ({HF_HUB_CACHE}; "
            f"HF_HOME or HF_HUB_CACHE move it; URL weights: {torch.hub.get_dir()}) and could not be downloaded "
            f"({type(e).__name__}: {printable(text, 120)}); pass a weights file or timm model folder: "
            f"{where}.pretrained=<path>"
        )
    return VitexpError(
        f"cannot load {where}.pretrained={source} ({type(e).__name__}: {printable(text, 160)}); pass timm weights "
        f"({', '.join(WEIGHT_SUFFIXES)}) or a timm model folder for this model"
    )
