"""The whole command against a plain timm loop: wall time, training images/s, validation and start/end seconds of
`python -m vitexp data=imagefolder ...` next to the loop timm's train.py runs, on the same ImageFolder tree and recipe.

    python -m vitexp.bench.whole_run [--epochs 3] [--per-class 300] [--val-per-class 100] [--repeats 3] [OVERRIDES...]
    python -m vitexp.bench.whole_run --digits [--against <older vitexp checkout>] [--epochs 3] [OVERRIDES...]

The tree holds CIFAR-10 JPEGs from ../shared/data/cifar10/train.tar.gz: `--per-class` images a class in train/ and
`--val-per-class` other images a class in val/ (built once, kept in the temporary folder). The recipe: ViT-Lite-7/4
(timm VisionTransformer: patch 4, dim 256, depth 7, 4 heads, MLP ratio 2) at 32 px, timm's transforms
(RandomResizedCrop scale 0.75-1, flip, colour jitter 0.4, bicubic; evaluation resize + center crop 0.875), batch 128,
2 loader workers, AdamW lr 1e-3 wd 0.05, 1 warmup epoch then cosine to 1e-5 per step, label smoothing 0.1, bf16
autocast where the CPU has it natively (else fp32, for both), a validation pass each epoch. The plain arm is written
here as timm's train.py runs it (torchvision ImageFolder, DataLoader with persistent workers, validation batches of
the training batch size); both arms are subprocesses timed whole, alternated in rounds so that other load on the
machine hits both alike; each keeps its best round. OVERRIDES go to the vitexp arm only.

`--digits` times the default job instead (`python -m vitexp trainer.max_epochs=<epochs>`: the digits, no download),
with the same figures; `--against DIR` alternates it with the vitexp of another checkout (its root on PYTHONPATH),
to show a change's effect on the job a new user runs first.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

TAR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "cifar10" / "train.tar.gz"
SHARED_TAR = Path("/work/shared/data/cifar10/train.tar.gz")
BATCH, WORKERS, IMG = 128, 2, 32
LR, WD, LR_MIN, WARMUP_LR, WARMUP_EPOCHS, SMOOTHING = 1e-3, 0.05, 1e-5, 1e-6, 1, 0.1
SCALE, JITTER, CROP_PCT = (0.75, 1.0), 0.4, 0.875
VIT = {"patch_size": 4, "embed_dim": 256, "depth": 7, "num_heads": 4, "mlp_ratio": 2.0}
# The default job's training images an epoch: 1,797 digits less 360 for validation, in whole batches of 32
DIGITS_TRAIN_IMAGES = (1797 - 360) // 32 * 32


def build_tree(tar: Path, root: Path, per_class: int, val_per_class: int) -> Path:
    """An ImageFolder tree under `root` of the first `per_class` JPEGs of each class in train/ and the next
    `val_per_class` in val/; built once (a finished tree carries a marker file)."""
    tree = root / f"cifar10-{per_class}-{val_per_class}"
    if (tree / "DONE").is_file():
        return tree
    taken: dict[str, int] = {}
    with tarfile.open(tar) as archive:
        for member in archive:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) != 3 or not parts[2].endswith(".jpg"):
                continue
            n = taken.get(parts[1], 0)
            if n >= per_class + val_per_class:
                continue
            taken[parts[1]] = n + 1
            split = "train" if n < per_class else "val"
            (tree / split / parts[1]).mkdir(parents=True, exist_ok=True)
            (tree / split / parts[1] / f"{n:04d}.jpg").write_bytes(archive.extractfile(member).read())
    (tree / "DONE").write_text("")
    return tree


def precision() -> str:
    """bf16 where this CPU multiplies it natively, else 32: the same for both arms."""
    from vitexp.hardware import cpu_has_native_bf16

    return "bf16" if cpu_has_native_bf16() else "32"


def vitexp_command(tree: Path, epochs: int, out: Path, overrides: list[str]) -> list[str]:
    """`python -m vitexp` on the tree with the bench's recipe."""
    return [
        sys.executable,
        "-m",
        "vitexp",
        "data=imagefolder",
        f"data.root={tree}",
        "model=baseline",
        f"data.img_size={IMG}",
        "data.num_classes=10",
        f"data.augment.scale=[{SCALE[0]},{SCALE[1]}]",
        f"data.augment.color_jitter={JITTER}",
        f"data.crop_pct={CROP_PCT}",
        f"data.batch_size={BATCH}",
        f"data.num_workers={WORKERS}",
        f"optim.lr={LR}",
        f"optim.weight_decay={WD}",
        f"optim.warmup_epochs={WARMUP_EPOCHS}",
        f"optim.scheduler.lr_min={LR_MIN}",
        f"task.loss.label_smoothing={SMOOTHING}",
        f"trainer.max_epochs={epochs}",
        f"trainer.precision={precision()}",
        "trainer.compile=false",
        "trainer.progress=false",
        "logger=none",
        *overrides,
        f"hydra.run.dir={out}",
    ]


