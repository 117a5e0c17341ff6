"""Independent oracles: for every data option a tiny trained checkpoint is scored by task=evaluate, by a plain loop
written here (PIL, resize and crop, `(x - mean) / std` with the statistics the checkpoint records, forward, argmax)
and by `vitexp.predict` on its ONNX export, and the three agree; evaluate normalises with the statistics the
checkpoint records whatever the command line's are; the device and worker loaders give the same normalised batches on
CIFAR's statistics; a distilled student's teacher is fed images normalised as it was trained."""

from __future__ import annotations

import csv
import json
import logging
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from tests.conftest import CIFAR_TAR, TINY, compose_config, vitexp
from vitexp import VitexpError, engine, shards
from vitexp.checkpoint import load_model
from vitexp.config import typed
from vitexp.data import make_loader, split_indices
from vitexp.distill import Distiller, TeacherOnly
from vitexp.onnx_export import export_onnx
from vitexp.predict import predict
from vitexp.runs import Run
from vitexp.tasks import evaluate
from vitexp.tasks.distill import score_teacher
from vitexp.tasks.recipe import read_recipe
from vitexp.training import fit

# CIFAR-10's statistics, written out here rather than read from conf/data/cifar10.yaml
CIFAR_MEAN, CIFAR_STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]
# statistics no data set has, so that a transform that falls back to ImageNet's (or CIFAR's) cannot pass
ODD_MEAN, ODD_STD = [0.31, 0.62, 0.47], [0.19, 0.33, 0.27]
SHORT = [*TINY, "model=baseline", "trainer.precision=32", "trainer.max_epochs=1", "trainer.limit_train_batches=4"]
# the whole split, not debug=fast's two batches
ALL_IMAGES = "trainer.limit_val_batches=null"
PHOTOS = ["data.img_size=24", f"data.mean={ODD_MEAN}", f"data.std={ODD_STD}"]
OPTIONS = {
    "cifar10": ["data=cifar10", "data.img_size=24"],  # CIFAR's statistics, on-device training, bilinear resize
    "imagefolder": ["data=imagefolder", *PHOTOS],  # timm's bicubic resize to 27 and centre crop 24
    "shards": ["data=shards", *PHOTOS],
}
PER_CLASS = {"train": 8, "val": 3, "test": 4}
INTERPOLATION = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


@pytest.fixture(scope="module")
def cifar_folder(tmp_path_factory) -> Path:
    """A CIFAR-10 ImageFolder tree of real JPEGs: 8 train, 3 val and 4 test images per class."""
    if not CIFAR_TAR.is_file():
        pytest.skip(f"{CIFAR_TAR} not present")
    root, counts = tmp_path_factory.mktemp("cifar_folder"), {}
    splits = [s for s, n in PER_CLASS.items() for _ in range(n)]
    with tarfile.open(CIFAR_TAR) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 3 or parts[-3] != "train" or counts.get(parts[-2], 0) >= len(splits):
                continue
            split = splits[counts.get(parts[-2], 0)]
            counts[parts[-2]] = counts.get(parts[-2], 0) + 1
            dest = root / split / parts[-2] / parts[-1]
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(tar.extractfile(member).read())
            if len(counts) == 10 and all(c == len(splits) for c in counts.values()):
                break
    return root


def _plain_logits(ckpt: Path, images: list[Image.Image], statistics: tuple | None = None) -> tuple[torch.Tensor, dict]:
    """The checkpoint's logits for `images`, preprocessed here from the statistics and geometry it records: the short
    side resized to floor(size / crop_pct), the centre crop, [0, 1], then (x - mean) / std (`statistics`: other
    mean and std instead of the recorded ones)."""
    model, saved = load_model(ckpt)
    data, kwargs = saved["config"]["data"], saved["arch"]["kwargs"]
    size, mode = kwargs["img_size"], "L" if kwargs["in_chans"] == 1 else "RGB"
    short = math.floor(size / data["crop_pct"])
    mean, std = (torch.tensor(v, dtype=torch.float32).view(-1, 1, 1) for v in statistics or (data["mean"], data["std"]))
    batch = []
    for img in images:
        img = img.convert(mode)
        w, h = img.size
        new = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        img = img.resize(new, INTERPOLATION[data["interpolation"]])
        left, top = int(round((new[0] - size) / 2)), int(round((new[1] - size) / 2))
        img = img.crop((left, top, left + size, top + size))
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).reshape(size, size, -1).permute(2, 0, 1)
        batch.append((x - mean) / std)
    with torch.no_grad():
        return model.eval()(torch.stack(batch)), saved


