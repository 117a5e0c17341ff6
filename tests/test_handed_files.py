"""Handed-over files are data at every entry point, checked where the data flows out: the one reader (FIFOs,
devices, folders refused at once; JSON and YAML nesting bounded), ONNX models from their own bytes only and checked
against model.json, the one CSV writer (control characters escaped, formulas neutralised, numbers kept) and the one
rule for outputs (a folder, device or FIFO is never replaced). Each case is built here; each refusal is one line."""

from __future__ import annotations

import csv
import json
import os
import stat
from pathlib import Path

import pytest
import yaml
from PIL import Image

from tests import handed
from vitexp import VitexpError, files, predict, report, shards
from vitexp.images import image_folder, load_image


def _predict_main(capsys, *argv: str) -> tuple[int, str]:
    """`python -m vitexp.predict` in-process: its exit status and all it printed."""
    with handed.no_hang(), pytest.raises(SystemExit) as ended:
        predict.main([*argv])
        raise SystemExit(0)
    out = capsys.readouterr()
    return ended.value.code, out.out + out.err


def _one_line_exit_2(code: int, printed: str, match: str) -> None:
    assert code == 2, printed
    lines = printed.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], printed


def _csv(path: Path) -> list[list[str]]:
    with path.open(newline="") as f:
        return list(csv.reader(f))


# --- the one reader -------------------------------------------------------------------------------------------------


