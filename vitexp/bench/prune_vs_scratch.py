"""Is pruning worth it? For one trained dense checkpoint and budgets of N epochs: prune (uniform and global) and
fine-tune N epochs, the same distilling the dense model, and the pruned shape trained from scratch for N epochs,
every arm for `--seeds` seeds; one table and one plot (mean ± std over seeds: accuracy vs budget, accuracy vs
measured speed), the dense model as the reference. `--target_model` adds the dense model pruned to a smaller
model's MACs (by global allocation when it is among `--allocations`) and fine-tuned N epochs, against that model
trained from scratch for the dense run's epochs + N.

    python -m vitexp.bench.prune_vs_scratch ckpt_path=<dense best.pt> --budgets 1,3,10 --out <folder>
    python -m vitexp.bench.prune_vs_scratch ckpt_path=<best.pt> data=cifar10 data.root=<dir> task.ratio=0.3
    python -m vitexp.bench.prune_vs_scratch ckpt_path=<vit_tiny best.pt> model=vit_tiny --target_model baseline

Overrides are Hydra overrides of the real config (task=prune is implied): `data.*`, `optim.*`, `trainer.*` and
`task.ratio`, `task.importance`, `task.round_to`, `task.rounds`, `task.alpha` apply to every arm, and must match
the data the checkpoint was trained on. Each arm is the task layer's own code (prune_checkpoint, finetune_recipe,
fit, train_in) in a folder of its own under `--out`; a finished arm is read back, not rerun. Speed is measured
once per shape, dense and pruned interleaved (vitexp.bench.prune_speed). Writes `table.md`, `results.json` and
`plots/prune_vs_scratch.png` in `--out` and prints the table; the arms of seed N lie in `--out`/seed<N>.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import statistics
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from torch import nn  # noqa: E402

from vitexp import VitexpError, checkpoint  # noqa: E402
from vitexp.bench.prune_speed import speeds  # noqa: E402
from vitexp.config import config_dir, register_resolvers, validate, version_base  # noqa: E402
from vitexp.data import make_loader  # noqa: E402
from vitexp.hardware import seed_everything  # noqa: E402
from vitexp.models import Arch, arch_from_config, build_from_arch, count_macs  # noqa: E402
from vitexp.pruning import apply_layout, layout_of, uniform_layout  # noqa: E402
from vitexp.records import completed  # noqa: E402
from vitexp.schema import Prune, choices  # noqa: E402
from vitexp.tasks.prune import finetune_recipe, measure_stage, prune_checkpoint  # noqa: E402
from vitexp.tasks.recipe import read_recipe  # noqa: E402
from vitexp.training import Recipe, fit, train_in  # noqa: E402

log = logging.getLogger("vitexp")


def compare(
    cfg: DictConfig,
    budgets: Sequence[int],
    allocations: Sequence[str],
    out: Path,
    *,
    distill: bool,
    compiled: bool,
    seeds: Sequence[int] = (0,),
    target: Arch | None = None,
) -> list[dict[str, Any]]:
    """Run every arm for every budget and seed in `out/seed<N>`; returns one row per (method, allocation, budget,
    seed), dense first. `target`: a smaller model's arch, for the wide-pruned-to-its-MACs arm against it from
    scratch. The validation split is the checkpoint's (`cfg.seed`); each seed reruns pruning and training."""
    recipe, source = read_recipe(cfg), cfg.ckpt_path
    val = make_loader(
        recipe.splits.val, recipe.settings.data.eval_batch_size, recipe.settings.data.num_workers, train=False
    )
    measure = functools.partial(measure_stage, recipe, val)
    rows, models = [], {"dense": checkpoint.load_model(source)[0]}
    for seed in seeds:
        seeded = replace(recipe, settings=replace(recipe.settings, seed=seed))
        arms, shapes = _seed_arms(seeded, source, budgets, allocations, out / f"seed{seed}", measure, distill=distill)
        if target is not None:
            more, timed = _target_arms(
                seeded, source, target, _wide(allocations), budgets, out / f"seed{seed}", measure
            )
            arms, shapes = arms + more, shapes | timed
        rows += [{**row, "seed": seed} for row in arms]
        # speed depends on the shape only: the first seed's shapes are timed
        models |= {k: checkpoint.load_model(p)[0] for k, p in shapes.items() if k not in models}
    _add_speed(rows, models, recipe, compiled=compiled)
    return rows


