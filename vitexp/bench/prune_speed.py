"""Measured inference speed of a pruned ViT against the unpruned one, interleaved in one process.

    python -m vitexp.bench.prune_speed                       # baseline at CIFAR size, task.ratio=0.5
    python -m vitexp.bench.prune_speed task.ratio=0.3 model=patch8

Overrides are Hydra overrides of the real config (task=prune is implied). Weights are random: speed does
not depend on them. Prints one JSON line.
"""

from __future__ import annotations

import copy
import json
import sys

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from vitexp.config import config_dir
from vitexp.models import count_macs, count_params, inference_img_per_s
from vitexp.pruning import layout_of, prune

DEFAULTS = ["task=prune", "data=cifar10"]


def main() -> None:
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=DEFAULTS + sys.argv[1:])
    torch.manual_seed(0)
    dense = instantiate(cfg.model).eval()
    pruned = copy.deepcopy(dense)
    prune(pruned, cfg.task.ratio, "magnitude", torch.zeros(1, cfg.data.in_chans, cfg.data.img_size, cfg.data.img_size))
    best = {name: {"batch": 0.0, "single": 0.0} for name in ("dense", "pruned")}
    for _ in range(3):  # interleaved rounds, best of each: noise hits both alike
        for name, model in (("dense", dense), ("pruned", pruned)):
            best[name]["batch"] = max(best[name]["batch"], inference_img_per_s(model, 256, iters=3))
            best[name]["single"] = max(best[name]["single"], inference_img_per_s(model, 1, iters=30))
    print(json.dumps({
        "model": cfg.model.name, "ratio": cfg.task.ratio, "layout": layout_of(pruned)[0],
        "params_dense": count_params(dense), "params_pruned": count_params(pruned),
        "macs_dense": count_macs(dense), "macs_pruned": count_macs(pruned),
        "img_per_s_b256_dense": round(best["dense"]["batch"], 1), "img_per_s_b256_pruned": round(best["pruned"]["batch"], 1),
        "speedup_b256": round(best["pruned"]["batch"] / best["dense"]["batch"], 3),
        "latency_ms_b1_dense": round(1000 / best["dense"]["single"], 2),
        "latency_ms_b1_pruned": round(1000 / best["pruned"]["single"], 2),
        "latency_ratio_b1": round(best["dense"]["single"] / best["pruned"]["single"], 3),
        "device": "cpu", "threads": torch.get_num_threads(),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