def test_the_reader_refuses_fifos_devices_and_folders_at_once(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    for path, kind in ((tmp_path / "pipe", "FIFO"), (Path("/dev/null"), "character device"), (tmp_path, "folder")):
        for read in (files.read_bytes, files.read_json, files.read_yaml):
            with handed.no_hang(), pytest.raises(VitexpError, match=f"is a {kind}"):
                read(path, follow=True)
    (tmp_path / "big.json").write_text("[" + "0," * 100 + "0]")
    with pytest.raises(VitexpError, match="more than 64 bytes"):
        files.read_json(tmp_path / "big.json", max_bytes=64)


@pytest.mark.parametrize("suffix", ["json", "yaml"])
def test_deep_nesting_is_one_line_not_a_recursion_error(tmp_path, suffix):
    path = tmp_path / f"deep.{suffix}"
    path.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(VitexpError, match="nested deeper than 64 levels"):
        (files.read_json if suffix == "json" else files.read_yaml)(path)
    path.write_text(json.dumps({"a": [[[1]]]}))
    assert (files.read_json if suffix == "json" else files.read_yaml)(path) == {"a": [[[1]]]}


# --- ONNX: the folder's own bytes, checked against its card ---------------------------------------------------------


def test_external_data_is_refused_and_never_read_from_the_working_folder(tmp_path, capsys, monkeypatch):
    secret = bytes(range(256)) * 2  # a file of the victim's, in the folder predict runs in
    (tmp_path / "secret.bin").write_bytes(secret[:192])
    monkeypatch.chdir(tmp_path)
    imgs = handed.images(tmp_path / "imgs", ["a.png"])
    for variant in ("external", "attribute_external"):
        folder = handed.export_folder(tmp_path / variant, variant)
        code, printed = _predict_main(capsys, str(folder), str(imgs), "--out", str(tmp_path / "p.csv"))
        _one_line_exit_2(code, printed, "external file (ONNX external data)")
        assert not (tmp_path / "p.csv").exists()
        assert secret[:16].hex() not in printed and str(list(secret[:8])) not in printed


@pytest.mark.parametrize(
    "variant,match",
    [
        ("input_name", "inputs are [x ['N', 3, 4, 4]], not one float32 'images'"),
        ("fp16", "inputs are [images (not float32)]"),
        ("second_input", "extra ['N', 1]], not one float32 'images'"),
        ("output_name", "outputs are [y ['N', 2]], not one float32 'logits' [N, 2]"),
        ("dynamic_width", "outputs are [logits ['N', 'W']]"),
        ("constant_of_shape", "tensor big would hold more than 268435456 elements"),
    ],
)
def test_graphs_vitexp_never_exports_are_one_line(tmp_path, capsys, variant, match):
    folder = handed.export_folder(tmp_path / "m", variant)
    imgs = handed.images(tmp_path / "imgs", ["a.png"])
    code, printed = _predict_main(capsys, str(folder), str(imgs), "--out", str(tmp_path / "p.csv"))
    _one_line_exit_2(code, printed, match)


def test_logits_of_another_width_at_run_time_are_one_line(tmp_path, capsys):
    folder = handed.export_folder(tmp_path / "m")  # declares 2 classes, computes 3: only running it tells
    (folder / "model.onnx").write_bytes(handed.model(classes=3).SerializeToString())
    proto = handed.model(classes=3)
    proto.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 2
    (folder / "model.onnx").write_bytes(proto.SerializeToString())
    imgs = handed.images(tmp_path / "imgs", ["a.png", "b.png"])
    code, printed = _predict_main(capsys, str(folder), str(imgs), "--out", str(tmp_path / "p.csv"))
    _one_line_exit_2(code, printed, "model.onnx")
    assert not (tmp_path / "p.csv").exists()


@pytest.mark.parametrize(
    "card,match",
    [
        ({"input_size": [3, 40000, 40000]}, "input_size not as vitexp writes it"),
        ({"input_size": [3, 1024, 1024], "crop_pct": 0.0625}, "input_size / crop_pct"),
        ({"classes": [[[["x"]]]] * 2}, "classes not as vitexp writes it"),
    ],
)
def test_cards_that_would_make_huge_inputs_are_one_line(tmp_path, capsys, card, match):
    folder = handed.export_folder(tmp_path / "m", **card)
    imgs = handed.images(tmp_path / "imgs", ["a.png"])
    code, printed = _predict_main(capsys, str(folder), str(imgs), "--out", str(tmp_path / "p.csv"))
    _one_line_exit_2(code, printed, match)


def test_a_card_nested_200000_deep_is_one_line(tmp_path, capsys):
    folder = handed.export_folder(tmp_path / "m")
    (folder / "model.json").write_text('{"classes": ' + "[" * 200_000 + "]" * 200_000 + "}")
    imgs = handed.images(tmp_path / "imgs", ["a.png"])
    code, printed = _predict_main(capsys, str(folder), str(imgs), "--out", str(tmp_path / "p.csv"))
    _one_line_exit_2(code, printed, "deeper than 64 levels")


# --- FIFOs in place of each file ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["model.json", "model.onnx"])
def test_a_fifo_in_an_exported_folder_is_refused_not_waited_on(tmp_path, capsys, name):
    folder = handed.export_folder(tmp_path / "m")
    (folder / name).unlink()
    os.mkfifo(folder / name)
    imgs = handed.images(tmp_path / "imgs", ["a.png"])
    code, printed = _predict_main(capsys, str(folder), str(imgs), "--out", str(tmp_path / "p.csv"))
    _one_line_exit_2(code, printed, "FIFO (named pipe), not a regular file")


def test_a_fifo_among_images_is_skipped_in_predict_and_training(tmp_path, capsys):
    folder = handed.export_folder(tmp_path / "m")
    imgs = handed.images(tmp_path / "imgs", ["a.png"])
    os.mkfifo(imgs / "pipe.png")
    code, printed = _predict_main(capsys, str(folder), str(imgs), "--out", str(tmp_path / "p.csv"))
    assert code == 0 and "skipped pipe.png" in printed and "FIFO" in printed, printed
    assert [row[0] for row in _csv(tmp_path / "p.csv")[1:]] == ["a.png"]
    train = handed.images(tmp_path / "train" / "cls", ["a.png", "b.png"]).parent
    os.mkfifo(train / "cls" / "pipe.png")
    with handed.no_hang():
        assert [Path(p).name for p, _ in image_folder(train, "RGB", check=True).samples] == ["a.png", "b.png"]
        unchecked = image_folder(train, "RGB", check=False)  # no header pass: the loader refuses it in one line
        with pytest.raises(VitexpError, match="pipe.png is a FIFO"):
            [unchecked[i] for i in range(len(unchecked))]


def test_follow_links_false_skips_linked_images_and_folders(tmp_path):
    outside = handed.images(tmp_path / "outside", ["o.png"])
    train = handed.images(tmp_path / "train" / "cls", ["a.png"]).parent
    (train / "cls" / "link.png").symlink_to(outside / "o.png")
    (train / "cls" / "sub").symlink_to(outside, target_is_directory=True)
    names = sorted(Path(p).name for p, _ in image_folder(train, "RGB", follow_links=True).samples)
    assert names == ["a.png", "link.png", "o.png"]
    assert [Path(p).name for p, _ in image_folder(train, "RGB", follow_links=False).samples] == ["a.png"]
    with pytest.raises(VitexpError, match="symlink"):
        load_image(str(train / "cls" / "link.png"), follow_links=False)


def _run(folder: Path, model: str) -> Path:
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"model={model}"]))
    (folder / "metrics.csv").write_text("epoch,val/acc1\n1,0.5\n")
    results = {"status": "completed", "task": "train", "model": model, "best_val_acc1": 0.5, "macs": 1e6}
    (folder / "results.json").write_text(json.dumps(results))
    return folder


