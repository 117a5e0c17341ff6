"""Folders of real photos (any size, shape and file format) and their shards: transforms, image modes, bad files,
shards read back exactly and split over ranks and workers, and every task through the CLI."""

from __future__ import annotations

import json
import logging
import random
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform
from torch.utils.data import Dataset
from torchvision import transforms

from tests.builders import build, data_of
from tests.conftest import TINY, compose_config, metric_rows, vitexp
from vitexp import VitexpError
from vitexp.config import validate
from vitexp.data import (
    Splits,
    eval_transform,
    image_splits,
    loaders,
    make_loader,
    make_splits,
    set_epoch,
    train_transform,
)
from vitexp.images import image_folder, load_image
from vitexp.schema import ImageData
from vitexp.shards import ShardSet
from vitexp.shards import main as write_shards

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
CIFAR = dict(crop_padding=4, rotate=0.0, scale=(0.08, 1.0), ratio=(0.75, 4 / 3), color_jitter=0.4)
# 32 pixels, the 2-block ViT on 4x4 patches, the cifar preset: photos through every task in seconds
SMALL = [*TINY, "data=imagefolder", "model=baseline", "data.num_classes=2", "data.img_size=32"]


def _data(**changes: Any) -> ImageData:
    """data=imagefolder's typed settings with MEAN, STD and CIFAR's augmentation, and `changes` (`augment`: a dict of
    augmentation changes)."""
    base = data_of("data=imagefolder", "data.root=unused")
    augment = replace(base.augment, **{**CIFAR, **changes.pop("augment", {})})
    return replace(base, mean=list(MEAN), std=list(STD), augment=augment, **changes)


def _photos(root: Path) -> list[Path]:
    return sorted(root.rglob("*.*"))


def _seeded(transform, image: Image.Image, seed: int = 0) -> torch.Tensor:
    random.seed(seed)
    torch.manual_seed(seed)
    np.random.seed(seed)
    return transform(image)


