"""`python -m vitexp.report <sweep folder or run folders>`: one table of the runs, and plots that compare them.

Reads what the runs left behind (results.json, metrics.csv, .hydra/overrides.yaml), so it works offline, on
finished, failed and still-running runs, and on train, distill, prune and evaluate runs alike. Runs whose overrides
differ only in `seed` (or the keys `--by` names) are one row: the mean, standard deviation and n of each figure.
The folders are data: files are read only inside them (no symlinks), a run folder with a file that is not what vitexp
writes there is left out with a warning, and names from the files are printed and plotted as plain text.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from vitexp import VitexpError, files
from vitexp.files import plot_text, printable
from vitexp.records import read_metrics

COLUMNS = [
    "run",
    "task",
    "model",
    "overrides",
    "status",
    "best_val_acc1",
    "epochs",
    "params",
    "macs",
    "train_img_per_s",
    "infer_img_per_s",
    "wall_s",
    "n",
]
# the figures a row of several runs gives as mean, standard deviation and n
FIGURES = ["best_val_acc1", "epochs", "params", "macs", "train_img_per_s", "infer_img_per_s", "wall_s"]
# what the report reads from results.json: figures (numbers, or null) and names (strings)
NUMBERS = {*FIGURES, "test_acc1", "pruned_val_acc1", "pruned_params", "pruned_macs", "pruned_infer_img_per_s"}
NAMES = {"task", "model", "status", "error"}
# what the report writes into its output folder
OUTPUTS = ["report.csv", "report_val_acc.png", "report_acc_vs_macs.png"]
# a cell of the table or of report.csv is cut only when absurdly long: these are the runs' own records
CELL_LIMIT = 100_000


class Unreadable(VitexpError):
    """A file of a run folder that is not what vitexp writes there ("<path> (<why>)"): the run is left out."""


def find_runs(paths: list[Path]) -> list[Path]:
    """Every run folder under `paths` (a folder with results.json or metrics.csv), in natural order; linked folders
    are not entered (they lead out of the folders given), nor W&B's own."""
    found = set()
    for path in paths:
        for top, folders, names in os.walk(path):  # os.walk lists a linked folder but never descends into it
            folders[:] = [f for f in folders if f != "wandb"]
            if "results.json" in names or "metrics.csv" in names:
                found.add(Path(top))
    return sorted(found, key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(p))])