@pytest.mark.parametrize(
    "name", ["0/results.json", "0/metrics.csv", "0/.hydra/overrides.yaml", "optimization_results.yaml"]
)
def test_a_fifo_in_a_report_folder_leaves_that_run_out(tmp_path, capsys, name):
    sweep = tmp_path / "sweep"
    _run(sweep / "0", "a")
    _run(sweep / "1", "b")
    (sweep / name).unlink(missing_ok=True)
    os.mkfifo(sweep / name)
    with handed.no_hang():
        report.main([str(sweep)])
    err = capsys.readouterr().err
    assert "FIFO" in err and len(_csv(sweep / "report.csv")) == 2 + (name == "optimization_results.yaml"), err


def test_a_fifo_sample_table_in_a_shard_folder_is_one_line(tmp_path):
    source = handed.images(tmp_path / "images" / "cls", ["a.png", "b.png"]).parent
    shards.write_split(source, tmp_path / "shards" / "train", samples_per_shard=4, workers=1)
    table = next((tmp_path / "shards" / "train").glob("*.idx.npy"))
    table.unlink()
    os.mkfifo(table)
    with handed.no_hang(), pytest.raises(VitexpError, match=r"idx.npy is a FIFO"):
        shards.ShardSet(tmp_path / "shards" / "train")[0]


# --- the one CSV writer ---------------------------------------------------------------------------------------------


def test_csv_cells_neutralise_formulas_and_control_characters_and_keep_numbers():
    cells = ["=1+1", "+1", "-0.5", "-1+2", "@SUM(A1)", "\tx", "\rx", "a\x1b[2Jb", "x\ny", "1e5", ".5", 3, -2.5, None]
    assert [files.csv_cell(c) for c in cells] == [
        "'=1+1",
        "+1",
        "-0.5",
        "'-1+2",
        "'@SUM(A1)",
        "'\\tx",
        "'\\rx",
        "a\\x1b[2Jb",
        "x\\ny",
        "1e5",
        ".5",
        3,
        -2.5,
        "",
    ]


def test_class_and_file_names_reach_predictions_and_report_csv_as_text(tmp_path, capsys):
    classes = ['=HYPERLINK("http://x")', "\x1b]0;title\x07"]
    folder = handed.export_folder(tmp_path / "m", classes=classes)
    imgs = handed.images(tmp_path / "imgs", ["@cmd.png", "-2+3.png", "tab\tname.png"])
    code, printed = _predict_main(capsys, str(folder), str(imgs), "--out", str(tmp_path / "p.csv"))
    assert code == 0, printed
    rows = _csv(tmp_path / "p.csv")[1:]
    assert sorted(r[0] for r in rows) == ["'-2+3.png", "'@cmd.png", "tab\\tname.png"]
    assert {r[1] for r in rows} | {r[3] for r in rows} == {'\'=HYPERLINK("http://x")', "\\x1b]0;title\\x07"}
    assert all(0 <= float(r[2]) <= 1 for r in rows)  # probabilities stay numbers
    sweep = tmp_path / "sweep"
    _run(sweep / "0", "=cmd|' /C calc'!A0")
    _run(sweep / "1", "+\x1b[31mred")
    report.main([str(sweep), "--by", "none"])
    models = sorted(r["model"] for r in csv.DictReader((sweep / "report.csv").open(newline="")))
    assert models == ["'+\\x1b[31mred", "'=cmd|' /C calc'!A0"]


