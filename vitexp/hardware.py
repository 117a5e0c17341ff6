"""Hardware choices: the device, the autocast precision, compilation, fused optimizers, seeds, progress bars and the
C allocator's handling of freed memory."""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vitexp import VitexpError, distributed
from vitexp.schema import Trainer

DTYPES = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}
# glibc's mallopt parameters, and the values `keep_freed_memory` gives them: the ceiling glibc's own adaptive mmap
# threshold reaches on a 64-bit machine, and twice that for the free memory kept at the top of the heap (its own rule)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD, TRIM_THRESHOLD = 32 << 20, 64 << 20
# a user's own choice of these thresholds (or of another allocator) is left alone
MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES", "LD_PRELOAD")


@dataclass(frozen=True)
class Machine:
    """What the `trainer` settings (and `optim.fused`) come to on this machine, their `auto` choices made."""

    device: torch.device
    amp: torch.dtype | None  # autocast dtype; None: fp32
    fp16_scaler: bool  # a GradScaler (precision 16)
    compile: bool
    fused: bool
    progress: bool


def choose(trainer: Trainer, *, fused: bool | str) -> Machine:
    """The device, autocast dtype, GradScaler, compilation, fused optimizer and progress bars `trainer` and
    `optim.fused` ask for on this machine; sets torch's deterministic mode and float32 matmul precision as
    `trainer.deterministic` and `trainer.matmul_precision` say."""
    device = resolve_device(trainer.device)
    use_deterministic(trainer.deterministic)
    torch.set_float32_matmul_precision(trainer.matmul_precision)
    return Machine(
        device=device,
        amp=autocast_dtype(trainer.precision, device),
        fp16_scaler=str(trainer.precision) == "16",
        compile=use_compile(trainer.compile, device),
        fused=use_fused(fused, device),
        progress=show_progress(trainer.progress),
    )


def keep_freed_memory() -> bool:
    """On Linux with glibc, have its malloc serve blocks of up to 32 MB from the heap and keep up to 64 MB of freed
    heap, so that the memory a CPU training step frees (activations, gradients) is reused by the next step instead
    of being handed back to the kernel and faulted in again, page by page. glibc's adaptive thresholds rise toward
    these values as large blocks are freed, but need not get there: on a 2-core CPU a ViT-Lite-7/4 run page-faulted
    22,000 times a second through training, and not once with this set (the epoch's kernel time: 4.4 s, then 2.1 s).
    Loader workers forked later inherit it. Nothing computed changes. False (and nothing done) elsewhere, or where the
    environment sets malloc's thresholds, glibc tunables or a preloaded allocator."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or any(k in os.environ for k in MALLOC_ENV):
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def use_deterministic(setting: bool | str) -> None:
    """trainer.deterministic: true makes every kernel deterministic (torch raises on an op that has no deterministic
    version), so a resumed CUDA run equals an uninterrupted one bitwise, as CPU runs always do; `warn` warns on such
    an op instead; false (the default) lets CUDA pick its fastest kernels, some of which add in a varying order
    (attention's backward). cuBLAS reads its workspace setting when it starts, before the first matrix product."""
    if setting:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(bool(setting), warn_only=setting == "warn")
    torch.backends.cudnn.deterministic = bool(setting)


def resolve_device(name: str) -> torch.device:
    """`auto` picks cuda when available; asking for cuda without one is an error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise VitexpError(f"trainer.device={name} but no CUDA device is visible; use trainer.device=cpu or auto")
    if name == "cuda" and distributed.launched():
        return torch.device("cuda", distributed.local_rank())  # one GPU per process
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for trainer.precision, one of the schema's choices (None: full fp32); `auto` is bf16
    where it is native, else 32."""
    key = str(precision)
    if key == "auto":
        native = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_native_bf16()
        key = "bf16" if native and device.type in ("cuda", "cpu") else "32"
    if key == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise VitexpError("this GPU has no bf16 support; use trainer.precision=16 or 32")
    return DTYPES[key]


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


def use_fused(setting: str | bool, device: torch.device) -> bool:
    """optim.fused: `auto` uses torch's fused kernel (one launch for all parameters) on CUDA and CPU."""
    return device.type in ("cuda", "cpu") if setting == "auto" else bool(setting)


def show_progress(setting: str | bool) -> bool:
    """trainer.progress: `auto` shows bars on a terminal only; plain epoch lines go to files and pipes."""
    return sys.stderr.isatty() if setting == "auto" else bool(setting)
