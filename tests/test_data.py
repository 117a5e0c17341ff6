"""Data sets and splits: embedded digits, ImageFolder trees, real CIFAR-10 images, clear errors."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from tests.builders import splits_of
from tests.conftest import compose_config
from vitexp import VitexpError
from vitexp.data import make_loader, set_epoch, split_indices


def test_split_is_seeded_disjoint_and_complete():
    train, val = split_indices(100, 20, None, seed=3)
    assert len(val) == 20 and len(train) == 80 and not set(train) & set(val)
    assert sorted(train + val) == list(range(100))
    assert split_indices(100, 20, None, seed=3) == (train, val)
    assert split_indices(100, 20, None, seed=4) != (train, val)
    assert len(split_indices(100, 0.25, 10, seed=0)[0]) == 10
    assert len(split_indices(100, 0.25, None, seed=0)[1]) == 25
    with pytest.raises(VitexpError, match="val_size"):
        split_indices(100, 100, None, seed=0)


def test_digits_splits_and_shapes():
    cfg = compose_config("data.img_size=16")
    splits = splits_of(cfg)
    assert (len(splits.train), len(splits.val), splits.test) == (1437, 360, None)
    image, label = splits.train[0]
    assert image.shape == (1, 16, 16) and 0 <= label < 10
    val_image, _ = splits.val[0]
    assert torch.equal(val_image, splits.val[0][0])  # no augmentation on val


def test_loader_order_depends_only_on_seed_and_epoch():
    splits = splits_of(compose_config())
    loader = make_loader(splits.train, 64, 0, train=True)

    def first_labels(epoch):
        set_epoch(loader, seed=0, epoch=epoch)
        return next(iter(loader))[1]

    a = first_labels(1)
    first_labels(2)
    assert torch.equal(a, first_labels(1))
    assert not torch.equal(a, first_labels(2))


def _write_tree(root, splits=("train",), per_class=6, classes=("cat", "dog", "fox")):
    for split in splits:
        for c, cls in enumerate(classes):
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (20, 24), (40 * c, 10 * i, 100)).save(root / split / cls / f"{i}.png")


def test_imagefolder_with_val_and_test(tmp_path):
    _write_tree(tmp_path, ("train", "val", "test"))
    cfg = compose_config("data=imagefolder", f"data.root={tmp_path}", "data.img_size=16", "data.num_classes=3")
    splits = splits_of(cfg)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (18, 18, 18)
    assert splits.classes == ["cat", "dog", "fox"]
    assert splits.train[0][0].shape == (3, 16, 16)


def test_imagefolder_without_val_splits_train(tmp_path):
    _write_tree(tmp_path, per_class=10)
    cfg = compose_config("data=imagefolder", f"data.root={tmp_path}", "data.val_size=0.2", "data.num_classes=3")
    splits = splits_of(cfg)
    assert (len(splits.train), len(splits.val), splits.test) == (24, 6, None)


@pytest.mark.parametrize("layout", ["missing", "empty", "no_images"])
def test_bad_data_folders_are_clear_errors(tmp_path, layout):
    root = tmp_path / "data"
    if layout != "missing":
        root.mkdir()
    if layout == "no_images":
        (root / "train" / "cat").mkdir(parents=True)
    cfg = compose_config("data=imagefolder", f"data.root={root}")
    with pytest.raises(VitexpError, match=str(root)):
        splits_of(cfg)


def test_cifar_offline_without_files_says_where_to_put_them(tmp_path):
    cfg = compose_config("data=cifar10", f"data.root={tmp_path / 'nothing'}", "data.download=false")
    with pytest.raises(VitexpError, match="data.root"):
        splits_of(cfg)


def test_real_cifar10_images_in_imagefolder_layout(cifar_small):
    cfg = compose_config("data=cifar10", f"data.root={cifar_small}", "data.val_size=100")
    splits = splits_of(cfg)
    assert splits.classes[:3] == ["airplane", "automobile", "bird"]
    assert (len(splits.train), len(splits.val)) == (500, 100)
    image, label = splits.train[0]
    assert image.shape == (3, 32, 32) and image.std() > 0.1
