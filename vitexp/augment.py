"""Per-image random augmentation of uint8 image batches on their device: TrivialAugment, RandAugment and random
erasing, a different operation and magnitude for every image, every draw read from a given tensor of uniforms."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from vitexp.schema import Data

Tensor = torch.Tensor

# Draws per operation layer: which operation, its magnitude, its sign, whether it is applied.
LAYER_DRAWS = 4
# Draws for random erasing: whether, area, aspect ratio, top, left (then one colour draw per channel).
ERASE_DRAWS = 5
GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")


@dataclass(frozen=True)
class Op:
    """One operation of a policy: its kernel's name, and its argument at level (0..1, the magnitude) and sign."""

    name: str
    arg: Callable[[Tensor], Tensor] | None = None  # level in [0, 1] -> the kernel's argument
    signed: bool = field(default=False, kw_only=True)  # the argument is negated for half the images


def _enhance(top: float) -> Callable[[Tensor], Tensor]:
    return lambda level: level * top  # the blend factor is 1 + (signed) this


# torchvision's TrivialAugmentWide (Mueller & Hutter 2021, the "wide" ranges found best on CIFAR): 31 magnitude
# bins, one operation per image. Translation is a fraction of the image side (up to 32 pixels at CIFAR's 32).
TRIVIAL_WIDE = (
    Op("identity"),
    Op("shear_x", lambda level: level * 0.99, signed=True),
    Op("shear_y", lambda level: level * 0.99, signed=True),
    Op("translate_x", lambda level: level * 1.0, signed=True),
    Op("translate_y", lambda level: level * 1.0, signed=True),
    Op("rotate", lambda level: level * 135.0, signed=True),
    Op("brightness", _enhance(0.99), signed=True),
    Op("color", _enhance(0.99), signed=True),
    Op("contrast", _enhance(0.99), signed=True),
    Op("sharpness", _enhance(0.99), signed=True),
    Op("posterize", lambda level: 8 - (level * 6).round()),
    Op("solarize", lambda level: 255.0 * (1 - level)),
    Op("autocontrast"),
    Op("equalize"),
)

# timm's RandAugment with increasing-severity operations ("rand-mM-nN-mstdS-inc1", as in the Compact Transformers
# CIFAR recipe): magnitude M of 10, each operation applied with probability `op_prob`, the magnitude jittered.
RAND_INCREASING = (
    Op("autocontrast"),
    Op("equalize"),
    Op("invert"),
    Op("rotate", lambda level: level * 30.0, signed=True),
    Op("posterize", lambda level: 4 - (level * 4).floor()),
    Op("solarize", lambda level: 256 - (level * 256).floor()),
    Op("solarize_add", lambda level: (level * 110).floor()),
    Op("color", _enhance(0.9), signed=True),
    Op("contrast", _enhance(0.9), signed=True),
    Op("brightness", _enhance(0.9), signed=True),
    Op("sharpness", _enhance(0.9), signed=True),
    Op("shear_x", lambda level: level * 0.3, signed=True),
    Op("shear_y", lambda level: level * 0.3, signed=True),
    Op("translate_x", lambda level: level * 0.45, signed=True),
    Op("translate_y", lambda level: level * 0.45, signed=True),
)

POLICIES = {"trivial": TRIVIAL_WIDE, "rand": RAND_INCREASING}


