"""`python -m vitexp.report <sweep folder or run folders>`: one table of the runs, and plots that compare them.

Reads what the runs left behind (results.json, metrics.csv, .hydra/overrides.yaml), so it works offline, on
finished, failed and still-running runs, and on train, distill, prune and evaluate runs alike. Runs whose overrides
differ only in `seed` (or the keys `--by` names) are one row: the mean, standard deviation and n of each figure.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from vitexp.records import read_metrics

COLUMNS = ["run", "task", "model", "overrides", "status", "best_val_acc1", "epochs", "params", "macs",
           "train_img_per_s", "infer_img_per_s", "wall_s", "n"]  # fmt: skip
# the figures a row of several runs gives as mean, standard deviation and n
FIGURES = ["best_val_acc1", "epochs", "params", "macs", "train_img_per_s", "infer_img_per_s", "wall_s"]


def find_runs(paths: list[Path]) -> list[Path]:
    """Every run folder under `paths` (a folder with results.json or metrics.csv), in natural order."""
    found = set()
    for path in paths:
        for name in ("results.json", "metrics.csv"):
            found |= {f.parent for f in Path(path).rglob(name) if "wandb" not in f.relative_to(path).parts}
    return sorted(found, key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(p))])


def _job(run: Path, root: Path) -> tuple[list[str], str]:
    """The overrides of the job `run` belongs to (its own, or, for a sub-run such as a distill job's teacher/, its
    job's) and its path inside that job ("." for the job itself)."""
    for folder in (run, *run.parents):
        if (folder / ".hydra" / "overrides.yaml").is_file():
            return yaml.safe_load((folder / ".hydra" / "overrides.yaml").read_text()) or [], str(
                run.relative_to(folder)
            )
        if folder == root:
            break
    return [], "."


def summarize(run: Path, root: Path) -> dict[str, Any]:
    """One row: what the run was (task, model, overrides) and what it reached."""
    results = json.loads((run / "results.json").read_text()) if (run / "results.json").is_file() else {}
    rows = read_metrics(run / "metrics.csv") if (run / "metrics.csv").is_file() else []
    overrides_file = run / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
    job_overrides, part = _job(run, root)
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
        "job_overrides": [o for o in job_overrides if not o.startswith("hydra.")],
        "part": part,
    }


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _stats(values: list[float]) -> tuple[float | None, float | None, int]:
    """Mean, sample standard deviation (None for one value) and n."""
    if not values:
        return None, None, 0
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None, len(values)


def _mean_curve(curves: list[list[tuple[float, float]]]) -> list[tuple[float, float, float | None]]:
    """(epoch, mean, std) of the runs' val accuracy at each epoch that any of them reached."""
    by_epoch: dict[float, list[float]] = {}
    for curve in curves:
        for epoch, acc in curve:
            by_epoch.setdefault(epoch, []).append(acc)
    return [(epoch, *_stats(accs)[:2]) for epoch, accs in sorted(by_epoch.items())]


def _group_overrides(overrides: list[list[str]], by: tuple[str, ...]) -> str:
    """The overrides a group of runs shares, then the values it takes of the keys `by`, in sweep syntax (seed=0,1,2)."""
    varied: dict[str, list[str]] = {}
    for own in overrides:
        for o in own:
            if _key(o) in by and o.split("=", 1)[1] not in varied.setdefault(_key(o), []):
                varied[_key(o)].append(o.split("=", 1)[1])
    kept = [o for o in overrides[0] if _key(o) not in by]
    return " ".join(kept + [f"{k}={','.join(v)}" for k, v in varied.items()])


def aggregate(runs: list[dict[str, Any]], by: tuple[str, ...] = ("seed",)) -> list[dict[str, Any]]:
    """One row per group of runs whose overrides differ only in the keys `by` (same task, model and sub-run): each
    figure's mean (under its own name), `<figure>_std` and `<figure>_n`, over the group's completed runs (over all
    of them while none has completed). No keys: one row per run."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in runs:
        rest = tuple(sorted(o for o in r["job_overrides"] if _key(o) not in by))
        named = tuple(r[k] for k in ("task", "model") if k not in by)  # a sweep over task or model may be pooled too
        key = (r["part"], rest, *named) if by else (r["run"],)
        groups.setdefault(key, []).append(r)
    rows = []
    for members in groups.values():
        counted = [r for r in members if r["status"] == "completed"] or members
        row = {**members[0], "run": ",".join(r["run"] for r in members), "n": len(members)}
        row |= {k: ",".join(dict.fromkeys(r[k] for r in members)) for k in ("task", "model")}
        row["overrides"] = _group_overrides([r["overrides"].split() for r in members], by)
        statuses = Counter(r["status"] for r in members)
        row["status"] = ", ".join(f"{c} {s}" if len(members) > 1 else s for s, c in statuses.items())
        row["error"] = next((r["error"] for r in members if r["error"]), None)
        for figure in FIGURES:
            values = [r[figure] for r in counted if isinstance(r[figure], (int, float))]
            row[figure], row[f"{figure}_std"], row[f"{figure}_n"] = _stats(values)
        row["curves"] = [r["curve"] for r in counted]
        row["curve"] = _mean_curve(row["curves"])
        rows.append(row)
    return rows


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


def _figure(row: dict[str, Any], key: str) -> str:
    """A cell: the value, or for a row of several runs the mean ± standard deviation (accuracy in percentage points),
    with its n when fewer runs than the row's have the figure."""
    text, std, n = _cell(key, row[key]), row.get(f"{key}_std"), row.get(f"{key}_n")
    if std:
        text += f" ± {100 * std:.2f}" if key == "best_val_acc1" else f" ± {_cell(key, std)}"
    return text + (f" (n={n})" if n is not None and 0 < n < row["n"] else "")


