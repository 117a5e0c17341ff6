"""`python -m vitexp.report <sweep folder or run folders>`: one table of every run, and plots that compare them.

Reads what the runs left behind (results.json, metrics.csv, .hydra/overrides.yaml), so it works offline, on
finished, failed and still-running runs, and on train, distill, prune and evaluate runs alike.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from vitexp.records import read_metrics

COLUMNS = ["run", "task", "model", "overrides", "status", "best_val_acc1", "epochs", "params", "macs",
           "train_img_per_s", "infer_img_per_s", "wall_s"]  # fmt: skip


def find_runs(paths: list[Path]) -> list[Path]:
    """Every run folder under `paths` (a folder with results.json or metrics.csv), in natural order."""
    found = set()
    for path in paths:
        for name in ("results.json", "metrics.csv"):
            found |= {f.parent for f in Path(path).rglob(name) if "wandb" not in f.relative_to(path).parts}
    return sorted(found, key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(p))])


def summarize(run: Path, root: Path) -> dict[str, Any]:
    """One row: what the run was (task, model, overrides) and what it reached."""
    results = json.loads((run / "results.json").read_text()) if (run / "results.json").is_file() else {}
    rows = read_metrics(run / "metrics.csv") if (run / "metrics.csv").is_file() else []
    overrides_file = run / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
    config_file = run / ".hydra" / "config.yaml"
    config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
    accs = [r["val/acc1"] for r in rows if "val/acc1" in r]
    best = results.get("best_val_acc1", results.get("test_acc1", results.get("pruned_val_acc1")))
    return {
        "run": str(run.relative_to(root)) if run != root else run.name,
        "task": results.get("task", config.get("task", {}).get("name", "?")),
        "model": results.get("model", config.get("model", {}).get("name", "?")),
        "overrides": " ".join(o for o in overrides or [] if not o.startswith("hydra.")),
        # a run without results.json is still going, or was stopped (resume= continues it)
        "status": results.get("status", "running or stopped"),
        "best_val_acc1": best if best is not None else (max(accs) if accs else None),
        "epochs": int(rows[-1]["epoch"]) if rows else results.get("epochs"),
        "params": results.get("params", results.get("pruned_params")),
        "macs": results.get("macs", results.get("pruned_macs")),
        "train_img_per_s": results.get("train_img_per_s", rows[-1].get("throughput/img_s") if rows else None),
        "infer_img_per_s": results.get("infer_img_per_s", results.get("pruned_infer_img_per_s")),
        "wall_s": results.get("wall_s", sum(r.get("time/epoch_s", 0) for r in rows) or None),
        "error": results.get("error"),
        "curve": [(r["epoch"], r["val/acc1"]) for r in rows if "val/acc1" in r],
    }


def _cell(key: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if key == "best_val_acc1":
        return f"{100 * value:.2f}%"
    if key == "params":
        return f"{value / 1e6:.2f}M"
    if key == "macs":
        return f"{value / 1e6:.1f}M"
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 10 else f"{value:.2g}"
    return str(value)


def markdown(rows: list[dict[str, Any]]) -> str:
    """The table as Markdown, best accuracy first."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(k, r[k]).replace("|", "\\|") for k in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points that no other point beats on both fewer MACs and higher accuracy, by increasing MACs."""
    front, best = [], -math.inf
    for macs, acc in sorted(points, key=lambda p: (p[0], -p[1])):
        if acc > best:
            front.append((macs, acc))
            best = acc
    return front


def _label(row: dict[str, Any]) -> str:
    return f"{row['run']}: {row['task']} {row['overrides'] or row['model']}"


def plot(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """val accuracy vs epoch for every run, and accuracy vs MACs with the Pareto front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        if r["curve"]:
            ax.plot(*zip(*r["curve"]), marker=".", label=_label(r)[:70])
    ax.set(xlabel="epoch", ylabel="val top-1", title="validation accuracy", ylim=(0, 1))
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    written.append(out / "report_val_acc.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)

    scored = [r for r in rows if r["macs"] and r["best_val_acc1"] is not None]
    fig, ax = plt.subplots(figsize=(7, 5))
    for i, r in enumerate(sorted(scored, key=lambda r: (r["macs"], r["best_val_acc1"]))):
        ax.scatter(r["macs"] / 1e6, r["best_val_acc1"], s=30)
        # alternate above/below so that runs at the same MACs stay readable
        ax.annotate(f"{r['run']}: {r['model']}", (r["macs"] / 1e6, r["best_val_acc1"]), fontsize=7,
                    textcoords="offset points", xytext=(6, 4 if i % 2 else -10))  # fmt: skip
    front = pareto_front([(r["macs"] / 1e6, r["best_val_acc1"]) for r in scored])
    if front:
        ax.step(*zip(*front), where="post", color="black", alpha=0.5, marker="o", markersize=11,
                markerfacecolor="none", label="Pareto front")  # fmt: skip
        ax.legend(fontsize=8, loc="best")
    ax.set(xlabel="MMACs per image", ylabel="best val top-1", title="accuracy vs compute")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    written.append(out / "report_acc_vs_macs.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)
    return written


def report(paths: list[Path], out: Path | None = None) -> tuple[str, list[Path]]:
    """Summarise the runs under `paths`: Markdown table (returned), report.csv and PNGs in `out`."""
    runs = find_runs(paths)
    if not runs:
        raise SystemExit(f"error: no run folders (with results.json or metrics.csv) under {' '.join(map(str, paths))}")
    root = Path(os.path.commonpath([p.resolve() for p in paths]))
    out = out or root
    out.mkdir(parents=True, exist_ok=True)
    rows = [summarize(run.resolve(), root) for run in runs]
    # Overrides every job shares (the sweep's fixed settings) are said once, above the table.
    own = [set(r["overrides"].split()) for r in rows if r["overrides"]]
    common = set.intersection(*own) if len(own) > 1 else set()
    for r in rows:
        r["overrides"] = " ".join(o for o in r["overrides"].split() if o not in common)
    rows.sort(key=lambda r: -(r["best_val_acc1"] if r["best_val_acc1"] is not None else -1))
    with (out / "report.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*COLUMNS, "error"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    text = (f"all runs: {' '.join(sorted(common))}\n\n" if common else "") + markdown(rows)
    search = root / "optimization_results.yaml"
    if search.is_file():
        best = yaml.safe_load(search.read_text())
        text += f"\n\nbest trial ({search.name}): {best.get('best_value')} with {best.get('best_params')}"
    return text, [out / "report.csv", *plot(rows, out)]


def main(argv: list[str] | None = None) -> None:
    """Console entry point (`python -m vitexp.report`)."""
    parser = argparse.ArgumentParser(prog="python -m vitexp.report", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="a sweep folder (multirun_outputs/<time>) or run folders")
    parser.add_argument("--out", type=Path, help="where report.csv and the PNGs go (default: the common folder)")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.paths if not p.is_dir()]
    if missing:
        parser.exit(2, f"error: {', '.join(missing)}: no such folder; pass a sweep or run folder\n")
    text, written = report(args.paths, args.out)
    print(text)
    print("wrote " + ", ".join(map(str, written)), file=sys.stderr)


if __name__ == "__main__":
    main()
