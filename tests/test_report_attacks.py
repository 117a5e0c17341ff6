"""A folder handed to `python -m vitexp.report` is data: links in it are never followed (to write or to read), a run
folder whose files are not what vitexp writes there is left out with a counted warning, and names read from the files
reach the terminal, report.csv and the plots as plain text."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import matplotlib.image
import pytest
import yaml

from tests import cli
from vitexp.report import Unreadable, main, summarize

SECRET = "vitexp-test-secret-9d2e"
PNGS = ("report_val_acc.png", "report_acc_vs_macs.png")


def _run(folder: Path, model: str = "baseline", acc: float = 0.5, seed: int = 0) -> Path:
    """A finished run folder as vitexp leaves it: .hydra/config.yaml and overrides.yaml, metrics.csv, results.json."""
    (folder / ".hydra").mkdir(parents=True)
    overrides = [f"model={model}", f"seed={seed}", "trainer.max_epochs=2"]
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    config = {"task": {"name": "train"}, "model": {"name": model}, "seed": seed, "trainer": {"max_epochs": 2}}
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / "metrics.csv").write_text(
        f"epoch,train/loss,val/acc1,time/epoch_s\n1,2.1,{acc / 2},1.5\n2,1.9,{acc},1.4\n"
    )
    results = {"task": "train", "model": model, "best_val_acc1": acc, "epochs": 2, "params": 1000, "macs": 2e6}
    results |= {"infer_img_per_s": 900.0, "wall_s": 3.0, "status": "completed"}
    (folder / "results.json").write_text(json.dumps(results))
    return folder


def _sweep(tmp_path: Path, n: int = 2) -> Path:
    """A sweep folder with `n` honest runs 0..n-1 (one model each, so each is a row of its own)."""
    sweep = tmp_path / "sweep"
    for i in range(n):
        _run(sweep / str(i), model=f"model{i}", acc=0.4 + 0.1 * i)
    return sweep


def _victim(tmp_path: Path, name: str = "victim.txt") -> tuple[Path, bytes]:
    """A file outside the folders handed over that must stay as it is."""
    victim = tmp_path / "outside" / name
    victim.parent.mkdir(exist_ok=True)
    victim.write_bytes(b"mine, not the report's\n")
    return victim, victim.read_bytes()


def _report(capsys, *argv: str) -> tuple[str, str]:
    """`python -m vitexp.report ARGV` in-process: its stdout and stderr, after checking that it succeeded."""
    main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return out, err


def _refused(capsys, *argv: str) -> str:
    """The one line that `python -m vitexp.report ARGV` exits 2 with."""
    with pytest.raises(SystemExit) as exit_:
        main(list(argv))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: ") and err.strip().count("\n") == 0, err
    return err


def _csv_rows(folder: Path) -> list[dict[str, str]]:
    path = folder / "report.csv"
    assert path.is_file() and not path.is_symlink()
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_links_in_the_output_folder_are_replaced_never_written_through(tmp_path, capsys):
    sweep = _sweep(tmp_path)
    victims = {name: _victim(tmp_path, f"victim_{name}") for name in ("report.csv", *PNGS)}
    for name, (victim, _) in victims.items():
        (sweep / name).symlink_to(victim)
    _report(capsys, str(sweep))
    for victim, before in victims.values():
        assert victim.read_bytes() == before
    assert sorted(r["model"] for r in _csv_rows(sweep)) == ["model0", "model1"]
    for png in PNGS:
        assert not (sweep / png).is_symlink() and matplotlib.image.imread(sweep / png).shape[0] >= 300


def test_a_linked_output_folder_is_refused_with_one_line(tmp_path, capsys):
    sweep = _sweep(tmp_path)
    elsewhere = tmp_path / "outside"
    elsewhere.mkdir()
    (tmp_path / "out").symlink_to(elsewhere, target_is_directory=True)
    assert "is a symlink" in _refused(capsys, str(sweep), "--out", str(tmp_path / "out"))
    assert list(elsewhere.iterdir()) == []


def test_linked_files_and_folders_in_a_run_folder_are_never_read(tmp_path, capsys):
    sweep = _sweep(tmp_path)
    victim = tmp_path / "outside" / "results.json"
    victim.parent.mkdir()
    victim.write_text(json.dumps({"task": "train", "model": SECRET, "best_val_acc1": 0.9, "status": "completed"}))
    before = victim.read_bytes()
    (sweep / "2").mkdir()
    (sweep / "2" / "results.json").symlink_to(victim)  # a linked file
    _run(sweep / "3", model="model3")
    os.rename(sweep / "3" / ".hydra", tmp_path / "outside" / ".hydra")
    (sweep / "3" / ".hydra").symlink_to(tmp_path / "outside" / ".hydra")  # a linked folder inside a run
    _run(tmp_path / "outside" / "run", model=SECRET)
    (sweep / "4").symlink_to(tmp_path / "outside" / "run", target_is_directory=True)  # a linked run folder
    out, err = _report(capsys, str(sweep))
    assert "warning: skipped 2 run folders with unreadable files, e.g. " in err
    assert f"{sweep / '2' / 'results.json'} (a symlink)" in err
    rows = _csv_rows(sweep)
    assert sorted(r["run"] for r in rows) == ["0", "1"]
    assert SECRET not in out + err + (sweep / "report.csv").read_text()
    assert victim.read_bytes() == before


MALFORMED = [
    ("results.json", "{not json", "not JSON"),
    ("results.json", "[]", "not a JSON object"),
    ("results.json", '"x"', "not a JSON object"),
    ("results.json", "3", "not a JSON object"),
    ("results.json", '{"best_val_acc1": "abc"}', "best_val_acc1 is not a number"),
    ("results.json", '{"params": [1]}', "params is not a number"),
    ("results.json", '{"macs": true}', "macs is not a number"),
    ("results.json", '{"model": {"name": "x"}}', "model is not a string"),
    ("results.json", "[" * 100_000, "not JSON"),
    ("metrics.csv", "epoch,val/acc1\n1,abc\n", "not a table of numbers with an epoch column"),
    ("metrics.csv", "val/acc1\n0.5\n", "not a table of numbers with an epoch column"),
    (".hydra/overrides.yaml", "model: baseline\n", "not a list"),
    (".hydra/overrides.yaml", "- [1]\n", "not a list of strings"),
    (".hydra/overrides.yaml", "- !!python/object/apply:os.system ['touch {marker}']\n", "not plain YAML"),
    (".hydra/config.yaml", "- task\n", "not a mapping"),
    (".hydra/config.yaml", "model: [1]\n", "model.name is not a string"),
    (".hydra/config.yaml", "task: !!python/object/apply:os.system ['touch {marker}']\n", "not plain YAML"),
    (".hydra/config.yaml", "seed: 2001-13-45\n", "not plain YAML"),
]


@pytest.mark.parametrize(("name", "text", "why"), MALFORMED)
def test_a_file_that_is_not_what_vitexp_writes_leaves_its_run_out(tmp_path, name, text, why):
    marker = tmp_path / "payload_ran"
    run = _run(tmp_path / "sweep" / "0")
    (run / name).write_text(text.replace("{marker}", str(marker)))
    with pytest.raises(Unreadable, match=r"\(" + why):
        summarize(run, tmp_path / "sweep")
    assert not marker.exists()


def test_a_sweep_with_malformed_runs_reports_the_others_and_counts_them(tmp_path, capsys):
    sweep, marker = _sweep(tmp_path), tmp_path / "payload_ran"
    for i, (name, text, _) in enumerate(MALFORMED, 2):
        (_run(sweep / str(i)) / name).write_text(text.replace("{marker}", str(marker)))
    # a sub-run (a distill job's teacher/) whose job's overrides.yaml is malformed is left out too
    shutil.rmtree(_run(sweep / "99" / "teacher") / ".hydra")
    (sweep / "99" / ".hydra").mkdir()
    (sweep / "99" / ".hydra" / "overrides.yaml").write_text("{}\n")
    (sweep / "optimization_results.yaml").write_text("best_params: !!python/name:os.system\n")
    out, err = _report(capsys, str(sweep))
    assert f"warning: skipped {len(MALFORMED) + 1} run folders with unreadable files, e.g. {sweep / '2'}" in err
    assert f"warning: skipped {sweep / 'optimization_results.yaml'} (not plain YAML" in err
    assert sorted(r["run"] for r in _csv_rows(sweep)) == ["0", "1"] and "best trial" not in out
    assert not marker.exists()
    assert all((sweep / png).is_file() for png in PNGS)


def test_no_readable_run_is_one_line(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    (_run(sweep / "0") / "results.json").write_text("[]")
    (_run(sweep / "1") / "metrics.csv").write_text("epoch\nx\n")
    err = _refused(capsys, str(sweep))
    assert "no readable run folders" in err and "2 left out" in err and "(not a JSON object)" in err
    assert not (sweep / "report.csv").exists()


def test_names_from_the_files_are_printed_and_plotted_as_plain_text(tmp_path, capsys):
    sweep = _sweep(tmp_path)
    evil = _run(sweep / "2", model="evil\nfake | row\x1b[31mRED\x9b2J", acc=0.3)
    results = json.loads((evil / "results.json").read_text())
    (evil / "results.json").write_text(json.dumps({**results, "task": "$\\frac{$", "error": "bad\x1b]0;title\x07"}))
    (evil / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["model=$\\frac{$", "seed=0\x1b[2J"]))
    mathtext = _run(sweep / "3\x1b[1mbold", model="$\\frac{$", acc=0.2)
    (mathtext / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["model=$x^$"]))
    (sweep / "optimization_results.yaml").write_text(yaml.safe_dump({"best_value": 0.5, "best_params": {"m\x1b": 1}}))
    out, err = _report(capsys, str(sweep))
    table = (sweep / "report.csv").read_text()
    for text in (out, err, table):
        assert not any(c in text for c in "\x1b\x9b\x07"), repr(text)
    assert "evil\\nfake \\| row\\x1b[31mRED\\x9b2J" in out and "3\\x1b[1mbold" in out and "m\\x1b" in out
    rows = {r["run"]: r for r in _csv_rows(sweep)}
    assert (
        rows["2"]["model"] == "evil\\nfake | row\\x1b[31mRED\\x9b2J" and rows["2"]["error"] == "bad\\x1b]0;title\\x07"
    )
    assert rows["3\\x1b[1mbold"]["model"] == "$\\frac{$" and len(rows) == 4
    for png in PNGS:
        assert matplotlib.image.imread(sweep / png).shape[0] >= 300


def test_the_cli_reports_a_tampered_sweep_with_one_warning(tmp_path):
    sweep = _sweep(tmp_path)
    victim, before = _victim(tmp_path)
    (sweep / "report.csv").symlink_to(victim)
    (_run(sweep / "2") / ".hydra" / "overrides.yaml").write_text("- !!python/name:os.system\n")
    _run(sweep / "3", model="$\\frac{$")
    proc = cli.run([str(sweep)], tmp_path, 300, entry="report")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: ")]
    bad = sweep / "2" / ".hydra" / "overrides.yaml"
    why = "not plain YAML: a syntax error or a tag such as !!python/..."
    assert warnings == [f"warning: skipped 1 run folder with unreadable files, e.g. {bad} ({why})"]
    assert victim.read_bytes() == before and "| model1 |" in proc.stdout and "| $\\frac{$ |" in proc.stdout
