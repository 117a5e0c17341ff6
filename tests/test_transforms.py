"""The per-image transforms against a hand-written oracle: resize, crop, [0, 1] and `(x - mean) / std` with the
statistics they are given, for the evaluation transform and both training presets with their randomness off; the
random parts (flip, shift, erasing, policies) change what they should; bad settings are one-line errors."""

from __future__ import annotations

import functools
import math
import random
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform
from timm.data.auto_augment import AugMixAugment, AutoAugment, RandAugment
from timm.data.random_erasing import RandomErasing

from tests.builders import data_of
from vitexp import VitexpError, schema
from vitexp.data import eval_transform, train_transform

MEAN, STD = [0.31, 0.62, 0.47], [0.19, 0.33, 0.27]
PIL_MODES = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}
# the training presets with every random part off
STILL = {
    "hflip": 0.0,
    "auto_augment": None,
    "re_prob": 0.0,
    "crop_padding": 0,
    "rotate": 0.0,
    "scale": [1.0, 1.0],
    "ratio": [1.0, 1.0],
    "color_jitter": None,
}


@functools.cache
def _base() -> schema.Data:
    return data_of("data=imagefolder", "data.root=unused")


def _data(
    preset: str = "cifar",
    size: int = 24,
    mean: list[float] = MEAN,
    std: list[float] = STD,
    interpolation: str = "bilinear",
    crop_pct: float = 1.0,
    **augment: object,
) -> schema.Data:
    """Typed data settings as a config would give them: `augment` over STILL, checked by the schema."""
    base = _base()
    data = replace(
        base,
        transform=preset,
        img_size=size,
        in_chans=len(mean),
        mean=list(mean),
        std=list(std),
        interpolation=interpolation,
        crop_pct=crop_pct,
        augment=replace(base.augment, **{**STILL, **augment}),
    )
    schema.check(data, "data.")
    return data


def _photo(w: int = 40, h: int = 30, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), mode="RGB")


def _oracle(img: Image.Image, size: int, crop_pct: float, interpolation: str) -> torch.Tensor:
    """Short side to floor(size / crop_pct), centre crop `size`, [0, 1], (x - MEAN) / STD."""
    short = math.floor(size / crop_pct)
    w, h = img.size
    new = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    img = img.resize(new, PIL_MODES[interpolation])
    left, top = int(round((new[0] - size) / 2)), int(round((new[1] - size) / 2))
    x = torch.from_numpy(np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.float32) / 255)
    return (x.permute(2, 0, 1) - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


@pytest.mark.parametrize(("crop_pct", "interpolation"), [(1.0, "bilinear"), (0.875, "bicubic"), (0.9, "nearest")])
def test_eval_transform_is_resize_crop_and_the_given_normalisation(crop_pct, interpolation):
    img = _photo()
    out = eval_transform(_data(crop_pct=crop_pct, interpolation=interpolation))(img)
    torch.testing.assert_close(out, _oracle(img, 24, crop_pct, interpolation), rtol=0, atol=1e-5)


@pytest.mark.parametrize("preset", ["cifar", "imagenet"])
def test_a_training_preset_without_randomness_is_the_evaluation_transform(preset):
    img = _photo(32, 32)  # square: a full-area, square RandomResizedCrop is a resize
    out = train_transform(_data(preset, interpolation="bicubic"))(img)
    torch.testing.assert_close(out, _oracle(img, 24, 1.0, "bicubic"), rtol=0, atol=1e-5)


def test_flip_shift_rotation_and_erasing_each_change_the_image():
    img = _photo(24, 24)
    still = train_transform(_data())(img)
    flipped = train_transform(_data(hflip=1.0))(img)
    torch.testing.assert_close(flipped, still.flip(2), rtol=0, atol=0)
    for change in ({"crop_padding": 4}, {"rotate": 30.0}, {"re_prob": 1.0}, {"auto_augment": "rand-m9-mstd0.5-inc1"}):
        transform = train_transform(_data(**change))
        torch.manual_seed(0)
        outs = [transform(img) for _ in range(8)]
        assert all(o.shape == (3, 24, 24) for o in outs)
        assert any(not torch.equal(o, still) for o in outs), change


def test_imagenet_preset_crops_a_random_area_and_jitters_colour():
    img = _photo(48, 32)
    transform = train_transform(_data("imagenet", scale=[0.1, 0.5]))
    torch.manual_seed(0)
    outs = [transform(img) for _ in range(4)]
    assert all(o.shape == (3, 24, 24) for o in outs) and not torch.equal(outs[0], outs[1])
    jitter = train_transform(_data("imagenet", color_jitter=0.4))
    still = train_transform(_data("imagenet"))
    assert not torch.equal(jitter(_photo(32, 32)), still(_photo(32, 32)))


@pytest.mark.parametrize("policy", ["rand-m9-mstd0.5-inc1", "augmix-m5-w4-d2", "original"])
def test_timm_policies_build_and_keep_the_shape(policy):
    out = train_transform(_data(auto_augment=policy))(_photo(24, 24))
    assert out.shape == (3, 24, 24)


POLICIES = (RandAugment, AutoAugment, AugMixAugment)


def _policy(transform) -> object:
    (policy,) = [t for t in transform.transforms if isinstance(t, POLICIES)]
    return policy


def _described(policy) -> object:
    """A timm policy as comparable values: every op's name, functions, probability, magnitude and parameters."""
    if isinstance(policy, AutoAugment):
        return [[vars(op) for op in sub] for sub in policy.policy]
    layers = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in vars(policy).items() if k != "ops"}
    return layers, [vars(op) for op in policy.ops]


