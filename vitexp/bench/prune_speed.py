"""Measured inference speed of pruned ViTs against the unpruned one, eager and compiled, interleaved in one process.

    python -m vitexp.bench.prune_speed                       # baseline at CIFAR size, task.ratio=0.5, both allocations
    python -m vitexp.bench.prune_speed task.ratio=0.3 model=patch8 --no-compile
    python -m vitexp.bench.prune_speed ckpt_path=<best.pt> data=digits --batches 1,256 --repeats 5

Overrides are Hydra overrides of the real config (task=prune is implied); `task.ratio`, `task.round_to` and
`trainer.precision`/`trainer.device` apply. Weights are random unless `ckpt_path` is given: speed does not depend on
them, but a global allocation does. Pruned by magnitude: `uniform` and `global` at `task.round_to`, and the same
two unrounded (round_to 1) when task.round_to > 1. Every model runs eager and under torch.compile at every batch
size, in interleaved rounds (best of `--repeats`), so other load on the machine hits all of them alike. Prints a
table and one JSON line last.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from vitexp import checkpoint
from vitexp.config import config_dir, register_resolvers, typed, version_base
from vitexp.hardware import autocast_dtype, precision_name, resolve_device
from vitexp.models import arch_from_config, build_from_arch, count_macs, count_params, input_shape
from vitexp.pruning import layout_of, prune
from vitexp.schema import Prune

DEFAULTS = ["task=prune", "data=cifar10"]


@torch.no_grad()
def img_per_s(model: Callable, x: torch.Tensor, amp: torch.dtype | None, min_s: float) -> float:
    """Forward images/s on `x` over at least `min_s` seconds (and two calls), after two warm-up calls."""
    device = x.device

    def forward() -> None:
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            model(x)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(2):  # the first compiled call compiles; the second settles caches
        forward()
    sync()
    start, calls = time.perf_counter(), 0
    while calls < 2 or time.perf_counter() - start < min_s:
        forward()
        calls += 1
        if calls % 8 == 0 or calls < 8:
            sync()
    sync()
    return x.shape[0] * calls / (time.perf_counter() - start)


def speeds(
    models: dict[str, nn.Module],
    batches: Sequence[int],
    *,
    compiled: bool,
    repeats: int,
    amp: torch.dtype | None,
    min_s: float = 0.5,
) -> dict[str, dict[str, float]]:
    """Images/s of every model, eager (and compiled), at every batch size: the best of `repeats` rounds, each round
    measuring every model once in turn. Keys: model name -> `eager_b<N>` / `compiled_b<N>`."""
    device = next(next(iter(models.values())).parameters()).device
    generator = torch.Generator().manual_seed(0)
    inputs = {
        b: torch.randn(b, *input_shape(next(iter(models.values()))), generator=generator).to(device) for b in batches
    }
    runs = {name: {"eager": model.eval()} for name, model in models.items()}
    if compiled:
        for name, model in models.items():
            runs[name]["compiled"] = torch.compile(model)
    best: dict[str, dict[str, float]] = {name: {} for name in models}
    for _ in range(repeats):
        for name, modes in runs.items():
            for mode, run in modes.items():
                for b in batches:
                    key = f"{mode}_b{b}"
                    best[name][key] = max(best[name].get(key, 0.0), img_per_s(run, inputs[b], amp, min_s))
    return best


def variants(dense: nn.Module, settings: Prune) -> dict[str, nn.Module]:
    """The dense model and its copies magnitude-pruned to `settings.ratio` in one round: uniform and global at
    `settings.round_to` (and unrounded)."""
    example = torch.zeros(1, *input_shape(dense), device=next(dense.parameters()).device)
    models = {"dense": dense}
    for allocation in ("uniform", "global"):
        for multiple in dict.fromkeys((settings.round_to, 1)):
            pruned = copy.deepcopy(dense)
            one = replace(settings, importance="magnitude", rounds=1, allocation=allocation, round_to=multiple)
            prune(pruned, one, example)
            if all(layout_of(pruned) != layout_of(m) for m in models.values()):  # the same shape is timed once
                models[f"{allocation}_r{multiple}"] = pruned
    return models


def report(models: dict[str, nn.Module], figures: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """One row per model: params, MACs, layout, images/s, batch-1 latency and the speed-ups over `dense`."""
    dense_macs, base, rows = count_macs(models["dense"]), figures["dense"], []
    for name, model in models.items():
        row = {
            "model": name,
            "params": count_params(model),
            "macs": count_macs(model),
            "mac_ratio": round(dense_macs / count_macs(model), 3),
            "layout": layout_of(model),
        }
        for key, value in figures[name].items():
            row[f"img_per_s_{key}"] = round(value, 1)
            row[f"speedup_{key}"] = round(value / base[key], 3)
            if key.endswith("_b1"):
                row[f"latency_ms_{key.removesuffix('_b1')}"] = round(1000 / value, 3)
        rows.append(row)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    """The rows as a Markdown table: MAC ratio next to every measured speed-up."""
    keys = [k for k in rows[0] if k.startswith("speedup_")]
    print(
        "| model | MACs (M) | MAC ratio | " + " | ".join(k.removeprefix("speedup_") + " img/s (x)" for k in keys) + " |"
    )
    print("| --- " * (3 + len(keys)) + "|")
    for row in rows:
        cells = [f"{row['img_per_s_' + k.removeprefix('speedup_')]:.0f} ({row[k]:.2f}x)" for k in keys]
        print(f"| {row['model']} | {row['macs'] / 1e6:.1f} | {row['mac_ratio']:.2f}x | " + " | ".join(cells) + " |")


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def main(argv: Sequence[str] | None = None) -> None:
    """Measure the pruned variants and print the table and one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=_ints, default=[1, 256], help="comma-separated, e.g. 1,256")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--min-s", type=float, default=0.5, help="seconds each measurement runs at least")
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    register_resolvers()
    with initialize_config_dir(config_dir=config_dir(), **version_base()):
        cfg = compose(config_name="config", overrides=DEFAULTS + overrides)
    device = resolve_device(cfg.trainer.device)
    amp = autocast_dtype(cfg.trainer.precision, device)
    torch.manual_seed(0)
    arch = arch_from_config(OmegaConf.to_container(cfg.model, resolve=True))
    dense = checkpoint.load_model(cfg.ckpt_path)[0] if cfg.ckpt_path else build_from_arch(arch)
    models = variants(dense.to(device).eval(), typed(cfg).task)
    figures = speeds(
        models, args.batches, compiled=not args.no_compile, repeats=args.repeats, amp=amp, min_s=args.min_s
    )
    rows = report(models, figures)
    print_table(rows)
    print(
        json.dumps(
            {
                "ratio": cfg.task.ratio,
                "round_to": cfg.task.round_to,
                "device": str(device),
                "precision": precision_name(amp),
                "threads": torch.get_num_threads(),
                "rows": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
