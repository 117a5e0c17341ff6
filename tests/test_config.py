"""Every option of every config group composes and instantiates; `--cfg job` has no side effects."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torchvision.transforms import Normalize

from tests.builders import model_of
from tests.conftest import TINY, compose_config, vitexp
from vitexp import VitexpError
from vitexp.augment import device_augment
from vitexp.config import config_dir, plain, typed, validate
from vitexp.data import eval_transform, train_transform
from vitexp.runs import resumed
from vitexp.tasks.recipe import mixup

CONF = Path(config_dir())
GROUPS = {
    g: sorted(p.stem for p in (CONF / g).glob("*.yaml"))
    for g in ("model", "task", "data", "optim", "trainer", "logger", "experiment", "debug", "hparams_search")
}
OPTIONS = [(g, o) for g, options in GROUPS.items() for o in options]


def test_every_group_has_options():
    assert {"baseline", "patch8", "pruned", "vit_tiny", "vit_ti16", "vit_s16", "timm"} <= set(GROUPS["model"])
    assert GROUPS["task"] == ["benchmark", "distill", "evaluate", "prune", "train"]
    assert {"digits", "cifar10", "cifar100", "imagefolder", "shards"} <= set(GROUPS["data"])
    assert all(GROUPS.values())


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_and_instantiates(group, option, tmp_path):
    overrides = [f"{group}={option}"]
    if group == "data" and option != "digits" or group == "experiment":
        overrides.append(f"data.root={tmp_path}")
    if group == "experiment" and option.startswith("finetune_"):
        overrides.append("model.pretrained=false")  # their timm weights come from a cache that tests have not
    cfg = compose_config(*overrides)
    OmegaConf.resolve(cfg)  # every interpolation resolves
    validate(cfg)  # and every value is of its schema's choices and range
    model = model_of(cfg.model)
    x = torch.randn(2, cfg.data.in_chans, cfg.data.img_size, cfg.data.img_size)
    assert model(x).shape == (2, cfg.data.num_classes)
    optimizer = instantiate(cfg.optim.optimizer)(model.parameters())
    scheduler = instantiate(cfg.optim.scheduler)(optimizer, t_initial=10, warmup_t=2)
    scheduler.step_update(1)
    if "loss" in cfg.task:  # the tasks that train
        instantiate(cfg.task.loss)(model(x), torch.tensor([0, 1]))
    settings = typed(cfg)
    data = settings.data
    train_transform(data), eval_transform(data)
    if "loss" in cfg.task:
        mixup(data, settings.task.loss)
    if aug := device_augment(data, compile=False):  # as the recipe builds it: only when switched on
        images = torch.randint(0, 256, (2, cfg.data.in_chans, cfg.data.img_size, cfg.data.img_size), dtype=torch.uint8)
        assert aug(images, torch.rand(2, aug.n_draws)).shape == images.shape
    # and as a user asks for it: `python -m vitexp --cfg job <option>` prints the same config and writes nothing
    printed = OmegaConf.create(vitexp("--cfg", "job", *overrides, cwd=tmp_path).stdout)
    assert printed.model.name == cfg.model.name and printed.data.name == cfg.data.name
    assert printed.task.name == cfg.task.name and printed.optim.lr == cfg.optim.lr
    assert not (tmp_path / "outputs").exists()


DATA_OPTIONS = [*GROUPS["data"], "experiment=cifar10_baseline", "data=imagefolder data.mean=[0.1,0.2,0.3]"]


@pytest.mark.parametrize("option", DATA_OPTIONS)
def test_every_transform_normalises_with_the_statistics_the_checkpoint_records(option, tmp_path):
    """The worker path's transforms (training, evaluate, a teacher's) and the device path's fill use `data.mean` and
    `data.std`, which checkpoints, model.json and predict record."""
    overrides = option.split() if "=" in option else [f"data={option}"]
    cfg = compose_config(*overrides, *([] if option == "digits" else [f"data.root={tmp_path}"]))
    recorded = plain(cfg.data)  # as a checkpoint's config records it
    data = typed(cfg).data
    for transform in (train_transform(data), eval_transform(data)):
        (normalize,) = [t for t in transform.transforms if isinstance(t, Normalize)]
        assert list(normalize.mean) == pytest.approx(recorded["mean"]), option
        assert list(normalize.std) == pytest.approx(recorded["std"]), option
    policy = replace(data, device_augment=replace(data.device_augment, policy="rand"))
    assert device_augment(policy, compile=False).fill == pytest.approx([255 * m for m in recorded["mean"]])


def test_cfg_job_prints_config_and_writes_nothing(tmp_path):
    proc = vitexp("--cfg", "job", "model=patch8", cwd=tmp_path)
    cfg = OmegaConf.create(proc.stdout)
    assert cfg.model.patch_size == 8 and cfg.model.name == "patch8"
    assert list(tmp_path.iterdir()) == []


def test_model_dimensions_follow_data():
    cfg = compose_config("data=cifar100", *TINY)
    assert (cfg.model.in_chans, cfg.model.num_classes, cfg.model.img_size) == (3, 100, 32)


def test_run_dir_names_task_model_and_time(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = compose_config("model=patch8", hydra=True)
    assert cfg.hydra.run.dir.startswith("outputs/train/patch8/")
    assert cfg.hydra.sweep.dir.startswith("multirun_outputs/")


def test_optuna_search_space_composes_into_the_sweeper():
    cfg = compose_config("hparams_search=optuna")
    hydra_cfg = compose_config("hparams_search=optuna", hydra=True).hydra
    assert hydra_cfg.mode.name == "MULTIRUN" and hydra_cfg.sweeper.direction == "maximize"
    assert set(hydra_cfg.sweeper.params) == {"optim.lr", "optim.weight_decay", "model.drop_path_rate"}
    assert cfg.optim.lr and cfg.model.drop_path_rate is not None  # the searched keys exist


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=-1", "optim.lr=-1.0 is not valid: it must be a number > 0"),
        ("trainer.precision=64", "trainer.precision='64' is not valid: choose one of auto, 32, bf16, 16"),
        (
            "data.crop_pct=1.5",
            "data.crop_pct=1.5 is not valid: it must be a number in (0, 1] (timm's ImageNet value is 0.875)",
        ),
        (
            "data.interpolation=cubic",
            "data.interpolation='cubic' is not valid: choose one of bilinear, bicubic, nearest",
        ),
        ("data.augment.hflip=2", "data.augment.hflip=2.0 is not valid: it must be a number in [0, 1]"),
        ("task.loss.label_smoothing=1", "task.loss.label_smoothing=1.0 is not valid: it must be a number in [0, 1)"),
        ("data.val_size=0", "data.val_size=0 is not valid: it must be a count >= 1 or a fraction in (0, 1)"),
        ("task=prune", "task.ratio=1.0 is not valid: it must be a number in [0, 1)"),
    ],
)
def test_a_value_out_of_its_fields_range_is_refused_in_one_line(override, message):
    cfg = compose_config(*TINY, override, *(["task.ratio=1.0"] if override == "task=prune" else []))
    with pytest.raises(VitexpError, match=f"^{re.escape(message)}$"):
        validate(cfg)


@pytest.mark.parametrize("override", ["trainer.foo=1", "trainer.max_epochs=abc", "trainer.max_epochs=1.5"])
def test_an_unknown_key_or_a_wrong_type_is_refused_by_the_schema(override):
    with pytest.raises(ConfigCompositionException, match=re.escape(override.split("=")[0])):
        compose_config(*TINY, override)


@pytest.mark.parametrize(
    ("plant", "message"),
    [
        (lambda c: c["optim"].update(name="adamw"), "cannot resume from run: optim.name is not a setting"),
        (lambda c: c["trainer"].update(max_epochs="many"), "cannot resume from run: trainer.max_epochs: "),
        (lambda c: c["optim"].update(lr=-1.0), "cannot resume from run: optim.lr=-1.0 is not valid"),
    ],
)
def test_a_resumed_runs_values_are_merged_into_the_schema(plant, message):
    cfg = compose_config(*TINY)
    saved = plain(cfg)
    plant(saved)
    with pytest.raises(VitexpError, match=re.escape(message)) as refused:
        resumed(cfg, saved, [], "run", ["resume=run"])
    assert "\n" not in str(refused.value)
