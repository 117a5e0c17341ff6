"""The fast path: device-resident data (same batches, same augmentation distribution as the CPU loader), fused
optimizers changing no results, the allocator keeping a step's freed memory, and `task=benchmark` as users call it."""

from __future__ import annotations

import csv
import json
import os
import platform
import subprocess
import sys
from collections import Counter
from datetime import datetime

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

from tests.builders import data_of
from tests.conftest import TINY, vitexp
from vitexp.bench.run_summary import summary
from vitexp.data import DeviceLoader, TransformSubset, eval_transform, make_loader, set_epoch, to_device
from vitexp.hardware import MALLOC_ENV

SIZE, PAD = 8, 2


class Gradient(Dataset):
    """Grey 8x8 images whose pixel (r, c) is 1 + 8r + c (never 0, the padding value), so that a crop's offset
    and a flip can be read back from the output."""

    def __init__(self, n: int) -> None:
        self.image = Image.fromarray((1 + np.arange(SIZE * SIZE)).reshape(SIZE, SIZE).astype(np.uint8), mode="L")
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return self.image, i % 3


def _offset_and_flip(out: torch.Tensor) -> tuple[int, int, bool]:
    """(top, left, flipped) of a crop of the zero-padded gradient image."""
    img = out[0].to(torch.int64)
    nonzero = img.nonzero()
    r, c = nonzero[0].tolist()
    row_values = img[r][img[r] > 0]
    flipped = len(row_values) > 1 and bool(row_values[0] > row_values[1])
    if flipped:
        img = img.flip(1)
        r, c = img.nonzero()[0].tolist()
    value = int(img[r, c]) - 1
    return value // SIZE + PAD - r, value % SIZE + PAD - c, flipped


def test_device_augmentation_has_the_distribution_of_torchvision_crop_and_flip():
    n = 20_000
    cpu = transforms.Compose(
        [transforms.RandomCrop(SIZE, padding=PAD), transforms.RandomHorizontalFlip(0.5), transforms.PILToTensor()]
    )
    torch.manual_seed(0)
    reference = Counter(_offset_and_flip(cpu(Gradient(1).image)) for _ in range(n))
    images, labels = to_device(TransformSubset(Gradient(n), range(n), None), SIZE, torch.device("cpu"), 0)
    loader = DeviceLoader(images, labels, 1000, train=True, mean=[0.0], std=[1 / 255], crop_padding=PAD, hflip=0.5)
    set_epoch(loader, 0, 1)
    device = Counter(_offset_and_flip(x.round().to(torch.uint8)) for batch, _ in loader for x in batch)
    cells = [(t, left, f) for t in range(2 * PAD + 1) for left in range(2 * PAD + 1) for f in (False, True)]
    assert set(reference) == set(device) == set(cells)  # every offset and flip occurs, nothing else
    expected = n / len(cells)  # 400: both are uniform over the 50 cells
    for cell in cells:  # binomial sd ~ 20: 5 sd
        assert abs(reference[cell] - expected) < 100 and abs(device[cell] - expected) < 100, cell


def test_device_loader_gives_the_cpu_loaders_batches_without_augmentation():
    n = 100
    data = TransformSubset(
        Gradient(n), range(n), eval_transform(data_of(f"data.img_size={SIZE}", "data.mean=[0.5]", "data.std=[0.25]"))
    )
    cpu = make_loader(data, 16, 0, train=True)
    device = DeviceLoader(*to_device(data, SIZE, torch.device("cpu"), 0), 16, train=True, mean=[0.5], std=[0.25])
    for epoch in (1, 2):
        set_epoch(cpu, 7, epoch)
        set_epoch(device, 7, epoch)
        pairs = list(zip(cpu, device, strict=True))
        assert len(pairs) == len(cpu) == len(device) == 6
        for (x_cpu, y_cpu), (x_dev, y_dev) in pairs:
            assert torch.equal(x_cpu, x_dev) and torch.equal(y_cpu, y_dev)


def _losses(tmp_path, *args):
    vitexp(
        *TINY,
        "trainer.precision=32",
        "trainer.max_epochs=3",
        "trainer.limit_train_batches=10",
        "data.augment.crop_padding=0",
        "data.augment.rotate=0",
        *args,
        cwd=tmp_path,
    )
    (run,) = (tmp_path / "outputs" / "train" / "baseline").iterdir()
    with (run / "metrics.csv").open() as f:
        return [(float(r["train/loss"]), float(r["val/loss"])) for r in csv.DictReader(f)]


def test_fast_and_plain_paths_give_the_same_losses(tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "fast").mkdir()
    plain = _losses(tmp_path / "plain", "data.on_device=false", "optim.fused=false")
    fast = _losses(tmp_path / "fast", "data.on_device=true", "optim.fused=true")
    # Same batches in the same order; the fused AdamW kernel rounds differently in the last bits only.
    assert np.allclose(plain, fast, rtol=1e-4, atol=0), (plain, fast)


