"""Checkpoints: written atomically, read without executing anything from the file, loaded into a model."""

from __future__ import annotations

import pickle
import random
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vitexp import VitexpError, files

# The layout of the checkpoint dict; a file of a newer layout is refused with a clear error, not misread.
FORMAT_VERSION = 1


def save(checkpoint: dict[str, Any], path: str | Path, root: str | Path | None = None) -> None:
    """Write `checkpoint` to `path` through a temp file in the same folder, fsync, then rename.

    A crash at any moment leaves either the previous file or the new one, never a partial file; the temp
    file a killed writer left behind is removed by the next save of the same file. `root`: the run folder `path`
    lies in (a symlinked folder from it down is refused; default: `path`'s own folder).
    """
    path = Path(path)
    try:
        with files.atomic(path, root, durable=True) as f:
            torch.save(checkpoint, f)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)
    except (OSError, RuntimeError) as e:  # torch's zip writer reports a failed write as RuntimeError
        kept = f"; the previous {path.name} is kept" if path.exists() else ""
        raise VitexpError(f"cannot write {path} ({_why(e, path.parent)}): free disk space or pick another "
                          f"hydra.run.dir{kept}") from None  # fmt: skip


def _why(e: BaseException, folder: Path) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    free = shutil.disk_usage(folder).free
    return "no space left on device" if free < 1 << 20 else "the write failed"


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with `weights_only=True`; every failure is a one-line `VitexpError`."""
    path = Path(path)
    if not path.is_file():
        raise VitexpError(f"checkpoint not found: {path}; pass the path of a .pt file written by vitexp")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VitexpError(
            f"refused to load {path}: it holds objects other than tensors and plain data ({files.printable(first)})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise VitexpError(
            f"cannot read checkpoint {path}: the file is truncated or corrupt ({type(e).__name__})"
        ) from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "arch" not in checkpoint:
        raise VitexpError(f"{path} is not a vitexp checkpoint (no 'model' and 'arch' entries)")
    _check_fields(checkpoint, path)
    return checkpoint


def _check_fields(checkpoint: dict[str, Any], path: Path) -> None:
    """The fields every reader of a checkpoint takes: its layout's format and version, the weights, the `arch`."""
    from vitexp.models import check_arch

    version, layout = checkpoint.get("version"), checkpoint.get("format", FORMAT_VERSION)
    if version is not None and not isinstance(version, str):
        raise VitexpError(f"{path}: version is a {type(version).__name__}, not a string; pass one vitexp wrote")
    if type(layout) is not int or layout != FORMAT_VERSION:
        raise VitexpError(
            f"{path} has checkpoint format {files.printable(repr(layout), 60)}, this vitexp reads format "
            f"{FORMAT_VERSION}; use the vitexp version that wrote it ({files.printable(version, 60)})"
        )
    weights = checkpoint["model"]
    if not isinstance(weights, dict):
        raise VitexpError(f"{path}: model is a {type(weights).__name__}, not a dict of tensors; pass one vitexp wrote")
    for key, value in weights.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise VitexpError(
                f"{path}: model.{files.printable(key, 80)} is a {type(value).__name__}, not a tensor named by a "
                f"string; pass a checkpoint vitexp wrote"
            )
    check_arch(checkpoint["arch"], str(path))


def load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load `state_dict` into `model` strictly; a mismatch is a one-line error that says what differs."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [k for k in own.keys() & state_dict.keys() if own[k].shape != state_dict[k].shape]
    heads = [k for k in shapes if k.startswith(("head.", "fc.", "classifier."))]
    if heads and heads == shapes and not (missing or unexpected) and state_dict[heads[0]].ndim:
        raise VitexpError(
            f"{source} predicts {state_dict[heads[0]].shape[0]} classes but this model has {own[heads[0]].shape[0]} "
            f"(data.num_classes); pick the data= it was trained on"
        )
    if missing or unexpected or shapes:
        detail = f"{len(missing)} missing, {len(unexpected)} unexpected, {len(shapes)} mismatched tensors" + (
            f", e.g. {shapes[0]} {tuple(state_dict[shapes[0]].shape)} vs {tuple(own[shapes[0]].shape)}"
            if shapes
            else ""
        )
        raise VitexpError(f"{source} does not fit this model ({detail}); pick the model= it was trained with")
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:  # a tensor torch cannot copy into the parameter (a complex or quantized one)
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise VitexpError(
            f"{source} does not fit this model ({files.printable(first, 160)}); pass one vitexp wrote"
        ) from None


def load_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The module a checkpoint holds, rebuilt from its `arch` with its weights (on the CPU), and the checkpoint."""
    from vitexp.models import build_from_arch, without_weights_source

    checkpoint = load(path)
    # the weights are the checkpoint's: pretrained weights an arch might name are never read
    model = build_from_arch(without_weights_source(checkpoint["arch"]), where=f"{path}: arch.kwargs")
    load_weights(model, checkpoint["model"], str(path))
    return model, checkpoint


def rng_state() -> dict[str, Any]:
    """Every random generator's state, as tensors and plain containers."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].copy()),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["name"],
            np_state["keys"].numpy(),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
