"""What every task does before its recipe starts: device, precision, seeds, run folder, resume, weights."""

from __future__ import annotations

import functools
import random
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import MissingMandatoryValue
from torch import nn

from vitexp import VitexpError, distributed
from vitexp.logging import start_wandb

# Groups that define what a run is; a resumed run keeps its own.
FIXED_ON_RESUME = ("model", "task", "data", "optim", "experiment", "debug")


def build(node: Any, *args: Any, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate`, with any failure turned into a one-line `VitexpError` naming the config key."""
    try:
        return instantiate(node, *args, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, VitexpError):
            raise cause from None
        key = getattr(node, "_get_full_key", lambda _: "")("")
        raise VitexpError(f"cannot build {key or 'config node'}: {type(cause).__name__}: {cause}") from None
    except MissingMandatoryValue as e:
        raise VitexpError(f"{e.full_key} must be set: pass {e.full_key}=...") from None


_stop_requested: list[str] = []


def request_stop(reason: str) -> None:
    """Ask the running training loop to stop after the current epoch (a termination signal arrived)."""
    _stop_requested.append(reason)


def check_stop() -> None:
    """Stop with KeyboardInterrupt(reason) if a stop was requested; called where the run can resume from."""
    if _stop_requested:
        raise KeyboardInterrupt(_stop_requested[-1])


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """`auto` picks cuda when available; asking for cuda without one is an error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise VitexpError(f"trainer.device={name} but no CUDA device is visible; use trainer.device=cpu or auto")
    if name == "cuda" and distributed.launched():
        return torch.device("cuda", distributed.local_rank())  # one GPU per process
    return torch.device(name)


def autocast_dtype(precision: str | int, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for trainer.precision (None: full fp32); `auto` is bf16 on a GPU that has it, else 32."""
    dtypes = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}
    key = str(precision)
    if key == "auto":
        native = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_native_bf16()
        key = "bf16" if native and device.type in ("cuda", "cpu") else "32"
    if key not in dtypes:
        raise VitexpError(f"trainer.precision={precision} is not one of auto, 32, bf16, 16")
    if key == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise VitexpError("this GPU has no bf16 support; use trainer.precision=16 or 32")
    return dtypes[key]


def precision_name(dtype: torch.dtype | None) -> str:
    """How an autocast dtype reads in logs and results: fp32, bf16, fp16."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX), where bf16 autocast roughly doubles the
    training step; elsewhere bf16 is emulated and no faster than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def use_compile(setting: str | bool, device: torch.device) -> bool:
    """trainer.compile: `auto` compiles on CUDA, where it pays back its compile time; true or false."""
    return device.type == "cuda" if setting == "auto" else bool(setting)


def fused_option(setting: str | bool, device: torch.device) -> dict[str, bool]:
    """optim.fused as the optimizer's keyword: `auto` uses torch's fused kernel (one launch for all parameters)
    on CUDA and CPU; false keeps torch's default implementation."""
    fused = device.type in ("cuda", "cpu") if setting == "auto" else bool(setting)
    return {"fused": True} if fused else {}


def show_progress(setting: str | bool) -> bool:
    """trainer.progress: `auto` shows bars on a terminal only; plain epoch lines go to files and pipes."""
    return sys.stderr.isatty() if setting == "auto" else bool(setting)


def run_dir() -> Path:
    """This job's output folder, as Hydra made it."""
    return Path(HydraConfig.get().runtime.output_dir)


def resume_run_dir(resume: str) -> Path:
    """The run folder named by `resume=`: the folder itself, or the one holding checkpoints/last.pt."""
    path = Path(resume).expanduser()
    return path.parent.parent if path.suffix == ".pt" else path


def _run_dir_resolver(resume: str | None, default: str) -> str:
    return str(resume_run_dir(resume)) if resume else fresh_dir(default)


@functools.cache  # Hydra resolves the folder more than once per job; the claim is made once per process
def fresh_dir(path: str) -> str:
    """`path`, created now, or `path_1`, `path_2`, ... when another run took it (two runs in the same second)."""
    candidate, n = Path(path), 0
    while True:
        try:
            candidate.mkdir(parents=True)
            return str(candidate)
        except FileExistsError:
            n += 1
            candidate = Path(f"{path}_{n}")


def _output_subdir_resolver(resume: str | None, output_dir: str) -> str:
    # A run folder keeps the .hydra/ of its first start; each resume (or auto-resume) records its own beside it.
    again = resume or (Path(output_dir) / ".hydra" / "config.yaml").is_file()
    return f".hydra/resume_{datetime.now():%Y-%m-%d_%H-%M-%S}" if again else ".hydra"


def register_resolvers() -> None:
    """The resolvers conf/hydra/default.yaml uses: a fresh folder per run, resumed runs back in their own.

    They live here, not in `__main__`, so that launchers that pickle the config (submitit) can import them."""
    OmegaConf.register_new_resolver("vitexp_run_dir", _run_dir_resolver, replace=True)
    OmegaConf.register_new_resolver("vitexp_output_subdir", _output_subdir_resolver, replace=True, use_cache=True)
    # cached in the config, so that jobs a launcher runs in other processes (submitit) resolve the same folder
    OmegaConf.register_new_resolver("vitexp_fresh_dir", fresh_dir, replace=True, use_cache=True)


def ensure_new_run_dir(path: Path, *, before_hydra: bool = False) -> None:
    """A new run never writes over an existing one (checked again `before_hydra` writes its .hydra/ there)."""
    if resumable(path) if before_hydra else (path / "checkpoints").exists():
        raise VitexpError(f"{path} already holds a run; continue it with resume={path} or pick a new hydra.run.dir")


def resumable(folder: Path) -> bool:
    """Whether `folder` holds a run that `resume=` can continue: one with checkpoints/last.pt, or one stopped
    before its first checkpoint (its first start's .hydra/config.yaml is there; a distill or prune run may be
    inside its teacher or unpruned sub-run)."""
    return (folder / "checkpoints" / "last.pt").is_file() or (folder / ".hydra" / "config.yaml").is_file()


def resumed_task(resume: str) -> str:
    """The task of the run that `resume=` names (`python -m vitexp resume=<distill run>` goes on distilling)."""
    from vitexp import checkpoint

    folder = resume_run_dir(resume)
    try:
        return OmegaConf.load(folder / ".hydra" / "config.yaml").task.name
    except Exception:  # noqa: BLE001 - no or unreadable .hydra/: the checkpoint has the config too
        return checkpoint.load(folder / "checkpoints" / "last.pt")["config"]["task"]["name"]


def _sub_run_checkpoints(folder: Path) -> list[Path]:
    return sorted(folder.glob("*/checkpoints/last.pt"))


def open_run(cfg: DictConfig) -> tuple[DictConfig, Path, dict[str, Any] | None]:
    """The run's config, folder and, with `resume=`, its loaded last.pt; a new run gets a fresh folder.

    A run stopped before its own first checkpoint resumes from its first start's config and no last.pt: its
    sub-runs (a teacher, an unpruned model) continue from their own last.pt, and its epochs start over."""
    from vitexp import checkpoint

    out = run_dir()
    started = (out / "checkpoints" / "last.pt").is_file() or _sub_run_checkpoints(out)
    if not cfg.resume and cfg.auto_resume and started:
        with open_dict(cfg):
            cfg.resume = str(out)  # a requeued job: continue where the previous allocation stopped
    if not cfg.resume:
        ensure_new_run_dir(out)
        start_tracking(cfg, out)
        return cfg, out, None
    folder = resume_run_dir(cfg.resume)
    last, subs = folder / "checkpoints" / "last.pt", _sub_run_checkpoints(folder)
    resume = checkpoint.load(last) if last.is_file() else None
    if resume is not None:
        saved, run_id = resume["config"], resume["wandb_run_id"]
    else:
        try:
            saved = OmegaConf.to_container(OmegaConf.load(folder / ".hydra" / "config.yaml"))
        except Exception as e:  # noqa: BLE001 - cut short while Hydra wrote it: nothing ran yet
            raise VitexpError(f"resume={cfg.resume}: its .hydra/config.yaml is unreadable ({type(e).__name__}); "
                              f"start the run again instead") from None  # fmt: skip
        run_id = checkpoint.load(subs[-1])["wandb_run_id"] if subs else None  # the sub-run logged to the job's run
    cfg = resumed_config(cfg, saved)
    start_tracking(cfg, out, run_id)
    return cfg, out, resume


def start_tracking(cfg: DictConfig, out: Path, run_id: str | None = None) -> None:
    """Open the job's W&B run (when `logger.mode` is not disabled; rank 0 only under torchrun): named from the
    task, model and command-line overrides, grouped by sweep, with the resolved config; `run_id` continues a
    resumed run's W&B run."""
    if not distributed.is_main():
        return
    hydra_cfg = HydraConfig.get()
    sweep = Path(hydra_cfg.sweep.dir).name if hydra_cfg.mode == RunMode.MULTIRUN else None
    start_wandb(
        out,
        mode=cfg.logger.mode,
        project=cfg.logger.project,
        entity=cfg.logger.entity,
        group=cfg.logger.group or (f"sweep-{sweep}" if sweep else None),
        tags=list(cfg.logger.tags),
        name=cfg.logger.name or run_name(cfg.task.name, cfg.model.name, list(hydra_cfg.overrides.task)),
        job_type=cfg.task.name,
        config=OmegaConf.to_container(cfg, resolve=True),
        run_id=run_id,
        init_timeout=cfg.logger.init_timeout,
    )


def run_name(task: str, model: str, overrides: list[str]) -> str:
    """A readable run name: task, model and what the command line changed (`train-baseline-optim.lr=0.001`)."""
    shown = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in ("task", "model", "resume", "logger")
             and not o.lstrip("+~").startswith(("hydra.", "logger."))]  # fmt: skip
    return "-".join([task, model, *shown])[:128]


def derived_config(cfg: DictConfig, changes: dict[str, Any]) -> DictConfig:
    """A resolved, struct-mode copy of `cfg` with the top-level nodes in `changes` replaced (a sub-run's config)."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.update({key: OmegaConf.to_container(v, resolve=True) if isinstance(v, DictConfig) else v
                  for key, v in changes.items()})  # fmt: skip
    derived = OmegaConf.create(plain)
    OmegaConf.set_struct(derived, True)
    return derived


def resumed_config(cfg: DictConfig, saved: dict[str, Any]) -> DictConfig:
    """The interrupted run's own config, with the values named on this command line applied on top.

    Config groups that define the run (model, task, data, optim, experiment, debug) cannot change on resume.
    """
    resumed = OmegaConf.create(saved)
    choices = HydraConfig.get().runtime.choices
    # the overrides the run started with (repeated by a requeued cluster job, or by a user re-running the
    # same command line with resume=) change nothing
    started_with = resume_run_dir(cfg.resume) / ".hydra" / "overrides.yaml"
    original = set(OmegaConf.load(started_with)) if started_with.is_file() else set()
    for override in HydraConfig.get().overrides.task:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in ("resume", "auto_resume") or key.startswith("hydra") or override in original:
            continue
        if key in choices and key in FIXED_ON_RESUME:
            raise VitexpError(f"{override} cannot change on resume; start a new run (with ckpt_path=...) instead")
        OmegaConf.update(resumed, key, OmegaConf.select(cfg, key), merge=False, force_add=True)
    resumed.resume = cfg.resume
    OmegaConf.set_struct(resumed, True)
    return resumed


def load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load `state_dict` into `model` strictly; a mismatch is a one-line error that says what differs."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [k for k in own.keys() & state_dict.keys() if own[k].shape != state_dict[k].shape]
    heads = [k for k in shapes if k.startswith(("head.", "fc.", "classifier."))]
    if heads and heads == shapes and not (missing or unexpected):
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
    model.load_state_dict(state_dict)
