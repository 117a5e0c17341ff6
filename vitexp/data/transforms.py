"""Per-image transforms of `data`: the training augmentation presets and timm's evaluation resize and crop."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from timm.data import (
    auto_augment_transform,
    create_transform,
    rand_augment_transform,
    str_to_interp_mode,
    str_to_pil_interp,
)
from timm.data.auto_augment import augment_and_mix_transform
from timm.data.random_erasing import RandomErasing
from torchvision import transforms

from vitexp import VitexpError
from vitexp.schema import Data


def train_transform(data: Data) -> transforms.Compose:
    """The training augmentation of preset `data.transform`, always ending in square `data.img_size` tensors
    normalised with `data.mean` and `data.std`.

    `cifar` (small images): resize the short side, random shift (crop of the zero-padded image), flip, rotation.
    `imagenet` (photos of any size): timm's `create_transform`, i.e. RandomResizedCrop(`scale`, `ratio`), flip and
    colour jitter (off when `auto_augment` is set, as in timm). Both then apply timm's `auto_augment` policy
    (`rand-m9-mstd0.5-inc1`, `augmix-m5-w4-d2`, `original`, ...), normalise, and timm's random erasing (`re_prob`).
    """
    aug, size, mean, std = data.augment, data.img_size, _floats(data.mean), _floats(data.std)
    if data.transform == "imagenet":
        return create_transform(
            size,
            is_training=True,
            scale=tuple(_floats(aug.scale)),
            ratio=tuple(_floats(aug.ratio)),
            hflip=aug.hflip,
            color_jitter=aug.color_jitter,
            auto_augment=aug.auto_augment,
            interpolation=data.interpolation,
            mean=mean,
            std=std,
            re_prob=aug.re_prob,
            re_mode="pixel",
        )
    ops: list[Callable] = [
        transforms.Resize(size, str_to_interp_mode(data.interpolation)),
        transforms.RandomCrop(size, padding=aug.crop_padding),
    ]
    if aug.hflip:
        ops.append(transforms.RandomHorizontalFlip(aug.hflip))
    if aug.rotate:
        ops.append(transforms.RandomRotation(aug.rotate))
    if aug.auto_augment:
        ops.append(_auto_augment(aug.auto_augment, size, mean, data.interpolation))
    ops += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    if aug.re_prob:
        ops.append(RandomErasing(aug.re_prob, mode="pixel", device="cpu"))
    return transforms.Compose(ops)


def _auto_augment(policy: str, img_size: int, mean: list[float], interpolation: str) -> Callable:
    """timm's augmentation policy named `policy`, with the parameters timm's create_transform gives it (the
    policy's geometric ops resample with `interpolation`; AugMix translates by at most 30%)."""
    fill = tuple(min(255, round(255 * m)) for m in mean)
    params = {
        "translate_const": int(img_size * 0.45),
        "img_mean": fill,
        "interpolation": str_to_pil_interp(interpolation),
    }
    try:
        if policy.startswith("rand"):
            return rand_augment_transform(policy, params)
        if policy.startswith("augmix"):
            return augment_and_mix_transform(policy, {**params, "translate_pct": 0.3})
        return auto_augment_transform(policy, params)
    except (AssertionError, KeyError, ValueError, IndexError) as e:
        raise VitexpError(
            f"data.augment.auto_augment={policy!r} is not a timm policy ({e}); use e.g. rand-m9-mstd0.5-inc1, "
            f"augmix-m5-w4-d2 or original"
        ) from None


def eval_transform(data: Data) -> transforms.Compose:
    """Deterministic square `data.img_size` tensors, as timm evaluates: resize the short side to `img_size /
    crop_pct`, center-crop `img_size`, normalise with `data.mean` and `data.std` (crop_pct 1: resize and crop the
    long side only)."""
    return create_transform(
        data.img_size,
        is_training=False,
        interpolation=data.interpolation,
        mean=_floats(data.mean),
        std=_floats(data.std),
        crop_pct=data.crop_pct,
    )


def _floats(values: Sequence[float]) -> list[float]:
    # Plain floats, not the config's ListConfig: Normalize would otherwise probe the ListConfig's attributes
    # for every image, and each failed probe raises and formats an OmegaConf error.
    return [float(v) for v in values]
