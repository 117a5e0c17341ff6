"""A checkpoint's fields and a timm model folder's `config.json` are checked field by field against what each builder
(and the timm class it builds) takes: a bad one is one line that names it, and no timm argument read from a file ever
loads or fetches another file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.builders import build
from tests.conftest import TINY, compose_config, vitexp
from vitexp import VitexpError, checkpoint
from vitexp.config import plain
from vitexp.export import write_folder
from vitexp.models import Arch, arch_from_config, arch_of

# a DeiT-Tiny-shaped timm ViT, shrunk to 16x16 one-channel images: 4x4 patches, one block of width 32
SIZES = {"patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2}
DATA = {"img_size": 16, "in_chans": 1, "num_classes": 10}
NEWER = checkpoint.FORMAT_VERSION + 1


class Touch:
    """A pickle that touches a marker file when it is unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


class Overwrite:
    """A pickle that overwrites a file outside the folder when it is unpickled."""

    def __init__(self, victim: Path) -> None:
        self.victim = victim

    def __reduce__(self):
        return (Path.write_text, (self.victim, "overwritten"))


@pytest.fixture
def attack(tmp_path) -> tuple[Path, Path, Path]:
    """A pickle that, once unpickled, touches `marker` and overwrites `victim`; returns the three paths."""
    marker, victim, evil = tmp_path / "payload_ran", tmp_path / "victim.txt", tmp_path / "evil.pth"
    victim.write_text("mine")
    torch.save({"state_dict": {"a": Touch(marker), "b": Overwrite(victim)}}, evil)
    return marker, victim, evil


def _nothing_ran(marker: Path, victim: Path) -> None:
    assert not marker.exists(), "the pickle payload ran"
    assert victim.read_bytes() == b"mine", "the victim changed"


def _timm_state() -> dict:
    model = build("timm", "deit_tiny_patch16_224", **DATA, kwargs=SIZES)
    return {
        "model": model.state_dict(),
        "arch": arch_of(model).to_dict(),
        "epoch": 0,
        "format": checkpoint.FORMAT_VERSION,
    }


def _refused(path: Path, *names: str) -> str:
    """The one-line error `load_model(path)` gives; it names the file and every one of `names`."""
    with pytest.raises(VitexpError) as e:
        checkpoint.load_model(path)
    message = str(e.value)
    assert "\n" not in message and str(path) in message, message
    for name in names:
        assert name in message, message
    return message


def _kwargs(**kwargs):
    return lambda state: state["arch"]["kwargs"].update(kwargs)


def _timm_kwargs(**kwargs):
    return lambda state: state["arch"]["kwargs"]["kwargs"].update(kwargs)


TAMPERED = {
    "arch a list": (lambda s: s.update(arch=["timm"]), "arch is a list"),
    "arch without kwargs": (lambda s: s["arch"].pop("kwargs"), "arch.kwargs is missing"),
    "kwargs a string": (lambda s: s["arch"].update(kwargs="img_size=16"), "arch.kwargs is a str"),
    "unknown builder": (lambda s: s["arch"].update(builder="os.system"), "arch.builder='os.system'"),
    "name a number": (lambda s: s["arch"].update(name=3), "arch.name is a int"),
    "extra arch field": (lambda s: s["arch"].update(_target_="os.system"), "arch._target_ is not a field"),
    "unknown keyword": (_kwargs(foo=1), "arch.kwargs.foo is not an argument of builder 'timm'"),
    "missing keyword": (lambda s: s["arch"]["kwargs"].pop("in_chans"), "arch.kwargs.in_chans is missing"),
    "object value": (_kwargs(layout={"_target_": "os.system"}), "arch.kwargs.layout holds a dict"),
    "timm kwargs a list": (_kwargs(kwargs=[1, 2]), "arch.kwargs.kwargs is a list"),
    "unknown timm keyword": (_timm_kwargs(foo=1), "arch.kwargs.kwargs.foo is not an argument of timm's"),
    "timm factory keyword": (_timm_kwargs(features_only=True), "arch.kwargs.kwargs.features_only is an argument of"),
    "a size from data": (_timm_kwargs(in_chans=3), "arch.kwargs.kwargs.in_chans: in_chans comes from data"),
    "placement": (_timm_kwargs(device="cuda:7"), "arch.kwargs.kwargs.device is an argument of timm's create_model"),
    "weights a list": (lambda s: s.update(model=[1]), "model is a list, not a dict of tensors"),
    "weight a string": (lambda s: s["model"].update({"head.weight": "x"}), "model.head.weight is a str"),
    "format a string": (lambda s: s.update(format="1"), "checkpoint format '1'"),
    "newer format": (lambda s: s.update(format=NEWER), f"checkpoint format {NEWER}"),
    "version a dict": (lambda s: s.update(version={"_target_": "os.system"}), "version is a dict"),
}


