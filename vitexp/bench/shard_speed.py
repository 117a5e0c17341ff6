"""The training loader's images/s reading a folder of image files against reading the same images from shards.

    python -m vitexp.bench.shard_speed --folder <ImageFolder root> [--workers 2] [--batches 100] [--repeats 2]

Writes the folder's shards to a temporary folder (or takes `--shards`), then times, interleaved, the loader that
`python -m vitexp data=imagefolder` and `data=shards` build (the same transforms, batch size and workers) over the
first `--batches` batches of an epoch, and prints one JSON line per path and their ratio. Also checks that one
epoch over 2 ranks x `--workers` workers reads every training sample of the shards once.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from vitexp.config import config_dir, register_resolvers, typed
from vitexp.data import eval_transform, make_loader, make_splits, set_epoch, train_transform
from vitexp.shards import ShardSet
from vitexp.shards import main as write_shards

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def _loader(root: Path, name: str, args: argparse.Namespace) -> torch.utils.data.DataLoader:
    overrides = [
        "data=imagefolder",
        f"data.name={name}",
        f"data.root={root}",
        f"data.transform={args.transform}",
        f"data.img_size={args.img_size}",
        f"data.mean={list(MEAN)}",
        f"data.std={list(STD)}",
        "data.interpolation=bilinear",
        "data.crop_pct=1.0",
        "data.val_size=5000",
        "data.check_images=false",
    ]
    register_resolvers()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        data = typed(compose(config_name="config", overrides=overrides)).data
    splits = make_splits(data, 0, train_transform(data), eval_transform(data))
    return make_loader(splits.train, args.batch_size, args.workers, train=True)


def _img_per_s(loader: torch.utils.data.DataLoader, batches: int, epoch: int) -> tuple[float, int]:
    set_epoch(loader, 0, epoch)
    seen, start = 0, time.perf_counter()
    for b, (images, _) in enumerate(loader):
        seen += len(images)
        if b + 1 == batches:
            break
    return seen / (time.perf_counter() - start), len(loader.sampler)


def _once_over_ranks(shards: Path, workers: int) -> bool:
    """Every training sample of the shards read exactly once in one epoch over 2 ranks x `workers` workers."""
    data = ShardSet(shards / "train")

    class Sources(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(data)

        def __getitem__(self, i: int) -> int:
            return i

    seen: Counter = Counter()
    for rank in range(2):
        loader = make_loader(Sources(), 2 * 100, workers, train=False, rank=rank, world=2)
        for indices in loader:
            seen.update(indices.tolist())
    return seen == Counter(range(len(data)))


def main() -> None:
    """Time both loaders and print their figures."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, required=True, help="ImageFolder root (train/<class>/*)")
    parser.add_argument("--shards", type=Path, help="its shards, if already written")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--transform", default="cifar", choices=("cifar", "imagenet"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards or Path(tmp) / "shards"
        if args.shards is None:
            start = time.perf_counter()
            write_shards([str(args.folder), "--out", str(shards), "--workers", str(args.workers)])
            print(json.dumps({"wrote_shards_s": round(time.perf_counter() - start, 1)}))
        loaders = {"folder": _loader(args.folder, "imagefolder", args), "shards": _loader(shards, "shards", args)}
        best: dict[str, float] = {}
        for repeat in range(args.repeats):
            for name, loader in loaders.items():
                speed, per_epoch = _img_per_s(loader, args.batches, repeat)
                best[name] = max(best.get(name, 0.0), speed)
                print(
                    json.dumps(
                        {"path": name, "repeat": repeat, "img_per_s": round(speed, 1), "samples_per_epoch": per_epoch}
                    )
                )
        print(
            json.dumps(
                {
                    "shards_vs_folder": round(best["shards"] / best["folder"], 3),
                    "once_over_2_ranks": _once_over_ranks(shards, args.workers),
                    "workers": args.workers,
                    "batch_size": args.batch_size,
                    "batches": args.batches,
                }
            )
        )


if __name__ == "__main__":
    main()