def _score_three_ways(ckpt: Path, images: dict[str, tuple[Image.Image, int]], folder: Path, evaluated: dict, tmp):
    """Assert that evaluate's figures, the plain loop's and predict's on the ONNX export agree on `images` (name ->
    image, label; `folder` holds the same files by name)."""
    names = sorted(images)
    logits, saved = _plain_logits(ckpt, [images[n][0] for n in names])
    labels = torch.tensor([images[n][1] for n in names])
    top1 = logits.argmax(1)
    assert evaluated["images"] == len(names)
    assert evaluated[f"{evaluated['split']}_acc1"] == (top1 == labels).sum().item() / len(names)
    loss = nn.functional.cross_entropy(logits, labels).item()
    assert evaluated[f"{evaluated['split']}_loss"] == pytest.approx(loss, rel=1e-5)
    export_onnx(ckpt, tmp / "onnx")
    classes = json.loads((tmp / "onnx" / "model.json").read_text())["classes"]
    for c, name in enumerate(classes):  # per-class accuracy, by the class names the export records
        mine = labels == c
        assert evaluated[f"{evaluated['split']}_acc1/{name}"] == (top1[mine] == c).float().mean().item()
    predict(tmp / "onnx", folder, tmp / "predictions.csv", topk=1)
    with (tmp / "predictions.csv").open(newline="") as f:
        predicted = {row["path"]: row["label"] for row in csv.DictReader(f)}
    assert sorted(predicted) == names
    margin = logits.topk(2, dim=1).values.diff(dim=1).abs().squeeze(1)
    for name, top, gap in zip(names, top1.tolist(), margin.tolist()):
        if gap > 1e-4:  # a near tie may fall either way in another runtime's arithmetic
            assert predicted[name] == classes[top], name
    return saved


def _evaluate(tmp: Path, *args: str) -> dict:
    vitexp(*SHORT, *args, "task=evaluate", ALL_IMAGES, "hydra.run.dir=ev", cwd=tmp)
    return json.loads((tmp / "ev" / "results.json").read_text())


def _train(tmp: Path, *args: str) -> Path:
    vitexp(*SHORT, *args, "hydra.run.dir=run", cwd=tmp)
    return tmp / "run" / "checkpoints" / "best.pt"


def _digits_val_images(ckpt: Path, folder: Path) -> dict[str, tuple[Image.Image, int]]:
    """The held-out digits of the run that wrote `ckpt` (name -> image, label), also written to `folder` as PNGs."""
    saved = torch.load(ckpt, weights_only=True)
    _, val_idx = split_indices(1797, saved["config"]["data"]["val_size"], None, saved["config"]["seed"])
    digits, images = load_digits(), {}
    for i in val_idx:
        img = Image.fromarray((digits.images[i] * (255 / 16)).round().astype(np.uint8), mode="L")
        (folder / f"{i:04d}.png").parent.mkdir(exist_ok=True)
        img.save(folder / f"{i:04d}.png")
        images[f"{i:04d}.png"] = (img, int(digits.target[i]))
    return images


def test_digits_evaluate_plain_loop_and_onnx_agree(tmp_path):
    ckpt = _train(tmp_path)
    evaluated = _evaluate(tmp_path, f"ckpt_path={ckpt}")
    folder = tmp_path / "val_pngs"
    saved = _score_three_ways(ckpt, _digits_val_images(ckpt, folder), folder, evaluated, tmp_path)
    assert saved["config"]["data"]["mean"] == [0.5] and saved["config"]["data"]["std"] == [0.5]