def _wide(allocations: Sequence[str]) -> str:
    """The allocation that prunes the wide model to the target's MACs: global (docs/pruning.md's choice when the
    pruned model is fine-tuned) when it is among `allocations`, else the first."""
    return "global" if "global" in allocations else allocations[0]


def _seed_arms(
    recipe: Recipe,
    source: str,
    budgets: Sequence[int],
    allocations: Sequence[str],
    out: Path,
    measure: Any,
    *,
    distill: bool,
) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    """Every arm of one seed (the recipe's): rows, and each allocation's pruned.pt."""
    task, shapes, rows = recipe.settings.task, {}, []
    for allocation in allocations:
        folder = out / f"pruned_{allocation}"
        seed_everything(recipe.settings.seed)
        figures, _ = prune_checkpoint(recipe, source, replace(task, allocation=allocation), measure, folder)
        shapes[allocation] = folder / "checkpoints" / "pruned.pt"
        rows.append(_row("pruned, no training", allocation, 0, figures["pruned_val_acc1"], figures["pruned_macs"]))
    rows.insert(0, _row("dense", "-", 0, figures["before_val_acc1"], figures["before_macs"], shape="dense"))
    for epochs in budgets:
        for allocation, pruned in shapes.items():
            for method, teacher in (("prune + fine-tune", None), ("prune + KD", source))[: 2 if distill else 1]:
                tune = finetune_recipe(recipe, pruned, epochs, teacher, task.alpha)
                kind = "kd" if teacher else "ft"
                rows.append(_arm(tune, out / f"{allocation}_{kind}_{epochs}ep", method, allocation, epochs))
        scratch = checkpoint.load_arch(shapes[allocations[0]])
        best = train_in(recipe, out / f"scratch_{allocations[0]}_{epochs}ep", scratch, epochs)
        rows.append(_row("scratch", allocations[0], epochs, *_read(best.parent.parent)))
    return rows, shapes


def _target_arms(
    recipe: Recipe,
    source: str,
    target: Arch,
    allocation: str,
    budgets: Sequence[int],
    out: Path,
    measure: Any,
) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    """The dense model pruned (`allocation`) to the `target` model's MACs and fine-tuned N epochs, against the target
    trained from scratch for the dense model's epochs + N: the same total epochs. Rows, and the two shapes' files."""
    task, dense = recipe.settings.task, checkpoint.load(source)
    dense_epochs = dense[checkpoint.CONFIG]["trainer"]["max_epochs"]
    macs = count_macs(build_from_arch(target))
    ratio = ratio_for_macs(build_from_arch(checkpoint.load_arch(source)), macs, task.round_to)
    folder = out / "pruned_to_target"
    seed_everything(recipe.settings.seed)
    pruning = replace(task, ratio=ratio, allocation=allocation)
    figures, _ = prune_checkpoint(recipe, source, pruning, measure, folder)
    pruned, shape = folder / "checkpoints" / "pruned.pt", "pruned to target"
    acc, macs = figures["pruned_val_acc1"], figures["pruned_macs"]
    rows = [_row(f"wide pruned to target ({ratio:.3f})", allocation, 0, acc, macs, shape=shape)]
    for epochs in budgets:
        tune = finetune_recipe(recipe, pruned, epochs, None, task.alpha)
        row = _arm(tune, out / f"target_pruned_ft_{epochs}ep", "wide pruned to target + fine-tune", allocation, epochs)
        rows.append(row | {"shape": shape})
        total = dense_epochs + epochs
        best = train_in(recipe, out / f"target_scratch_{total}ep", target, total)
        rows.append(_row(f"target from scratch ({dense_epochs} + N epochs)", "-", epochs, *_read(best.parent.parent)))
        rows[-1]["shape"] = "target"
    return rows, {shape: pruned, "target": best}


