"""A run folder someone handed over (a tarball, `cp -r`) may hold symlinks: vitexp refuses such a folder before it
writes anything, writes every file of a run through `vitexp.files` (a link is replaced, never written through), and
prints strings from files as data (one line, no escape sequences, no mathtext)."""

from __future__ import annotations

import io
import logging
import logging.config
import os
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import torch
import yaml
from omegaconf import OmegaConf

from tests.conftest import TINY, compose_config, vitexp
from vitexp import VitexpError, checkpoint, files, plots, tracking
from vitexp.checkpoint import check_resume_fields
from vitexp.export import write_folder
from vitexp.models import build_from_arch
from vitexp.records import EpochLog, read_metrics, write_results
from vitexp.runs import prepare, resume_overrides, resume_point
from vitexp.schema import Logger
from vitexp.tasks.recipe import read_recipe
from vitexp.training import RunState, checkpoint_state, optimization, restore

VICTIM = b"export PATH=$HOME/bin:$PATH\n"


@pytest.fixture(scope="module")
def honest(tmp_path_factory) -> Path:
    """One finished tiny run, copied by each test before it plants a link in it."""
    run = tmp_path_factory.mktemp("honest") / "run"
    vitexp(*TINY, "trainer.max_epochs=1", f"hydra.run.dir={run}", cwd=run.parent)
    return run


def _copy(honest: Path, tmp_path: Path, name: str = "run") -> Path:
    run = tmp_path / name
    shutil.copytree(honest, run, symlinks=True)
    (run / "results.json").unlink()  # an interrupted run, as resume= expects
    return run


def _victims(tmp_path: Path) -> tuple[Path, Path]:
    """A file and a folder outside the run that a link may point at, each with content that must stay as it is."""
    victim, folder = tmp_path / "victim.txt", tmp_path / "victim_dir"
    victim.write_bytes(VICTIM)
    folder.mkdir()
    (folder / "last.pt").write_bytes(VICTIM)
    return victim, folder


def _unchanged(victim: Path, folder: Path) -> None:
    assert victim.read_bytes() == VICTIM, "a write went through a link"
    assert sorted(p.name for p in folder.iterdir()) == ["last.pt"], "a file was written into a linked folder"
    assert (folder / "last.pt").read_bytes() == VICTIM, "a file in a linked folder was replaced"


def _one_line(proc: subprocess.CompletedProcess, fragment: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("error: ") and fragment in lines[0], lines[0]
    return lines[0]


# (where the link goes in the run folder, whether it points at the victim folder rather than the victim file)
PLANTS = {
    "log file": ("train_baseline.log", False),
    "plot": ("plots/learning_curves.png", False),
    "stale results temp file": (".results.json.tmp", False),
    "metrics.csv": ("metrics.csv", False),
    "checkpoints folder": ("checkpoints", True),
    ".hydra folder": (".hydra", True),
    "distill teacher sub-run": ("teacher", True),
    "file in a prune sub-run": ("unpruned/checkpoints/last.pt", False),
    "wandb's folder": ("wandb", True),
    "link in wandb's folder": ("wandb/latest-run", True),
}


@pytest.mark.parametrize("plant", PLANTS, ids=list(PLANTS))
def test_resume_refuses_a_folder_that_holds_a_symlink_before_hydra(honest, tmp_path, plant):
    where, to_folder = PLANTS[plant]
    victim, folder = _victims(tmp_path)
    run = _copy(honest, tmp_path, name="run\necho pwned" if plant == "log file" else "run")  # a name from a tarball
    link = run / where
    if link.is_dir():
        shutil.rmtree(link)
    link.parent.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)
    link.symlink_to(folder if to_folder else victim)
    for resume in (run, run / "checkpoints" / "last.pt"):
        with pytest.raises(VitexpError) as refused:
            resume_overrides(["trainer.max_epochs=2", f"resume={resume}"])
        message = str(refused.value)
        assert "\n" not in message and files.printable(link) in message and "is a symlink" in message
    _unchanged(victim, folder)


def test_auto_resume_refuses_a_folder_that_holds_a_symlink_before_hydra(honest, tmp_path):
    victim, folder = _victims(tmp_path)
    run = _copy(honest, tmp_path)
    (run / "metrics.csv").unlink()
    (run / "metrics.csv").symlink_to(victim)
    with pytest.raises(VitexpError, match="metrics.csv is a symlink"):
        prepare([*TINY, f"hydra.run.dir={run}", "auto_resume=true"])
    _unchanged(victim, folder)


