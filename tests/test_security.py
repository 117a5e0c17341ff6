"""A run folder or checkpoint is data, never code: what a file says is never instantiated, resolved or executed,
whichever entry point reads it (resume=, auto_resume, ckpt_path=, task.teacher_ckpt=, task=evaluate)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import TINY, compose_config, vitexp
from vitexp import VitexpError, checkpoint
from vitexp.config import plain
from vitexp.runs import resume_point, resumed, saved_choices

SECRET = "vitexp-test-secret-4f1c"


class Payload:
    """A pickle that touches a marker file when it is unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def honest(tmp_path_factory) -> Path:
    """One finished tiny run, copied by each test before it tampers with it."""
    run = tmp_path_factory.mktemp("honest") / "run"
    vitexp(*TINY, "trainer.max_epochs=1", f"hydra.run.dir={run}", cwd=run.parent)
    return run


def _copy(honest: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(honest, run)
    (run / "results.json").unlink()  # an interrupted run, as resume= expects
    return run


def _attacks(tmp_path: Path) -> tuple[dict, dict, Path, Path]:
    """Two nested nodes an attacker could plant: torch.load of a pickle beside the checkpoint, and shutil.copy over a
    file the test owns. Returns the nodes, the payload's marker and the file that must stay unchanged."""
    marker, victim = tmp_path / "payload_ran", tmp_path / "victim.txt"
    torch.save({"x": Payload(marker)}, tmp_path / "notes.pt")
    victim.write_text("mine")
    (tmp_path / "attacker.txt").write_text("overwritten")
    load = {"_target_": "torch.load", "f": str(tmp_path / "notes.pt"), "weights_only": False}
    copy = {"_target_": "shutil.copy", "src": str(tmp_path / "attacker.txt"), "dst": str(victim)}
    return load, copy, marker, victim


def _tamper_checkpoint(path: Path, edit) -> None:
    state = checkpoint.load(path)
    edit(state["config"])
    torch.save(state, path)  # still only dicts, strings and tensors: weights_only=True reads it


def _refused(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert "error: refused to resume" in lines[-1] and "Traceback" not in proc.stderr, proc.stderr
    return lines[-1]


def _nothing_ran(marker: Path, victim: Path) -> None:
    assert not marker.exists(), "the pickle payload ran"
    assert victim.read_text() == "mine", "shutil.copy ran"


def test_a_checkpoint_config_that_names_code_is_refused_on_resume(honest, tmp_path):
    run = _copy(honest, tmp_path)
    load, copy, marker, victim = _attacks(tmp_path)
    for key, node in (("notes", load), ("extra", copy)):
        shutil.copy(honest / "checkpoints" / "last.pt", run / "checkpoints" / "last.pt")
        _tamper_checkpoint(
            run / "checkpoints" / "last.pt", lambda config, k=key, n=node: config["model"].update({k: n})
        )
        line = _refused(vitexp(f"resume={run}", cwd=tmp_path, check=False))
        assert f"model.{key}._target_" in line, line
        _nothing_ran(marker, victim)
    # a _target_ of vitexp's own config swapped for another callable is refused the same way
    shutil.copy(honest / "checkpoints" / "last.pt", run / "checkpoints" / "last.pt")
    _tamper_checkpoint(run / "checkpoints" / "last.pt", lambda config: config["optim"]["optimizer"].update(copy))
    assert "optim.optimizer._target_" in _refused(vitexp(f"resume={run}", cwd=tmp_path, check=False))
    _nothing_ran(marker, victim)


def _before_first_checkpoint(run: Path, sub_run: bool) -> None:
    """The folder as a run stopped before its own first checkpoint leaves it (a teacher may have written one)."""
    if sub_run:
        (run / "teacher").mkdir()
        shutil.move(run / "checkpoints", run / "teacher" / "checkpoints")
    else:
        shutil.rmtree(run / "checkpoints")


def _tamper_hydra_config(run: Path, edit) -> None:
    path = run / ".hydra" / "config.yaml"
    config = yaml.safe_load(path.read_text())
    edit(config)
    path.write_text(yaml.safe_dump(config))


def test_a_hydra_config_that_names_code_is_refused_on_resume_and_auto_resume(honest, tmp_path):
    load, copy, marker, victim = _attacks(tmp_path)
    run = _copy(honest, tmp_path)
    _before_first_checkpoint(run, sub_run=False)
    _tamper_hydra_config(run, lambda config: config["model"].update({"notes": load}))
    assert "model.notes._target_" in _refused(vitexp(f"resume={run}", cwd=tmp_path, check=False))
    _nothing_ran(marker, victim)
    # a requeued job: the same command with auto_resume, in a folder whose sub-run has a checkpoint
    requeued = tmp_path / "requeued"
    shutil.copytree(honest, requeued)
    (requeued / "results.json").unlink()
    _before_first_checkpoint(requeued, sub_run=True)
    _tamper_hydra_config(requeued, lambda config: config["data"]["augment"].update({"extra": copy}))
    proc = vitexp(
        *TINY, "trainer.max_epochs=1", f"hydra.run.dir={requeued}", "auto_resume=true", cwd=tmp_path, check=False
    )
    assert "data.augment.extra._target_" in _refused(proc)
    _nothing_ran(marker, victim)


def test_an_interpolation_in_a_stored_config_is_refused_and_never_resolved(tmp_path):
    run = tmp_path / "run"
    vitexp(*TINY, "trainer.max_epochs=1", "logger=wandb", "logger.mode=offline", f"hydra.run.dir={run}", cwd=tmp_path)
    (run / "results.json").unlink()
    _tamper_checkpoint(
        run / "checkpoints" / "last.pt",
        lambda config: config["logger"].update({"name": "${oc.env:VITEXP_TEST_SECRET}"}),
    )
    env = {"VITEXP_TEST_SECRET": SECRET, "WANDB_MODE": "offline"}
    line = _refused(vitexp(f"resume={run}", cwd=tmp_path, check=False, env=env))
    assert "logger.name" in line and "interpolation" in line
    # the value reached no file of the run, its W&B files included
    for path in run.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_ckpt_path_teacher_ckpt_and_evaluate_take_only_weights_and_plain_values(honest, tmp_path):
    load, copy, marker, victim = _attacks(tmp_path)
    evil = tmp_path / "evil.pt"
    shutil.copy(honest / "checkpoints" / "best.pt", evil)

    def plant(config):
        config["model"]["notes"] = load
        config["task"]["loss"] = copy
        config["logger"]["name"] = "${oc.env:HOME}"

    _tamper_checkpoint(evil, plant)
    for args in (
        ["task=evaluate", f"ckpt_path={evil}"],
        [f"ckpt_path={evil}", "trainer.max_epochs=1"],
        ["task=distill", f"task.teacher_ckpt={evil}", "trainer.max_epochs=1"],
    ):
        vitexp(*TINY, *args, cwd=tmp_path)
        _nothing_ran(marker, victim)
    # the architecture a checkpoint names can only select a vitexp builder with plain arguments
    state = checkpoint.load(evil)
    state["arch"]["kwargs"]["act_layer"] = load
    torch.save(state, evil)
    proc = vitexp(*TINY, "task=evaluate", f"ckpt_path={evil}", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "not plain values" in proc.stderr.strip().splitlines()[-1]
    state["arch"] = {
        "builder": "timm",
        "name": "x",
        "kwargs": {
            "model_name": "hf-hub:someone/model",
            "img_size": 16,
            "in_chans": 1,
            "num_classes": 10,
            "small_input": True,
        },
    }
    torch.save(state, evil)
    proc = vitexp(*TINY, "task=evaluate", f"ckpt_path={evil}", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "not a timm model name" in proc.stderr.strip().splitlines()[-1]
    _nothing_ran(marker, victim)


def test_an_honest_run_folder_still_resumes(honest, tmp_path):
    run = _copy(honest, tmp_path)
    proc = vitexp(f"resume={run}", "trainer.max_epochs=2", cwd=tmp_path)
    assert "resuming" in proc.stderr and (run / "results.json").is_file()
    assert checkpoint.load(run / "checkpoints" / "last.pt")["epoch"] == 2


def test_resumed_config_takes_plain_values_and_refuses_code(tmp_path):
    cfg = compose_config(*TINY, "trainer.max_epochs=5")
    command = ["resume=run", "trainer.max_epochs=5"]
    saved = plain(cfg)
    saved["optim"]["lr"] = 0.123  # a value of the run
    saved["model"]["depth"] = 3
    saved["trainer"]["max_epochs"] = 9  # this command line says 5
    got = resumed(cfg, saved, ["debug=fast"], "run", command)
    assert (got.optim.lr, got.model.depth, got.trainer.max_epochs) == (0.123, 3, 5)
    assert "_target_" not in got.model  # a model is built from its registered `builder`
    attacks = {
        "model._target_": lambda c: c["model"].update(_target_="vitexp.models.vit"),
        "model.notes._target_": lambda c: c["model"].update(notes={"_target_": "os.system", "_args_": ["true"]}),
        "optim.optimizer._target_": lambda c: c["optim"]["optimizer"].update(_target_="shutil.rmtree"),
        "logger.name": lambda c: c["logger"].update(name="${oc.env:HOME}"),
        "data.mean[0]._args_": lambda c: c["data"].update(mean=[{"_args_": [1]}]),
        "data.augment._partial_": lambda c: c["data"]["augment"].update(_partial_=True),
    }
    for key, plant in attacks.items():
        evil = plain(cfg)
        plant(evil)
        with pytest.raises(VitexpError, match=r"refused to resume from run: " + re.escape(key)):
            resumed(cfg, evil, [], "run", command)
    with pytest.raises(VitexpError, match="model=patch8 cannot change on resume"):
        resumed(cfg, saved, ["debug=fast"], "run", [*command, "model=patch8"])
    overrides = ["model=patch8", "model=../../evil", "data=cifar10", "task=os", "optim.lr=1"]
    assert saved_choices({}, overrides) == {"model": "patch8", "data": "cifar10"}


def test_a_stored_wandb_run_id_is_used_only_when_it_is_a_plain_id(honest, tmp_path):
    run = _copy(honest, tmp_path)
    for run_id, kept in (("a1b2c3d4", True), ("../../elsewhere", False), ("x" * 65, False)):
        state = checkpoint.load(run / "checkpoints" / "last.pt")
        state["wandb_run_id"] = run_id
        torch.save(state, run / "checkpoints" / "last.pt")
        assert resume_point(run).wandb_run_id == (run_id if kept else None)
