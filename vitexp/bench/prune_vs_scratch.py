"""Is pruning worth it? For one trained dense checkpoint and budgets of N epochs: prune (uniform and global) and
fine-tune N epochs, the same distilling the dense model, and the pruned shape trained from scratch for N epochs;
one table and one plot (accuracy vs budget, accuracy vs measured speed), the dense model as the reference.

    python -m vitexp.bench.prune_vs_scratch ckpt_path=<dense best.pt> --budgets 1,3,10 --out <folder>
    python -m vitexp.bench.prune_vs_scratch ckpt_path=<best.pt> data=cifar10 data.root=<dir> task.ratio=0.3

Overrides are Hydra overrides of the real config (task=prune is implied): `data.*`, `optim.*`, `trainer.*` and
`task.ratio`, `task.importance`, `task.round_to`, `task.rounds`, `task.alpha` apply to every arm, and must match
the data the checkpoint was trained on. Each arm is the task layer's own code (prune_checkpoint, finetune_recipe,
fit, train_in) in a folder of its own under `--out`; a finished arm is read back, not rerun. Speed is measured
once per shape, dense and pruned interleaved (vitexp.bench.prune_speed). Writes `table.md`, `results.json` and
`plots/prune_vs_scratch.png` in `--out` and prints the table.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from vitexp import VitexpError, checkpoint  # noqa: E402
from vitexp.bench.prune_speed import speeds  # noqa: E402
from vitexp.config import config_dir, register_resolvers, validate, version_base  # noqa: E402
from vitexp.data import make_loader  # noqa: E402
from vitexp.hardware import seed_everything  # noqa: E402
from vitexp.records import completed  # noqa: E402
from vitexp.schema import Prune, choices  # noqa: E402
from vitexp.tasks.prune import finetune_recipe, measure_stage, prune_checkpoint  # noqa: E402
from vitexp.tasks.recipe import read_recipe  # noqa: E402
from vitexp.training import Recipe, fit, train_in  # noqa: E402

log = logging.getLogger("vitexp")


def compare(
    cfg: DictConfig, budgets: Sequence[int], allocations: Sequence[str], out: Path, *, distill: bool, compiled: bool
) -> list[dict[str, Any]]:
    """Run every arm for every budget in `out`; returns one row per (method, allocation, budget), dense first."""
    task, source = cfg.task, cfg.ckpt_path
    recipe = read_recipe(cfg)
    val = make_loader(
        recipe.splits.val, recipe.settings.data.eval_batch_size, recipe.settings.data.num_workers, train=False
    )
    measure = functools.partial(measure_stage, recipe, val)
    shapes, rows = {}, []
    for allocation in allocations:
        folder = out / f"pruned_{allocation}"
        seed_everything(cfg.seed)
        pruning = replace(recipe.settings.task, allocation=allocation)
        figures, _ = prune_checkpoint(recipe, source, pruning, measure, folder)
        shapes[allocation] = folder / "checkpoints" / "pruned.pt"
        rows.append(_row("pruned, no training", allocation, 0, figures["pruned_val_acc1"], figures["pruned_macs"]))
    rows.insert(0, _row("dense", "-", 0, figures["before_val_acc1"], figures["before_macs"]))
    for epochs in budgets:
        for allocation, pruned in shapes.items():
            for method, teacher in (("prune + fine-tune", None), ("prune + KD", source))[: 2 if distill else 1]:
                tune = finetune_recipe(recipe, pruned, epochs, teacher, task.alpha)
                kind = "kd" if teacher else "ft"
                rows.append(_arm(tune, out / f"{allocation}_{kind}_{epochs}ep", method, allocation, epochs))
        scratch = checkpoint.load_arch(shapes[allocations[0]])
        best = train_in(recipe, out / f"scratch_{allocations[0]}_{epochs}ep", scratch, epochs)
        rows.append(_row("scratch", allocations[0], epochs, *_read(best.parent.parent)))
    _add_speed(
        rows,
        {"dense": checkpoint.load_model(source)[0], **{a: checkpoint.load_model(p)[0] for a, p in shapes.items()}},
        recipe,
        compiled=compiled,
    )
    return rows


def _arm(tune: Recipe, folder: Path, method: str, allocation: str, epochs: int) -> dict[str, Any]:
    """One fine-tuning arm, run with the task layer's `fit` (or read back when `folder` finished earlier)."""
    if not completed(folder):
        log.info(f"{method} ({allocation}), {epochs} epochs in {folder}")
        fit(tune, folder)
    return _row(method, allocation, epochs, *_read(folder))


def _read(folder: Path) -> tuple[float, int]:
    results = json.loads((folder / "results.json").read_text())
    return results["val_acc1"], results["macs"]


def _row(method: str, allocation: str, epochs: int, acc: float, macs: int) -> dict[str, Any]:
    return {"method": method, "allocation": allocation, "epochs": epochs, "val_acc1": acc, "macs": macs}