def test_the_bashrc_attack_leaves_bashrc_unchanged_and_runs_nothing(honest, tmp_path):
    """A model name that holds a newline and a shell command, and the run's log and metrics.csv linked to the
    user's ~/.bashrc: appended as it was, the name would start a line that runs at the next login."""
    home, marker = tmp_path / "home", tmp_path / "pwned"
    home.mkdir()
    bashrc = home / ".bashrc"
    bashrc.write_bytes(VICTIM)
    run = _copy(honest, tmp_path)
    name = f"x\necho pwned > {marker}\n"
    config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    config["model"]["name"] = name
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    state = checkpoint.load(run / "checkpoints" / "last.pt")
    state["config"]["model"]["name"] = name
    torch.save(state, run / "checkpoints" / "last.pt")
    for planted in ("train_baseline.log", "metrics.csv"):
        (run / planted).unlink()
        (run / planted).symlink_to(bashrc)
    proc = vitexp(f"resume={run}", "trainer.max_epochs=2", cwd=tmp_path, check=False, env={"HOME": str(home)})
    _one_line(proc, "is a symlink")
    assert bashrc.read_bytes() == VICTIM and not any((run / ".hydra").glob("resume_*"))
    subprocess.run(["bash", "-c", f". {bashrc}"], env={**os.environ, "HOME": str(home)}, check=True)
    assert not marker.exists(), "a command from the model name ran"


def test_an_honest_copied_run_folder_still_resumes(honest, tmp_path):
    run = _copy(honest, tmp_path)
    proc = vitexp(f"resume={run}", "trainer.max_epochs=2", cwd=tmp_path)
    assert "resuming" in proc.stderr and "Traceback" not in proc.stderr
    assert all(line.startswith("[") for line in proc.stderr.splitlines())  # the console's lines: the formatter's
    assert [row["epoch"] for row in read_metrics(run / "metrics.csv")] == [1.0, 2.0]
    log = (run / "train_baseline.log").read_text()
    assert "epoch 1/1" in log and "epoch 2/2" in log  # appended to the run's own log
    assert len(list((run / ".hydra").glob("resume_*"))) == 1
    for written in ("results.json", "metrics.csv", "plots/learning_curves.png", "checkpoints/last.pt"):
        assert (run / written).is_file() and not (run / written).is_symlink()


