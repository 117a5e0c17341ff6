"""Save a checkpoint atomically and load one without executing anything from the file."""

from __future__ import annotations

import os
import pickle
import random
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitexp import VitexpError

FORMAT_VERSION = 1


def save(checkpoint: dict[str, Any], path: str | Path) -> None:
    """Write `checkpoint` to `path` through a temp file in the same folder, fsync, then rename.

    A crash at any moment leaves either the previous file or the new one, never a partial file; the temp
    file a killed writer left behind is removed by the next save of the same file.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise VitexpError(f"cannot write {path} ({e.strerror}); make {path.parent} writable") from None
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, (OSError, RuntimeError)):  # torch's zip writer reports a failed write as RuntimeError
            kept = f"; the previous {path.name} is kept" if path.exists() else ""
            raise VitexpError(f"cannot write {path} ({_why(e, path.parent)}): free disk space or pick another "
                              f"hydra.run.dir{kept}") from None  # fmt: skip
        raise


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
            f"refused to load {path}: it holds objects other than tensors and plain data ({first})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise VitexpError(
            f"cannot read checkpoint {path}: the file is truncated or corrupt ({type(e).__name__})"
        ) from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "arch" not in checkpoint:
        raise VitexpError(f"{path} is not a vitexp checkpoint (no 'model' and 'arch' entries)")
    return checkpoint


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
