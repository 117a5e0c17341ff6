"""Per-image transforms: the training augmentation presets and timm's evaluation resize and crop."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from timm.data import auto_augment_transform, create_transform, rand_augment_transform, str_to_interp_mode
from timm.data.auto_augment import augment_and_mix_transform
from timm.data.random_erasing import RandomErasing
from torchvision import transforms

from vitexp import VitexpError

PRESETS = ("cifar", "imagenet")


def train_transform(
    preset: str,
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str,
    hflip: float,
    auto_augment: str | None,
    re_prob: float,
    crop_padding: int,
    rotate: float,
    scale: Sequence[float],
    ratio: Sequence[float],
    color_jitter: float | None,
) -> transforms.Compose:
    """The training augmentation of `preset`, always ending in square `img_size` tensors.

    `cifar` (small images): resize the short side, random shift (crop of the zero-padded image), flip, rotation.
    `imagenet` (photos of any size): timm's `create_transform`, i.e. RandomResizedCrop(`scale`, `ratio`), flip and
    colour jitter (off when `auto_augment` is set, as in timm). Both then apply timm's `auto_augment` policy
    (`rand-m9-mstd0.5-inc1`, `augmix-m5-w4-d2`, `original`, ...), normalise, and timm's random erasing (`re_prob`).
    """
    mean, std = _floats(mean), _floats(std)
    if preset == "imagenet":
        return create_transform(
            img_size,
            is_training=True,
            scale=tuple(_floats(scale)),
            ratio=tuple(_floats(ratio)),
            hflip=hflip,
            color_jitter=color_jitter,
            auto_augment=auto_augment,
            interpolation=interpolation,
            mean=mean,
            std=std,
            re_prob=re_prob,
            re_mode="pixel",
        )
    if preset != "cifar":
        raise VitexpError(f"data.transform={preset} is not a preset; choose one of {', '.join(PRESETS)}")
    ops: list[Callable] = [
        transforms.Resize(img_size, _interpolation(interpolation)),
        transforms.RandomCrop(img_size, padding=crop_padding),
    ]
    if hflip:
        ops.append(transforms.RandomHorizontalFlip(hflip))
    if rotate:
        ops.append(transforms.RandomRotation(rotate))
    if auto_augment:
        ops.append(_auto_augment(auto_augment, img_size, mean, interpolation))
    ops += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    if re_prob:
        ops.append(RandomErasing(re_prob, mode="pixel", device="cpu"))
    return transforms.Compose(ops)


def _auto_augment(policy: str, img_size: int, mean: list[float], interpolation: str) -> Callable:
    """timm's augmentation policy named `policy`, with the parameters timm's create_transform gives it."""
    fill = tuple(round(255 * m) for m in mean)
    params = {"translate_const": int(img_size * 0.45), "img_mean": fill}
    try:
        if policy.startswith("rand"):
            return rand_augment_transform(policy, params)
        if policy.startswith("augmix"):
            return augment_and_mix_transform(policy, params)
        return auto_augment_transform(policy, params)
    except (AssertionError, KeyError, ValueError, IndexError) as e:
        raise VitexpError(
            f"auto_augment={policy!r} is not a timm policy ({e}); use e.g. rand-m9-mstd0.5-inc1, "
            f"augmix-m5-w4-d2 or original"
        ) from None


def eval_transform(
    img_size: int, mean: Sequence[float], std: Sequence[float], crop_pct: float, interpolation: str
) -> transforms.Compose:
    """Deterministic square `img_size` tensors, as timm evaluates: resize the short side to `img_size / crop_pct`,
    center-crop `img_size`, normalise (crop_pct 1: resize and crop the long side only)."""
    if not 0 < crop_pct <= 1:
        raise VitexpError(f"data.crop_pct={crop_pct} must be in (0, 1]; timm's ImageNet value is 0.875")
    return create_transform(
        img_size,
        is_training=False,
        interpolation=interpolation,
        mean=_floats(mean),
        std=_floats(std),
        crop_pct=crop_pct,
    )


def _interpolation(name: str) -> transforms.InterpolationMode:
    try:
        return str_to_interp_mode(name)
    except KeyError:
        raise VitexpError(f"data.interpolation={name} is not one of bilinear, bicubic, nearest") from None


def _floats(values: Sequence[float]) -> list[float]:
    # Plain floats, not the config's ListConfig: Normalize would otherwise probe the ListConfig's attributes
    # for every image, and each failed probe raises and formats an OmegaConf error.
    return [float(v) for v in values]
