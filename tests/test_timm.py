"""model=timm: any timm model by name, pretrained weights through timm's loader, layer decay, head-only epochs, export
to timm's model folder, and the tasks (evaluate, resume, prune, distill) on such checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from timm.models import adapt_input_conv

from tests.builders import build
from tests.conftest import TINY, compose_config, vitexp
from vitexp import VitexpError, checkpoint, engine
from vitexp.models import arch_of, build_from_arch
from vitexp.runs import resumed
from vitexp.tasks.recipe import read_recipe
from vitexp.training import optimization

REPO = Path(__file__).resolve().parents[1]
# a DeiT-Tiny-shaped timm ViT, shrunk: 4x4 patches, 2 blocks of width 64
SIZES = {"patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 2}
DEIT = ["model=timm", "model.name=deit_tiny_patch16_224", "model.patch_size=4"]


def _deit(img_size: int = 32, in_chans: int = 3, num_classes: int = 5, **kw):
    return build(
        "timm",
        "deit_tiny_patch16_224",
        img_size=img_size,
        in_chans=in_chans,
        num_classes=num_classes,
        kwargs=SIZES,
        **kw,
    )


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A 32-pixel RGB 5-class timm DeiT's weights as .safetensors, and the model."""
    torch.manual_seed(0)
    source = _deit()
    path = tmp_path_factory.mktemp("weights") / "deit32.safetensors"
    save_file(source.state_dict(), path)
    return path, source


def test_weights_file_resampled_to_another_size_and_channels(weights):
    path, source = weights
    model = _deit(img_size=48, in_chans=1, num_classes=10, pretrained=str(path))
    # timm's own resampling of the position grid (8x8 -> 12x12) and channel adaptation (3 -> 1)
    assert model.pos_embed.shape == (1, 1 + 12 * 12, 64)
    assert torch.allclose(model.pos_embed, resample_abs_pos_embed(source.pos_embed, (12, 12), num_prefix_tokens=1))
    assert torch.allclose(model.patch_embed.proj.weight, adapt_input_conv(1, source.patch_embed.proj.weight))
    assert torch.equal(model.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)
    assert model.head.weight.shape == (10, 64)  # a new classifier for 10 classes
    assert model(torch.randn(2, 1, 48, 48)).shape == (2, 10)
    same = _deit(pretrained=str(path))  # same classes: the classifier is kept
    assert torch.equal(same.head.weight, source.head.weight)
    # the checkpoint's arch rebuilds it without the file
    assert arch_of(model).kwargs["pretrained"] is False
    assert build_from_arch(arch_of(model)).pos_embed.shape == model.pos_embed.shape


def test_pretrained_file_trains_on_digits_at_48_pixels(weights, tmp_path):
    proc = vitexp(
        *TINY, *DEIT, "data.img_size=48", f"model.pretrained={weights[0]}", "trainer.max_epochs=1", cwd=tmp_path
    )
    assert "deit_tiny_patch16_224" in proc.stderr
    best = next(tmp_path.glob("outputs/train/*/*/checkpoints/best.pt"))
    saved = checkpoint.load(best)
    assert saved["model"]["pos_embed"].shape == (1, 145, 64) and saved["model"]["patch_embed.proj.weight"].shape[1] == 1


def test_weights_of_another_architecture_are_one_line(weights, tmp_path):
    with pytest.raises(VitexpError, match=r"100 keys missing \(e.g. conv1.weight\), 32 unexpected \(e.g. blocks"):
        build("timm", "resnet18", img_size=32, in_chans=3, num_classes=5, pretrained=str(weights[0]))
    with pytest.raises(VitexpError, match=r"0 keys missing, 0 unexpected, \d+ of another shape \(e.g. "):
        build(
            "timm",
            "deit_tiny_patch16_224",
            img_size=32,
            in_chans=3,
            num_classes=5,
            pretrained=str(weights[0]),
            kwargs={**SIZES, "embed_dim": 96},
        )
    no_vit_sizes = ["model.embed_dim=null", "model.depth=null", "model.num_heads=null"]  # set by debug=fast
    proc = vitexp(
        *TINY,
        "model=timm",
        "model.name=resnet18",
        *no_vit_sizes,
        f"model.pretrained={weights[0]}",
        cwd=tmp_path,
        check=False,
    )
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "another architecture" in last and "unexpected (e.g. blocks." in last