# --- the one rule for outputs ---------------------------------------------------------------------------------------


def test_outputs_that_are_not_regular_files_are_refused_before_any_work(tmp_path, capsys):
    folder = tmp_path / "absent"  # no model at all: a refusal of --out must come first
    imgs = handed.images(tmp_path / "imgs", ["a.png"])
    os.mkfifo(tmp_path / "pipe.csv")
    (tmp_path / "dir.csv").mkdir()
    for out, kind in (
        ("/dev/null", "character device"),
        (tmp_path / "pipe.csv", "FIFO"),
        (tmp_path / "dir.csv", "folder"),
    ):
        code, printed = _predict_main(capsys, str(folder), str(imgs), "--out", str(out))
        _one_line_exit_2(code, printed, f"is a {kind}")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert stat.S_ISFIFO(os.lstat(tmp_path / "pipe.csv").st_mode) and (tmp_path / "dir.csv").is_dir()
    with handed.no_hang(), pytest.raises(VitexpError, match="is a FIFO"):
        files.write_text(tmp_path / "pipe.csv", "x")
    from vitexp.export import export
    from vitexp.onnx_export import export_onnx

    with pytest.raises(VitexpError, match="pipe.csv is a FIFO .*not a folder"):  # no checkpoint needed: it comes first
        export_onnx(tmp_path / "absent.pt", tmp_path / "pipe.csv")
    (tmp_path / "timm" / "config.json").mkdir(parents=True)
    with pytest.raises(VitexpError, match="config.json is a folder"):
        export(tmp_path / "absent.pt", tmp_path / "timm")
    sweep = _run(tmp_path / "sweep" / "0", "a").parent
    (sweep / "report.csv").mkdir()
    with pytest.raises(SystemExit) as ended:
        report.main([str(sweep)])
    assert ended.value.code == 2 and "report.csv is a folder" in capsys.readouterr().err


def test_report_of_runs_at_plus_and_minus_1e308_writes_everything(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    for job, value in (("0", 1e308), ("1", -1e308)):
        _run(sweep / job, job)
        results = {"status": "completed", "model": job, "best_val_acc1": value, "macs": value, "params": value}
        (sweep / job / "results.json").write_text(json.dumps(results))
    report.main([str(sweep), "--by", "none"])
    assert len(_csv(sweep / "report.csv")) == 3
    assert all(Image.open(sweep / name).size[0] > 0 for name in ("report_val_acc.png", "report_acc_vs_macs.png"))


def test_handed_folders_untouched_after_refusals(tmp_path, capsys):
    """A refused model folder is read, never written: its files keep their bytes."""
    folder = handed.export_folder(tmp_path / "m", "external")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    imgs = handed.images(tmp_path / "imgs", ["a.png"])
    _predict_main(capsys, str(folder), str(imgs), "--out", str(tmp_path / "p.csv"))
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_a_resume_refusal_prints_a_crafted_key_as_text():
    from tests.conftest import TINY, compose_config
    from vitexp import runs

    saved = {"model": {"\x1b[2J": {"_target_": "os.system"}}}
    with pytest.raises(VitexpError) as refused:
        runs.resumed(compose_config(*TINY), saved, [], "run\x1b]0;x", [])
    assert "model.\\x1b[2J._target_ would name code" in str(refused.value)
    assert not any(c in str(refused.value) for c in "\x1b\n\x07")
