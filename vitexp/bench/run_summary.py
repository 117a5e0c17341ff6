"""Time to accuracy of one training run, from its folder: wall time, epochs, images/s, the accuracy per epoch with
the time since the command started, and where the time went.

    python -m vitexp.bench.run_summary <run folder> <command start, seconds since the epoch> [--budget 180]
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
from datetime import datetime
from pathlib import Path

EPOCH_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\]\[INFO\] epoch (\d+)/(\d+) ")
THRESHOLDS = (0.80, 0.85, 0.88, 0.90, 0.91, 0.92)


def epoch_times(run: Path, start: float) -> tuple[dict[int, float], int | None]:
    """Seconds from the command's start to each epoch's log line (after its evaluation; 1 s resolution), and
    the epochs the run was set to."""
    times, planned = {}, None
    for log in run.glob("*.log"):
        for line in log.read_text().splitlines():
            if m := EPOCH_LINE.match(line):
                times[int(m[2])] = datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S").timestamp() - start
                planned = int(m[3])
    return times, planned


def at_gaps(at: dict[int, float]):
    """Seconds between consecutive epochs' log lines."""
    return (at[e] - at[e - 1] for e in at if e - 1 in at)


def summary(run: Path, start: float, budget: float) -> dict:
    """The run's figures; works on a run stopped early (no results.json) from its metrics.csv and log."""
    with (run / "metrics.csv").open() as f:
        rows = [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]
    results = json.loads((run / "results.json").read_text()) if (run / "results.json").is_file() else {}
    at, planned = epoch_times(run, start)
    acc = [r["val/acc1"] for r in rows]
    img_s = [r["throughput/img_s"] for r in rows]
    epoch_s = [r["time/epoch_s"] for r in rows]
    first = min(at) if at else None
    gaps = [at[e] - at[e - 1] - rows[e - 1]["time/epoch_s"] for e in at if e - 1 in at and e - 1 < len(rows)]
    within = [a for e, a in zip(range(1, len(acc) + 1), acc) if at.get(e, float("inf")) <= budget]
    return {
        "status": results.get("status", "stopped early"),
        "epochs": len(rows),
        "wall_s": results.get("wall_s"),
        "best_val_acc1": max(acc) if acc else None,
        "best_epoch": acc.index(max(acc)) + 1 if acc else None,
        f"best_within_{budget:.0f}s": max(within) if within else None,
        "img_s_median": statistics.median(img_s) if img_s else None,
        "img_s_min_max": (min(img_s), max(img_s)) if img_s else None,
        "epoch_s_median": statistics.median(epoch_s) if epoch_s else None,
        "start_to_epoch1_end_s": at.get(first) if first else None,
        "planned_epochs": planned,
        # a run stopped early: what all its epochs would take at the median pace, start-up included
        "est_full_wall_s": round(at[max(at)] + (planned - max(at)) * statistics.median(list(at_gaps(at))), 1)
        if at and planned and len(at) > 1
        else None,
        "between_epochs_s_median": statistics.median(gaps) if gaps else None,  # checkpoints, logging
        "time_to": {
            f"{t:.2f}": next((round(at[e], 1) for e, a in enumerate(acc, 1) if a >= t and e in at), None)
            for t in THRESHOLDS
        },
        "curve": [(e, round(a, 4), round(at[e], 1) if e in at else None) for e, a in enumerate(acc, 1)],
    }


def main() -> None:
    """Print one run folder's figures as a JSON line, then its accuracy curve."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("start", type=float)
    parser.add_argument("--budget", type=float, default=180.0)
    args = parser.parse_args()
    if not (args.run / "metrics.csv").is_file():
        print(f"{args.run}: no metrics.csv (the run did not finish an epoch)")
        return
    figures = summary(args.run, args.start, args.budget)
    curve = figures.pop("curve")
    print(json.dumps(figures))
    print("curve (epoch acc1 seconds):", " ".join(f"{e}:{a:.3f}@{t}" for e, a, t in curve))


if __name__ == "__main__":
    main()
