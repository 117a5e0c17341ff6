"""An independent oracle for `task=evaluate`: a checkpoint trained on CIFAR-10 photos, scored by vitexp and by a
plain torchvision loop written here (PIL, resize and crop, ToTensor, `(x - mean) / std` with the statistics the
checkpoint records, forward, argmax), must give the same accuracy and loss on the same test images."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.nn import functional
from torchvision.transforms import functional as tf

from tests.conftest import CIFAR_TAR, TINY, vitexp
from vitexp import checkpoint

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _write_photos(root: Path, per_class: dict[str, int]) -> None:
    """20 training and 4 test photos per class: real CIFAR-10 JPEGs from ../shared where present, else seeded
    noise PNGs with a colour per class."""
    splits = [("train", 20), ("test", 4)]
    if CIFAR_TAR.is_file():
        with tarfile.open(CIFAR_TAR) as tar:
            for member in tar:
                parts = Path(member.name).parts
                if not member.isfile() or len(parts) < 3 or parts[-3] != "train":
                    continue
                n = per_class[parts[-2]] = per_class.get(parts[-2], 0) + 1
                if n <= 24:
                    split = "train" if n <= 20 else "test"
                    (root / split / parts[-2]).mkdir(parents=True, exist_ok=True)
                    (root / split / parts[-2] / parts[-1]).write_bytes(tar.extractfile(member).read())
                if len(per_class) == 10 and min(per_class.values()) >= 24:
                    return
    g = torch.Generator().manual_seed(0)
    for c in range(10):
        for split, n in splits:
            (root / split / f"class{c}").mkdir(parents=True)
            for i in range(n):
                pixels = (torch.rand(32, 32, 3, generator=g) * 160 + torch.tensor([c * 9, 90 - c * 9, 40])).byte()
                Image.fromarray(pixels.numpy()).save(root / split / f"class{c}" / f"{i}.png")


@pytest.fixture(scope="module")
def cifar_folder(tmp_path_factory) -> Path:
    """A CIFAR-style ImageFolder tree of 10 classes: 20 training and 4 test photos each."""
    root = tmp_path_factory.mktemp("cifar_oracle")
    _write_photos(root, {})
    return root


def _plain_scores(ckpt: Path, root: Path, mean: list[float], std: list[float]) -> tuple[float, float, int]:
    """Top-1 accuracy, mean cross-entropy and image count of the checkpoint on `root`/test, preprocessed by hand."""
    saved = torch.load(ckpt, weights_only=True)
    model, _ = checkpoint.load_model(ckpt)
    data = saved["config"]["data"]
    size = data["img_size"]
    short_side = int(size / data["crop_pct"])
    mean_t, std_t = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    images, labels = [], []
    for label, cls in enumerate(sorted(p.name for p in (root / "test").iterdir())):
        for path in sorted((root / "test" / cls).iterdir()):
            image = Image.open(path).convert("RGB")
            image = tf.center_crop(tf.resize(image, short_side, tf.InterpolationMode.BILINEAR), size)
            images.append((tf.to_tensor(image) - mean_t) / std_t)
            labels.append(label)
    x, y = torch.stack(images), torch.tensor(labels)
    with torch.no_grad():
        logits = model.eval()(x)
    correct = (logits.argmax(1) == y).sum().item()
    return correct / len(y), functional.cross_entropy(logits, y).item(), len(y)


def test_evaluate_equals_a_plain_torchvision_pass_with_the_recorded_statistics(cifar_folder, tmp_path):
    common = [*TINY, "data=cifar10", f"data.root={cifar_folder}", "trainer.precision=32"]
    vitexp(*common, "data.val_size=40", "trainer.max_epochs=1", "hydra.run.dir=train", cwd=tmp_path)
    best = tmp_path / "train" / "checkpoints" / "best.pt"
    args = ["task=evaluate", f"ckpt_path={best}", "trainer.limit_val_batches=null", "hydra.run.dir=eval"]
    vitexp(*common, *args, cwd=tmp_path)
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    recorded = torch.load(best, weights_only=True)["config"]["data"]
    assert recorded["mean"] == pytest.approx([0.4914, 0.4822, 0.4465])  # CIFAR's, not ImageNet's
    acc1, loss, images = _plain_scores(best, cifar_folder, recorded["mean"], recorded["std"])
    assert (results["split"], results["images"]) == ("test", images) == ("test", 40)
    assert results["test_acc1"] == acc1
    assert results["test_loss"] == pytest.approx(loss, rel=1e-5)
    # the check can tell the statistics apart: ImageNet's move the loss by far more than its tolerance
    _, imagenet_loss, _ = _plain_scores(best, cifar_folder, IMAGENET_MEAN, IMAGENET_STD)
    assert abs(imagenet_loss - loss) > 1e-3 * loss
