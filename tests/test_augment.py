"""The on-device augmentation (vitexp/augment.py): each operation against torchvision's and timm's own at fixed
magnitudes, each image a function of its own draws, determinism for a seed, and the loader and CLI paths."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.auto_augment import AugmentOp
from torchvision.transforms import InterpolationMode
from torchvision.transforms import autoaugment as tv_autoaugment

from tests.conftest import TINY, compose_config, metric_rows, vitexp
from vitexp import VitexpError
from vitexp.augment import LAYER_DRAWS, RAND_INCREASING, TRIVIAL_WIDE, DeviceAugment
from vitexp.config import validate
from vitexp.data import DeviceLoader, set_epoch

FILL = [0.49, 0.48, 0.45]
# torchvision's and timm's names for our operations
TORCHVISION = {
    "identity": "Identity",
    "shear_x": "ShearX",
    "shear_y": "ShearY",
    "translate_x": "TranslateX",
    "translate_y": "TranslateY",
    "rotate": "Rotate",
    "brightness": "Brightness",
    "color": "Color",
    "contrast": "Contrast",
    "sharpness": "Sharpness",
    "posterize": "Posterize",
    "solarize": "Solarize",
    "autocontrast": "AutoContrast",
    "equalize": "Equalize",
}
TIMM = {
    "shear_x": "ShearX",
    "shear_y": "ShearY",
    "translate_x": "TranslateXRel",
    "translate_y": "TranslateYRel",
    "rotate": "Rotate",
    "brightness": "BrightnessIncreasing",
    "color": "ColorIncreasing",
    "contrast": "ContrastIncreasing",
    "sharpness": "SharpnessIncreasing",
    "posterize": "PosterizeIncreasing",
    "solarize": "SolarizeIncreasing",
    "autocontrast": "AutoContrast",
    "equalize": "Equalize",
    "invert": "Invert",
    "solarize_add": "SolarizeAdd",
}
BLENDS = {"brightness", "color", "contrast", "sharpness"}
GEOMETRIC = {"shear_x", "shear_y", "translate_x", "translate_y", "rotate"}


def photos(n: int = 4, seed: int = 0) -> torch.Tensor:
    """uint8 [n, 3, 32, 32] images with a photo's mix of smooth regions, edges and noise."""
    g = torch.Generator().manual_seed(seed)
    smooth = nn_up(torch.rand(n, 3, 8, 8, generator=g) * 255)
    return (smooth + torch.randn(smooth.shape, generator=g) * 10).clamp(0, 255).round().to(torch.uint8)