def vitexp_epochs(run: Path, train_images: int) -> list[dict]:
    """Per epoch of a vitexp run folder: seconds, training images/s, validation (and epoch-end) seconds, val top-1."""
    with (run / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    figures = []
    for row in rows:
        epoch_s, img_s = float(row["time/epoch_s"]), float(row["throughput/img_s"])
        figures.append(
            {
                "epoch_s": epoch_s,
                "img_s": img_s,
                "val_s": epoch_s - train_images / img_s,
                "acc1": float(row["val/acc1"]),
            }
        )
    return figures


def summarise(whole_s: float, epochs: list[dict], cpu_s: float) -> dict:
    """One run's figures: whole seconds, CPU seconds (of the command and its loader workers), steady training
    images/s (median over the epochs after the first, which starts the workers), median validation seconds, start/end
    seconds (whole minus the epochs), last val top-1."""
    steady = epochs[1:] or epochs
    return {
        "whole_s": round(whole_s, 2),
        "cpu_s": round(cpu_s, 1),
        "img_s": round(statistics.median(e["img_s"] for e in steady), 1),
        "val_s": round(statistics.median(e["val_s"] for e in epochs), 2),
        "start_end_s": round(whole_s - sum(e["epoch_s"] for e in epochs), 2),
        "acc1": round(epochs[-1]["acc1"], 4),
    }


def best(runs: list[dict]) -> dict:
    """The round with the shortest whole time."""
    return min(runs, key=lambda r: r["whole_s"])


def ratios(plain: dict, vitexp: dict) -> dict:
    """vitexp against the plain loop, >1 where vitexp is faster: whole time and validation as plain/vitexp seconds,
    training images/s as vitexp/plain."""
    return {
        "whole": round(plain["whole_s"] / vitexp["whole_s"], 3),
        "train_img_s": round(vitexp["img_s"] / plain["img_s"], 3),
        "val": round(plain["val_s"] / vitexp["val_s"], 3),
    }


def timed(cmd: list[str], source: Path | None = None) -> tuple[float, float, str]:
    """Run `cmd` (with the vitexp of the checkout `source` when given: run in that folder, since `python -m` puts the
    working folder before PYTHONPATH); its wall seconds, its CPU seconds (user and system, its loader workers
    included: the work done, which other load on the machine moves less than the wall time) and stdout (a failure
    ends the bench with its stderr)."""
    env = {**os.environ, "PYTHONPATH": str(source)} if source is not None else None
    cpu, started = _children_cpu(), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=source)
    whole, cpu = time.perf_counter() - started, _children_cpu() - cpu
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return whole, cpu, proc.stdout