@pytest.mark.parametrize("case", TAMPERED)
def test_a_mistyped_checkpoint_field_is_one_line_naming_it(case, tmp_path):
    edit, names = TAMPERED[case]
    state = _timm_state()
    edit(state)
    path = tmp_path / "tampered.pt"
    torch.save(state, path)
    message = _refused(path, names)
    with pytest.raises(VitexpError) as e:
        checkpoint.load(path)  # every reader of the file, not only load_model
    assert str(e.value) == message


@pytest.mark.parametrize("case", [case for case, (_, names) in TAMPERED.items() if names.startswith("arch")])
def test_the_arch_refuses_what_a_checkpoint_refuses(case):
    edit, names = TAMPERED[case]
    state = _timm_state()
    edit(state)
    with pytest.raises(VitexpError) as e:
        Arch.from_dict(state["arch"], "tampered.pt")
    assert str(e.value).startswith(f"tampered.pt: {names}") and "\n" not in str(e.value)


def test_an_arch_round_trips_through_its_plain_dict():
    state = _timm_state()
    arch = Arch.from_dict(state["arch"], "honest.pt")
    assert arch.to_dict() == state["arch"] and arch.to_dict() is not state["arch"]
    assert arch.without_weights_source() == arch and arch.with_kwargs(pretrained=True) != arch


def test_an_honest_checkpoint_still_loads(tmp_path):
    state = _timm_state()
    torch.save(state, tmp_path / "honest.pt")
    model, _ = checkpoint.load_model(tmp_path / "honest.pt")
    assert torch.equal(model.state_dict()["pos_embed"], state["model"]["pos_embed"])


def test_timm_arguments_that_load_or_fetch_files_never_reach_timm(attack, tmp_path):
    marker, victim, evil = attack
    plants = {
        "checkpoint_path": str(evil),
        "pretrained_cfg_overlay": {"file": str(evil), "url": "https://example.com/evil.pth"},
        "pretrained_cfg": "https://example.com/evil.pth",
        "cache_dir": str(tmp_path),
        "pretrained": True,
    }
    for key, value in plants.items():
        state = _timm_state()
        state["arch"]["kwargs"]["kwargs"][key] = value
        torch.save(state, tmp_path / "tampered.pt")
        message = _refused(tmp_path / "tampered.pt", f"arch.kwargs.kwargs.{key} would have timm load or fetch")
        assert "pretrained=<weights file or timm model folder>" in message
        _nothing_ran(marker, victim)
    # the same arguments typed on the command line are refused too: weights come from model.pretrained
    with pytest.raises(VitexpError, match=r"^model\.kwargs\.checkpoint_path would have timm load"):
        build("timm", "deit_tiny_patch16_224", **DATA, kwargs={**SIZES, "checkpoint_path": str(evil)})
    _nothing_ran(marker, victim)


def test_hub_and_folder_names_are_refused(tmp_path):
    hub = {"timm": ("name", "hf-hub:someone/evil"), "cnn": ("model_name", f"local-dir:{tmp_path}")}
    for builder, (field, value) in hub.items():
        state = _timm_state()
        if builder == "cnn":
            model = build("timm", "r", model_name="resnet18", small_input=True, **DATA)
            state = {"model": model.state_dict(), "arch": arch_of(model).to_dict()}
            state["arch"]["kwargs"][field] = value
        else:
            state["arch"][field] = value
        torch.save(state, tmp_path / "tampered.pt")
        where = "arch.name" if builder == "timm" else "arch.kwargs.model_name"
        _refused(tmp_path / "tampered.pt", f"{where}={value!r} is not a timm model name")