def test_on_device_data_refuses_augmentations_it_cannot_run(tmp_path):
    proc = vitexp(*TINY, "data.on_device=true", cwd=tmp_path, check=False)  # digits rotate by default
    assert proc.returncode == 2
    assert "data.augment.rotate=0" in proc.stderr and proc.stderr.count("\n") == 1


@pytest.mark.parametrize("mode", ["synthetic", "real"])
def test_benchmark_prints_one_json_line_with_the_figures(mode, tmp_path):
    args = ["task=benchmark", f"task.mode={mode}", "task.warmup_steps=1", "task.steps=2", "task.repeats=1"]
    if mode == "real":
        args += ["data.on_device=true", "data.augment.rotate=0"]
    proc = vitexp(*TINY, *args, cwd=tmp_path)
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {
        "img_per_s",
        "step_ms",
        "mfu",
        "peak_mem_mb",
        "params",
        "macs",
        "device",
        "batch_size",
        "anchor_img_per_s",
        "ratio",
        "infer_img_per_s",
    } <= figures.keys()
    assert figures["img_per_s"] > 0 and figures["batch_size"] == 16
    # a training step is 3 forward passes' worth of FLOPs, 2 per multiply-accumulate, against the measured peak
    train_flops = 6 * figures["macs"] * figures["img_per_s"]
    assert figures["mfu"] == pytest.approx(train_flops / (figures["peak_tflops"] * 1e12), rel=0.1)
    assert figures["ratio"] == pytest.approx(figures["img_per_s"] / figures["anchor_img_per_s"], rel=1e-2)
    assert abs(figures["step_ms"] - 1000 * 16 / figures["img_per_s"]) < 0.01
    (run,) = (tmp_path / "outputs" / "benchmark" / "baseline").iterdir()
    assert json.loads((run / "results.json").read_text())["img_per_s"] == figures["img_per_s"]


def test_run_summary_gives_time_to_accuracy_of_a_stopped_run(tmp_path):
    """A run stopped after 3 of 10 epochs (no results.json): accuracy against time since its command started."""
    start = datetime(2026, 1, 1, 12, 0, 0).timestamp()
    rows = [(1, 0.5, 10.0), (2, 0.86, 9.0), (3, 0.84, 9.0)]  # epoch, val/acc1, time/epoch_s
    (tmp_path / "metrics.csv").write_text(
        "epoch,val/acc1,time/epoch_s,throughput/img_s\n" + "".join(f"{e},{a},{t},{1000 * e}\n" for e, a, t in rows)
    )
    (tmp_path / "train_baseline.log").write_text(
        "".join(
            f"[2026-01-01 12:00:{s}][INFO] epoch {e}/10 | val/acc1 {a}\n" for (e, a, _), s in zip(rows, (30, 40, 50))
        )
    )
    figures = summary(tmp_path, start, budget=45)
    assert figures["status"] == "stopped early" and figures["epochs"] == 3 and figures["planned_epochs"] == 10
    assert figures["best_val_acc1"] == 0.86 and figures["best_epoch"] == 2 and figures["best_within_45s"] == 0.86
    assert figures["time_to"]["0.85"] == 40 and figures["time_to"]["0.88"] is None
    assert figures["curve"] == [(1, 0.5, 30), (2, 0.86, 40), (3, 0.84, 50)]
    assert figures["est_full_wall_s"] == 50 + 7 * 10  # 7 more epochs at the 10 s between log lines
    assert figures["between_epochs_s_median"] == 1  # 10 s apart, 9 s of it the epoch: 1 s of checkpoints
    assert figures["img_s_median"] == 2000


# In a fresh interpreter: glibc's own figures (mallinfo2) for one 24 MB block, with `keep_freed_memory` or without.
ALLOCATOR = """
import ctypes, sys
from vitexp.hardware import keep_freed_memory
FIELDS = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in FIELDS]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype, libc.malloc.restype, libc.free.argtypes = Info, ctypes.c_void_p, [ctypes.c_void_p]
kept, mapped = keep_freed_memory(), libc.mallinfo2().hblks
block = libc.malloc(24 << 20)
mapped = libc.mallinfo2().hblks - mapped
libc.free(block)
print(kept, mapped, libc.mallinfo2().keepcost >= 24 << 20)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_the_allocator_serves_a_step_from_the_heap_and_keeps_it_after_freeing():
    """A 24 MB block (an activation of a large batch) comes from the heap, not a fresh mapping, and once freed stays
    for the next step rather than being handed back to the kernel; a user's own malloc settings are left alone."""
    plain = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV}

    def figures(env: dict[str, str]) -> list[str]:
        return subprocess.run([sys.executable, "-c", ALLOCATOR], capture_output=True, text=True, env=env).stdout.split()

    assert figures(plain) == ["True", "0", "True"]
    assert figures({**plain, "MALLOC_TRIM_THRESHOLD_": "131072"})[0] == "False"
