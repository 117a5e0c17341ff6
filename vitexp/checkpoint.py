"""Checkpoints: their layout (key names, the typed `TrainingState`, the checks of a loaded file), written atomically,
read without executing anything from the file, loaded into a model."""

from __future__ import annotations

import math
import pickle
import random
import shutil
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from vitexp import VitexpError, __version__, engine, files

if TYPE_CHECKING:  # vitexp.models (timm) is imported where a model or an arch is built, not with this module
    from vitexp.models import Arch

# The layout of the checkpoint dict; a file of another layout is refused with a clear error, not misread. Format 2:
# every timm model by name is the `timm` builder's, and a pruned vitexp ViT is a `vit` with a `layout`.
FORMAT_VERSION = 2

# The keys of a checkpoint dict, and the fields of `TrainingState` of the same names
MODEL = "model"
ARCH = "arch"
OPTIMIZER = "optimizer"
SCHEDULER = "scheduler"
SCALER = "scaler"
EMA = "ema"
EPOCH = "epoch"
STEP = "step"
RNG = "rng"
CONFIG = "config"
METRICS = "metrics"
VAL_IMAGES = "val_images"
POSITION = "position"
EARLY_STOPPING = "early_stopping"
WANDB_RUN_ID = "wandb_run_id"
VERSION = "version"
FORMAT = "format"
# The fields of a mid-epoch `position` besides its epoch (`Position`)
BATCH = "batch"
SUMS = "sums"
KEYS = (
    MODEL,
    ARCH,
    OPTIMIZER,
    SCHEDULER,
    SCALER,
    EMA,
    EPOCH,
    STEP,
    RNG,
    CONFIG,
    METRICS,
    VAL_IMAGES,
    POSITION,
    EARLY_STOPPING,
    WANDB_RUN_ID,
    VERSION,
    FORMAT,
)
# What a file of weights alone holds (a pruned model before its fine-tuning): no state to resume a run from
WEIGHTS_KEYS = (MODEL, ARCH, EPOCH, STEP, CONFIG, METRICS, VERSION, FORMAT)


@dataclass
class Position:
    """Where a mid-epoch checkpoint stands: its epoch, the batches done in it, and each rank's running sums (the
    state dicts of `engine.EpochSums`)."""

    epoch: int
    batch: int
    sums: list[dict[str, Any]]

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint's `position` entry."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Position:
        """A `position` entry of a loaded checkpoint (checked by `check_resume_fields`)."""
        return cls(**{f.name: state[f.name] for f in fields(cls)})


@dataclass
class TrainingState:
    """What a checkpoint holds: the weights and the `arch` a fresh process rebuilds them into, the states an exact
    resume puts back (optimizer, scheduler, GradScaler, EMA, every generator), where the run stands (epoch,
    optimizer step, metrics, validation images, a mid-epoch `position`), the resolved config, the W&B run and the
    vitexp version and layout `format` that wrote it. A state of a part the run has not (a GradScaler, an EMA) is
    None; a pruned model's file holds no optimizer, scheduler or generators."""

    model: dict[str, torch.Tensor]
    arch: Arch  # written as the plain dict `Arch.to_dict` makes
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None
    ema: dict[str, Any] | None = None
    epoch: int = 0
    step: int = 0
    rng: dict[str, Any] | None = None
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    val_images: int | None = None
    position: Position | None = None  # a mid-epoch checkpoint's place
    early_stopping: dict[str, Any] | None = None  # vitexp.early_stopping's state (None: off)
    wandb_run_id: str | None = None
    version: str = __version__
    format: int = FORMAT_VERSION

    def state_dict(self, *, resumable: bool = True) -> dict[str, Any]:
        """The checkpoint dict, keyed by `KEYS` (`WEIGHTS_KEYS` for a file that is not `resumable`): tensors and
        plain containers that `torch.load(weights_only=True)` reads."""
        state = {key: getattr(self, key) for key in (KEYS if resumable else WEIGHTS_KEYS)}
        state[ARCH] = self.arch.to_dict()
        if state.get(POSITION) is not None:
            state[POSITION] = self.position.state_dict()
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], source: str | Path) -> TrainingState:
        """The fields a checkpoint dict holds (one `load` checked; `source` names it); a key it lacks keeps its
        default. Its `arch` becomes an `Arch`, its `position` a `Position`."""
        from vitexp.models import Arch

        values = {key: state[key] for key in KEYS if key in state}
        values[ARCH] = Arch.from_dict(state[ARCH], str(source))
        if isinstance(values.get(POSITION), dict):
            values[POSITION] = Position.from_state(values[POSITION])
        return cls(**values)