def test_pretrained_true_offline_names_the_cache_and_the_fix(tmp_path):
    # a fresh interpreter: the hub reads HF_HOME and HF_HUB_OFFLINE when it is imported
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run(
        [sys.executable, "-m", "vitexp", *TINY, "model=timm", "model.patch_size=4", "model.pretrained=true"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2, proc.stderr
    assert f"{tmp_path}/hf/hub" in last and "timm/vit_tiny_patch16_224" in last and "model.pretrained=<path>" in last


def test_layer_decay_scales_each_group_and_keeps_no_decay_groups():
    cfg = compose_config(*TINY, *DEIT, "optim.layer_decay=0.5", "optim.warmup_epochs=0")
    recipe = read_recipe(cfg, with_data=False)
    model = build_from_arch(recipe.arch)
    opt = optimization(recipe, model, batches_per_epoch=10)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = opt.optimizer.param_groups
    depth = len(model.blocks)  # layers: embeddings (0), blocks (1..depth), final norm and head (depth + 1)
    scales = {names[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}
    assert scales["head.weight"] == 1.0 and scales["blocks.1.attn.qkv.weight"] == 0.5
    assert scales["blocks.0.attn.qkv.weight"] == 0.25 and scales["pos_embed"] == 0.5 ** (depth + 1)
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert {"pos_embed", "cls_token", "blocks.0.norm1.weight", "head.bias"} <= no_decay
    assert "blocks.0.attn.qkv.weight" not in no_decay
    opt.scheduler.step_update(5)
    base = engine.base_lr(opt.optimizer)
    assert 0 < base < cfg.optim.lr
    assert all(g["lr"] == pytest.approx(base * g["lr_scale"]) for g in groups)
    # without layer decay the same no-decay set: position embedding and class token included
    cfg = compose_config(*TINY, *DEIT)
    plain_groups = optimization(read_recipe(cfg, with_data=False), model, 10).optimizer.param_groups
    assert {names[id(p)] for g in plain_groups if g["weight_decay"] == 0 for p in g["params"]} == no_decay


def test_head_only_epochs_then_everything_trains(weights, tmp_path):
    vitexp(
        *TINY,
        *DEIT,
        f"model.pretrained={weights[0]}",
        "optim.head_only_epochs=1",
        "trainer.ckpt_every_n_epochs=1",
        cwd=tmp_path,
    )
    folder = next(tmp_path.glob("outputs/train/*/*/checkpoints"))
    one, two = checkpoint.load(folder / "epoch_0001.pt")["model"], checkpoint.load(folder / "epoch_0002.pt")["model"]
    start = _deit(img_size=16, in_chans=1, num_classes=10, pretrained=str(weights[0])).state_dict()
    assert torch.equal(one["blocks.0.attn.qkv.weight"], start["blocks.0.attn.qkv.weight"])  # frozen in epoch 1
    assert torch.equal(one["pos_embed"], start["pos_embed"])
    assert not torch.equal(one["head.weight"], start["head.weight"])
    assert not torch.equal(two["blocks.0.attn.qkv.weight"], one["blocks.0.attn.qkv.weight"])  # trains in epoch 2


def test_resume_keeps_timm_kwargs():
    cfg = compose_config(*TINY, "model=timm")
    saved = compose_config(*TINY, "model=timm", "model.kwargs={global_pool:avg}", "model.depth=3")
    got = resumed(cfg, json.loads(json.dumps(dict(_plain(saved)))), ["model=timm"], "run", ["resume=run"])
    assert got.model.kwargs.global_pool == "avg" and got.model.depth == 3


def _plain(cfg):
    from vitexp.config import plain

    return plain(cfg)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, weights) -> Path:
    """A tiny timm DeiT fine-tuned on digits from a weights file (deleted afterwards): its run folder."""
    cwd = tmp_path_factory.mktemp("trained")
    source = cwd / "source.safetensors"
    source.write_bytes(weights[0].read_bytes())
    vitexp(*TINY, *DEIT, f"model.pretrained={source}", "hydra.run.dir=run", cwd=cwd)
    source.unlink()  # a checkpoint brings its own weights
    return cwd / "run"


FRESH_TIMM = """
import sys, torch, timm
folder, batch, expected = sys.argv[1:]
model = timm.create_model("local-dir:" + folder, pretrained=True).eval()
with torch.no_grad():
    diff = (model(torch.load(batch)) - torch.load(expected)).abs().max().item()
assert "vitexp" not in sys.modules
print(f"max abs diff {diff:.3e}")
"""


def test_export_round_trip_in_plain_timm(trained, tmp_path):
    out = tmp_path / "folder"
    proc = subprocess.run(
        [sys.executable, "-m", "vitexp.export", str(trained / "checkpoints/best.pt"), "--out", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors"}
    model, _ = checkpoint.load_model(trained / "checkpoints/best.pt")
    x = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.save(model.eval()(x), tmp_path / "logits.pt")
    torch.save(x, tmp_path / "batch.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # a process that cannot import this vitexp
    proc = subprocess.run(
        [sys.executable, "-c", FRESH_TIMM, str(out), str(tmp_path / "batch.pt"), str(tmp_path / "logits.pt")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    print(proc.stdout.strip())
    assert float(proc.stdout.split()[-1]) < 1e-5
    # and vitexp fine-tunes from the folder: its model arguments are the defaults
    vitexp(
        *TINY,
        "model=timm",
        "model.name=deit_tiny_patch16_224",
        f"model.pretrained={out}",
        "trainer.max_epochs=1",
        "hydra.run.dir=tuned",
        cwd=tmp_path,
    )
    assert checkpoint.load(tmp_path / "tuned/checkpoints/best.pt")["arch"]["kwargs"]["kwargs"]["patch_size"] == 4


def test_export_refuses_what_timm_cannot_describe(tmp_path):
    model = build("vit", "pruned", ratio=0.5, img_size=16, in_chans=1, num_classes=10, **SIZES)
    path = tmp_path / "pruned.pt"
    checkpoint.save({"model": model.state_dict(), "arch": arch_of(model).to_dict(), "epoch": 0, "config": {}}, path)
    proc = subprocess.run(
        [sys.executable, "-m", "vitexp.export", str(path), "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 2 and "has no timm model arguments" in proc.stderr.strip().splitlines()[-1]


def _evaluate(ckpt: Path, cwd: Path) -> float:
    cwd.mkdir(exist_ok=True)
    vitexp(*TINY, "task=evaluate", f"ckpt_path={ckpt}", "hydra.run.dir=eval", cwd=cwd)
    return json.loads((cwd / "eval/results.json").read_text())["val_acc1"]


def test_timm_checkpoint_evaluates_and_resumes_without_its_weights_file(trained, tmp_path):
    best = checkpoint.load(trained / "checkpoints/best.pt")
    assert _evaluate(trained / "checkpoints/best.pt", tmp_path) == best["metrics"]["val/acc1"]
    run = tmp_path / "run"
    run.mkdir()
    for item in trained.rglob("*"):
        if item.is_file():
            (run / item.relative_to(trained)).parent.mkdir(parents=True, exist_ok=True)
            (run / item.relative_to(trained)).write_bytes(item.read_bytes())
    vitexp(f"resume={run}", "trainer.max_epochs=3", cwd=tmp_path)  # the pretrained file is gone: not read again
    assert checkpoint.load(run / "checkpoints/last.pt")["epoch"] == 3


@pytest.mark.slow
def test_timm_deit_prunes_and_distils_and_evaluate_reproduces(trained, tmp_path):
    ckpt = trained / "checkpoints/best.pt"
    vitexp(
        *TINY,
        *DEIT,
        "task=prune",
        f"ckpt_path={ckpt}",
        "task.ratio=0.5",
        "task.finetune_epochs=1",
        "hydra.run.dir=prune",
        cwd=tmp_path,
    )
    pruned = checkpoint.load(tmp_path / "prune/checkpoints/best.pt")
    assert pruned["arch"]["builder"] == "timm" and pruned["arch"]["kwargs"]["layout"] == [[1, 128], [1, 128]]
    assert _evaluate(tmp_path / "prune/checkpoints/best.pt", tmp_path / "e1") == pruned["metrics"]["val/acc1"]
    # a timm teacher given by name and weights file (this run's exported fine-tuned DeiT), used as loaded
    teacher = tmp_path / "teacher.safetensors"
    save_file(checkpoint.load(ckpt)["model"], teacher)
    vitexp(
        *TINY,
        *DEIT,
        "task=distill",
        f"ckpt_path={ckpt}",
        "task.distill_type=soft",
        "task.teacher_epochs=0",
        "task.teacher.name=deit_tiny_patch16_224",
        "task.teacher.small_input=false",
        f"task.teacher.pretrained={teacher}",
        "task.teacher.kwargs={" + ",".join(f"{k}:{v}" for k, v in SIZES.items()) + "}",
        "hydra.run.dir=distill",
        cwd=tmp_path,
    )
    results = json.loads((tmp_path / "distill/results.json").read_text())
    assert results["teacher_val_acc1"] == checkpoint.load(ckpt)["metrics"]["val/acc1"]
    student = checkpoint.load(tmp_path / "distill/checkpoints/best.pt")
    assert _evaluate(tmp_path / "distill/checkpoints/best.pt", tmp_path / "e2") == student["metrics"]["val/acc1"]


def test_a_timm_arch_takes_only_a_flat_dict_of_plain_values():
    arch = arch_of(_deit())
    build_from_arch(arch)
    for evil in ({"act_layer": {"_target_": "os.system"}}, {"act_layer": object()}):
        with pytest.raises(VitexpError, match="not plain values"):
            build_from_arch(arch.with_kwargs(kwargs=evil))
    with pytest.raises(VitexpError, match="not plain values"):  # a dict anywhere else
        build_from_arch(arch.with_kwargs(layout={"_target_": "os.system"}))
    with pytest.raises(VitexpError, match="not a timm model name"):
        build_from_arch(replace(arch, name="hf-hub:someone/model"))
