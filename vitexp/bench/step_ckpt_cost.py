"""What mid-epoch checkpoints cost: training images/s with `trainer.ckpt_every_n_steps` at 50 and 500 next to none,
the same run back to back on this machine.

    python -m vitexp.bench.step_ckpt_cost [--epochs 25] [--every 0,50,500] [--repeats 2] [OVERRIDES...]

Each setting is one `python -m vitexp` run (default: model=baseline on the embedded digits, batches of 32, 44 steps
per epoch); images/s is the training throughput over all its epochs (the mid-epoch saves happen inside them), the
harmonic mean of metrics.csv's per-epoch `throughput/img_s`. The settings run in interleaved rounds, so other load on
the machine hits all of them alike; each keeps its best round. Prints one line per run, the ratios, and one JSON line.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from vitexp import checkpoint

DEFAULTS = ["model=baseline", "data=digits", "logger=none", "trainer.progress=false", "trainer.limit_val_batches=1"]


def throughput(run: Path) -> tuple[float, int]:
    """Training images/s over a run's epochs, and the size of its last.pt in bytes."""
    with (run / "metrics.csv").open() as f:
        rates = [float(row["throughput/img_s"]) for row in csv.DictReader(f)]
    return statistics.harmonic_mean(rates), (run / "checkpoints" / "last.pt").stat().st_size


def main(argv: list[str] | None = None) -> None:
    """Run each setting once and print its images/s."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--every", default="0,50,500", help="ckpt_every_n_steps settings, comma-separated")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of all settings, interleaved; best kept")
    args, overrides = parser.parse_known_args(argv)
    settings = [int(e) for e in args.every.split(",")]
    rates: dict[int, list[float]] = {every: [] for every in settings}
    with tempfile.TemporaryDirectory(prefix="step_ckpt_cost-") as root:
        for r, every in ((r, every) for r in range(args.repeats) for every in settings):
            run = Path(root) / f"every_{every}_{r}"
            cmd = [
                sys.executable,
                "-m",
                "vitexp",
                *DEFAULTS,
                f"trainer.max_epochs={args.epochs}",
                f"trainer.ckpt_every_n_steps={every}",
                *overrides,
                f"hydra.run.dir={run}",
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
            img_s, size = throughput(run)
            steps = checkpoint.load(run / "checkpoints" / "last.pt")["step"]
            rates[every].append(img_s)
            print(
                f"round {r + 1}: ckpt_every_n_steps={every or 'none'}: {img_s:.1f} img/s over {args.epochs} epochs, "
                f"{steps} steps (last.pt {size / 1e6:.1f} MB)",
                flush=True,
            )
    best = {every: max(found) for every, found in rates.items()}
    reference = best[settings[0]]
    for every in settings:
        print(
            f"ckpt_every_n_steps={every or 'none'}: best {best[every]:.1f} img/s, "
            f"{best[every] / reference:.3f} of {settings[0] or 'none'}'s"
        )
    print(
        json.dumps(
            {
                "img_per_s": {str(e or "none"): round(v, 1) for e, v in best.items()},
                "epochs": args.epochs,
                "repeats": args.repeats,
                "overrides": overrides,
            }
        )
    )


if __name__ == "__main__":
    main()
