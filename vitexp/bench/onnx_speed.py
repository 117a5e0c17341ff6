"""Does pruning's speed-up survive ONNX export? Images/s of a dense ViT and its pruned copy, eager torch against
onnxruntime, on the CPU, at batch 1 and 64, interleaved in one process.

    python -m vitexp.bench.onnx_speed                          # baseline at CIFAR size, task.ratio=0.5, uniform
    OMP_NUM_THREADS=2 python -m vitexp.bench.onnx_speed task.ratio=0.3 model=patch8 --repeats 5
    python -m vitexp.bench.onnx_speed ckpt_path=<best.pt> data=digits

Overrides are Hydra overrides of the real config (task=prune is implied); `task.ratio`, `task.allocation` and
`task.round_to` apply. Weights are random unless `ckpt_path` is given (speed does not depend on them). Both engines
use torch's thread count. Every (model, engine, batch) is measured once per round, rounds interleaved, best of
`--repeats`, so that other load on the machine hits all alike. Prints the machine, a table and one JSON line last.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import onnxruntime
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from vitexp import checkpoint
from vitexp.bench.prune_speed import img_per_s
from vitexp.config import config_dir, register_resolvers, typed, version_base
from vitexp.models import arch_from_config, build_from_arch, count_macs, input_shape
from vitexp.onnx_export import to_onnx
from vitexp.predict import INPUT, OUTPUT
from vitexp.pruning import prune

DEFAULTS = ["task=prune", "data=cifar10"]
ENGINES = ("torch", "onnxruntime")


def machine() -> str:
    """The CPU's model name, its logical cores and the threads this benchmark computes on."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} logical cores, {torch.get_num_threads()} threads"


def ort_runner(model: nn.Module) -> Callable[[torch.Tensor], Any]:
    """`model` exported to ONNX and run by onnxruntime on the CPU with torch's thread count."""
    chans, height, _ = input_shape(model)
    proto = to_onnx(model, {"input_size": [chans, height, height]})
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    arrays: dict[int, np.ndarray] = {}

    def run(x: torch.Tensor) -> Any:
        array = arrays.setdefault(id(x), x.numpy())  # the conversion is not what is measured
        return session.run([OUTPUT], {INPUT: array})

    return run


def speeds(
    models: dict[str, nn.Module], batches: Sequence[int], repeats: int, min_s: float
) -> dict[tuple[str, str, int], float]:
    """Best images/s of each (model, engine, batch size) over `repeats` interleaved rounds."""
    generator = torch.Generator().manual_seed(0)
    shape = input_shape(next(iter(models.values())))
    inputs = {b: torch.randn(b, *shape, generator=generator) for b in batches}
    runs = {(name, "torch"): model.eval() for name, model in models.items()}
    runs |= {(name, "onnxruntime"): ort_runner(model) for name, model in models.items()}
    best: dict[tuple[str, str, int], float] = {}
    for _ in range(repeats):
        for (name, engine), run in runs.items():
            for b in batches:
                key = (name, engine, b)
                best[key] = max(best.get(key, 0.0), img_per_s(run, inputs[b], None, min_s))
    return best


def rows(models: dict[str, nn.Module], best: dict[tuple[str, str, int], float], batches: Sequence[int]) -> list[dict]:
    """One row per (model, engine): MACs, images/s per batch size, and the speed-up over dense in the same engine."""
    table = []
    for name, model in models.items():
        for engine in ENGINES:
            row: dict[str, Any] = {"model": name, "engine": engine, "macs": count_macs(model)}
            for b in batches:
                row[f"img_per_s_b{b}"] = round(best[(name, engine, b)], 1)
                row[f"speedup_b{b}"] = round(best[(name, engine, b)] / best[("dense", engine, b)], 3)
            table.append(row)
    return table


def print_table(table: list[dict], batches: Sequence[int]) -> None:
    """The rows as a Markdown table."""
    print("| model | engine | MACs (M) | " + " | ".join(f"batch {b} img/s (vs dense)" for b in batches) + " |")
    print("| --- " * (3 + len(batches)) + "|")
    for row in table:
        cells = [f"{row[f'img_per_s_b{b}']:.0f} ({row[f'speedup_b{b}']:.2f}x)" for b in batches]
        print(f"| {row['model']} | {row['engine']} | {row['macs'] / 1e6:.1f} | " + " | ".join(cells) + " |")


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point (`python -m vitexp.bench.onnx_speed`)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=lambda s: [int(v) for v in s.split(",")], default=[1, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--min-s", type=float, default=0.5, help="seconds each measurement runs at least")
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    register_resolvers()
    with initialize_config_dir(config_dir=config_dir(), **version_base()):
        cfg = compose(config_name="config", overrides=DEFAULTS + overrides)
    torch.manual_seed(0)
    arch = arch_from_config(OmegaConf.to_container(cfg.model, resolve=True))
    dense = (checkpoint.load_model(cfg.ckpt_path)[0] if cfg.ckpt_path else build_from_arch(arch)).eval()
    pruned = copy.deepcopy(dense)
    example = torch.zeros(1, *input_shape(dense))
    prune(pruned, replace(typed(cfg).task, importance="magnitude", rounds=1), example)
    models = {"dense": dense, f"pruned_{cfg.task.ratio}": pruned}
    best = speeds(models, args.batches, args.repeats, args.min_s)
    table = rows(models, best, args.batches)
    print(f"machine: {machine()}; torch {torch.__version__}, onnxruntime {onnxruntime.__version__}")
    print_table(table, args.batches)
    print(json.dumps({"ratio": cfg.task.ratio, "allocation": cfg.task.allocation, "machine": machine(), "rows": table}))


if __name__ == "__main__":
    main()
