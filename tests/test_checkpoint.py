"""Atomic save; weights-only load; every bad file is a one-line error."""

from __future__ import annotations

import pickle
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.conftest import TINY, vitexp
from vitexp import VitexpError, checkpoint, engine

STATE = {"model": {"w": torch.arange(6.0)}, "arch": {"builder": "vit", "name": "x", "kwargs": {}}, "epoch": 3}


def test_save_is_atomic_and_loads_weights_only(tmp_path):
    path = tmp_path / "ckpt" / "last.pt"
    checkpoint.save(STATE, path)
    checkpoint.save({**STATE, "epoch": 4}, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]
    assert torch.load(path, weights_only=True)["epoch"] == 4
    assert torch.equal(checkpoint.load(path)["model"]["w"], STATE["model"]["w"])


def test_failed_save_keeps_the_previous_file(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save(STATE, path)
    with pytest.raises((AttributeError, pickle.PicklingError)):
        checkpoint.save({**STATE, "bad": lambda: None}, path)
    assert checkpoint.load(path)["epoch"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_missing_truncated_and_foreign_files(tmp_path):
    with pytest.raises(VitexpError, match="not found"):
        checkpoint.load(tmp_path / "nope.pt")
    path = tmp_path / "last.pt"
    checkpoint.save(STATE, path)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:300])
    with pytest.raises(VitexpError, match="truncated or corrupt"):
        checkpoint.load(truncated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(VitexpError, match="truncated or corrupt|refused"):
        checkpoint.load(garbage)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(VitexpError, match="not a vitexp checkpoint"):
        checkpoint.load(foreign)


class Payload:
    def __reduce__(self):
        return (Path.touch, (Path(MARKER),))


MARKER = ""


def test_pickle_that_runs_code_is_refused_and_never_runs(tmp_path):
    global MARKER
    MARKER = str(tmp_path / "payload_ran")
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "arch": {}, "x": Payload()}, evil)
    assert not Path(MARKER).exists()
    with pytest.raises(VitexpError, match="refused"):
        checkpoint.load(evil)
    assert not Path(MARKER).exists()
    with pytest.raises(pickle.UnpicklingError):
        torch.load(evil, weights_only=True)
    for args in (["task=evaluate", f"ckpt_path={evil}"], [*TINY, f"ckpt_path={evil}"], [f"resume={tmp_path}"]):
        if args[0].startswith("resume"):
            (tmp_path / "checkpoints").mkdir(exist_ok=True)
            (tmp_path / "checkpoints" / "last.pt").write_bytes(evil.read_bytes())
        proc = vitexp(*args, cwd=tmp_path, check=False)
        assert proc.returncode == 2 and "refused to load" in proc.stderr.strip().splitlines()[-1], proc.stderr
        assert not Path(MARKER).exists()
    torch.load(evil, weights_only=False)  # the payload is live: an unguarded load runs it
    assert Path(MARKER).exists()


def test_rng_state_round_trips_through_a_file(tmp_path):
    path = tmp_path / "rng.pt"
    checkpoint.save({**STATE, "rng": checkpoint.rng_state()}, path)
    expected = (random.random(), np.random.rand(), torch.rand(2))
    checkpoint.set_rng_state(checkpoint.load(path)["rng"])
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert expected[:2] == got[:2] and torch.equal(expected[2], got[2])


def test_the_training_state_is_the_layout_a_weights_only_load_reads(tmp_path):
    state = checkpoint.TrainingState(model=STATE["model"], arch=STATE["arch"], epoch=3, step=9, config={"seed": 0})
    saved = state.state_dict()
    assert list(saved) == list(checkpoint.KEYS) and saved[checkpoint.FORMAT] == checkpoint.FORMAT_VERSION
    for key in ("model", "arch", "optimizer", "scheduler", "scaler", "ema", "epoch", "step", "rng", "config"):
        assert key in saved  # the layout DESIGN.md names
    assert {"metrics", "wandb_run_id", "version"} <= saved.keys()
    checkpoint.save(saved, tmp_path / "last.pt")
    loaded = torch.load(tmp_path / "last.pt", weights_only=True)
    again = checkpoint.TrainingState()
    again.load_state_dict(loaded)
    assert (again.epoch, again.step, again.config, again.version) == (3, 9, {"seed": 0}, saved["version"])
    assert torch.equal(again.model["w"], STATE["model"]["w"])