def markdown(rows: list[dict[str, Any]]) -> str:
    """The table as Markdown, best accuracy first."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    cells = [[_figure(r, k) if k in FIGURES else _cell(k, r[k]) for k in COLUMNS] for r in rows]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
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
    """val accuracy vs epoch for every row, and accuracy vs MACs with the Pareto front; a row of several runs shows
    its mean with a band (curves) or error bar (MACs) of one standard deviation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        if r["curve"]:
            epochs, means, stds = zip(*r["curve"])
            (line,) = ax.plot(epochs, means, marker=".", label=_label(r)[:70])
            if any(stds):  # the spread of a row of several runs: mean ± one standard deviation
                low, high = zip(*[(m - (s or 0), m + (s or 0)) for m, s in zip(means, stds)])
                ax.fill_between(epochs, low, high, color=line.get_color(), alpha=0.2)
    ax.set(xlabel="epoch", ylabel="val top-1 (band: ± 1 std over a row's runs)", title="validation accuracy",
           ylim=(0, 1))  # fmt: skip
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
        ax.errorbar(r["macs"] / 1e6, r["best_val_acc1"], yerr=r["best_val_acc1_std"], fmt="o", markersize=5, capsize=4)
        # alternate above/below so that runs at the same MACs stay readable
        ax.annotate(f"{r['run']}: {r['model']}", (r["macs"] / 1e6, r["best_val_acc1"]), fontsize=7,
                    textcoords="offset points", xytext=(6, 4 if i % 2 else -10))  # fmt: skip
    front = pareto_front([(r["macs"] / 1e6, r["best_val_acc1"]) for r in scored])
    if front:
        ax.step(*zip(*front), where="post", color="black", alpha=0.5, marker="o", markersize=11,
                markerfacecolor="none", label="Pareto front")  # fmt: skip
        ax.legend(fontsize=8, loc="best")
    ax.set(
        xlabel="MMACs per image", ylabel="best val top-1 (bar: ± 1 std over a row's runs)", title="accuracy vs compute"
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    written.append(out / "report_acc_vs_macs.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)
    return written


def report(paths: list[Path], out: Path | None = None, by: tuple[str, ...] = ("seed",)) -> tuple[str, list[Path]]:
    """Summarise the runs under `paths`, those that differ only in the keys `by` as one row: Markdown table
    (returned), report.csv and PNGs in `out`."""
    runs = find_runs(paths)
    if not runs:
        raise SystemExit(f"error: no run folders (with results.json or metrics.csv) under {' '.join(map(str, paths))}")
    root = Path(os.path.commonpath([p.resolve() for p in paths]))
    out = out or root
    out.mkdir(parents=True, exist_ok=True)
    rows = aggregate([summarize(run.resolve(), root) for run in runs], by)
    # Overrides every job shares (the sweep's fixed settings) are said once, above the table.
    own = [set(r["overrides"].split()) for r in rows if r["overrides"]]
    common = set.intersection(*own) if len(own) > 1 else set()
    for r in rows:
        r["overrides"] = " ".join(o for o in r["overrides"].split() if o not in common)
    rows.sort(key=lambda r: -(r["best_val_acc1"] if r["best_val_acc1"] is not None else -1))
    with (out / "report.csv").open("w", newline="") as f:
        spread = [f"{figure}_{what}" for figure in FIGURES for what in ("std", "n")]
        writer = csv.DictWriter(f, fieldnames=[*COLUMNS, *spread, "error"], extrasaction="ignore")
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
    parser.add_argument("--by", default="seed", help="runs whose overrides differ only in these keys (comma-separated; "
                        "default: seed) are one row with mean, std and n of each figure; none: one row per run")  # fmt: skip
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.paths if not p.is_dir()]
    if missing:
        parser.exit(2, f"error: {', '.join(missing)}: no such folder; pass a sweep or run folder\n")
    by = () if args.by.strip().lower() == "none" else tuple(k.strip() for k in args.by.split(",") if k.strip())
    text, written = report(args.paths, args.out, by)
    print(text)
    print("wrote " + ", ".join(map(str, written)), file=sys.stderr)


if __name__ == "__main__":
    main()