def _present(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _parsed(path: Path, root: Path, kind: str) -> Any:
    """`path` parsed by the one reader (`files.read_json` or `read_yaml`: a regular file reached from `root` without a
    symlink, size and nesting bounded); `Unreadable` naming why when it is not, None when there is no file."""
    if not _present(path):
        return None
    if path.is_symlink():
        raise Unreadable(f"{printable(path)} (a symlink)")
    try:
        return (files.read_json if kind == "json" else files.read_yaml)(path, root)
    except VitexpError as e:
        raise _unreadable(path, e) from None
    except OSError as e:
        raise Unreadable(f"{printable(path)} ({e.strerror})") from None


def _unreadable(path: Path, error: VitexpError) -> Unreadable:
    """The reader's refusal of `path` as a reason to leave the run out."""
    return Unreadable(f"{printable(path)} ({files.reason(error, path)})")


def _number(value: Any, path: Path, key: str) -> int | float | None:
    """A figure of results.json: a number (None for null, NaN or infinity, as vitexp writes them)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Unreadable(f"{printable(path)} ({printable(key)} is not a number)")
    try:
        return value if math.isfinite(float(value)) else None
    except OverflowError:
        raise Unreadable(f"{printable(path)} ({printable(key)} is too large)") from None


def _results(path: Path, root: Path) -> dict[str, Any]:
    """results.json as one flat object whose figures are numbers and names strings ({} when there is none)."""
    results = _parsed(path, root, "json")
    if results is None:
        return {}
    if not isinstance(results, dict):
        raise Unreadable(f"{printable(path)} (not a JSON object)")
    for key in NUMBERS & results.keys():
        results[key] = _number(results[key], path, key)
    for key in NAMES & results.keys():
        if not isinstance(results[key], str) and not (key == "error" and results[key] is None):
            raise Unreadable(f"{printable(path)} ({key} is not a string)")
    return results


def _metrics(path: Path, root: Path) -> list[dict[str, float]]:
    """metrics.csv's rows of numbers, each with its epoch ([] when there is none)."""
    if not _present(path):
        return []
    if path.is_symlink():
        raise Unreadable(f"{printable(path)} (a symlink)")
    try:
        rows = read_metrics(path, root=root)
    except files.NotRegular as e:
        raise _unreadable(path, e) from None
    except (VitexpError, OSError):
        rows = None
    if rows is None or not all(math.isfinite(r.get("epoch", math.nan)) for r in rows):
        raise Unreadable(f"{printable(path)} (not a table of numbers with an epoch column)")
    return rows


def _yaml(path: Path, root: Path, kind: type) -> Any:
    """A YAML file read with the safe loader and checked to be a `kind` (None when there is none, or it is empty)."""
    value = _parsed(path, root, "yaml")
    if value is not None and not isinstance(value, kind):
        raise Unreadable(f"{printable(path)} (not a {'mapping' if kind is dict else 'list'})")
    return value


def _overrides(path: Path, root: Path) -> list[str] | None:
    """A .hydra/overrides.yaml: a list of strings (None when there is none)."""
    if not _present(path):
        return None
    overrides = _yaml(path, root, list) or []
    if not all(isinstance(o, str) for o in overrides):
        raise Unreadable(f"{printable(path)} (not a list of strings)")
    return overrides


def _names(path: Path, root: Path) -> dict[str, str]:
    """The task and model names in a .hydra/config.yaml ("?" where it has none)."""
    config = _yaml(path, root, dict) or {}
    names = {}
    for group in ("task", "model"):
        node = config.get(group) or {}
        names[group] = node.get("name", "?") if isinstance(node, dict) else None
        if not isinstance(names[group], str):
            raise Unreadable(f"{printable(path)} ({group}.name is not a string)")
    return names


def _job(run: Path, root: Path) -> tuple[list[str], str]:
    """The overrides of the job `run` belongs to (its own, or, for a sub-run such as a distill job's teacher/, its
    job's) and its path inside that job ("." for the job itself)."""
    for folder in (run, *run.parents):
        if not folder.is_relative_to(root):
            break
        overrides = _overrides(folder / ".hydra" / "overrides.yaml", root)
        if overrides is not None:
            return overrides, str(run.relative_to(folder))
    return [], "."


def summarize(run: Path, root: Path) -> dict[str, Any]:
    """One row: what the run was (task, model, overrides) and what it reached; `Unreadable` when a file of the run is
    not what vitexp writes there."""
    results = _results(run / "results.json", root)
    rows = _metrics(run / "metrics.csv", root)
    overrides = _overrides(run / ".hydra" / "overrides.yaml", root) or []
    job_overrides, part = _job(run, root)
    names = _names(run / ".hydra" / "config.yaml", root)
    curve = [(r["epoch"], r["val/acc1"]) for r in rows if math.isfinite(r.get("val/acc1", math.nan))]
    best = results.get("best_val_acc1", results.get("test_acc1", results.get("pruned_val_acc1")))
    return {
        "run": str(run.relative_to(root)) if run != root else run.name,
        "task": results.get("task", names["task"]),
        "model": results.get("model", names["model"]),
        "overrides": " ".join(o for o in overrides if not o.startswith("hydra.")),
        # a run without results.json is still going, or was stopped (resume= continues it)
        "status": results.get("status", "running or stopped"),
        "best_val_acc1": best if best is not None else (max(a for _, a in curve) if curve else None),
        "epochs": int(rows[-1]["epoch"]) if rows else results.get("epochs"),
        "params": results.get("params", results.get("pruned_params")),
        "macs": results.get("macs", results.get("pruned_macs")),
        "train_img_per_s": results.get("train_img_per_s", rows[-1].get("throughput/img_s") if rows else None),
        "infer_img_per_s": results.get("infer_img_per_s", results.get("pruned_infer_img_per_s")),
        "wall_s": results.get("wall_s", sum(r.get("time/epoch_s", 0) for r in rows) or None),
        "error": results.get("error"),
        "curve": curve,
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
            if _key(o) in by and o.partition("=")[2] not in varied.setdefault(_key(o), []):
                varied[_key(o)].append(o.partition("=")[2])
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
    return printable(value, CELL_LIMIT)  # names and overrides from the run folders: their control characters escaped


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
    return plot_text(f"{row['run']}: {row['task']} {row['overrides'] or row['model']}", limit=70)


# what a plot's axis shows: accuracies are fractions; MACs and epochs beyond this are not a model's (matplotlib cannot
# place ticks between -1e308 and 1e308): such a row is in the table and report.csv, not in the plots
MAX_AXIS = 1e18


def _fraction(value: Any) -> bool:
    return isinstance(value, (int, float)) and 0 <= value <= 1


def _plottable(row: dict[str, Any]) -> bool:
    """Whether `row` has a point on the accuracy-vs-MACs plot: an accuracy in [0, 1] and MACs in (0, MAX_AXIS)."""
    macs = row["macs"]
    return _fraction(row["best_val_acc1"]) and isinstance(macs, (int, float)) and 0 < macs < MAX_AXIS


def plot(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """val accuracy vs epoch for every row, and accuracy vs MACs with the Pareto front; a row of several runs shows
    its mean with a band (curves) or error bar (MACs) of one standard deviation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        curve = [(e, m, s if _fraction(s) else None) for e, m, s in r["curve"] if _fraction(m) and abs(e) < MAX_AXIS]
        if curve:
            epochs, means, stds = zip(*curve)
            (line,) = ax.plot(epochs, means, marker=".", label=_label(r))
            if any(stds):  # the spread of a row of several runs: mean ± one standard deviation
                low, high = zip(*[(m - (s or 0), m + (s or 0)) for m, s in zip(means, stds)])
                ax.fill_between(epochs, low, high, color=line.get_color(), alpha=0.2)
    ax.set(
        xlabel="epoch", ylabel="val top-1 (band: ± 1 std over a row's runs)", title="validation accuracy", ylim=(0, 1)
    )
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    written.append(files.save_figure(fig, out / "report_val_acc.png", out))
    plt.close(fig)

    scored = [r for r in rows if _plottable(r)]
    fig, ax = plt.subplots(figsize=(7, 5))
    for i, r in enumerate(sorted(scored, key=lambda r: (r["macs"], r["best_val_acc1"]))):
        std = r["best_val_acc1_std"] if _fraction(r["best_val_acc1_std"]) else None
        ax.errorbar(r["macs"] / 1e6, r["best_val_acc1"], yerr=std, fmt="o", markersize=5, capsize=4)
        # alternate above/below so that runs at the same MACs stay readable
        at, name = (r["macs"] / 1e6, r["best_val_acc1"]), plot_text(f"{r['run']}: {r['model']}", limit=70)
        ax.annotate(name, at, fontsize=7, textcoords="offset points", xytext=(6, 4 if i % 2 else -10))
    front = pareto_front([(r["macs"] / 1e6, r["best_val_acc1"]) for r in scored])
    if front:
        style = {"color": "black", "alpha": 0.5, "marker": "o", "markersize": 11, "markerfacecolor": "none"}
        ax.step(*zip(*front), where="post", label="Pareto front", **style)
        ax.legend(fontsize=8, loc="best")
    ax.set(
        xlabel="MMACs per image", ylabel="best val top-1 (bar: ± 1 std over a row's runs)", title="accuracy vs compute"
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    written.append(files.save_figure(fig, out / "report_acc_vs_macs.png", out))
    plt.close(fig)
    return written


def _summaries(runs: list[Path], root: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows of the readable runs, and "<path> (<why>)" for each run left out."""
    rows, skipped = [], []
    for run in runs:
        try:
            rows.append(summarize(run, root))
        except Unreadable as e:
            skipped.append(str(e))
    return rows, skipped


def _best_trial(root: Path) -> str:
    """The line on an Optuna search's best trial ("" when `root` holds no optimization_results.yaml, or an unreadable
    one, said on stderr)."""
    path = root / "optimization_results.yaml"
    try:
        best = _yaml(path, root, dict)
        if best is not None and not isinstance(best.get("best_params", {}), dict):
            raise Unreadable(f"{printable(path)} (best_params is not a mapping)")
    except Unreadable as e:
        print(f"warning: skipped {e}", file=sys.stderr)
        return ""
    if best is None:
        return ""
    value, params = printable(best.get("best_value")), printable(best.get("best_params"), CELL_LIMIT)
    return f"\n\nbest trial ({path.name}): {value} with {params}"


def _write_csv(rows: list[dict[str, Any]], path: Path, out: Path) -> Path:
    """report.csv through the one CSV writer (`files.write_csv`): names and messages from the run folders as text
    that no spreadsheet runs."""
    spread = [f"{figure}_{what}" for figure in FIGURES for what in ("std", "n")]
    return files.write_csv(path, [*COLUMNS, *spread, "error"], rows, out)


def report(paths: list[Path], out: Path | None = None, by: tuple[str, ...] = ("seed",)) -> tuple[str, list[Path]]:
    """Summarise the runs under `paths`, those that differ only in the keys `by` as one row: Markdown table
    (returned), report.csv and PNGs in `out`; runs with unreadable files are left out, with a warning on stderr."""
    paths = [Path(p).resolve() for p in paths]
    root, where = Path(os.path.commonpath(paths)), " ".join(printable(p) for p in paths)
    for name in OUTPUTS:  # before any work: a folder, device or FIFO there is never replaced
        files.check_output((out or root) / name)
    runs = find_runs(paths)
    if not runs:
        raise VitexpError(
            f"no run folders (with results.json or metrics.csv) under {where}; pass a sweep or run folder"
        )
    summaries, skipped = _summaries(runs, root)
    if not summaries:
        raise VitexpError(f"no readable run folders under {where}: {len(skipped)} left out, e.g. {skipped[0]}")
    if skipped:
        many = f"{len(skipped)} run folder{'s' * (len(skipped) > 1)}"
        print(f"warning: skipped {many} with unreadable files, e.g. {skipped[0]}", file=sys.stderr)
    out = files.make_folder(out or root)
    rows = aggregate(summaries, by)
    # Overrides every job shares (the sweep's fixed settings) are said once, above the table.
    own = [set(r["overrides"].split()) for r in rows if r["overrides"]]
    common = set.intersection(*own) if len(own) > 1 else set()
    for r in rows:
        r["overrides"] = " ".join(o for o in r["overrides"].split() if o not in common)
    rows.sort(key=lambda r: -(r["best_val_acc1"] if r["best_val_acc1"] is not None else -1))
    text = (f"all runs: {printable(' '.join(sorted(common)), CELL_LIMIT)}\n\n" if common else "") + markdown(rows)
    return text + _best_trial(root), [_write_csv(rows, out / "report.csv", out), *plot(rows, out)]


def main(argv: list[str] | None = None) -> None:
    """Console entry point (`python -m vitexp.report`)."""
    parser = argparse.ArgumentParser(prog="python -m vitexp.report", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="a sweep folder (multirun_outputs/<time>) or run folders")
    parser.add_argument("--out", type=Path, help="where report.csv and the PNGs go (default: the common folder)")
    parser.add_argument(
        "--by",
        default="seed",
        help="runs whose overrides differ only in these keys (comma-separated; "
        "default: seed) are one row with mean, std and n of each figure; none: one row per run",
    )
    args = parser.parse_args(argv)
    missing = [printable(p) for p in args.paths if not p.is_dir()]
    if missing:
        parser.exit(2, f"error: {', '.join(missing)}: no such folder; pass a sweep or run folder\n")
    by = () if args.by.strip().lower() == "none" else tuple(k.strip() for k in args.by.split(",") if k.strip())
    try:
        text, written = report(args.paths, args.out, by)
    except VitexpError as e:
        parser.exit(2, f"error: {e}\n")
    except OSError as e:  # the output folder: full, read-only, or a folder where report.csv goes
        parser.exit(2, f"error: cannot write {printable(e.filename)} ({e.strerror}); pick another --out\n")
    print(text)
    print("wrote " + ", ".join(map(str, written)), file=sys.stderr)


if __name__ == "__main__":
    main()