@pytest.fixture
def folder(tmp_path) -> Path:
    """A timm model folder (config.json, model.safetensors) of the tiny DeiT, as python -m vitexp.export writes it."""
    model = build("timm", "deit_tiny_patch16_224", **DATA, kwargs=SIZES).eval()
    config = {"input_size": (1, 16, 16), "mean": (0.5,), "std": (0.5,), "crop_pct": 1.0, "interpolation": "bilinear"}
    write_folder(model, config, tmp_path / "folder")
    return tmp_path / "folder"


def _set_model_arg(folder: Path, key: str, value) -> None:
    """Set (or, for None, remove) one of the model arguments in the folder's config.json."""
    config = json.loads((folder / "config.json").read_text())
    config["model_args"] = {k: v for k, v in {**config["model_args"], key: value}.items() if v is not None}
    (folder / "config.json").write_text(json.dumps(config))


def test_a_model_folders_model_args_never_load_files(folder, attack):
    marker, victim, evil = attack
    build("timm", "deit_tiny_patch16_224", **DATA, pretrained=str(folder))  # the honest folder loads
    for key, value in (("checkpoint_path", str(evil)), ("pretrained_cfg_overlay", {"file": str(evil)}), ("foo", 1)):
        _set_model_arg(folder, key, value)
        with pytest.raises(VitexpError) as e:
            build("timm", "deit_tiny_patch16_224", **DATA, pretrained=str(folder))
        assert f"{folder}/config.json: model_args.{key} " in str(e.value) and "\n" not in str(e.value), e.value
        _nothing_ran(marker, victim)
        _set_model_arg(folder, key, None)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_args": ["checkpoint_path", str(evil)]}))
    with pytest.raises(VitexpError, match=rf"^model\.pretrained={folder} is not a timm model folder \(AttributeError"):
        build("timm", "deit_tiny_patch16_224", **DATA, pretrained=str(folder))
    _nothing_ran(marker, victim)


def test_a_teachers_weights_errors_name_task_teacher_pretrained(folder, tmp_path):
    from vitexp.tasks.distill import _built_teacher

    sizes = "task.teacher.kwargs={" + ",".join(f"{k}:{v}" for k, v in SIZES.items()) + "}"
    deit = ["task.teacher.name=deit_tiny_patch16_224", "task.teacher.small_input=false", sizes]

    def teacher(source: str) -> str:
        cfg = compose_config(*TINY, "task=distill", "task.teacher_epochs=0", *deit, f"task.teacher.pretrained={source}")
        with pytest.raises(VitexpError) as e:
            _built_teacher(arch_from_config(plain(cfg.task.teacher)), cfg.data)
        assert "\n" not in str(e.value) and "model.pretrained" not in str(e.value), e.value
        return str(e.value)

    assert f"task.teacher.pretrained={tmp_path}/none.pt is not a weights file" in teacher(f"{tmp_path}/none.pt")
    (folder / "config.json").write_text("[1, 2]")
    assert f"task.teacher.pretrained={folder} is not a timm model folder" in teacher(str(folder))


def test_evaluate_refuses_a_checkpoint_path_planted_in_arch(attack, tmp_path):
    marker, victim, evil = attack
    state = _timm_state()
    state["arch"]["kwargs"]["kwargs"]["checkpoint_path"] = str(evil)
    torch.save(state, tmp_path / "tampered.pt")
    proc = vitexp(*TINY, "task=evaluate", f"ckpt_path={tmp_path / 'tampered.pt'}", cwd=tmp_path, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"error: {tmp_path / 'tampered.pt'}: arch.kwargs.kwargs.checkpoint_path would have timm" in lines[-1]
    _nothing_ran(marker, victim)
