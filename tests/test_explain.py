"""`python -m vitexp.explain` and its maps: a pointing game on images whose class is where a bright square lies, the
randomisation check of Adebayo et al. (2018), a map of the input's size for every model kind vitexp trains, and the
command on a real checkpoint and a folder with bad files."""

from __future__ import annotations

import csv
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import spearmanr

from tests.builders import build
from tests.conftest import REPO, TINY, compose_config, vitexp
from vitexp import VitexpError, engine
from vitexp.explain import CAM_METHODS, METHODS, Mistakes, explain, explain_batch, main, plot_mistakes, rollout
from vitexp.tasks.recipe import read_recipe
from vitexp.training import fit

SIZE = 16  # pixels; patch 4: a 4x4 grid, each quadrant 2x2 patches
TINY_VIT = {"patch_size": 4, "in_chans": 3, "num_classes": 4, "embed_dim": 64, "depth": 2, "num_heads": 4}


def quadrant_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` noise images (values in [0, 0.5], normalised) with a bright 4x4 square anywhere inside one quadrant; the
    class is the quadrant (0 top left, 1 top right, 2 bottom left, 3 bottom right)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, SIZE, SIZE, generator=gen) * 0.5
    y = torch.randint(0, 4, (n,), generator=gen)
    half, side = SIZE // 2, SIZE // 4
    for i, corner in enumerate(torch.randint(0, half - side + 1, (n, 2), generator=gen).tolist()):
        top, left = divmod(int(y[i]), 2)
        row, col = top * half + corner[0], left * half + corner[1]
        x[i, :, row : row + side, col : col + side] = 1.0
    return (x - 0.5) / 0.25, y


def quadrant_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build("vit", "baseline", img_size=SIZE, mlp_ratio=2.0, qkv_bias=True, **TINY_VIT)


@pytest.fixture(scope="module")
def trained() -> torch.nn.Module:
    """The tiny ViT trained on quadrant images until it classifies them, then 100 steps more, which sharpen its
    maps (about 400 AdamW steps, ~15 s)."""
    model, right, extra = quadrant_model(0), 0, 0
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for step in range(800):
        x, y = quadrant_images(64, seed=1000 + step)
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        right = right + 1 if (logits.argmax(1) == y).all() else 0
        extra += right >= 5 or extra > 0  # counting from the fifth batch in a row all right
        if extra == 100:
            break
    model.eval()
    x, y = quadrant_images(40, seed=1)
    assert (model(x).argmax(1) == y).float().mean() >= 0.95
    return model


def hits(maps: np.ndarray, y: torch.Tensor) -> float:
    """The fraction of maps whose peak lies in the quadrant of the image's square."""
    half = maps.shape[-1] // 2
    peaks = [np.unravel_index(int(np.argmax(m)), m.shape) for m in maps]
    return float(np.mean([(py // half) * 2 + px // half == int(c) for (py, px), c in zip(peaks, y)]))


def test_the_peak_of_rollout_and_layercam_falls_in_the_square_and_gradcams_above_chance(trained):
    x, y = quadrant_images(40, seed=2)
    found = {method: hits(explain_batch(trained, x, method)[0], y) for method in ("rollout", "layercam", "gradcam")}
    assert found["rollout"] >= 0.8 and found["layercam"] >= 0.8, found
    assert found["gradcam"] >= 0.4, found  # chance is 0.25: Grad-CAM localises worse on a ViT (docs/explain.md)


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho of two maps; a constant map ranks no pixel above another: 0."""
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(spearmanr(a.ravel(), b.ravel()).statistic)


@pytest.mark.parametrize("method", ["gradcam", "layercam", "rollout"])
def test_maps_of_the_trained_and_a_reinitialised_model_differ(trained, method):
    x, _ = quadrant_images(20, seed=3)
    ours, targets, _ = explain_batch(trained, x, method)
    random = quadrant_model(seed=7)
    theirs = explain_batch(random, x, method)[0]
    rho = np.mean([rank_correlation(a, b) for a, b in zip(ours, theirs)])
    assert rho < 0.5, rho
    assert len(set(targets.tolist())) > 1  # the trained model explains several classes, not one


def _vit(**extra) -> dict:
    return {"img_size": 32, "mlp_ratio": 2.0, **TINY_VIT, "patch_size": 4, **extra}


def _timm(name: str, model_name: str, **extra) -> torch.nn.Module:
    sizes = {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2} if "resnet" not in model_name else {}
    size = {"img_size": 32, "in_chans": 3, "num_classes": 4, "pretrained": False}
    return build("timm", name, model_name=model_name, **size, **sizes, **extra)


KINDS = {
    "baseline": lambda: build("vit", "baseline", **_vit()),
    "patch8": lambda: build("vit", "patch8", **_vit(patch_size=8)),
    "pruned": lambda: build("vit", "pruned", **_vit(num_heads=4, embed_dim=64, layout=[[3, 64], [1, 32]])),
    "token-distilled": lambda: build("vit_distilled", "token", **_vit()),
    "timm DeiT": lambda: _timm("deit", "deit_tiny_distilled_patch16_224"),
    "timm ViT with registers": lambda: _timm("reg", "vit_small_patch14_reg4_dinov2"),
    "timm ViT with registers, no class token": lambda: _timm("gap", "vit_medium_patch16_reg4_gap_256"),
    "CNN teacher": lambda: _timm("resnet18", "resnet18", small_input=True),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_model_kind_maps_the_whole_image_without_nan(kind):
    torch.manual_seed(0)
    model = KINDS[kind]()
    x = torch.randn(2, 3, 32, 32)
    methods = CAM_METHODS if kind == "CNN teacher" else METHODS
    for method in methods:
        maps, targets, probs = explain_batch(model, x, method)
        assert maps.shape == (2, 32, 32) and np.isfinite(maps).all(), method
        assert maps.min() >= 0 and maps.max() <= 1 + 1e-6 and probs.shape == (2, 4), method
    if kind == "CNN teacher":
        with pytest.raises(VitexpError, match="rollout needs a ViT"):
            rollout(model, x)


def test_rollout_reads_each_blocks_own_heads_and_restores_fused_attention():
    model = KINDS["pruned"]()
    assert [b.attn.num_heads for b in model.blocks] == [3, 1]
    fused = [b.attn.fused_attn for b in model.blocks]
    from vitexp.explain import attentions

    found = attentions(model, torch.randn(1, 3, 32, 32))
    assert [a.shape[1] for a in found] == [3, 1] and torch.allclose(found[0].sum(-1), torch.ones(1, 3, 65))
    assert [b.attn.fused_attn for b in model.blocks] == fused


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory) -> Path:
    """A tiny ViT trained one epoch on the digits, in-process."""
    out = tmp_path_factory.mktemp("digits")
    fit(read_recipe(compose_config(*TINY, "trainer.max_epochs=1")), out)
    return out / "checkpoints" / "best.pt"


def _digit_folder(root: Path) -> Path:
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i in range(5):
        folder = root / "nested" / str(digits.target[i]) if i % 2 else root
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).resize((24, 24)).save(folder / f"d{i}.png")
    (root / "notes.txt").write_text("not an image")
    (root / "link.png").symlink_to(root / "d0.png")
    return root


def test_the_command_writes_an_overlay_per_image_a_grid_and_explain_csv(digits_ckpt, tmp_path):
    images = _digit_folder(tmp_path / "images")
    proc = subprocess.run(
        [sys.executable, "-m", "vitexp.explain", str(digits_ckpt), str(images), "--method", "gradcam++"]
        + ["--out", str(tmp_path / "out")],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert (
        "5 images explained by gradcam++; 2 files skipped" in proc.stdout and "link.png (a symbolic link" in proc.stdout
    )
    with (tmp_path / "out" / "explain.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == ["d0.png", "d2.png", "d4.png", "nested/1/d1.png", "nested/3/d3.png"]
    assert all(r["label"] in "0123456789" and 0 < float(r["prob"]) <= 1 for r in rows)
    assert all(0 <= int(r["peak_x"]) < 16 and 0 <= int(r["peak_y"]) < 16 for r in rows)  # digits: 16-pixel inputs
    for row in rows:
        assert Image.open(tmp_path / "out" / "images" / f"{row['path']}.png").size[0] > 300
    assert Image.open(tmp_path / "out" / "grid.png").size[0] > 5 * 100


def test_a_target_class_is_explained_and_bad_arguments_are_one_line_errors(digits_ckpt, tmp_path, capsys):
    images = _digit_folder(tmp_path / "images")
    rows, skipped = explain(digits_ckpt, images / "d0.png", tmp_path / "one", method="rollout", target="7")
    assert [(r.path, r.label) for r in rows] == [("d0.png", "7")] and skipped == []
    assert Image.open(tmp_path / "one" / "images" / "d0.png.png").size[0] > 300
    rows, skipped = explain(digits_ckpt, images, tmp_path / "batches", method="eigencam", batch_size=2)
    assert len(rows) == 5 and len(skipped) == 2  # batches of 2, 2, 1 around the skipped files
    with pytest.raises(VitexpError, match="--target cat is neither a class name"):
        explain(digits_ckpt, images, tmp_path / "two", target="cat")
    with pytest.raises(SystemExit) as exit_status:
        main([str(digits_ckpt), str(tmp_path / "absent"), "--out", str(tmp_path / "three")])
    assert exit_status.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: ")


def test_explain_refuses_outputs_that_are_not_files_and_writes_names_as_data(digits_ckpt, tmp_path):
    """`--out` a file, or a folder whose explain.csv is a FIFO: one line before any work; formula and control
    characters in file names reach explain.csv neutralised (the one CSV writer)."""
    images = tmp_path / "images"
    images.mkdir()
    for name in ("=HYPERLINK(1).png", "+cmd\x1b[2J.png"):
        Image.new("L", (8, 8), 200).save(images / name, format="PNG")
    (tmp_path / "file").write_text("mine")
    with pytest.raises(VitexpError, match="is a file, not a folder"):
        explain(digits_ckpt, images, tmp_path / "file")
    (tmp_path / "fifo").mkdir()
    os.mkfifo(tmp_path / "fifo" / "explain.csv")
    with pytest.raises(VitexpError, match="explain.csv is a FIFO"):
        explain(digits_ckpt, images, tmp_path / "fifo")
    assert (tmp_path / "file").read_text() == "mine" and not (tmp_path / "fifo" / "grid.png").exists()
    explain(digits_ckpt, images, tmp_path / "out")
    with (tmp_path / "out" / "explain.csv").open(newline="") as f:
        paths = sorted(r["path"] for r in csv.DictReader(f))
    assert paths == ["'+cmd\\x1b[2J.png", "'=HYPERLINK(1).png"]


def test_evaluate_plots_the_most_confidently_wrong_images_and_logs_them_to_wandb(digits_ckpt, tmp_path):
    vitexp(
        *TINY,
        "task=evaluate",
        f"ckpt_path={digits_ckpt}",
        "logger=wandb",
        "logger.mode=offline",
        "hydra.run.dir=ev",
        cwd=tmp_path,
    )
    figure = Image.open(tmp_path / "ev" / "plots" / "mistakes.png")
    assert figure.size[0] >= 8 * 150 and figure.size[1] >= 2 * 150  # 16 maps, 8 a row (one epoch: most are wrong)
    (offline,) = (tmp_path / "ev" / "wandb").glob("offline-run-*")
    assert len(list(offline.glob("files/media/images/mistakes_*.png"))) == 16


def test_the_most_confidently_wrong_come_first_and_a_model_without_a_cam_layer_skips_the_plot(tmp_path, caplog):
    identity = torch.nn.Linear(3, 3)  # the logits are the inputs
    with torch.no_grad():
        identity.weight.copy_(torch.eye(3))
        identity.bias.zero_()
    logits = torch.tensor([[5.0, 0, 0], [0, 1, 0], [0, 0, 9], [2, 0, 0], [0, 3, 0]])
    truth = torch.tensor([1, 1, 0, 0, 2])  # wrong: 0 (p 0.99), 2 (p 1.00), 4 (p 0.91); right: 1, 3
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(logits, truth), batch_size=2)
    for limit, expected in ((None, [2, 0, 4]), (1, [0])):
        wrong = Mistakes(loader.batch_size)
        metrics, _ = engine.evaluate(identity, loader, torch.device("cpu"), 3, limit_batches=limit, on_batch=wrong)
        assert wrong.order() == expected and metrics["acc1"] == (2 / 5 if limit is None else 0.5)
    with caplog.at_level(logging.WARNING, logger="vitexp"):
        shown = plot_mistakes(
            identity, loader.dataset, [2, 0, 4], "abc", ([0.5], [0.5]), tmp_path / "m.png", title="t", root=tmp_path
        )
    assert shown == 0 and not (tmp_path / "m.png").exists()
    assert "no m.png: Linear is neither a timm ViT nor a timm CNN" in caplog.text