def ratio_for_macs(model: nn.Module, macs: int, round_to: int) -> float:
    """The smallest uniform pruning ratio (to 1/1000) at which `model` has at most `macs` MACs per image."""
    depth, (heads, hidden) = len(model.blocks), layout_of(model)[0]

    def pruned_macs(ratio: float) -> int:
        return count_macs(apply_layout(copy.deepcopy(model), uniform_layout(depth, heads, hidden, ratio, round_to)))

    if pruned_macs(0.999) > macs:
        raise VitexpError(f"the checkpoint's model cannot be pruned to {macs / 1e6:.1f}M MACs; choose a larger target")
    low, high = 0, 999  # thousandths: pruned_macs(low) > macs >= pruned_macs(high)
    if pruned_macs(0.0) <= macs:
        return 0.0
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if pruned_macs(middle / 1000) <= macs else (middle, high)
    return high / 1000


def _arm(tune: Recipe, folder: Path, method: str, allocation: str, epochs: int) -> dict[str, Any]:
    """One fine-tuning arm, run with the task layer's `fit` (or read back when `folder` finished earlier)."""
    if not completed(folder):
        log.info(f"{method} ({allocation}), {epochs} epochs in {folder}")
        fit(tune, folder)
    return _row(method, allocation, epochs, *_read(folder))


def _read(folder: Path) -> tuple[float, int]:
    results = json.loads((folder / "results.json").read_text())
    return results["val_acc1"], results["macs"]


def _row(method: str, allocation: str, epochs: int, acc: float, macs: int, shape: str | None = None) -> dict[str, Any]:
    """One arm's figures; `shape`: the model whose speed applies (default: the allocation's pruned shape)."""
    row = {"method": method, "allocation": allocation, "epochs": epochs, "val_acc1": acc, "macs": macs}
    return row | {"shape": shape or allocation}