class DeviceAugment:
    """`aug(images, u)`: a policy's random operations and random erasing on a uint8 batch [B, C, H, W], image i's
    every choice a function of its row u[i] of `n_draws` uniforms in [0, 1) alone, so that a batch is reproduced
    from its draws wherever they come from.

    Each image gets `num_ops` operations, each drawn uniformly (with replacement) from the policy's table and
    applied with probability `op_prob`. policy `trivial`: TrivialAugmentWide's operations and ranges, the magnitude
    uniform over its 31 bins (`magnitude` and `magnitude_std` unused; TrivialAugmentWide itself is num_ops=1,
    op_prob=1). policy `rand`: timm's RandAugment with increasing operations, at `magnitude` of 10 plus Gaussian
    noise of `magnitude_std`, clipped to [0, 10] (timm's rand-m9-n2-mstd0.5-inc1 is 2, 9, 0.5, op_prob 0.5).
    Geometric operations sample bilinearly and fill with `fill` (per-channel, 0..1, e.g. the data mean).
    Random erasing (timm's, with probability `erase_prob`): a rectangle of 2-33% of the image with aspect ratio
    in [1/3, 3], clipped to fit instead of redrawn, filled with a random colour.
    """

    def __init__(
        self,
        policy: str,
        num_ops: int,
        magnitude: float,
        magnitude_std: float,
        op_prob: float,
        erase_prob: float,
        fill: Sequence[float],
        *,
        compile: bool = False,
    ) -> None:
        self.policy, self.ops = policy, POLICIES[policy]
        self.num_ops, self.magnitude, self.magnitude_std = num_ops, magnitude, magnitude_std
        self.op_prob, self.erase_prob = op_prob, erase_prob
        self.fill = [255.0 * float(f) for f in fill]
        self.n_draws = num_ops * LAYER_DRAWS + (ERASE_DRAWS + len(self.fill) if erase_prob > 0 else 0)
        # `compile`: one fused graph instead of several hundred small kernels per batch, whose launches would
        # otherwise cost the GPU step more than their arithmetic does
        self.run = torch.compile(self.augment, dynamic=False) if compile else self.augment

    def __call__(self, images: Tensor, u: Tensor) -> Tensor:
        """The augmented uint8 batch; `u` [B, n_draws] holds each image's uniforms."""
        if u.shape != (images.shape[0], self.n_draws):
            raise ValueError(f"expected draws of shape {(images.shape[0], self.n_draws)}, got {tuple(u.shape)}")
        return self.run(images, u)

    def augment(self, images: Tensor, u: Tensor) -> Tensor:
        """`__call__` without the check of `u`'s shape, uncompiled."""
        x = images.float()
        for layer in range(self.num_ops):
            x = self._layer(x, u[:, layer * LAYER_DRAWS : (layer + 1) * LAYER_DRAWS])
        if self.erase_prob > 0:
            x = erase(x, u[:, self.num_ops * LAYER_DRAWS :], self.erase_prob)
        return x.to(torch.uint8)

    def levels(self, u: Tensor) -> Tensor:
        """Each image's magnitude in [0, 1] from its uniform."""
        if self.policy == "trivial":
            return (u * 31).floor().clamp(max=30) / 30  # torchvision's 31 bins, uniform
        noise = math.sqrt(2) * torch.erfinv((2 * u - 1).clamp(-1 + 1e-7, 1 - 1e-7)) * self.magnitude_std
        return ((self.magnitude + noise) / 10).clamp(0, 1)

    def _layer(self, x: Tensor, u: Tensor) -> Tensor:
        """One operation per image (op index from u[:, 0], level from u[:, 1], sign from u[:, 2], applied when
        u[:, 3] < op_prob), every kind of operation run on the whole batch and each image's own kept."""
        choice = (u[:, 0] * len(self.ops)).long().clamp(max=len(self.ops) - 1)
        level = self.levels(u[:, 1])
        sign = torch.where(u[:, 2] < 0.5, 1.0, -1.0)
        choice = torch.where(u[:, 3] < self.op_prob, choice, -1)  # -1: not applied
        theta = torch.eye(2, 3, device=x.device).repeat(len(x), 1, 1)
        out, geometric = x, torch.zeros_like(choice, dtype=torch.bool)
        for i, op in enumerate(self.ops):
            if op.name == "identity":
                continue
            arg = op.arg(level) if op.arg else level
            arg = arg * sign if op.signed else arg
            chosen = choice == i
            if op.name in GEOMETRIC:
                theta = torch.where(chosen[:, None, None], inverse_affine(op.name, arg, x.shape), theta)
                geometric |= chosen
            else:
                out = torch.where(chosen[:, None, None, None], COLOUR[op.name](x, arg), out)
        return torch.where(geometric[:, None, None, None], warp(x, theta, self.fill), out)