def _same_draws(ours, theirs, images: list[Image.Image]) -> None:
    """Both transforms, seeded alike (python, numpy and torch generators), give the same pixels for every image."""
    for i, img in enumerate(images):
        outs = []
        for transform in (ours, theirs):
            random.seed(i), np.random.seed(i), torch.manual_seed(i)
            out = transform(img)
            outs.append(torch.from_numpy(np.array(out)) if isinstance(out, Image.Image) else out)
        assert torch.equal(*outs), i


@pytest.mark.parametrize(
    ("policy", "interpolation"),
    [("rand-m9-mstd0.5-inc1", "bicubic"), ("augmix-m5-w4-d2", "nearest"), ("original", "bilinear"), ("v0r", "bicubic")],
)
def test_a_policy_gets_the_parameters_timm_create_transform_gives_it(policy, interpolation):
    mean = [0.8, 1.2, 0.47]  # a mean above 1: the fill is clamped to 255, as timm's own factory does
    ours = _policy(train_transform(_data(auto_augment=policy, interpolation=interpolation, mean=mean)))
    theirs = _policy(
        create_transform(24, is_training=True, auto_augment=policy, interpolation=interpolation, mean=mean)
    )
    assert type(ours) is type(theirs) and _described(ours) == _described(theirs)
    op = ours.ops[0] if hasattr(ours, "ops") else ours.policy[0][0]
    assert op.hparams["translate_const"] == 10 and op.hparams["img_mean"] == (204, 255, 120)  # 0.45 of 24, 255 * mean
    assert op.kwargs["resample"] == PIL_MODES[interpolation]
    assert op.hparams.get("translate_pct") == (0.3 if policy.startswith("augmix") else None)
    _same_draws(ours, theirs, [_photo(24, 24, seed) for seed in range(3)])


def test_the_imagenet_preset_is_timm_create_transform_with_the_documented_settings():
    settings = {"scale": [0.35, 0.9], "ratio": [0.6, 1.6], "hflip": 0.3, "re_prob": 0.5, "interpolation": "bicubic"}
    for augment in (
        {"auto_augment": "rand-m7-mstd0.5", "color_jitter": 0.4},
        {"auto_augment": None, "color_jitter": 0.3},
    ):
        options = {**settings, **augment}
        ours = train_transform(_data("imagenet", **options))
        theirs = create_transform(
            24,
            is_training=True,
            **{**options, "scale": (0.35, 0.9), "ratio": (0.6, 1.6)},
            mean=MEAN,
            std=STD,
            re_mode="pixel",
        )
        crop, erasing = ours.transforms[0], ours.transforms[-1]
        assert (crop.scale, crop.ratio, erasing.probability, erasing.mode) == ((0.35, 0.9), (0.6, 1.6), 0.5, "pixel")
        assert (
            (_described(_policy(ours)) == _described(_policy(theirs)))
            if augment["auto_augment"]
            else "Jitter" in repr(ours)
        )
        _same_draws(ours, theirs, [_photo(48, 32, seed) for seed in range(4)])


def test_the_cifar_preset_erases_with_noise_at_its_probability():
    """timm's RandomErasing (per-pixel noise, `re_prob`) after the still preset, seeded alike."""
    still, erasing = train_transform(_data()), RandomErasing(0.25, mode="pixel", device="cpu")
    ours = train_transform(_data(re_prob=0.25))
    erased = 0
    for seed in range(10):  # python's first draw decides: under 0.25 for 4 of these seeds, under 0.5 for 6
        img = _photo(24, 24, seed)
        torch.manual_seed(seed), random.seed(seed)
        expected = erasing(still(img))
        torch.manual_seed(seed), random.seed(seed)
        out = ours(img)
        assert torch.equal(out, expected)
        erased += not torch.equal(out, still(img))
    assert 0 < erased < 10


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: eval_transform(_data(crop_pct=0.0)),
            r"^data\.crop_pct=0\.0 is not valid: it must be a number in \(0, 1\]",
        ),
        (
            lambda: eval_transform(_data(crop_pct=1.5)),
            r"^data\.crop_pct=1\.5 is not valid: it must be a number in \(0, 1\]",
        ),
        (
            lambda: train_transform(_data("nope")),
            r"^data\.transform='nope' is not valid: choose one of cifar, imagenet$",
        ),
        (
            lambda: train_transform(_data(interpolation="lanczos9")),
            r"^data\.interpolation='lanczos9' is not valid: choose one of bilinear, bicubic, nearest$",
        ),
        (
            lambda: train_transform(_data(auto_augment="rand-zz9")),
            r"^data\.augment\.auto_augment='rand-zz9' is not a timm policy",
        ),
    ],
)
def test_bad_settings_are_one_line_errors(build, message):
    with pytest.raises(VitexpError, match=message):
        build()


def test_crop_pct_one_is_accepted():
    assert eval_transform(_data(size=8, mean=[0.5], std=[0.5]))(_photo(8, 8).convert("L")).shape == (1, 8, 8)