def test_every_writer_replaces_a_linked_file_and_refuses_a_linked_folder(tmp_path):
    victim, folder = _victims(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").symlink_to(victim)
    write_results(run, {"status": "completed"})
    assert not (run / "results.json").is_symlink() and '"completed"' in (run / "results.json").read_text()
    (run / "teacher").symlink_to(folder)  # a sub-run's folder, written with the job's folder as root
    with pytest.raises(VitexpError, match="teacher is a symlink"):
        write_results(run / "teacher", {"status": "completed"}, root=run)
    (run / "checkpoints").symlink_to(folder)
    with pytest.raises(VitexpError, match="checkpoints is a symlink"):
        checkpoint.save({"epoch": 1}, run / "checkpoints" / "last.pt", run)
    (run / "plots").symlink_to(folder)
    figure_rows = [{"epoch": 1.0, "train/loss": 1.0}]
    with pytest.raises(VitexpError, match="plots is a symlink"):
        plots.learning_curves(figure_rows, run / "plots" / "learning_curves.png", "t", root=run)
    (run / "wandb").symlink_to(folder)
    with pytest.raises(VitexpError, match="wandb is a symlink"):
        logger = Logger(
            mode="offline",
            name=None,
            project="p",
            entity=None,
            group=None,
            tags=[],
            log_checkpoints=False,
            log_every_n_steps=50,
            init_timeout=60.0,
        )
        tracking.start_wandb(run, logger, job_type="t", config={})
    _unchanged(victim, folder)
    # a stale temp file a killed writer left is removed as a link, never through it
    (run / "real").mkdir()
    (run / "real" / ".last.pt.x.tmp").symlink_to(victim)
    checkpoint.save({"epoch": 1}, run / "real" / "last.pt", run)
    assert not (run / "real" / ".last.pt.x.tmp").exists() and victim.read_bytes() == VICTIM


def test_metrics_csv_is_rewritten_not_appended_and_holds_numbers_only(tmp_path):
    victim, folder = _victims(tmp_path)
    (tmp_path / "metrics.csv").symlink_to(victim)
    with pytest.raises(VitexpError, match="metrics.csv is a symlink"):
        EpochLog(tmp_path, resume_epoch=1)
    (tmp_path / "metrics.csv").unlink()
    records = EpochLog(tmp_path)
    records.epoch({"epoch": 1, "train/loss": 0.5, "val/acc1": 1.0}, 2)
    records.epoch({"epoch": 2, "train/loss": 0.25, "val/acc1": 1.0}, 2)
    again = EpochLog(tmp_path, resume_epoch=1)  # an interrupted epoch 2 runs again: its row goes
    assert (tmp_path / "metrics.csv").read_text().splitlines()[1].startswith("1,0.5,,1.0,")
    again.epoch({"epoch": 2, "train/loss": 0.2, "val/acc1": 1.0}, 2)
    assert [r["train/loss"] for r in read_metrics(tmp_path / "metrics.csv")] == [0.5, 0.2]
    (tmp_path / "metrics.csv").write_text("epoch,train/loss\n1,\"x\n=cmd|' /C calc'!A0\"\n")
    with pytest.raises(VitexpError, match="not a number") as refused:
        EpochLog(tmp_path, resume_epoch=1)
    assert "\n" not in str(refused.value)
    _unchanged(victim, folder)


def test_export_replaces_linked_files_in_its_folder(tmp_path):
    import timm

    victim, folder = _victims(tmp_path)
    out = tmp_path / "export"
    out.mkdir()
    (out / "config.json").symlink_to(victim)
    (out / "model.safetensors").symlink_to(folder / "last.pt")
    model = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, depth=1, num_classes=2)
    write_folder(model, {"input_size": (3, 16, 16), "mean": (0.5,) * 3, "std": (0.5,) * 3}, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert not any(p.is_symlink() for p in out.iterdir())
    _unchanged(victim, folder)


def test_plot_names_are_plain_text_never_mathtext(tmp_path):
    name = r"$\frac{$ x^{"  # read as mathtext, matplotlib raised a ParseFatalException
    rows = [{"epoch": 1.0, "train/loss": 1.0, "val/acc1": 0.5}]
    plots.learning_curves(rows, tmp_path / "plots" / "curves.png", f"train {name}", root=tmp_path)
    classes = [name, "b\x1b[31m"]
    plots.confusion_matrix(torch.tensor([[1, 0], [1, 1]]), classes, tmp_path / "plots" / "c.png", name, root=tmp_path)
    points = [(name, {"macs": 1e6, "val_acc1": 0.5}), ("round 1", {"macs": 5e5, "val_acc1": 0.4})]
    plots.accuracy_vs_macs(points, tmp_path / "plots" / "a.png", name, root=tmp_path)
    assert all((tmp_path / "plots" / f).stat().st_size > 0 for f in ("curves.png", "c.png", "a.png"))
    assert not plt.get_fignums()  # every figure closed


def test_the_run_log_and_console_escape_control_characters(tmp_path):
    """Hydra's job_logging as conf/hydra/default.yaml sets it: the one formatter of the file and console handlers
    escapes a newline or an ESC in a message, and the file handler refuses a link."""
    cfg = compose_config(*TINY, f"hydra.run.dir={tmp_path}", hydra=True)
    job_logging = OmegaConf.to_container(cfg.hydra.job_logging, resolve=False)
    handlers = job_logging["handlers"]
    assert {h["formatter"] for h in handlers.values()} == {"simple"}
    assert handlers["file"]["class"] == "vitexp.files.NoFollowFileHandler" and handlers["file"]["delay"]
    formatter = logging.config.DictConfigurator({}).configure_formatter(dict(job_logging["formatters"]["simple"]))
    console = io.StringIO()
    logger = logging.getLogger("vitexp.test_symlinks")
    logger.propagate, logger.level = False, logging.INFO
    for handler in (logging.StreamHandler(console), files.NoFollowFileHandler(str(tmp_path / "run.log"), delay=True)):
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    try:
        logger.info("model x\necho pwned\x1b[2J\x9b done")
    finally:
        for handler in logger.handlers[:]:
            handler.close()
            logger.removeHandler(handler)
    for text in (console.getvalue(), (tmp_path / "run.log").read_text()):
        assert text.count("\n") == 1 and text.endswith("[INFO] model x\\necho pwned\\x1b[2J\\x9b done\n"), text
    (tmp_path / "linked.log").symlink_to(tmp_path / "run.log")
    with pytest.raises(VitexpError, match="is a symlink"):
        files.NoFollowFileHandler(str(tmp_path / "linked.log")).emit(logging.makeLogRecord({"msg": "x"}))


# A field of last.pt as a file may hold it, and the field a resume names when it refuses it.
MISTYPED = {
    "epoch": lambda s: s.update(epoch=torch.tensor(1)),
    "step": lambda s: s.update(step="3"),
    "metrics": lambda s: s.update(metrics={"best_val_acc1": "high"}),
    "config": lambda s: s.update(config=["model"]),
    "rng": lambda s: s.update(rng=torch.zeros(3)),
    "optimizer": lambda s: s.update(optimizer=None),
    "position": lambda s: s.update(position={"epoch": 1, "batch": 2, "sums": [{"loss": 1}]}),
    "val_images": lambda s: s.update(val_images=-1),
}


@pytest.mark.parametrize("field", MISTYPED)
def test_a_mistyped_checkpoint_field_is_one_line_on_resume(honest, tmp_path, field):
    run = _copy(honest, tmp_path)
    state = checkpoint.load(run / "checkpoints" / "last.pt")
    MISTYPED[field](state)
    torch.save(state, run / "checkpoints" / "last.pt")
    with pytest.raises(VitexpError, match=rf"\b{field}\b") as refused:
        resume_point(run)
    assert "\n" not in str(refused.value) and "vitexp wrote" in str(refused.value)


def test_the_honest_checkpoint_passes_and_evaluate_refuses_a_tensor_epoch(honest, tmp_path):
    check_resume_fields(checkpoint.load(honest / "checkpoints" / "last.pt"), "last.pt")
    evil = tmp_path / "best.pt"
    state = checkpoint.load(honest / "checkpoints" / "best.pt")
    state["epoch"] = torch.tensor(1)
    torch.save(state, evil)
    proc = vitexp(*TINY, "task=evaluate", f"ckpt_path={evil}", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "its epoch is a Tensor, not int" in proc.stderr.strip().splitlines()[-1]


def test_files_one_writer_and_printable_strings(tmp_path):
    victim, folder = _victims(tmp_path)
    (tmp_path / "a.txt").symlink_to(victim)
    files.write_text(tmp_path / "a.txt", "new")
    assert (tmp_path / "a.txt").read_text() == "new" and not (tmp_path / "a.txt").is_symlink()
    (tmp_path / "sub").symlink_to(folder)
    with pytest.raises(VitexpError, match="sub is a symlink"):
        files.write_text(tmp_path / "sub" / "b.txt", "x", root=tmp_path)
    (tmp_path / "b.log").symlink_to(victim)
    with pytest.raises(VitexpError, match="b.log is a symlink"):
        files.open_append(tmp_path / "b.log")
    with pytest.raises(VitexpError, match="is a symlink"):
        files.read_text(tmp_path / "sub" / "last.pt", root=tmp_path)
    _unchanged(victim, folder)
    wandb = tmp_path / "run" / "wandb"
    (wandb / "run-1" / "logs").mkdir(parents=True)
    (wandb / "run-1" / "logs" / "debug.log").write_text("")
    (wandb / "latest-run").symlink_to("run-1")
    (wandb / "debug.log").symlink_to("run-1/logs/debug.log")
    (wandb / "run-1" / "logs" / "debug-core.log").symlink_to(tmp_path / "cache" / "core-debug-1.log")
    files.refuse_links(tmp_path / "run")  # wandb's own links: inside its folder, and its core's log in its cache
    (wandb / "debug-internal.log").symlink_to(victim)
    with pytest.raises(VitexpError, match="debug-internal.log is a symlink"):
        files.refuse_links(tmp_path / "run")
    assert files.printable("a\nb\x1b[31mc\x9bd\x7f") == r"a\nb\x1b[31mc\x9bd\x7f"
    assert files.printable("x" * 300) == "x" * 197 + "..."
    assert files.plot_text(r"$\frac{$") == r"\$\frac{\$"


def test_a_state_that_does_not_fit_the_run_is_one_line_on_resume(tmp_path):
    recipe = read_recipe(compose_config(*TINY))
    model = build_from_arch(recipe.arch)
    state = checkpoint_state(model, optimization(recipe, model, 3), RunState(), recipe.config)
    for part, edit in (("optimizer", {"state": {}, "param_groups": []}), ("rng", {"python": 3})):
        with pytest.raises(VitexpError, match=f"its {part} state does not fit this run") as refused:
            restore(replace(state, **{part: edit}), model, optimization(recipe, model, 3), tmp_path)
        assert "\n" not in str(refused.value)