def test_imagenet_preset_is_timms_create_transform(photos):
    augment = {"auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25, "scale": (0.3, 1.0)}
    ours = train_transform(_data(img_size=48, transform="imagenet", interpolation="bicubic", augment=augment))
    timms = create_transform(
        48,
        is_training=True,
        scale=(0.3, 1.0),
        ratio=(0.75, 4 / 3),
        hflip=0.5,
        color_jitter=0.4,
        auto_augment="rand-m9-mstd0.5-inc1",
        interpolation="bicubic",
        mean=MEAN,
        std=STD,
        re_prob=0.25,
        re_mode="pixel",
    )
    evaluation = eval_transform(_data(img_size=48, crop_pct=0.875, interpolation="bicubic"))
    by_hand = transforms.Compose(
        [
            transforms.Resize(int(48 / 0.875), transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(48),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )
    for path in _photos(photos)[::7]:
        image = load_image(str(path))
        for seed in range(2):
            out = _seeded(ours, image, seed)
            assert out.shape == (3, 48, 48) and torch.equal(out, _seeded(timms, image, seed))
        assert torch.equal(evaluation(image), by_hand(image)) and evaluation(image).shape == (3, 48, 48)


def test_cifar_preset_makes_square_batches_of_photos_of_any_shape(photos):
    train = train_transform(_data(img_size=32, transform="cifar", interpolation="bilinear"))
    evaluation = eval_transform(_data(img_size=32, crop_pct=1.0, interpolation="bilinear"))
    shapes = {load_image(str(p)).size for p in _photos(photos)}
    assert any(w > h for w, h in shapes) and any(w < h for w, h in shapes) and min(map(min, shapes)) < 8
    for path in _photos(photos)[::5]:
        image = load_image(str(path))
        assert train(image).shape == evaluation(image).shape == (3, 32, 32)
    with pytest.raises(VitexpError, match="data.transform='photo' is not valid: choose one of cifar, imagenet"):
        validate(compose_config("data.transform=photo"))


@pytest.mark.parametrize("kind", ["grey", "cmyk", "alpha", "palette", "grey16"])
def test_any_image_mode_is_read_as_8_bit_rgb_or_grey(photos, kind):
    (path,) = (photos / "train" / "china").glob(f"*_{kind}.*")
    rgb, grey = load_image(str(path)), load_image(str(path), "L")
    assert rgb.mode == "RGB" and grey.mode == "L" and rgb.size == grey.size == Image.open(path).size
    if kind == "grey16":  # 16-bit values scaled to 8 bits, not clipped to white
        stored = np.asarray(Image.open(path), dtype=np.int64) // 257
        assert np.abs(np.asarray(grey, dtype=np.int64) - stored).max() <= 1 and stored.std() > 10


def test_bad_files_are_named_skipped_or_refused_in_one_line(photos, tmp_path, caplog):
    root = tmp_path / "data"
    shutil.copytree(photos / "train" / "china", root / "train" / "china")
    good = root / "train" / "china" / "010.png"
    truncated = root / "train" / "china" / "truncated.jpg"
    largest = max((root / "train" / "china").glob("*.jpg"), key=lambda p: p.stat().st_size)
    truncated.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])  # header intact, pixels cut
    (root / "train" / "china" / "notes.jpg").write_text("not an image")
    with caplog.at_level(logging.WARNING, logger="vitexp"):
        folder = image_folder(root / "train", "RGB")
    assert "skipped 1 files" in caplog.text and "notes.jpg" in caplog.text
    assert len(folder) == 111 and folder.loader(str(good)).mode == "RGB"
    with pytest.raises(VitexpError, match=r"cannot decode .*truncated.jpg .*delete or replace the file") as e:
        folder.loader(str(truncated))
    assert "\n" not in str(e.value)
    (root / "train" / "flower").mkdir()
    with pytest.raises(VitexpError, match=r"no readable images in class folder\(s\) flower under .*remove the folder"):
        image_folder(root / "train", "RGB")
    with pytest.raises(
        VitexpError, match=r"data.img_size=30 is not divisible by model.patch_size=4; use data.img_size=28 or 32"
    ):
        build(
            "vit", "baseline", img_size=30, patch_size=4, in_chans=3, num_classes=2, embed_dim=32, depth=1, num_heads=2
        )


def test_photos_are_not_held_on_the_device(photos):
    splits = image_splits(_data(root=str(photos), val_size=0.1), 0, lambda x: x, lambda x: x)
    data = _data(batch_size=16, eval_batch_size=16, num_workers=0, on_device=True, img_size=32, transform="imagenet")
    with pytest.raises(
        VitexpError, match="data.transform=imagenet crops each photo from its full size; set data.on_device=false"
    ):
        loaders(data, splits, torch.device("cpu"), None)


@pytest.fixture(scope="module")
def shards(photos, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    assert write_shards([str(photos), "--out", str(out), "--samples-per-shard", "30", "--workers", "2"]) == 0
    return out


def test_shards_hold_the_folder_sample_for_sample(photos, shards):
    folder, sharded = image_folder(photos / "train", "RGB"), ShardSet(shards / "train")
    assert len(sharded) == len(folder) == 220 and sharded.classes == folder.classes == ["china", "flower"]
    assert len(sharded.shards) == 8 and [s.samples for s in sharded.shards] == [30] * 7 + [10]
    for i in range(0, 220, 3):
        (a, label_a), (b, label_b) = folder[i], sharded[i]
        assert label_a == label_b and sharded.source(i) == str(Path(folder.samples[i][0]).relative_to(photos / "train"))
        assert np.array_equal(np.asarray(a), np.asarray(b))
    import webdataset  # the files are plain webdataset shards, readable without vitexp

    samples = list(webdataset.WebDataset(sorted(str(p) for p in (shards / "train").glob("*.tar")), shardshuffle=False))
    assert len(samples) == 220 and {k for s in samples for k in s if not k.startswith("__")} == {
        "jpg",
        "png",
        "cls",
        "txt",
    }


class _Sources(Dataset):
    """Each sample's identity (its source path in the shards), read in whichever process loads it."""

    def __init__(self, shards: ShardSet) -> None:
        self.shards = shards

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, i: int) -> tuple[int, int]:
        self.shards[i]  # decodes the image, as training does
        return i, hash(self.shards.source(i)) % 2**31


@pytest.mark.parametrize("train", [True, False])
def test_an_epoch_over_2_ranks_and_2_workers_reads_every_sample_once(shards, train):
    sources = _Sources(ShardSet(shards / "train"))
    seen: Counter = Counter()
    for rank in range(2):
        loader = make_loader(
            sources, 20, num_workers=2, persistent_workers=False, train=train, pin_memory=False, rank=rank, world=2
        )
        if train:
            set_epoch(loader, seed=0, epoch=3)
        for _, keys in loader:
            seen.update(keys.tolist())
    every = Counter(hash(sources.shards.source(i)) % 2**31 for i in range(220))
    assert seen == every  # 220 samples, global batch 20: no partial batch to drop


def test_missing_truncated_or_forged_shards_are_one_line_errors(shards, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    tar = copy / "train" / "train-000002.tar"
    tar.write_bytes(tar.read_bytes()[:5000])
    with pytest.raises(VitexpError, match=r"train-000002.tar has 5000 bytes, its index says \d+ \(truncated"):
        ShardSet(copy / "train")
    tar.unlink()
    with pytest.raises(VitexpError, match=r"shard .*train-000002.tar is missing; copy it back or write the shards"):
        ShardSet(copy / "train")
    index = json.loads((shards / "train" / "index.json").read_text())
    index["shards"][0]["file"] = "../../elsewhere.tar"
    (copy / "train" / "index.json").write_text(json.dumps(index))
    with pytest.raises(VitexpError, match=r"names '../../elsewhere.tar', not a .tar file in that folder; refused"):
        ShardSet(copy / "train")
    (copy / "train" / "index.json").write_text("{not json")
    with pytest.raises(VitexpError, match="is not a shard index"):
        ShardSet(copy / "train")
    with pytest.raises(VitexpError, match=r"no shards under data.root=.*python -m vitexp.shards"):
        image_splits(_data(name="shards", root=str(tmp_path), val_size=0.1), 0, lambda x: x, lambda x: x)


def test_photos_train_evaluate_distill_and_prune_through_the_cli(photos, tmp_path):
    vitexp(*SMALL, f"data.root={photos}", "hydra.run.dir=train", cwd=tmp_path)
    best = tmp_path / "train" / "checkpoints" / "best.pt"
    trained = json.loads((tmp_path / "train" / "results.json").read_text())
    assert trained["status"] == "completed" and trained["model"] == "baseline"
    vitexp(
        *SMALL,
        "task=evaluate",
        f"data.root={photos}",
        f"ckpt_path={best}",
        "hydra.run.dir=eval",
        "trainer.limit_val_batches=null",
        cwd=tmp_path,
    )
    evaluated = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert evaluated["images"] == 22 and evaluated["val_acc1"] == pytest.approx(trained["best_val_acc1"], abs=1e-6)
    for task, args in (("distill", [f"task.teacher_ckpt={best}"]), ("prune", [f"ckpt_path={best}", "task.ratio=0.5"])):
        vitexp(*SMALL, f"task={task}", f"data.root={photos}", *args, f"hydra.run.dir={task}", cwd=tmp_path)
        assert json.loads((tmp_path / task / "results.json").read_text())["status"] == "completed"
    vitexp(f"resume={tmp_path / 'train'}", "trainer.max_epochs=3", cwd=tmp_path)  # data.root comes from the run
    assert json.loads((tmp_path / "train" / "results.json").read_text())["epochs"] == 3


def test_training_from_shards_equals_training_from_the_folder(photos, shards, tmp_path):
    args = [*SMALL, "trainer.max_epochs=1", "data.num_workers=2"]
    vitexp(*args, f"data.root={photos}", "hydra.run.dir=folder", cwd=tmp_path)
    vitexp(*args, "data=shards", f"data.root={shards}", "hydra.run.dir=shards", cwd=tmp_path)
    folder, sharded = ((tmp_path / run / "metrics.csv").read_text() for run in ("folder", "shards"))
    assert folder.splitlines()[1].split(",")[1:4] == sharded.splitlines()[1].split(",")[1:4]  # losses and accuracy
    log = (tmp_path / "shards" / "train_baseline.log").read_text()
    assert "shards: 198 train, 22 val" in log


def test_the_photo_defaults_compose_timms_transforms_and_vit_ti16(photos, tmp_path):
    cfg = compose_config("data=imagefolder", f"data.root={photos}", "data.num_classes=2")
    assert (cfg.model.name, cfg.model.patch_size, cfg.data.img_size) == ("vit_ti16", 16, 224)
    assert (cfg.data.transform, cfg.data.crop_pct, cfg.data.interpolation) == ("imagenet", 0.875, "bicubic")
    assert compose_config("data=shards", "data.root=x", "model=patch8").model.name == "patch8"
    data = _data(root=str(photos), val_size=0.1, img_size=224, transform="imagenet", interpolation="bicubic")
    data = replace(data, crop_pct=0.875)
    splits: Splits = make_splits(data, 0, train_transform(data), eval_transform(data))
    assert splits.train[0][0].shape == splits.val[0][0].shape == (3, 224, 224)


@pytest.mark.slow
def test_photos_from_shards_under_torchrun_train_evaluate_distill_and_prune(shards, tmp_path):
    from tests.test_distributed import torchrun

    args = [*SMALL, "data=shards", f"data.root={shards}", "data.num_workers=2", "data.batch_size=20"]
    torchrun(2, *args, "hydra.run.dir=train", cwd=tmp_path)  # 2 ranks x 2 loader workers
    best = tmp_path / "train" / "checkpoints" / "best.pt"
    trained = json.loads((tmp_path / "train" / "results.json").read_text())
    vitexp(
        *args,
        "task=evaluate",
        f"ckpt_path={best}",
        "hydra.run.dir=eval",
        "trainer.limit_val_batches=null",
        cwd=tmp_path,
    )
    evaluated = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert evaluated["val_acc1"] == pytest.approx(trained["best_val_acc1"], abs=1e-6)
    for task, extra in (("distill", [f"task.teacher_ckpt={best}"]), ("prune", [f"ckpt_path={best}"])):
        torchrun(2, *args, f"task={task}", *extra, f"hydra.run.dir={task}", cwd=tmp_path)
        assert json.loads((tmp_path / task / "results.json").read_text())["status"] == "completed"


@pytest.mark.slow
def test_a_run_on_shards_killed_and_resumed_equals_an_uninterrupted_one(shards, tmp_path):
    import signal
    import time

    from tests import cli

    args = [
        *SMALL,
        "data=shards",
        f"data.root={shards}",
        "data.num_workers=2",
        "trainer.max_epochs=3",
        "trainer.limit_train_batches=null",
    ]
    vitexp(*args, "hydra.run.dir=straight", cwd=tmp_path)
    run = tmp_path / "killed"
    child = cli.Child([*args, f"hydra.run.dir={run}"], tmp_path)
    while not (run / "checkpoints" / "last.pt").exists() and child.process.is_alive():
        time.sleep(0.005)
    child.kill()
    assert child.wait().returncode == -signal.SIGKILL, "the run finished before it could be killed"
    stopped_at = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["epoch"]
    vitexp(f"resume={run}", cwd=tmp_path)
    assert stopped_at < 3 and metric_rows(run / "metrics.csv") == metric_rows(tmp_path / "straight" / "metrics.csv")
    straight, resumed = (
        torch.load(r / "checkpoints" / "last.pt", weights_only=True) for r in (tmp_path / "straight", run)
    )
    assert resumed["epoch"] == 3 and resumed["scheduler"] == straight["scheduler"]
    assert all(torch.equal(t, resumed["model"][k]) for k, t in straight["model"].items())