def save(
    checkpoint: dict[str, Any], path: str | Path, root: str | Path | None = None, *, also: Iterable[Path] = ()
) -> None:
    """Write `checkpoint` to `path` through a temp file in the same folder, fsync, then rename; then give it each
    name of `also` in turn (hard links: the file is serialised and written once however many names it has).

    A crash at any moment leaves either the previous file or the new one at each name, never a partial file; the
    temp file a killed writer left behind is removed by the next save of the same file. `root`: the run folder `path`
    lies in (a symlinked folder from it down is refused; default: `path`'s own folder).
    """
    path = Path(path)
    try:
        with files.atomic(path, root, durable=True) as f:
            torch.save(checkpoint, f)
        for name in [path, *also]:
            if name != path:
                files.second_name(path, name, root)
            for stale in name.parent.glob(f".{name.name}.*.tmp"):
                stale.unlink(missing_ok=True)
    except (OSError, RuntimeError) as e:  # torch's zip writer reports a failed write as RuntimeError
        kept = f"; the previous {path.name} is kept" if path.exists() else ""
        raise VitexpError(
            f"cannot write {path} ({_why(e, path.parent)}): free disk space or pick another hydra.run.dir{kept}"
        ) from None


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
        with files.open_regular(path, follow=True) as f:  # the one reader: a FIFO or device swapped in is refused
            checkpoint = torch.load(f, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VitexpError(
            f"refused to load {path}: it holds objects other than tensors and plain data ({files.printable(first)})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise VitexpError(
            f"cannot read checkpoint {path}: the file is truncated or corrupt ({type(e).__name__})"
        ) from None
    if not isinstance(checkpoint, dict) or MODEL not in checkpoint or ARCH not in checkpoint:
        raise VitexpError(f"{path} is not a vitexp checkpoint (no 'model' and 'arch' entries)")
    _check_fields(checkpoint, path)
    return checkpoint


def _check_fields(checkpoint: dict[str, Any], path: Path) -> None:
    """The fields every reader of a checkpoint takes: its layout's format and version, the weights, the `arch`."""
    from vitexp.models import Arch

    version, layout = checkpoint.get(VERSION), checkpoint.get(FORMAT, FORMAT_VERSION)
    if version is not None and not isinstance(version, str):
        raise VitexpError(f"{path}: version is a {type(version).__name__}, not a string; pass one vitexp wrote")
    if type(layout) is not int or layout != FORMAT_VERSION:
        raise VitexpError(
            f"{path} has checkpoint format {files.printable(repr(layout), 60)}, this vitexp reads format "
            f"{FORMAT_VERSION}; use the vitexp version that wrote it ({files.printable(version, 60)})"
        )
    weights = checkpoint[MODEL]
    if not isinstance(weights, dict):
        raise VitexpError(f"{path}: model is a {type(weights).__name__}, not a dict of tensors; pass one vitexp wrote")
    for key, value in weights.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise VitexpError(
                f"{path}: model.{files.printable(key, 80)} is a {type(value).__name__}, not a tensor named by a "
                f"string; pass a checkpoint vitexp wrote"
            )
    Arch.from_dict(checkpoint[ARCH], str(path))


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


def recorded_statistics(saved: dict[str, Any], source: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The normalisation a checkpoint's model was trained with: its config's data.mean and data.std, checked to be
    numbers (a positive std for each mean); `source` names the checkpoint in errors."""
    try:
        data = saved[CONFIG]["data"]
        mean, std = tuple(float(m) for m in data["mean"]), tuple(float(s) for s in data["std"])
    except (KeyError, TypeError, ValueError):
        mean = std = ()
    if not (mean and len(mean) == len(std) and all(math.isfinite(v) for v in mean + std) and min(std) > 0):
        raise VitexpError(
            f"{source} records no data.mean and data.std as numbers (a positive std for each mean); pass a "
            f"checkpoint vitexp wrote"
        )
    return mean, std


def trained_split(saved: dict[str, Any], data: Any) -> tuple[int | None, Any]:
    """The held-out split of the run that wrote `saved` when it trained on the data set `data` names: its split seed
    (its `data.split_seed`, else its `seed`) and `data.val_size`, checked to be plain numbers; `data`'s own when it
    trained on another data set (or records none)."""
    config = saved.get(CONFIG) if isinstance(saved.get(CONFIG), dict) else {}
    trained = config.get("data") if isinstance(config.get("data"), dict) else {}
    if trained.get("name") != data.name:
        return data.split_seed, data.val_size
    seed = trained.get("split_seed")
    seed, size = (config.get("seed") if seed is None else seed), trained.get("val_size")
    if type(seed) is not int or seed < 0 or type(size) not in (int, float) or not 0 < size:
        raise VitexpError(
            f"{data.name} split settings in the checkpoint are not plain numbers (seed {files.printable(seed, 40)}, "
            f"val_size {files.printable(size, 40)}); pass a checkpoint vitexp wrote"
        )
    return seed, size


def load_arch(path: str | Path) -> Arch:
    """The `arch` of the checkpoint `path` (read and checked by `load`), without building its model."""
    from vitexp.models import Arch

    return Arch.from_dict(load(path)[ARCH], str(path))


def load_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The module a checkpoint holds, rebuilt from its `arch` with its weights (on the CPU), and the checkpoint (plain
    data as `load` read it; `vitexp.models.arch_of(module)`: its arch, typed)."""
    from vitexp.models import Arch, build_from_arch

    checkpoint = load(path)
    # the weights are the checkpoint's: pretrained weights an arch might name are never read
    arch = Arch.from_dict(checkpoint[ARCH], str(path)).without_weights_source()
    model = build_from_arch(arch, where=f"{path}: arch.kwargs")
    load_weights(model, checkpoint[MODEL], str(path))
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


# The top-level fields of a checkpoint that a resume reads, and the types vitexp writes them with: a file is data, and
# a tensor or a string where a number belongs is refused here rather than met later as a traceback (`load` checks the
# weights and the arch for every reader).
_OPTIONAL = type(None)
RESUME_FIELDS: dict[str, tuple[type, ...]] = {
    EPOCH: (int,),
    STEP: (int,),
    CONFIG: (dict,),
    METRICS: (dict,),
    RNG: (dict,),
    OPTIMIZER: (dict,),
    SCHEDULER: (dict,),
    SCALER: (dict, _OPTIONAL),
    EMA: (dict, _OPTIONAL),
    VAL_IMAGES: (int, _OPTIONAL),
    POSITION: (dict, _OPTIONAL),
    EARLY_STOPPING: (dict, _OPTIONAL),
}


def check_resume_fields(ckpt: dict[str, Any], source: str | Path, fields: Iterable[str] = tuple(RESUME_FIELDS)) -> None:
    """Refuse, with one line, a loaded checkpoint whose top-level `fields` do not have the types vitexp writes
    (numbers not negative; metrics numbers; a mid-epoch position as a mid-epoch save writes it)."""
    for key in fields:
        value, kinds = ckpt.get(key), RESUME_FIELDS[key]
        if isinstance(value, bool) or not isinstance(value, kinds) or isinstance(value, int) and value < 0:
            expected = " or ".join("None" if kind is _OPTIONAL else kind.__name__ for kind in kinds)
            what = str(value) if isinstance(value, int) else f"a {type(value).__name__}"
            raise _mistyped(source, key, f"is {what}, not {expected}{' >= 0' if int in kinds else ''}")
    metrics = ckpt.get(METRICS) if METRICS in fields else {}
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values()) or (
        metrics and "best_val_acc1" not in metrics
    ):
        raise _mistyped(source, METRICS, "holds values that are not numbers (or no best_val_acc1)")
    if POSITION in fields and ckpt.get(POSITION) is not None and not _valid_position(ckpt[POSITION]):
        raise _mistyped(source, POSITION, "is not a mid-epoch place (epoch, batch and each rank's running sums)")


def _mistyped(source: str | Path, key: str, why: str) -> VitexpError:
    return VitexpError(
        f"{files.printable(source)} is not a checkpoint vitexp wrote: its {key} {why}; start a new run "
        f"(ckpt_path=<it> keeps its weights)"
    )


def _valid_position(position: dict[str, Any]) -> bool:
    """A mid-epoch place as a mid-epoch save writes it, each rank's sums shaped as the engine's running sums are."""
    template = engine.EpochSums(torch.device("cpu"), skip_nonfinite=False).state_dict()
    sums = position.get(SUMS)

    def same(value: Any, like: Any) -> bool:
        if torch.is_tensor(like):
            return torch.is_tensor(value) and value.shape == like.shape
        return isinstance(value, int) and not isinstance(value, bool)

    def fits(state: Any) -> bool:
        return (
            isinstance(state, dict)
            and state.keys() == template.keys()
            and all(same(state[k], v) for k, v in template.items())
        )

    numbers = [position.get(EPOCH), position.get(BATCH)]
    whole = all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in numbers)
    return whole and isinstance(sums, list) and bool(sums) and all(fits(state) for state in sums)


def load_training_state(path: str | Path) -> TrainingState:
    """A last.pt to resume from: `load`, every field a resume reads checked, as a `TrainingState`."""
    saved = load(path)
    check_resume_fields(saved, path)
    return TrainingState.from_state_dict(saved, path)


def load_part(source: str | Path, name: str, load: Callable[[], Any]) -> None:
    """`load()` one part of a checkpoint into the run; torch's loaders meet a state of the wrong shape (a file someone
    edited, or one from another setup) as KeyError, TypeError, ... deep inside: one line instead."""
    try:
        load()
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
        raise VitexpError(
            f"{files.printable(source)}: its {name} state does not fit this run ({type(e).__name__}); resume with "
            f"the settings it was saved with, or start a new run with ckpt_path=<it>"
        ) from None