def nn_up(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.interpolate(x, size=32, mode="bicubic").clamp(0, 255)


def draws(op: int, n_ops: int, level: float, positive: bool, n: int = 4) -> torch.Tensor:
    """One layer's draws choosing operation `op` at magnitude `level` (a uniform), with the sign given, applied."""
    return torch.tensor([(op + 0.5) / n_ops, level, 0.25 if positive else 0.75, 0.0]).expand(n, LAYER_DRAWS)


@pytest.mark.parametrize("index", range(len(TRIVIAL_WIDE)), ids=[op.name for op in TRIVIAL_WIDE])
def test_trivial_operations_match_torchvision(index):
    """TrivialAugmentWide's operations at two of its 31 bins, both signs, against torchvision's `_apply_op` on the
    same uint8 tensors (bilinear, same fill). Exact, except the enhance blends: within 1 (we round as PIL does,
    torchvision truncates); geometric ones on a CPU whose kernels round a tie the other way: within 1
    on a few pixels."""
    op, images = TRIVIAL_WIDE[index], photos()
    aug = DeviceAugment("trivial", 1, 0, 0, 1.0, 0.0, FILL)
    space = tv_autoaugment.TrivialAugmentWide()._augmentation_space(31)
    magnitudes, signed = space[TORCHVISION[op.name]]
    for bin_ in (7, 24):
        for positive in (True, False):
            ours = aug(images, draws(index, len(TRIVIAL_WIDE), (bin_ + 0.5) / 31, positive=positive)).int()
            magnitude = float(magnitudes[bin_]) if magnitudes.ndim else 0.0
            # torchvision shifts content right for a positive translation, PIL (and we) left
            flip = op.name.startswith("translate") == positive
            magnitude = -magnitude if signed and flip else magnitude
            theirs = torch.stack(
                [
                    tv_autoaugment._apply_op(
                        image, TORCHVISION[op.name], magnitude, InterpolationMode.BILINEAR, [255 * f for f in FILL]
                    )
                    for image in images
                ]
            ).int()
            diff = (ours - theirs).abs()
            assert diff.max().item() <= (1 if op.name in BLENDS | GEOMETRIC else 0), (op.name, bin_, positive)
            # a sample that falls on a rounding tie may round the other way where a CPU's vector kernels sum the
            # bilinear weights in another order: a few pixels off by one, never more
            if op.name in GEOMETRIC:
                assert (diff > 0).float().mean().item() < 1e-3, (op.name, bin_, positive)


def _timm(name: str, magnitude: float, image: torch.Tensor, positive: bool) -> torch.Tensor:
    """timm's RandAugment operation (PIL) at `magnitude`, with the sign given (timm negates at random)."""
    op = AugmentOp(
        TIMM[name],
        prob=1.0,
        magnitude=magnitude,
        hparams={
            "img_mean": tuple(round(255 * f) for f in FILL),
            "interpolation": Image.BILINEAR,
            "translate_pct": 0.45,
        },
    )
    for seed in range(10):  # a seed whose one draw gives the sign wanted: timm negates when random() > 0.5
        if (random.Random(seed).random() <= 0.5) == positive:
            break
    random.seed(seed)
    out = op(Image.fromarray(image.permute(1, 2, 0).numpy()))
    return torch.from_numpy(np.array(out)).permute(2, 0, 1)


@pytest.mark.parametrize("index", range(len(RAND_INCREASING)), ids=[op.name for op in RAND_INCREASING])
def test_rand_operations_match_timm(index):
    """timm's RandAugment (increasing) operations on PIL images, magnitude 6.25 of 10 (whole-pixel shifts: 9 of 32),
    both signs. Colour operations within 2 (PIL rounds its grey and its means, we follow torchvision); geometric
    ones within 1 for >= 90% of the pixels: the rest lie on the border, where PIL fills a pixel whose source falls
    outside and torchvision (and we) blend the fill in by how far out it falls."""
    op, images = RAND_INCREASING[index], photos()
    aug = DeviceAugment("rand", 1, 6.25, 0.0, 1.0, 0.0, FILL)
    for positive in (True, False):
        ours = aug(images, draws(index, len(RAND_INCREASING), 0.5, positive=positive)).int()
        theirs = torch.stack([_timm(op.name, 6.25, image, positive=positive) for image in images]).int()
        diff = (ours - theirs).abs()
        if op.name in GEOMETRIC and not op.name.startswith("translate"):
            assert (diff <= 1).float().mean() >= 0.9, (op.name, positive, (diff <= 1).float().mean())
        else:
            assert diff.max() <= 2, (op.name, positive, diff.max())


def test_each_image_is_a_function_of_its_own_draws():
    aug = DeviceAugment("rand", 2, 9, 0.5, 0.5, 0.5, FILL)
    images = photos(1).expand(64, -1, -1, -1)  # one image, 64 times
    u = torch.rand(64, aug.n_draws, generator=torch.Generator().manual_seed(1))
    out = aug(images, u)
    for i in (0, 17, 63):  # the same image with the same row of draws, alone: the same result
        assert torch.equal(aug(images[i : i + 1], u[i : i + 1])[0], out[i])
    assert torch.equal(aug(images, u), out)  # same draws, same output
    distinct = {tuple(x.flatten().tolist()) for x in out}
    assert len(distinct) > 40  # different draws: different operations and magnitudes per image
    ops = (u[:, 0] * len(RAND_INCREASING)).long()
    assert len(set(ops.tolist())) >= 10  # the first layer alone chose >= 10 of the 15 operations


def test_random_erasing_draws_a_rectangle_of_2_to_33_percent():
    aug = DeviceAugment("trivial", 0, 0, 0, 1.0, 0.5, FILL)  # no operations: erasing alone
    images = torch.zeros(2000, 3, 32, 32, dtype=torch.uint8)
    u = torch.rand(2000, aug.n_draws, generator=torch.Generator().manual_seed(2))
    erased = (aug(images, u) != 0).any(dim=1)
    fraction = erased.flatten(1).float().mean(dim=1)
    hit = fraction > 0
    assert abs(hit.float().mean() - 0.5) < 0.05  # erase_prob
    assert torch.equal(hit, u[:, 0] < 0.5)
    assert fraction[hit].min() >= 0.015 and fraction[hit].max() <= 0.4  # 2-33% of the area, rounded to pixels
    rows, cols = erased.any(dim=2), erased.any(dim=1)  # each a rectangle: its area is its rows x its columns
    assert torch.equal(erased.sum(dim=(1, 2)), rows.sum(dim=1) * cols.sum(dim=1))


def _batches(policy: DeviceAugment, seed: int, epoch: int) -> list[torch.Tensor]:
    images = photos(64, seed=3)
    loader = DeviceLoader(
        images, torch.arange(64), 16, train=True, mean=FILL, std=[0.25] * 3, crop_padding=4, hflip=0.5, policy=policy
    )
    set_epoch(loader, seed, epoch)
    return [x for x, _ in loader]


def test_device_loader_augments_deterministically_for_a_seed():
    aug = DeviceAugment("rand", 2, 9, 0.5, 0.5, 0.25, FILL)
    first, again, other = _batches(aug, 0, 1), _batches(aug, 0, 1), _batches(aug, 0, 2)
    assert len(first) == 4 and all(torch.equal(a, b) for a, b in zip(first, again))
    assert not any(torch.equal(a, b) for a, b in zip(first, other))
    plain = _batches(None, 0, 1)  # the policy changes the images, not the order or the crop and flip draws
    assert not torch.equal(first[0], plain[0])


def test_settings_outside_the_ranges_are_one_line_errors():
    with pytest.raises(
        VitexpError, match="^data.device_augment.policy='auto' is not valid: choose one of null, trivial"
    ):
        validate(compose_config("data.device_augment.policy=auto"))
    with pytest.raises(
        VitexpError, match=r"^data.device_augment.magnitude=12.0 is not valid: it must be a number in \[0, 10\]"
    ):
        validate(compose_config("data.device_augment.magnitude=12"))


@pytest.mark.slow
def test_compiled_augmentation_equals_the_eager_one():
    eager = DeviceAugment("rand", 2, 9, 0.5, 0.5, 0.25, FILL)
    compiled = DeviceAugment("rand", 2, 9, 0.5, 0.5, 0.25, FILL, compile=True)
    images = photos(32)
    u = torch.rand(32, eager.n_draws, generator=torch.Generator().manual_seed(4))
    assert (eager(images, u).int() - compiled(images, u).int()).abs().max() <= 1  # fused float rounding


def test_device_augment_needs_the_device_path(tmp_path):
    proc = vitexp(*TINY, "data.device_augment.policy=trivial", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "data.device_augment runs with data.on_device=true" in proc.stderr
    proc = vitexp(
        *TINY,
        "data.on_device=true",
        "data.augment.rotate=0",
        "data.augment.auto_augment=rand-m9-n2",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2 and "use data.device_augment.policy=rand instead" in proc.stderr


def test_digits_train_with_the_device_policy(tmp_path):
    def train(name: str, *policy: str) -> list[dict[str, str]]:
        device = ["data.on_device=true", "data.augment.rotate=0", "trainer.precision=32"]
        vitexp(*TINY, *device, *policy, "trainer.max_epochs=1", f"hydra.run.dir={name}", cwd=tmp_path)
        assert json.loads((tmp_path / name / "results.json").read_text())["status"] == "completed"
        return metric_rows(tmp_path / name / "metrics.csv")

    augmented = train("rand", "data.device_augment.policy=rand", "data.device_augment.erase_prob=0.25")
    plain = train("plain")
    saved = torch.load(tmp_path / "rand" / "checkpoints" / "last.pt", weights_only=True)
    assert saved["config"]["data"]["device_augment"]["policy"] == "rand"
    assert math.isfinite(float(augmented[0]["train/loss"]))
    # the same seed and weights: only the augmented batches can move the training loss
    assert augmented[0]["train/loss"] != plain[0]["train/loss"]


def test_speedrun_and_baseline_recipes_run_an_epoch_on_cpu(cifar_small, tmp_path):
    """The two CIFAR-10 recipes with their device augmentation, shrunk to a few batches of real images on CPU."""
    for experiment in ("cifar10_speedrun", "cifar10_baseline"):
        vitexp(
            f"experiment={experiment}",
            f"data.root={cifar_small}",
            "data.val_size=100",
            "data.batch_size=50",
            "data.eval_batch_size=100",
            "data.num_workers=0",
            "trainer.device=cpu",
            "trainer.compile=false",
            "trainer.precision=32",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=2",
            "model.depth=1",
            "logger=none",
            f"hydra.run.dir={tmp_path / experiment}",
            cwd=tmp_path,
        )
        results = json.loads((tmp_path / experiment / "results.json").read_text())
        assert results["status"] == "completed" and results["val_images"] == 100 and results["epochs"] == 1
        saved = torch.load(tmp_path / experiment / "checkpoints" / "last.pt", weights_only=True)
        policy = {"cifar10_speedrun": None, "cifar10_baseline": "rand"}[experiment]  # their YAML's
        assert saved["step"] == 2 and saved["config"]["data"]["device_augment"]["policy"] == policy
        assert math.isfinite(float(metric_rows(tmp_path / experiment / "metrics.csv")[0]["train/loss"]))
