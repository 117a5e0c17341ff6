"""`python -m vitexp.predict`: a folder of real photos of every size and mode, bad files counted and named, the top-1
equal to task=evaluate's accuracy, the exported folder read without vitexp's training code."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.builders import data_of
from tests.conftest import REPO, TINY, vitexp
from vitexp import VitexpError
from vitexp.data import eval_transform
from vitexp.images import load_image
from vitexp.onnx_export import export_onnx
from vitexp.predict import predict, preprocess

# 32 pixels, the 2-block ViT on 4x4 patches, timm's evaluation resize and crop (bicubic, crop_pct 0.875)
SMALL = [*TINY, "data=imagefolder", "model=baseline", "data.num_classes=2", "data.img_size=32", "trainer.precision=32"]


@pytest.fixture(scope="module")
def trained(photos, tmp_path_factory) -> dict:
    """A model trained on 80 photos per class (30 more per class held out in test/) and its ONNX export."""
    cwd = tmp_path_factory.mktemp("predict")
    root = cwd / "data"
    for cls in ("china", "flower"):
        for i, path in enumerate(sorted((photos / "train" / cls).iterdir())):
            dest = root / ("train" if i < 80 else "test") / cls / path.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)
    vitexp(*SMALL, f"data.root={root}", "trainer.max_epochs=1", "hydra.run.dir=run", cwd=cwd)
    ckpt = cwd / "run" / "checkpoints" / "best.pt"
    export_onnx(ckpt, cwd / "onnx")
    return {"ckpt": ckpt, "onnx": cwd / "onnx", "test": root / "test", "root": root, "cwd": cwd}


@pytest.fixture(scope="module")
def evaluated(trained) -> dict:
    """task=evaluate's results.json for the trained model on the held-out photos."""
    vitexp(
        *SMALL,
        f"data.root={trained['root']}",
        "task=evaluate",
        f"ckpt_path={trained['ckpt']}",
        "trainer.limit_val_batches=null",
        "hydra.run.dir=ev",
        cwd=trained["cwd"],
    )
    return json.loads((trained["cwd"] / "ev" / "results.json").read_text())


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("source", ["onnx", "ckpt"])
def test_top1_on_a_labelled_folder_equals_evaluates_accuracy(trained, evaluated, source, tmp_path):
    rows, skipped = predict(trained[source], trained["test"], tmp_path / "p.csv", topk=1)
    table = _rows(tmp_path / "p.csv")
    assert rows == len(table) == evaluated["images"] == 60 and skipped == []
    correct = sum(row["label"] == row["path"].split("/")[0] for row in table)
    assert correct / rows == pytest.approx(evaluated["test_acc1"], abs=1e-9)
    assert list(table[0]) == ["path", "label", "prob"]


def test_engines_agree_on_labels_and_probabilities(trained, tmp_path):
    predict(trained["onnx"], trained["test"], tmp_path / "o.csv", topk=2)
    predict(trained["ckpt"], trained["test"], tmp_path / "t.csv", topk=2, engine="torch")
    onnx_rows, torch_rows = _rows(tmp_path / "o.csv"), _rows(tmp_path / "t.csv")
    assert [(r["path"], r["label"], r["label_2"]) for r in onnx_rows] == [
        (r["path"], r["label"], r["label_2"]) for r in torch_rows
    ]
    for a, b in zip(onnx_rows, torch_rows):
        assert float(a["prob"]) == pytest.approx(float(b["prob"]), abs=1e-5)
        assert float(a["prob"]) >= float(a["prob_2"]) and float(a["prob"]) + float(a["prob_2"]) == pytest.approx(
            1, 1e-5
        )


def test_a_mixed_folder_with_bad_files_runs_without_training_code(trained, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(trained["test"], mixed / "nested" / "deeper")  # grey, CMYK, alpha, palette, 16-bit, 6..900 px
    good = sorted((mixed / "nested" / "deeper" / "china").iterdir())[5]
    (mixed / "truncated.jpg").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 3])
    (mixed / "notes.txt").write_text("not an image")
    (mixed / "empty.png").write_bytes(b"")
    (mixed / "link.jpg").symlink_to(good)
    code = (
        "import sys; from vitexp.predict import main; main(sys.argv[1:]); "
        "assert not {'vitexp.training', 'vitexp.engine', 'vitexp.checkpoint', 'timm'} & set(sys.modules), sys.modules"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(trained["onnx"]), str(mixed), "--out", str(tmp_path / "p.csv"), "--topk", "5"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    table = _rows(tmp_path / "p.csv")
    assert len(table) == 60 and all(row["path"].startswith("nested/deeper/") for row in table)
    assert list(table[0]) == ["path", "label", "prob", "label_2", "prob_2"]  # top-5 of two classes: two
    assert {row["label"] for row in table} <= {"china", "flower"}
    for name in ("truncated.jpg", "notes.txt", "empty.png", "link.jpg"):
        assert f"skipped {name} (" in proc.stdout
    assert "60 images" in proc.stdout and "4 files skipped" in proc.stdout


@pytest.mark.parametrize(("crop_pct", "interpolation"), [(0.875, "bicubic"), (1.0, "bilinear")])
def test_preprocessing_is_the_evaluation_transform(photos, crop_pct, interpolation):
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    card = {"input_size": [3, 32, 32], "mean": mean, "std": std, "crop_pct": crop_pct, "interpolation": interpolation}
    seen = {"img_size": 32, "mean": mean, "std": std, "crop_pct": crop_pct, "interpolation": interpolation}
    ours, timms = preprocess(card), eval_transform(replace(data_of("data=imagefolder", "data.root=x"), **seen))
    for path in sorted((photos / "train").rglob("*.*"))[::9]:
        image = load_image(str(path))
        assert torch.equal(ours(image), timms(image)), path


def test_bad_cards_and_engines_are_one_line_errors(trained, tmp_path):
    folder = tmp_path / "export"
    shutil.copytree(trained["onnx"], folder)
    with pytest.raises(VitexpError, match="ONNX export; pass its checkpoint for --engine torch"):
        predict(folder, trained["test"], tmp_path / "p.csv", engine="torch")
    card = json.loads((folder / "model.json").read_text())
    (folder / "model.json").write_text(json.dumps({**card, "std": [0.0, 1, 1], "classes": "china"}))
    with pytest.raises(VitexpError, match="std, classes not as vitexp writes it"):
        predict(folder, trained["test"], tmp_path / "p.csv")
    (folder / "model.json").write_text(json.dumps({**card, "crop_pct": 1e-9}))  # a resize to 3e10 pixels
    with pytest.raises(VitexpError, match="crop_pct not as vitexp writes it"):
        predict(folder, trained["test"], tmp_path / "p.csv")
    (folder / "model.json").write_text(json.dumps({**card, "input_size": [3, 64, 64]}))
    with pytest.raises(
        VitexpError, match=r"inputs are \[images \['batch', 3, 32, 32\]\], not one float32 'images' \[N, 3, 64"
    ):
        predict(folder, trained["test"], tmp_path / "p.csv")
    (folder / "model.json").unlink()
    (folder / "model.json").symlink_to(trained["onnx"] / "model.json")
    with pytest.raises(VitexpError, match="link"):
        predict(folder, trained["test"], tmp_path / "p.csv")
    Image.new("RGB", (4, 4)).save(tmp_path / "one.png")
    with pytest.raises(VitexpError, match="is not a folder"):
        predict(trained["onnx"], tmp_path / "one.png", tmp_path / "p.csv")
