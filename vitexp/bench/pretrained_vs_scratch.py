"""Pretrained beats scratch, measured on CIFAR-10 without outside weights: a timm ViT pretrained here on five classes
(airplane, automobile, bird, cat, deer), exported as a timm model folder, then fine-tuned on a small labelled set of
the other five (dog, frog, horse, ship, truck) for the same epochs from (a) those weights, (b) those weights with
layer-wise lr decay, (c) scratch, (d) a linear probe (only the classifier trains). Prints one table.

    nice -n 10 python -m vitexp.bench.pretrained_vs_scratch --work /tmp/pvs

Every stage is `python -m vitexp` (and `python -m vitexp.export`) as a user runs it; a stage whose results.json
exists in --work is reused.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

CIFAR_TAR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "cifar10" / "train.tar.gz"
PRETRAIN_CLASSES = ("airplane", "automobile", "bird", "cat", "deer")
FINETUNE_CLASSES = ("dog", "frog", "horse", "ship", "truck")
# A small timm ViT for 32x32 images (4x4 patches, 4 blocks of width 64), sized for a shared CPU.
MODEL = [
    "model=timm",
    "model.name=vit_tiny_patch16_224",
    "model.patch_size=4",
    "model.embed_dim=64",
    "model.depth=4",
    "model.num_heads=2",
]
COMMON = [
    "data=imagefolder",
    "data.num_classes=5",
    "data.mean=[0.4914,0.4822,0.4465]",
    "data.std=[0.2470,0.2435,0.2616]",
    "data.on_device=true",
    "data.num_workers=0",
    "data.batch_size=64",
    "trainer.device=cpu",
    "trainer.precision=32",
    "trainer.progress=false",
    "logger=none",
    "optim.weight_decay=0.05",
]


def extract(tar_path: Path, root: Path, per_class: dict[str, tuple[int, int]]) -> None:
    """ImageFolder trees under `root`: for each class its first n_train images in train/, the next n_val in val/."""
    if (root / "done").exists():
        return
    counts: dict[str, int] = {}
    with tarfile.open(tar_path) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) != 3 or parts[1] not in per_class:
                continue
            n_train, n_val = per_class[parts[1]]
            i = counts[parts[1]] = counts.get(parts[1], 0) + 1
            if i > n_train + n_val:
                continue
            dest = root / ("train" if i <= n_train else "val") / parts[1] / parts[2]
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(tar.extractfile(member).read())
    (root / "done").touch()


def vitexp(run: Path, threads: int, *overrides: str) -> dict:
    """`python -m vitexp OVERRIDES` in the run folder `run` (reused when finished) on `threads` CPU threads; its
    results.json."""
    if not (run / "results.json").exists():
        command = [sys.executable, "-m", "vitexp", *overrides, f"hydra.run.dir={run}"]
        # on a CPU shared with other jobs, torch's threads wait for each other at every operation: one is faster
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env)
    return json.loads((run / "results.json").read_text())


def backbone(folder: Path, out: Path) -> Path:
    """A copy of the timm model folder without its classifier: the five new classes get a new one (with the same
    class count timm would keep the old classes' head; weights without a classifier leave it initialised)."""
    from safetensors.torch import load_file, save_file

    out.mkdir(exist_ok=True)
    (out / "config.json").write_text((folder / "config.json").read_text())
    weights = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("head.")}, out / "model.safetensors")
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line: where to work, the CIFAR-10 archive, set sizes, epochs and threads."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/pretrained_vs_scratch"))
    parser.add_argument("--tar", type=Path, default=CIFAR_TAR)
    parser.add_argument("--pretrain-per-class", type=int, default=500)
    parser.add_argument("--pretrain-epochs", type=int, default=6)
    parser.add_argument("--finetune-per-class", type=int, default=100)
    parser.add_argument("--finetune-epochs", type=int, default=10)
    parser.add_argument("--layer-decay", type=float, default=0.75)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per run (OMP_NUM_THREADS)")
    return parser.parse_args(argv)


def pretrain(work: Path, args: argparse.Namespace) -> dict:
    """Train on the five pretraining classes; the run's results.json."""
    return vitexp(
        work / "pretrain",
        args.threads,
        *MODEL,
        *COMMON,
        f"data.root={work / 'pretrain_data'}",
        "data.val_size=250",
        f"trainer.max_epochs={args.pretrain_epochs}",
        "optim.lr=1e-3",
        "optim.warmup_epochs=1",
    )


def export_backbone(work: Path) -> Path:
    """The pretraining run's best weights exported as a timm model folder (reused when there), without its head."""
    folder = work / "pretrained_folder"
    if not (folder / "config.json").exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "vitexp.export",
                str(work / "pretrain" / "checkpoints" / "best.pt"),
                "--out",
                str(folder),
            ],
            check=True,
        )
    return backbone(folder, work / "pretrained_backbone")


def finetune(work: Path, args: argparse.Namespace, folder: Path) -> list[tuple[str, dict]]:
    """Fine-tune each start (a)-(d) on the other five classes; (name, results.json) per start."""
    tune = [
        *MODEL,
        *COMMON,
        f"data.root={work / 'finetune_data'}",
        f"trainer.max_epochs={args.finetune_epochs}",
        "optim.lr=5e-4",
        "optim.warmup_epochs=1",
    ]
    variants = {
        "(a) pretrained (new head)": [f"model.pretrained={folder}"],
        f"(b) pretrained + layer decay {args.layer_decay}": [
            f"model.pretrained={folder}",
            f"optim.layer_decay={args.layer_decay}",
        ],
        "(c) scratch": [],
        "(d) linear probe (pretrained, head only)": [
            f"model.pretrained={folder}",
            f"optim.head_only_epochs={args.finetune_epochs}",
        ],
    }
    return [
        (name, vitexp(work / f"finetune_{i}", args.threads, *tune, *extra))
        for i, (name, extra) in enumerate(variants.items())
    ]


def print_table(args: argparse.Namespace, pretrained: dict, pretrain_s: float, rows: list[tuple[str, dict]]) -> None:
    """What was pretrained and fine-tuned, then one row per start."""
    print(
        f"pretraining on {', '.join(PRETRAIN_CLASSES)} ({args.pretrain_per_class} images each, "
        f"{args.pretrain_epochs} epochs): best val acc {pretrained['best_val_acc1']:.3f}, {pretrained['wall_s']:.0f} s"
        + ("" if pretrain_s > 5 else " (reused)")
    )
    print(
        f"fine-tuning on {', '.join(FINETUNE_CLASSES)}: {args.finetune_per_class} train images per class, "
        f"1,000 val images, {args.finetune_epochs} epochs each\n"
    )
    print("| start | best val acc | final val acc | wall s |\n| --- | --- | --- | --- |")
    for name, r in rows:
        print(f"| {name} | {r['best_val_acc1']:.3f} | {r['val_acc1']:.3f} | {r['wall_s']:.0f} |")


def main(argv: list[str] | None = None) -> None:
    """Run the stages and print the table."""
    args = parse_args(argv)
    work = args.work.resolve()
    extract(args.tar, work / "pretrain_data", {c: (args.pretrain_per_class, 0) for c in PRETRAIN_CLASSES})
    extract(args.tar, work / "finetune_data", {c: (args.finetune_per_class, 200) for c in FINETUNE_CLASSES})
    started = time.perf_counter()
    pretrained = pretrain(work, args)
    pretrain_s = time.perf_counter() - started
    rows = finetune(work, args, export_backbone(work))
    print_table(args, pretrained, pretrain_s, rows)


if __name__ == "__main__":
    main()