def _children_cpu() -> float:
    """User and system seconds of this process's finished children (and theirs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def one_round(tree: Path, args: argparse.Namespace, overrides: list[str], out: Path) -> dict[str, dict]:
    """Both arms once, plain first; each arm's summary."""
    train_images = (args.per_class * 10 // BATCH) * BATCH
    whole, cpu, stdout = timed(
        [sys.executable, "-m", "vitexp.bench.whole_run", "--plain", str(tree), f"--epochs={args.epochs}"]
    )
    plain = summarise(whole, json.loads(stdout.strip().splitlines()[-1])["epochs"], cpu)
    whole, cpu, _ = timed(vitexp_command(tree, args.epochs, out, overrides))
    return {"plain": plain, "vitexp": summarise(whole, vitexp_epochs(out, train_images), cpu)}


def digits_command(epochs: int, out: Path, overrides: list[str]) -> list[str]:
    """The default job a new user runs first, for `epochs`."""
    return [sys.executable, "-m", "vitexp", f"trainer.max_epochs={epochs}", *overrides, f"hydra.run.dir={out}"]


def digits_round(args: argparse.Namespace, overrides: list[str], out: Path) -> dict[str, dict]:
    """The default job once with `--against`'s vitexp (when given), then once with this one; each arm's summary."""
    arms = {}
    for arm, source in ([("before", args.against)] if args.against else []) + [("vitexp", None)]:
        folder = out / arm
        whole, cpu, _ = timed(digits_command(args.epochs, folder, overrides), source)
        arms[arm] = summarise(whole, vitexp_epochs(folder, DIGITS_TRAIN_IMAGES), cpu)
    return arms


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """The bench's options and the vitexp overrides."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--per-class", type=int, default=300, help="training images a class")
    parser.add_argument("--val-per-class", type=int, default=100, help="validation images a class")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of both arms, alternated; best kept")
    parser.add_argument("--tar", type=Path, default=TAR if TAR.is_file() else SHARED_TAR)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "vitexp-whole-run")
    parser.add_argument("--digits", action="store_true", help="time the default job (the digits) instead")
    parser.add_argument("--against", type=Path, help="with --digits: another vitexp checkout to alternate with")
    parser.add_argument("--plain", type=Path, help=argparse.SUPPRESS)  # the plain arm's own process
    return parser.parse_known_args(argv)


def report(rounds: list[dict[str, dict]], args: argparse.Namespace, overrides: list[str]) -> dict:
    """Print each arm's best round and the ratios; return the JSON line's object."""
    best_of = {arm: best([r[arm] for r in rounds]) for arm in rounds[0]}
    for arm, fig in best_of.items():
        print(
            f"{arm}: whole {fig['whole_s']:.1f} s ({fig['cpu_s']:.0f} CPU s), train {fig['img_s']:.1f} img/s, "
            f"validation {fig['val_s']:.2f} s, start/end {fig['start_end_s']:.1f} s, val top-1 {fig['acc1']:.3f}"
        )
    reference = "plain" if "plain" in best_of else "before" if "before" in best_of else None
    summary = {
        **best_of,
        **({f"{reference}_over_vitexp": ratios(best_of[reference], best_of["vitexp"])} if reference else {}),
        "job": "digits" if args.digits else "imagefolder",
        "epochs": args.epochs,
        "per_class": None if args.digits else args.per_class,
        "repeats": len(rounds),
        "precision": precision(),
        "overrides": overrides,
    }
    print(json.dumps(summary))
    return summary


def main(argv: list[str] | None = None) -> None:
    """Alternate both arms `--repeats` times and print their best figures and ratios."""
    args, overrides = parse(argv)
    if args.plain is not None:
        from vitexp.bench.plain_timm import train

        print(json.dumps({"epochs": train(args.plain, args.epochs, precision())}))
        return
    tree = None if args.digits else build_tree(args.tar, args.cache, args.per_class, args.val_per_class)
    rounds = []
    with tempfile.TemporaryDirectory(prefix="whole_run-") as root:
        for r in range(args.repeats):
            out = Path(root) / f"round_{r}"
            rounds.append(digits_round(args, overrides, out) if tree is None else one_round(tree, args, overrides, out))
            print(f"round {r + 1}: {json.dumps(rounds[-1])}", flush=True)
    report(rounds, args, overrides)


if __name__ == "__main__":
    main()