def _add_speed(rows: list[dict[str, Any]], models: dict[str, Any], recipe: Recipe, *, compiled: bool) -> None:
    """Images/s at batch 256 and latency at batch 1 of every shape (eager, and compiled when asked), interleaved."""
    device = recipe.machine.device
    figures = speeds(
        {k: m.to(device) for k, m in models.items()}, (1, 256), compiled=compiled, repeats=3, amp=recipe.machine.amp
    )
    for row in rows:
        shape = figures["dense" if row["method"] == "dense" else row["allocation"]]
        for key, value in shape.items():
            if key.endswith("_b1"):
                row[f"latency_ms_{key.removesuffix('_b1')}"] = round(1000 / value, 3)
            else:
                row[f"img_per_s_{key}"] = round(value, 1)
        row["speedup_eager_b256"] = round(shape["eager_b256"] / figures["dense"]["eager_b256"], 3)


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as Markdown: accuracy, MACs, measured speed (eager, and compiled when measured)."""
    speed_keys = [k for k in rows[0] if k.startswith(("img_per_s_", "latency_ms_"))]
    head = ["method", "allocation", "epochs", "val top-1", "MACs (M)", *speed_keys, "speed-up b256"]
    lines = ["| " + " | ".join(head) + " |", "| --- " * len(head) + "|"]
    for r in rows:
        cells = [
            r["method"],
            r["allocation"],
            str(r["epochs"]),
            f"{r['val_acc1']:.2%}",
            f"{r['macs'] / 1e6:.1f}",
            *(f"{r[k]:g}" for k in speed_keys),
            f"{r['speedup_eager_b256']:.2f}x",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Accuracy against budget (epochs) and against measured images/s at batch 256, dense as the reference."""
    dense = rows[0]
    fig, (by_budget, by_speed) = plt.subplots(1, 2, figsize=(13, 4.5))
    arms = sorted({(r["method"], r["allocation"]) for r in rows if r["epochs"] > 0})
    for method, allocation in arms:
        points = sorted(
            (r["epochs"], r["val_acc1"], r["img_per_s_eager_b256"])
            for r in rows
            if (r["method"], r["allocation"]) == (method, allocation) and r["epochs"] > 0
        )
        label = f"{method} ({allocation})"
        by_budget.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        by_speed.scatter([p[2] for p in points], [p[1] for p in points], label=label)
        for epochs, acc, speed in points:
            by_speed.annotate(f"{epochs}", (speed, acc), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for ax in (by_budget, by_speed):
        ax.axhline(dense["val_acc1"], color="black", linestyle="--", label="dense")
        ax.grid(alpha=0.3)
    by_speed.scatter([dense["img_per_s_eager_b256"]], [dense["val_acc1"]], color="black", marker="*", s=120)
    by_budget.set(xscale="log", xlabel="budget (epochs)", ylabel="val top-1", title="accuracy vs budget")
    by_speed.set(
        xlabel="images/s at batch 256 (eager, measured)",
        ylabel="val top-1",
        title="accuracy vs measured speed (labels: epochs)",
    )
    by_budget.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def _allocations(text: str) -> list[str]:
    names = text.split(",")
    if not set(names) <= set(allocations := choices(Prune, "allocation")):
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(allocations)}")
    return names


def main(argv: Sequence[str] | None = None) -> None:
    """Run every arm and write the table, results.json and the plot."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=_ints, default=[1, 3, 10], help="epochs, comma-separated")
    parser.add_argument("--allocations", type=_allocations, default=["uniform", "global"], help="comma-separated")
    parser.add_argument("--out", type=Path, default=Path("outputs/prune_vs_scratch"))
    parser.add_argument("--no-distill", action="store_true", help="leave out the prune + KD arms")
    parser.add_argument("--compile", action="store_true", help="also measure speed under torch.compile")
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(levelname)s] %(message)s")
    register_resolvers()
    with initialize_config_dir(config_dir=config_dir(), **version_base()):
        cfg = compose(config_name="config", overrides=["task=prune", "logger=none", *overrides])
    validate(cfg)
    if not cfg.ckpt_path:
        raise VitexpError("prune_vs_scratch needs ckpt_path=<a trained dense best.pt>; train one with python -m vitexp")
    rows = compare(cfg, args.budgets, args.allocations, args.out, distill=not args.no_distill, compiled=args.compile)
    text = table(rows)
    (args.out / "table.md").write_text(text + "\n")
    (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot(
        rows,
        args.out / "plots" / "prune_vs_scratch.png",
        f"{cfg.data.name}: prune ratio {cfg.task.ratio} ({cfg.task.importance}) vs scratch",
    )
    print(text)


if __name__ == "__main__":
    try:
        main()
    except VitexpError as error:
        sys.exit(f"error: {error}")
