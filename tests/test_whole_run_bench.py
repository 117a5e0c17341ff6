"""vitexp.bench.whole_run's pieces without a training run: its options, the ImageFolder tree it cuts from a tar of
class folders, the figures it reads from a vitexp run folder and how it sums up rounds."""

from __future__ import annotations

import io
import sys
import tarfile
from pathlib import Path

import pytest

from vitexp.bench import whole_run


def _tar(path: Path, classes: dict[str, int]) -> Path:
    """A tar laid out as the CIFAR-10 one: train/<class>/<NNNN>.jpg, plus a file that is not an image."""
    with tarfile.open(path, "w:gz") as archive:
        for name, count in classes.items():
            for i in range(count):
                data = f"{name}{i}".encode()
                info = tarfile.TarInfo(f"train/{name}/{i:04d}.jpg")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("train/README.txt")
        archive.addfile(info, io.BytesIO(b""))
    return path


def test_options_and_overrides_are_parsed_apart() -> None:
    args, overrides = whole_run.parse(["--epochs", "1", "--per-class", "2", "--repeats", "5", "data.num_workers=0"])
    assert (args.epochs, args.per_class, args.val_per_class, args.repeats) == (1, 2, 100, 5)
    assert overrides == ["data.num_workers=0"]
    command = whole_run.vitexp_command(Path("/t"), 1, Path("/o"), overrides)
    # the bench's recipe first, the user's overrides after it (they win), the run folder last
    assert command.index("trainer.max_epochs=1") < command.index("data.num_workers=0") < len(command) - 1
    assert command[-1] == "hydra.run.dir=/o" and "data.root=/t" in command


def test_the_tree_takes_per_class_train_then_val_images_once(tmp_path: Path) -> None:
    tar = _tar(tmp_path / "t.tar.gz", {"cat": 5, "dog": 4})
    tree = whole_run.build_tree(tar, tmp_path / "cache", per_class=2, val_per_class=2)
    assert sorted(p.name for p in (tree / "train" / "cat").iterdir()) == ["0000.jpg", "0001.jpg"]
    assert sorted(p.name for p in (tree / "val" / "dog").iterdir()) == ["0002.jpg", "0003.jpg"]
    assert (tree / "val" / "cat" / "0003.jpg").read_bytes() == b"cat3"
    tar.unlink()  # a built tree is kept: the tar is not read again
    assert whole_run.build_tree(tar, tmp_path / "cache", per_class=2, val_per_class=2) == tree


def test_figures_from_a_run_folder_and_the_rounds_summed_up(tmp_path: Path) -> None:
    (tmp_path / "metrics.csv").write_text(
        "epoch,val/acc1,time/epoch_s,throughput/img_s\n1,0.2,12.0,100.0\n2,0.3,11.0,128.0\n3,0.4,10.5,128.0\n"
    )
    epochs = whole_run.vitexp_epochs(tmp_path, train_images=1280)
    assert [e["val_s"] for e in epochs] == pytest.approx([12.0 - 12.8, 1.0, 0.5])
    fig = whole_run.summarise(40.0, epochs, 71.04)
    # steady: the epochs after the first; start/end: the whole minus the epochs
    assert fig == {"whole_s": 40.0, "cpu_s": 71.0, "img_s": 128.0, "val_s": 0.5, "start_end_s": 6.5, "acc1": 0.4}
    plain = {"whole_s": 30.0, "img_s": 120.0, "val_s": 1.0, "start_end_s": 2.0, "acc1": 0.3}
    assert whole_run.best([fig, {**fig, "whole_s": 39.0}])["whole_s"] == 39.0
    assert whole_run.ratios(plain, fig) == {"whole": 0.75, "train_img_s": round(128 / 120, 3), "val": 2.0}


def test_the_default_job_against_another_checkout(tmp_path: Path, monkeypatch, capsys) -> None:
    args, overrides = whole_run.parse(["--digits", "--against", "/old", "--epochs", "2", "trainer.progress=false"])
    assert args.digits and args.against == Path("/old") and overrides == ["trainer.progress=false"]
    assert whole_run.digits_command(2, Path("/o"), overrides)[3:] == [
        "trainer.max_epochs=2",
        "trainer.progress=false",
        "hydra.run.dir=/o",
    ]
    calls = []

    def fake_timed(cmd: list[str], source: Path | None = None) -> tuple[float, float, str]:
        folder = Path(cmd[-1].split("=", 1)[1])
        folder.mkdir(parents=True)
        seconds = 20.0 if source else 10.0  # the older checkout takes twice as long an epoch
        (folder / "metrics.csv").write_text(f"epoch,val/acc1,time/epoch_s,throughput/img_s\n1,0.5,{seconds},700.0\n")
        calls.append(source)
        return seconds + 5, 2 * seconds, ""

    monkeypatch.setattr(whole_run, "timed", fake_timed)
    arms = whole_run.digits_round(args, overrides, tmp_path)
    assert calls == [Path("/old"), None] and list(arms) == ["before", "vitexp"]
    assert arms["vitexp"]["val_s"] == pytest.approx(10.0 - whole_run.DIGITS_TRAIN_IMAGES / 700.0, abs=0.01)
    summary = whole_run.report([arms], args, overrides)
    assert summary["before_over_vitexp"]["whole"] == round(25 / 15, 3) and summary["job"] == "digits"
    assert "before: whole 25.0 s (40 CPU s)" in capsys.readouterr().out


def test_a_command_is_timed_in_wall_and_cpu_seconds_its_own_children_included() -> None:
    """The CPU seconds count the command's children (a loader's workers) as well as the command."""
    spin = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\n"
    child = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {spin!r}]); print('done')"
    whole, cpu, stdout = whole_run.timed([sys.executable, "-c", spin + child])
    assert stdout == "done\n" and cpu >= 0.6 and whole >= cpu / 2


def test_another_checkout_runs_in_its_own_folder(tmp_path: Path, monkeypatch) -> None:
    """`python -m vitexp` imports the working folder's vitexp before PYTHONPATH's: the older checkout's arm runs in
    its folder, so that its own code runs even when the bench starts in this checkout."""
    for folder in ("this", "older"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "probe.py").write_text(f"print({folder!r})\n")
    monkeypatch.chdir(tmp_path / "this")
    assert whole_run.timed([sys.executable, "-m", "probe"], tmp_path / "older")[2] == "older\n"
    assert whole_run.timed([sys.executable, "-m", "probe"])[2] == "this\n"