def inverse_affine(name: str, arg: Tensor, shape: torch.Size) -> Tensor:
    """[B, 2, 3] maps from output to input pixel positions (centred coordinates, y down) of a rotation by `arg`
    degrees (counter-clockwise), a shear by factor `arg` about the top-left corner, or a shift by `arg` of the side."""
    h, w = shape[-2:]
    zero, one = torch.zeros_like(arg), torch.ones_like(arg)
    if name == "rotate":
        rad = torch.deg2rad(arg)
        cos, sin = rad.cos(), rad.sin()
        rows = [(cos, -sin, zero), (sin, cos, zero)]
    elif name == "shear_x":  # x_in = x + s (y + h/2): the corner row stays put, as PIL's and torchvision's
        rows = [(one, arg, arg * h / 2), (zero, one, zero)]
    elif name == "shear_y":
        rows = [(one, zero, zero), (arg, one, arg * w / 2)]
    elif name == "translate_x":  # whole pixels (torchvision's), content moving left for a positive shift (PIL's)
        rows = [(one, zero, (arg * w).trunc()), (zero, one, zero)]
    else:
        rows = [(one, zero, zero), (zero, one, (arg * h).trunc())]
    return torch.stack([torch.stack(row, dim=-1) for row in rows], dim=1)


def warp(x: Tensor, theta: Tensor, fill: Sequence[float]) -> Tensor:
    """Each image of the float batch resampled (bilinear) at theta[i] @ (x, y, 1) of each output pixel, places
    outside the image filled with `fill` in proportion to how far out they are (torchvision's rule), rounded."""
    b, c, h, w = x.shape
    ys = torch.arange(h, device=x.device, dtype=x.dtype) - (h - 1) / 2
    xs = torch.arange(w, device=x.device, dtype=x.dtype) - (w - 1) / 2
    base = torch.stack([xs.expand(h, w), ys[:, None].expand(h, w), torch.ones(h, w, device=x.device)], dim=-1)
    grid = torch.einsum("hwk,bjk->bhwj", base, theta) / torch.tensor([w / 2, h / 2], device=x.device)
    with_mask = torch.cat([x, torch.ones(b, 1, h, w, device=x.device)], dim=1)
    sampled = nn.functional.grid_sample(with_mask, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    image, mask = sampled[:, :c], sampled[:, c:]
    fill_t = torch.tensor(fill, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (image * mask + (1 - mask) * fill_t).round().clamp(0, 255)


def _grey(x: Tensor) -> Tensor:
    """ITU-R 601 luma, [B, 1, H, W] (the image itself when it has one channel)."""
    if x.shape[1] == 1:
        return x
    return (0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).clamp(0, 255)


def _blend(x: Tensor, degenerate: Tensor, factor: Tensor) -> Tensor:
    """PIL's ImageEnhance: degenerate + factor (x - degenerate), clipped and rounded."""
    f = factor.view(-1, 1, 1, 1)
    return (degenerate + f * (x - degenerate)).clamp(0, 255).round()


def brightness(x: Tensor, arg: Tensor) -> Tensor:
    """Blend with black by factor 1 + arg."""
    return _blend(x, torch.zeros_like(x), 1 + arg)


def color(x: Tensor, arg: Tensor) -> Tensor:
    """Saturation: blend with the image's grey by factor 1 + arg."""
    return _blend(x, _grey(x).floor(), 1 + arg)


def contrast(x: Tensor, arg: Tensor) -> Tensor:
    """Blend with the image's mean grey by factor 1 + arg."""
    return _blend(x, _grey(x).mean(dim=(1, 2, 3), keepdim=True), 1 + arg)


def sharpness(x: Tensor, arg: Tensor) -> Tensor:
    """Blend with the image smoothed by PIL's SMOOTH kernel inside a one-pixel border (the border kept)."""
    h, w = x.shape[-2:]
    # the 3x3 kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 as nine shifted sums, not conv2d: exact in float32
    # (cuDNN may use TF32) and the same on every run, which an exact resume needs
    total = sum(x[:, :, i : h - 2 + i, j : w - 2 + j] for i in range(3) for j in range(3))
    smooth = ((total + 4 * x[:, :, 1:-1, 1:-1]) / 13).round().clamp(0, 255)
    degenerate = x.clone()
    degenerate[:, :, 1:-1, 1:-1] = smooth
    return _blend(x, degenerate, 1 + arg)


def posterize(x: Tensor, bits: Tensor) -> Tensor:
    """Keep the top `bits` bits (0..8) of each value."""
    step = torch.exp2(8 - bits).view(-1, 1, 1, 1)
    return (x / step).floor() * step


def solarize(x: Tensor, threshold: Tensor) -> Tensor:
    """Invert the values at or above `threshold`."""
    return torch.where(x >= threshold.view(-1, 1, 1, 1), 255 - x, x)


def solarize_add(x: Tensor, add: Tensor) -> Tensor:
    """timm's SolarizeAdd: `add` added to values below 128, clipped."""
    return torch.where(x < 128, (x + add.view(-1, 1, 1, 1)).clamp(max=255), x)


def invert(x: Tensor, arg: Tensor) -> Tensor:
    """255 - x (`arg` unused)."""
    return 255 - x


def autocontrast(x: Tensor, arg: Tensor) -> Tensor:
    """Each channel stretched to 0..255 (unchanged where it is flat), truncated as PIL's lookup table is."""
    lo, hi = x.amin(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)
    flat = hi == lo
    lo, hi = torch.where(flat, 0.0, lo), torch.where(flat, 255.0, hi)
    return ((x - lo) * (255 / (hi - lo))).clamp(0, 255).floor()


def equalize(x: Tensor, arg: Tensor) -> Tensor:
    """PIL's ImageOps.equalize for each channel of each image: histograms of all B*C channels at once."""
    b, c, h, w = x.shape
    values = x.long().reshape(b * c, h * w)
    # scatter_add, not bincount: a fixed output size, which torch.compile can fuse; float counts (exact below
    # 2**24) because every GPU has float atomics
    hist = torch.zeros(b * c, 256, dtype=x.dtype, device=x.device).scatter_add_(
        1, values, torch.ones_like(x).view(b * c, -1)
    )
    last = hist.gather(1, values.amax(dim=1, keepdim=True))  # count of the highest value present
    step = torch.div(h * w - last, 255, rounding_mode="floor")
    cum = hist.cumsum(dim=1) - hist  # pixels below each value
    lut = torch.div(torch.div(step, 2, rounding_mode="floor") + cum, step.clamp(min=1), rounding_mode="floor")
    identity = torch.arange(256, device=x.device, dtype=x.dtype).expand(b * c, 256)
    lut = torch.where(step > 0, lut.clamp(max=255), identity)
    return lut.gather(1, values).view(b, c, h, w)


COLOUR: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "brightness": brightness,
    "color": color,
    "contrast": contrast,
    "sharpness": sharpness,
    "posterize": posterize,
    "solarize": solarize,
    "solarize_add": solarize_add,
    "invert": invert,
    "autocontrast": autocontrast,
    "equalize": equalize,
}


def erase(x: Tensor, u: Tensor, prob: float) -> Tensor:
    """timm's RandomErasing (one rectangle of 2-33% of the area, aspect ratio 1/3..3), from u[:, :5] (whether,
    area, log aspect, top, left) and a colour from u[:, 5:5+C] per image."""
    b, c, h, w = x.shape
    area = (0.02 + u[:, 1] * (1 / 3 - 0.02)) * h * w
    aspect = torch.exp(math.log(1 / 3) + u[:, 2] * (math.log(3) - math.log(1 / 3)))
    eh = (area * aspect).sqrt().round().clamp(1, h - 1)
    ew = (area / aspect).sqrt().round().clamp(1, w - 1)
    top = (u[:, 3] * (h - eh + 1)).floor()
    left = (u[:, 4] * (w - ew + 1)).floor()
    rows = torch.arange(h, device=x.device)[None, :]
    cols = torch.arange(w, device=x.device)[None, :]
    inside_r = (rows >= top[:, None]) & (rows < (top + eh)[:, None])
    inside_c = (cols >= left[:, None]) & (cols < (left + ew)[:, None])
    mask = inside_r[:, :, None] & inside_c[:, None, :] & (u[:, 0] < prob)[:, None, None]
    colour = (u[:, 5 : 5 + c] * 256).floor().clamp(max=255)
    return torch.where(mask[:, None], colour[:, :, None, None], x)


def device_augment(data: Data, *, compile: bool) -> DeviceAugment | None:
    """`data.device_augment`'s policy (None when off), filling with `data.mean`; torch.compiled with `compile`."""
    settings = data.device_augment
    if settings.policy is None:
        return None
    return DeviceAugment(**asdict(settings), fill=data.mean, compile=compile)  # the schema's names are the arguments