def test_a_checkpoint_of_another_format_names_the_version_that_wrote_it(tmp_path):
    path = tmp_path / "old.pt"
    checkpoint.save({**STATE, "format": 1, "version": "0.0.9"}, path)
    with pytest.raises(VitexpError) as e:
        checkpoint.load(path)
    message = str(e.value)
    assert "\n" not in message and "checkpoint format 1" in message and "(0.0.9)" in message, message


def test_a_pickle_that_runs_code_is_refused_in_process(tmp_path):
    """The same refusal without a child process: the payload would create a file if unpickled."""
    global MARKER
    MARKER = str(tmp_path / "ran")
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "arch": {}, "x": Payload()}, path)
    with pytest.raises(VitexpError, match=rf"^refused to load {path}: it holds objects other than tensors"):
        checkpoint.load(path)
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("content", [{"model": {}}, {"arch": {}}, [1, 2]], ids=["no arch", "no model", "a list"])
def test_a_file_without_model_and_arch_is_not_a_checkpoint(content, tmp_path):
    path = tmp_path / "partial.pt"
    torch.save(content, path)
    with pytest.raises(VitexpError, match=r"is not a vitexp checkpoint \(no 'model' and 'arch' entries\)$"):
        checkpoint.load(path)


def test_a_failed_write_says_whether_the_previous_file_is_kept(tmp_path, monkeypatch):
    def full(obj, f):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(VitexpError, match=r"\(No space left on device\): free disk space .*hydra\.run\.dir$"):
        checkpoint.save(STATE, tmp_path / "first.pt")
    monkeypatch.undo()
    checkpoint.save(STATE, tmp_path / "last.pt")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(VitexpError, match=r"hydra\.run\.dir; the previous last\.pt is kept$"):
        checkpoint.save(STATE, tmp_path / "last.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_a_version_that_is_not_a_string_is_named(tmp_path):
    path = tmp_path / "v.pt"
    torch.save({**STATE, "version": 3}, path)
    with pytest.raises(VitexpError, match=r"v\.pt: version is a int, not a string; pass one vitexp wrote$"):
        checkpoint.load(path)


# ---- the checks of a loaded file, without a training run: hand-made checkpoints and tiny modules


def _sums(**changes) -> dict:
    """One rank's running sums as a mid-epoch save writes them, with `changes`."""
    return {**engine.EpochSums(torch.device("cpu"), skip_nonfinite=False).state_dict(), **changes}


def _resumable(**changes) -> dict:
    """A checkpoint dict with every field a resume reads, as vitexp writes them, with `changes`."""
    state = checkpoint.TrainingState(
        model=STATE["model"],
        arch=STATE["arch"],
        optimizer={"state": {}, "param_groups": []},
        scheduler={"last_epoch": 3},
        rng=checkpoint.rng_state(),
        epoch=3,
        step=12,
        config={"seed": 0},
        metrics={"best_val_acc1": 0.5, "val/loss": 1},
        val_images=40,
        position=checkpoint.Position(epoch=3, batch=2, sums=[_sums()]),
    ).state_dict()
    return {**state, **changes}


def _refusal(key: str, why: str, source: str = "src.pt") -> str:
    return re.escape(
        f"{source} is not a checkpoint vitexp wrote: its {key} {why}; start a new run (ckpt_path=<it> keeps its weights)"
    )


@pytest.mark.parametrize(
    ("key", "value", "why"),
    [
        ("epoch", -1, "is -1, not int >= 0"),
        ("epoch", True, "is True, not int >= 0"),
        ("epoch", 1.0, "is a float, not int >= 0"),
        ("step", "3", "is a str, not int >= 0"),
        ("config", [], "is a list, not dict"),
        ("metrics", None, "is a NoneType, not dict"),
        ("rng", 5, "is 5, not dict"),
        ("optimizer", None, "is a NoneType, not dict"),
        ("scheduler", (), "is a tuple, not dict"),
        ("scaler", 0, "is 0, not dict or None"),
        ("ema", [], "is a list, not dict or None"),
        ("val_images", -2, "is -2, not int or None >= 0"),
        ("val_images", 2.5, "is a float, not int or None >= 0"),
        ("position", [], "is a list, not dict or None"),
        ("early_stopping", "on", "is a str, not dict or None"),
    ],
)
def test_a_resume_field_of_the_wrong_type_is_named_with_what_it_should_be(key, value, why):
    with pytest.raises(VitexpError, match=f"^{_refusal(key, why)}$"):
        checkpoint.check_resume_fields(_resumable(**{key: value}), "src.pt")


def test_a_missing_resume_field_is_refused_and_the_optional_ones_may_be_none():
    saved = _resumable()
    del saved["rng"]
    with pytest.raises(VitexpError, match=f"^{_refusal('rng', 'is a NoneType, not dict')}$"):
        checkpoint.check_resume_fields(saved, "src.pt")
    none = dict.fromkeys(("scaler", "ema", "val_images", "position", "early_stopping"))
    checkpoint.check_resume_fields(_resumable(**none), "src.pt")
    checkpoint.check_resume_fields(_resumable(epoch=0, step=0, val_images=0), "src.pt")  # 0 is a number
    checkpoint.check_resume_fields(_resumable(metrics={}), "src.pt")  # no epoch ended yet


@pytest.mark.parametrize(
    "metrics",
    [{"best_val_acc1": 0.5, "val/acc1": True}, {"best_val_acc1": "0.5"}, {"val/acc1": 0.5}, {"best_val_acc1": None}],
    ids=["a bool", "a string", "no best", "None"],
)
def test_metrics_that_are_not_numbers_or_lack_the_best_are_refused(metrics):
    with pytest.raises(
        VitexpError, match=_refusal("metrics", "holds values that are not numbers (or no best_val_acc1)")
    ):
        checkpoint.check_resume_fields(_resumable(metrics=metrics), "src.pt")
    checkpoint.check_resume_fields(_resumable(metrics=metrics), "src.pt", [checkpoint.EPOCH])  # not asked for


def test_only_the_fields_asked_for_are_checked_and_the_source_is_printable():
    saved = {"epoch": 2}  # evaluate reads the epoch of a file that may hold nothing else
    checkpoint.check_resume_fields(saved, "src.pt", [checkpoint.EPOCH])
    escaped = _refusal("step", "is a NoneType, not int >= 0", source=r"a\nb.pt")  # the newline as \n, one line
    with pytest.raises(VitexpError, match=f"^{escaped}$"):
        checkpoint.check_resume_fields(saved, "a\nb.pt", [checkpoint.EPOCH, checkpoint.STEP])
    bad = _resumable(position={"epoch": 1})
    checkpoint.check_resume_fields(bad, "src.pt", [checkpoint.EPOCH, checkpoint.METRICS])


NOT_A_PLACE = "is not a mid-epoch place (epoch, batch and each rank's running sums)"


@pytest.mark.parametrize(
    "position",
    [
        {"epoch": -1, "batch": 2, "sums": [_sums()]},
        {"epoch": 3, "batch": True, "sums": [_sums()]},
        {"epoch": 3, "batch": 2.0, "sums": [_sums()]},
        {"batch": 2, "sums": [_sums()]},
        {"epoch": 3, "sums": [_sums()]},
        {"epoch": 3, "batch": 2},
        {"epoch": 3, "batch": 2, "sums": []},
        {"epoch": 3, "batch": 2, "sums": (_sums(),)},
        {"epoch": 3, "batch": 2, "sums": [_sums(), [1]]},
        {"epoch": 3, "batch": 2, "sums": [_sums(), _sums(extra=1)]},
        {"epoch": 3, "batch": 2, "sums": [{k: v for k, v in _sums().items() if k != "seen"}]},
        {"epoch": 3, "batch": 2, "sums": [_sums(interval=torch.zeros(2))]},
        {"epoch": 3, "batch": 2, "sums": [_sums(loss=0.0)]},
        {"epoch": 3, "batch": 2, "sums": [_sums(seen=torch.tensor(4))]},
        {"epoch": 3, "batch": 2, "sums": [_sums(seen=True)]},
        {"epoch": 3, "batch": 2, "sums": [_sums(steps=1.0)]},
    ],
    ids=lambda p: ",".join(f"{k}={v!r}"[:40] for k, v in p.items()),
)
def test_a_position_that_is_not_a_mid_epoch_place_is_refused(position):
    with pytest.raises(VitexpError, match=f"^{_refusal('position', NOT_A_PLACE)}$"):
        checkpoint.check_resume_fields(_resumable(position=position), "src.pt")


def test_a_mid_epoch_place_as_a_save_writes_it_is_taken():
    sums = engine.EpochSums(torch.device("cpu"), skip_nonfinite=True)
    sums.add_batch(torch.tensor(2.0), 4, logging=True)
    two_ranks = {"epoch": 0, "batch": 0, "sums": [sums.state_dict(), _sums()]}
    checkpoint.check_resume_fields(_resumable(position=two_ranks), "src.pt")


def test_a_mid_epoch_training_state_round_trips_through_load_training_state(tmp_path):
    saved = _resumable(scaler={"scale": 8.0}, early_stopping={"bad_epochs": 1}, wandb_run_id="abc")
    saved[checkpoint.POSITION]["sums"][0]["seen"] = 16
    checkpoint.save(saved, tmp_path / "last.pt")
    state = checkpoint.load_training_state(tmp_path / "last.pt")
    assert isinstance(state.position, checkpoint.Position)
    assert (state.position.epoch, state.position.batch, state.position.sums[0]["seen"]) == (3, 2, 16)
    assert (state.epoch, state.step, state.val_images, state.metrics) == (3, 12, 40, saved["metrics"])
    assert (state.scaler, state.early_stopping, state.wandb_run_id) == ({"scale": 8.0}, {"bad_epochs": 1}, "abc")
    assert state.optimizer == saved["optimizer"] and state.scheduler == {"last_epoch": 3} and state.ema is None
    assert torch.equal(state.rng["torch"], saved["rng"]["torch"]) and torch.equal(state.model["w"], STATE["model"]["w"])
    again = state.state_dict()  # written again as it was read
    assert again.keys() == saved.keys() and again[checkpoint.POSITION] == {
        "epoch": 3,
        "batch": 2,
        "sums": state.position.sums,
    }
    weights = state.state_dict(resumable=False)  # a pruned model's file: weights and where they stand, no run state
    assert (
        list(weights)
        == list(checkpoint.WEIGHTS_KEYS)
        == ["model", "arch", "epoch", "step", "config", "metrics", "version", "format"]
    )


def test_load_training_state_refuses_a_mistyped_field_and_names_the_file(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save(_resumable(step=-3), path)
    with pytest.raises(VitexpError, match=f"^{_refusal('step', 'is -3, not int >= 0', str(path))}$"):
        checkpoint.load_training_state(path)


def test_a_training_state_without_a_position_keeps_the_defaults_of_what_the_file_lacks():
    state = checkpoint.TrainingState(epoch=7)
    state.load_state_dict({"step": 5, "position": None, "unknown": 1})
    assert (state.epoch, state.step, state.position, state.config) == (7, 5, None, {})
    assert not hasattr(state, "unknown") and state.state_dict()[checkpoint.POSITION] is None


class _Net(nn.Module):
    """A body and a classifier under `head` (timm's name; `fc` and `classifier` in other timm families)."""

    def __init__(self, classes: int = 3, width: int = 4, head: str = "head") -> None:
        super().__init__()
        self.body = nn.Linear(2, width)
        self.add_module(head, nn.Linear(width, classes, bias=False))


@pytest.mark.parametrize("head", ["head", "fc", "classifier"])
def test_weights_for_another_number_of_classes_name_both_counts(head):
    with pytest.raises(VitexpError) as e:
        checkpoint.load_weights(_Net(3, head=head), _Net(5, head=head).state_dict(), "best.pt")
    assert str(e.value) == (
        "best.pt predicts 5 classes but this model has 3 (data.num_classes); pick the data= it was trained on"
    )


@pytest.mark.parametrize(
    ("weights", "detail"),
    [
        (_Net(3, width=5).state_dict(), "0 missing, 0 unexpected, 3 mismatched tensors"),  # body and head
        ({"body.weight": torch.zeros(4, 2)}, "2 missing, 0 unexpected, 0 mismatched tensors"),
        (
            {**_Net().state_dict(), "extra": torch.zeros(1), "more": torch.zeros(1)},
            "0 missing, 2 unexpected, 0 mismatched tensors",
        ),
        (
            {**_Net(5).state_dict(), "extra": torch.zeros(1)},
            "0 missing, 1 unexpected, 1 mismatched tensors, e.g. head.weight (5, 4) vs (3, 4)",
        ),
        (
            {k: v for k, v in _Net(5).state_dict().items() if k != "body.bias"},
            "1 missing, 0 unexpected, 1 mismatched tensors, e.g. head.weight (5, 4) vs (3, 4)",
        ),
        (
            {**_Net().state_dict(), "body.weight": torch.zeros(4, 3)},
            "0 missing, 0 unexpected, 1 mismatched tensors, e.g. body.weight (4, 3) vs (4, 2)",
        ),
    ],
    ids=["width", "missing", "unexpected", "head and unexpected", "head and missing", "body"],
)
def test_weights_that_do_not_fit_say_what_differs(weights, detail):
    with pytest.raises(VitexpError) as e:
        checkpoint.load_weights(_Net(), weights, "w.pt")
    message = str(e.value)
    assert message.startswith(f"w.pt does not fit this model ({detail}")
    assert message.endswith("); pick the model= it was trained with"), message
    assert (", e.g. " in message) == (" 0 mismatched" not in detail)  # an example of a mismatch when there is one


def test_a_scalar_head_of_another_shape_is_not_read_as_a_class_count():
    net = _Net()
    net.head.register_buffer("scale", torch.ones(1))
    weights = {**net.state_dict(), "head.scale": torch.tensor(1.0)}
    with pytest.raises(
        VitexpError,
        match=r"^w\.pt does not fit this model \(0 missing, 0 unexpected, 1 mismatched tensors, e\.g\. head\.scale \(\) vs \(1,\)\)",
    ):
        checkpoint.load_weights(net, weights, "w.pt")


def test_weights_load_bitwise_and_a_tensor_torch_cannot_copy_is_one_line():
    source, target = _Net(), _Net()
    checkpoint.load_weights(target, source.state_dict(), "w.pt")
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), source.state_dict().values()))
    weights = {**source.state_dict(), "body.weight": torch.zeros(4, 2).to_sparse()}
    with pytest.raises(VitexpError) as e:
        checkpoint.load_weights(target, weights, "w.pt")
    message = str(e.value)  # torch's last line, its tab escaped, cut at 160 characters
    assert message.startswith('w.pt does not fit this model (\\tWhile copying the parameter named "body.weight"'), (
        message
    )
    assert (
        message.endswith("...); pass one vitexp wrote")
        and len(message) == len("w.pt does not fit this model (); pass one vitexp wrote") + 160
    )


def test_a_load_error_without_words_is_named_by_its_type():
    class Refuses(_Net):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            raise RuntimeError("  ")

    with pytest.raises(VitexpError, match=r"^w\.pt does not fit this model \(RuntimeError\); pass one vitexp wrote$"):
        checkpoint.load_weights(Refuses(), _Net().state_dict(), "w.pt")