def _add_speed(rows: list[dict[str, Any]], models: dict[str, Any], recipe: Recipe, *, compiled: bool) -> None:
    """Images/s at batch 256 and latency at batch 1 of every shape (eager, and compiled when asked), interleaved."""
    device = recipe.machine.device
    figures = speeds(
        {k: m.to(device) for k, m in models.items()}, (1, 256), compiled=compiled, repeats=3, amp=recipe.machine.amp
    )
    for row in rows:
        shape = figures[row["shape"]]
        for key, value in shape.items():
            if key.endswith("_b1"):
                row[f"latency_ms_{key.removesuffix('_b1')}"] = round(1000 / value, 3)
            else:
                row[f"img_per_s_{key}"] = round(value, 1)
        row["speedup_eager_b256"] = round(shape["eager_b256"] / figures["dense"]["eager_b256"], 3)


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per arm (method, allocation, budget) in the order first met: val top-1 as the mean over its seeds,
    with `val_acc1_std` (sample standard deviation, 0 for one seed) and `n`; MACs and speeds from its first seed."""
    arms: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for row in rows:
        arms.setdefault((row["method"], row["allocation"], row["epochs"]), []).append(row)
    summary = []
    for runs in arms.values():
        accs = [r["val_acc1"] for r in runs]
        first = {k: v for k, v in runs[0].items() if k != "seed"}
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        summary.append(first | {"val_acc1": statistics.fmean(accs), "val_acc1_std": std, "n": len(accs)})
    return summary


def table(summary: list[dict[str, Any]]) -> str:
    """Aggregated rows as Markdown: val top-1 mean ± std over n seeds, MACs, measured speed (eager, and compiled
    when measured)."""
    speed_keys = [k for k in summary[0] if k.startswith(("img_per_s_", "latency_ms_"))]
    head = ["method", "allocation", "epochs", "val top-1 (mean ± std)", "n", "MACs (M)", *speed_keys, "speed-up b256"]
    lines = ["| " + " | ".join(head) + " |", "| --- " * len(head) + "|"]
    for r in summary:
        cells = [
            r["method"],
            r["allocation"],
            str(r["epochs"]),
            f"{r['val_acc1']:.2%} ± {r['val_acc1_std']:.2%}",
            str(r["n"]),
            f"{r['macs'] / 1e6:.1f}",
            *(f"{r[k]:g}" for k in speed_keys),
            f"{r['speedup_eager_b256']:.2f}x",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: list[dict[str, Any]], path: Path, title: str) -> None:
    """Accuracy (mean ± std over seeds) against budget (epochs) and against measured images/s at batch 256, dense
    as the reference."""
    dense = summary[0]
    fig, (by_budget, by_speed) = plt.subplots(1, 2, figsize=(13, 4.5))
    arms = list(dict.fromkeys((r["method"], r["allocation"]) for r in summary if r["epochs"] > 0))
    for method, allocation in arms:
        points = sorted(
            (r["epochs"], r["val_acc1"], r["val_acc1_std"], r["img_per_s_eager_b256"])
            for r in summary
            if (r["method"], r["allocation"]) == (method, allocation) and r["epochs"] > 0
        )
        label = f"{method} ({allocation})"
        epochs, acc, std, speed = ([p[i] for p in points] for i in range(4))
        by_budget.errorbar(epochs, acc, yerr=std, marker="o", capsize=3, label=label)
        by_speed.errorbar(speed, acc, yerr=std, fmt="o", capsize=3, label=label)
        for n, a, s in zip(epochs, acc, speed):
            by_speed.annotate(f"{n}", (s, a), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for ax in (by_budget, by_speed):
        ax.axhline(dense["val_acc1"], color="black", linestyle="--", label="dense")
        ax.grid(alpha=0.3)
    by_speed.scatter([dense["img_per_s_eager_b256"]], [dense["val_acc1"]], color="black", marker="*", s=120)
    by_budget.set(xscale="log", xlabel="budget (epochs)", ylabel="val top-1", title="accuracy vs budget (± std)")
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


def _compose(overrides: Sequence[str]) -> DictConfig:
    with initialize_config_dir(config_dir=config_dir(), **version_base()):
        cfg = compose(config_name="config", overrides=["task=prune", "logger=none", *overrides])
    validate(cfg)
    return cfg


def _target_arch(overrides: Sequence[str], target: str) -> Arch:
    """The arch of the model that `target` describes ("baseline", or overrides such as "model=baseline
    model.depth=4"), composed with the run's overrides other than the dense model's own."""
    own = [o.split() if "=" in o else [f"model={o}"] for o in [target]][0]
    keys = [o.lstrip("+~").split("=")[0] for o in overrides]
    others = [o for o, k in zip(overrides, keys) if k != "model" and not k.startswith("model.")]
    return arch_from_config(OmegaConf.to_container(_compose([*others, *own]).model, resolve=True))


def main(argv: Sequence[str] | None = None) -> None:
    """Run every arm for every seed and write the table (mean ± std), results.json and the plot."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=_ints, default=[1, 3, 10], help="epochs, comma-separated")
    parser.add_argument("--allocations", type=_allocations, default=["uniform", "global"], help="comma-separated")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per arm: seed, seed + 1, ...")
    parser.add_argument(
        "--target_model",
        help="a smaller model: a model option (baseline) or overrides ('model=baseline model.depth=4')",
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/prune_vs_scratch"))
    parser.add_argument("--no-distill", action="store_true", help="leave out the prune + KD arms")
    parser.add_argument("--compile", action="store_true", help="also measure speed under torch.compile")
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(levelname)s] %(message)s")
    if args.seeds < 1:
        raise VitexpError(f"--seeds {args.seeds} must be at least 1")
    register_resolvers()
    cfg = _compose(overrides)
    if not cfg.ckpt_path:
        raise VitexpError("prune_vs_scratch needs ckpt_path=<a trained dense best.pt>; train one with python -m vitexp")
    target = _target_arch(overrides, args.target_model) if args.target_model else None
    seeds = range(cfg.seed, cfg.seed + args.seeds)
    distill = not args.no_distill
    rows = compare(
        cfg,
        args.budgets,
        args.allocations,
        args.out,
        distill=distill,
        compiled=args.compile,
        seeds=seeds,
        target=target,
    )
    summary = aggregate(rows)
    text = table(summary)
    (args.out / "table.md").write_text(text + "\n")
    (args.out / "results.json").write_text(json.dumps({"summary": summary, "runs": rows}, indent=2) + "\n")
    title = f"{cfg.data.name}: prune ratio {cfg.task.ratio} ({cfg.task.importance}) vs scratch, {args.seeds} seed(s)"
    plot(summary, args.out / "plots" / "prune_vs_scratch.png", title)
    print(text)


if __name__ == "__main__":
    try:
        main()
    except VitexpError as error:
        sys.exit(f"error: {error}")