def test_evaluate_normalises_with_the_checkpoints_statistics_not_the_command_lines(tmp_path, caplog):
    """A digits checkpoint trained (in-process) with other statistics than data=digits' [0.5] and [0.5], evaluated
    with those defaults on the command line: scored as the plain loop scores it with the recorded statistics, and one
    line says which statistics were used."""
    odd = ["data.mean=[0.8]", "data.std=[0.1]"]
    fit(read_recipe(compose_config(*SHORT, *odd)), tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints" / "best.pt"
    cfg = compose_config(*SHORT, ALL_IMAGES, "task=evaluate", f"ckpt_path={ckpt}")
    (tmp_path / "ev").mkdir()
    with caplog.at_level(logging.WARNING, logger="vitexp"):
        evaluated = evaluate.run(Run(cfg, typed(cfg), tmp_path / "ev"))
    assert f"normalising with the data.mean=[0.8] and data.std=[0.1] that {ckpt} was trained with" in caplog.text
    images = _digits_val_images(ckpt, tmp_path / "val_pngs")
    labels = torch.tensor([label for _, label in images.values()])
    logits, saved = _plain_logits(ckpt, [img for img, _ in images.values()])
    assert (saved["config"]["data"]["mean"], saved["config"]["data"]["std"]) == ([0.8], [0.1])
    assert evaluated["images"] == len(labels) and evaluated["split"] == "val"
    assert evaluated["val_acc1"] == (logits.argmax(1) == labels).sum().item() / len(labels)
    assert evaluated["val_loss"] == pytest.approx(nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)
    # what the command line's statistics would have scored: another loss, so the check above can fail
    other, _ = _plain_logits(ckpt, [img for img, _ in images.values()], ([0.5], [0.5]))
    assert evaluated["val_loss"] != pytest.approx(nn.functional.cross_entropy(other, labels).item(), rel=1e-3)
    saved["config"]["data"]["std"] = [0.0]  # a record that cannot normalise: refused, not replaced by the config's
    torch.save(saved, tmp_path / "flat.pt")
    cfg = compose_config(*SHORT, "task=evaluate", f"ckpt_path={tmp_path / 'flat.pt'}")
    with pytest.raises(VitexpError, match=r"flat\.pt records no data\.mean and data\.std as numbers \(a positive std"):
        evaluate.run(Run(cfg, typed(cfg), tmp_path / "ev"))


def _folder_images(split: Path) -> dict[str, tuple[Image.Image, int]]:
    classes = sorted(p.name for p in split.iterdir())
    return {
        f"{cls}/{f.name}": (Image.open(f), classes.index(cls))
        for cls in classes
        for f in sorted((split / cls).iterdir())
    }


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_image_options_evaluate_plain_loop_and_onnx_agree(option, cifar_folder, tmp_path):
    root = cifar_folder
    if option == "shards":  # the same tree written as shards
        root = tmp_path / "shards"
        assert shards.main([str(cifar_folder), "--out", str(root), "--samples-per-shard", "32", "--workers", "1"]) == 0
    args = (*OPTIONS[option], f"data.root={root}")
    ckpt = _train(tmp_path, *args)
    evaluated = _evaluate(tmp_path, *args, f"ckpt_path={ckpt}")
    assert evaluated["split"] == "test"
    saved = _score_three_ways(ckpt, _folder_images(cifar_folder / "test"), cifar_folder / "test", evaluated, tmp_path)
    expected = (CIFAR_MEAN, CIFAR_STD) if option == "cifar10" else (ODD_MEAN, ODD_STD)
    assert (saved["config"]["data"]["mean"], saved["config"]["data"]["std"]) == expected
    card = json.loads((tmp_path / "onnx" / "model.json").read_text())
    assert (card["mean"], card["std"]) == expected


def test_device_and_worker_loaders_give_the_same_batches_on_cifar_statistics(cifar_folder):
    def val_batches(on_device: str) -> list[torch.Tensor]:
        cfg = compose_config(*SHORT, "data=cifar10", f"data.root={cifar_folder}", on_device)
        return [x for x, _ in read_recipe(cfg).loaders[1]]

    device, worker = val_batches("data.on_device=true"), val_batches("data.on_device=false")
    assert len(device) == len(worker) > 0
    for a, b in zip(device, worker):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # normalised with CIFAR's statistics: the mean pixel of 30 CIFAR images is near 0, and ImageNet's would shift it
    pixels = torch.cat(worker).transpose(0, 1).flatten(1)
    assert pixels.mean(1).abs().max() < 0.35


def test_a_distilled_students_teacher_sees_images_normalised_as_it_was_trained(cifar_folder, tmp_path):
    """A teacher trained on CIFAR's statistics, a student on others (the same resize and crop): the teacher's logits
    on the student's validation batches, and distill's teacher accuracy, equal the plain loop's with the teacher's
    own statistics."""
    teacher_ckpt = _train(tmp_path, *OPTIONS["cifar10"], f"data.root={cifar_folder}")
    student = ["data=imagefolder", *PHOTOS, "data.crop_pct=1.0", "data.interpolation=bilinear"]
    cfg = compose_config(
        *SHORT, *student, f"data.root={cifar_folder}", "task=distill", f"task.teacher_ckpt={teacher_ckpt}"
    )
    recipe = read_recipe(cfg)
    teacher, saved = load_model(teacher_ckpt)
    data = saved["config"]["data"]
    distiller = Distiller(
        nn.Identity(), teacher, recipe.settings.data.mean, recipe.settings.data.std, data["mean"], data["std"], 24
    )
    scorer = TeacherOnly(distiller).eval()
    loader = make_loader(recipe.splits.val, 64, 0, train=False)
    with torch.no_grad():
        seen = torch.cat([scorer(x) for x, _ in loader])
    images = _folder_images(cifar_folder / "val")
    logits, _ = _plain_logits(teacher_ckpt, [img for img, _ in images.values()])
    torch.testing.assert_close(seen, logits, rtol=0, atol=1e-4)
    labels = torch.tensor([label for _, label in images.values()])
    assert score_teacher(recipe, scorer) == (logits.argmax(1) == labels).sum().item() / len(labels)


def test_a_bf16_validation_pass_scores_as_a_plain_autocast_loop_on_cifar_statistics(cifar_folder):
    """engine.evaluate under bf16 autocast (one region for the pass) against timm's validate loop written out (an
    autocast region per batch), on the CIFAR-10 val split normalised with CIFAR's statistics, 3 channels: the same
    logits, so the same loss, top-1 and top-5."""
    cfg = compose_config(
        *SHORT, "data=cifar10", "data.img_size=24", f"data.root={cifar_folder}", "data.on_device=false"
    )
    recipe = read_recipe(cfg)
    assert recipe.settings.data.mean == CIFAR_MEAN and recipe.settings.data.in_chans == 3
    torch.manual_seed(0)
    model = VisionTransformer(img_size=24, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=10).eval()
    loader = recipe.loaders[1]
    figures, _ = engine.evaluate(model, loader, torch.device("cpu"), 10, autocast_dtype=torch.bfloat16)
    logits, labels = [], []
    with torch.no_grad():
        for images, targets in loader:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits.append(model(images).float())
            labels.append(targets)
    logits, labels = torch.cat(logits), torch.cat(labels)
    top5 = logits.topk(5, dim=1).indices
    assert figures["images"] == len(labels) == 30
    assert figures["acc1"] == (top5[:, 0] == labels).sum().item() / 30
    assert figures["acc5"] == (top5 == labels[:, None]).any(dim=1).sum().item() / 30
    assert figures["loss"] == pytest.approx(nn.functional.cross_entropy(logits, labels).item(), rel=1e-6)
