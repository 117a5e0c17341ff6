"""Image files and shards are data: decompression bombs skipped and counted on every path, sample tables and
index.json fields checked before anything is read by them, shard files that are symlinks refused, the shard
writer writing only through vitexp.files, and names from files printed as data."""

from __future__ import annotations

import json
import logging
import re
import shutil
import struct
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.builders import data_of
from vitexp import VitexpError, shards
from vitexp.data import image_splits
from vitexp.images import image_folder, load_image
from vitexp.schema import ImageData
from vitexp.shards import ShardSet, read_index, write_split
from vitexp.shards import main as write_shards


def _data(root: Path, val_size: float) -> ImageData:
    """data=imagefolder's typed settings for the tree under `root`."""
    return replace(data_of("data=imagefolder", "data.root=unused"), root=str(root), val_size=val_size)


class Payload:
    """A pickle that touches a marker file when it is unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


# A file name with a newline and an ESC in it: printed raw, it would forge a log line and clear the terminal.
FORGED = "bomb\nerror: forged\x1b[2J.png"


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def bomb(path: Path, side: int) -> Path:
    """A valid 1-bit PNG of `side` x `side` pixels of one colour: tens of KB on disk, `side`**2 pixels decoded."""
    row, packer = bytes(1 + (side + 7) // 8), zlib.compressobj(9)
    data = b"".join(packer.compress(row * 1000) for _ in range(side // 1000)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b""))
    return path


def _tree(root: Path) -> Path:
    """train/a and train/b, 3 small PNGs each."""
    for c, name in enumerate("ab"):
        (root / "train" / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8 + i, 8), (90 * c, 40 * i, 60)).save(root / "train" / name / f"{i}.png")
    return root


@pytest.fixture
def written(tmp_path) -> Path:
    """A shard folder of 2 shards of 3 samples (6 images, 2 classes), written in-process."""
    write_split(_tree(tmp_path / "images") / "train", tmp_path / "shards" / "train", 3, workers=1)
    return tmp_path / "shards" / "train"


def test_bombs_in_an_image_folder_are_skipped_and_counted(tmp_path, caplog, monkeypatch):
    root = _tree(tmp_path)
    bomb(root / "train" / "a" / FORGED, 20_000)  # 4e8 pixels: PIL raises
    bomb(root / "train" / "b" / "warns.png", 10_000)  # 1e8 pixels: PIL only warns
    assert max(p.stat().st_size for p in root.rglob("*.png")) < 60_000
    for limit in (Image.MAX_IMAGE_PIXELS, None):  # PIL's own limit switched off: vitexp's still applies
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="vitexp"):
            folder = image_folder(root / "train", "RGB")
        assert len(folder) == 6 and [folder[i][0].size[1] for i in range(6)] == [8] * 6
        (line,) = [r.getMessage() for r in caplog.records]
        assert line.startswith(f"skipped 2 files under {root / 'train'} that are not readable images")
        assert "bomb\\nerror: forged\\x1b[2J.png (DecompressionBombError" in line and "\n" not in line
        assert "warns.png (DecompressionBomb" in line and "x1b[2J" in line and "\x1b" not in line
    with pytest.raises(VitexpError, match=r"cannot decode .*warns.png \(.*pixels.*; delete or replace the file"):
        load_image(str(root / "train" / "b" / "warns.png"))  # data.check_images=false: refused when read
    splits = image_splits(_data(root, 2), 0, lambda x: x, lambda x: x)
    assert len(splits.train) + len(splits.val) == 6


def test_the_shard_writer_skips_a_bomb_and_names_it(tmp_path, caplog):
    root = _tree(tmp_path)
    bomb(root / "train" / "a" / "big.png", 20_000)
    with caplog.at_level(logging.WARNING, logger="vitexp"):
        assert write_split(root / "train", tmp_path / "out" / "train", 4, workers=1) == 6
    assert "skipped 1 files" in caplog.text and "big.png (DecompressionBombError" in caplog.text
    assert len(ShardSet(tmp_path / "out" / "train")) == 6


def _bomb_shard(tmp_path: Path, bad: list[int]) -> Path:
    """One shard of 4 samples written without the writer's header check (as another tool could), `bad` of them
    bombs; its index by hand."""
    root, folder = _tree(tmp_path / "images"), tmp_path / "shards" / "train"
    folder.mkdir(parents=True)
    good = sorted((root / "train").rglob("*.png"))
    planted = bomb(root / "train" / "a" / FORGED, 20_000)
    samples = [(str(planted if i in bad else good[i]), i % 2) for i in range(4)]
    shard = shards._write_shard(folder / "train-000000.tar", 0, samples, root / "train")
    index = {"format": shards.FORMAT, "classes": ["a", "b"], "samples": 4, "shards": [shard.__dict__]}
    (folder / "index.json").write_text(json.dumps(index))
    return folder


def test_a_bomb_in_a_shard_is_counted_and_the_next_sample_read_in_its_place(tmp_path, caplog):
    folder = _bomb_shard(tmp_path, bad=[1, 3])
    sharded = ShardSet(folder)
    with caplog.at_level(logging.WARNING, logger="vitexp"):
        got = [sharded[i] for i in (0, 1, 2, 3, 1)]
    assert got[1][1] == got[2][1] == 0 and got[1][0].tobytes() == got[2][0].tobytes()  # 1 reads 2's image and label
    assert got[3][0].tobytes() == got[0][0].tobytes()  # the last sample wraps round to the first
    assert sharded.unreadable == {1, 3} and len(caplog.records) == 2  # each named once per process
    line = caplog.records[0].getMessage()
    assert line.startswith(f"shard {folder / 'train-000000.tar'} sample 1 (a/bomb\\nerror: forged\\x1b[2J.png) is ")
    assert "not a readable image (DecompressionBombError" in line and "(1 so far)" in line and "\x1b" not in line
    assert sharded.source(1) == f"a/{FORGED}"  # the name as written, for a caller to print as data


def test_a_shard_of_nothing_but_bombs_is_one_line(tmp_path, caplog):
    sharded = ShardSet(_bomb_shard(tmp_path, bad=[0, 1, 2, 3]))
    with caplog.at_level(logging.ERROR, logger="vitexp"), pytest.raises(VitexpError) as e:
        sharded[2]
    assert str(e.value).endswith("are not readable images; write the shards again") and "\n" not in str(e.value)


TABLE_EDITS = {  # (row of shard 1, column, value): the message, which names sample 3 + row
    "negative offset": (1, 0, -5, r"sample 4: image at offset -5 of size \d+ is outside the shard \(\d+ bytes\)"),
    "negative size": (0, 1, -1, r"sample 3: image at offset \d+ of size -1 is outside the shard"),
    "past the end": (2, 1, 10**6, r"sample 5: image at offset \d+ of size 1000000 is outside the shard"),
    "overflowing": (1, 0, 2**62, r"sample 4: image at offset 4611686018427387904 of size"),
    "name past the end": (1, 3, 10**7, r"sample 4: source path at offset 10000000 of size \d+ is outside"),
    "label too big": (2, 2, 2, r"sample 5: label 2 is not one of the 2 classes \[0, 2\) of its index"),
    "negative label": (0, 2, -1, r"sample 3: label -1 is not one of the 2 classes"),
}


@pytest.mark.parametrize("edit", TABLE_EDITS)
def test_a_sample_table_entry_outside_its_shard_or_classes_is_one_line(written, edit):
    row, column, value, message = TABLE_EDITS[edit]
    sidecar = written / "train-000001.tar.idx.npy"
    table = np.load(sidecar)
    if edit == "overflowing":
        table[row, 1] = 2**62  # offset + size wraps round to a negative int64
    table[row, column] = value
    np.save(sidecar, table)
    with pytest.raises(VitexpError, match=f"^shard {re.escape(str(written / 'train-000001.tar'))} {message}") as e:
        ShardSet(written)
    assert str(e.value).endswith("; write the shards again") and "\n" not in str(e.value)


def test_a_label_outside_the_classes_in_the_tar_itself_is_one_line(written):
    (written / "train-000000.tar.idx.npy").unlink()  # the table is then read from the tar headers
    shard = written / "train-000000.tar"
    blob = shard.read_bytes()
    at = blob.index(b"000000001.cls")  # the member's data is the next 512-byte block after its header
    data_at = at - at % 512 + 512
    shard.write_bytes(blob[:data_at] + b"7" + blob[data_at + 1 :])
    with pytest.raises(VitexpError, match=r"train-000000.tar sample 1: label 7 is not one of the 2 classes"):
        ShardSet(written)


def _npz(path: Path, table: np.ndarray) -> None:
    with path.open("wb") as f:
        np.savez(f, table=table)


def _pickled(path: Path, marker: Path) -> None:
    np.save(path, np.array([Payload(marker)], dtype=object), allow_pickle=True)


def _huge_header(path: Path) -> None:
    with path.open("wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<i8", "fortran_order": False, "shape": (10**12, 5)})


@pytest.mark.parametrize("kind", ["float", "columns", "rows", "npz", "pickle", "huge", "garbage"])
def test_a_sample_table_of_the_wrong_shape_or_kind_is_one_line_and_never_unpickled(written, tmp_path, kind):
    sidecar, marker = written / "train-000000.tar.idx.npy", tmp_path / "payload_ran"
    table = np.load(sidecar)
    writes = {
        "float": lambda: np.save(sidecar, table.astype(np.float64)),
        "columns": lambda: np.save(sidecar, table[:, :4]),
        "rows": lambda: np.save(sidecar, table[:2]),
        "npz": lambda: _npz(sidecar, table),
        "pickle": lambda: _pickled(sidecar, marker),
        "huge": lambda: _huge_header(sidecar),
        "garbage": lambda: sidecar.write_bytes(b"\x93NUMPY\x01\x00{'descr': <built-in"),
    }
    writes[kind]()
    with pytest.raises(VitexpError, match=r"train-000000.tar.idx.npy is not the sample table of train-000000.tar "):
        ShardSet(written)
    assert not marker.exists(), "the pickle payload ran"


INDEX_EDITS = {
    "not an object": (lambda index: [index], r"index.json is not a vitexp-shards-1 index"),
    "classes a string": (lambda index: {**index, "classes": "ab"}, r"classes is ab, not a list of class names"),
    "classes numbers": (lambda index: {**index, "classes": [0, 1]}, r"classes is \[0, 1\], not a list of class"),
    "no classes": (lambda index: {k: v for k, v in index.items() if k != "classes"}, r"classes is None, not a"),
    "shards an object": (lambda index: {**index, "shards": {}}, r"shards is \{\}, not a list"),
    "shard a string": (lambda index: {**index, "shards": ["x.tar"]}, r"shard 0 is x.tar, not \{\"file\""),
    "extra key": (lambda index: _shard(index, 1, evil=1), r"shard 1 is \{.*'evil': 1\}, not \{\"file\": <name>"),
    "missing key": (lambda index: _shard(index, 0, drop="bytes"), r"shard 0 is \{'file': 'train-000000.tar', 's"),
    "negative samples": (lambda index: _shard(index, 1, samples=-1), r"shard 1 is \{.*'samples': -1"),
    "bytes a string": (lambda index: _shard(index, 0, bytes="12"), r"shard 0 is \{.*'bytes': '12'"),
    "file a number": (lambda index: _shard(index, 0, file=5), r"shard 0 is \{'file': 5,"),
    "samples negative": (lambda index: {**index, "samples": -6}, r"samples is -6, its shards hold 6"),
    "samples true": (lambda index: {**index, "samples": True}, r"samples is True, its shards hold 6"),
    "samples wrong": (lambda index: {**index, "samples": 7}, r"samples is 7, its shards hold 6"),
}


def _shard(index: dict, n: int, drop: str | None = None, **fields) -> dict:
    entries = [dict(entry) for entry in index["shards"]]
    entries[n] = {k: v for k, v in {**entries[n], **fields}.items() if k != drop}
    return {**index, "shards": entries}


@pytest.mark.parametrize("edit", INDEX_EDITS)
def test_an_index_field_of_the_wrong_type_is_one_line(written, edit):
    change, message = INDEX_EDITS[edit]
    path = written / "index.json"
    path.write_text(json.dumps(change(json.loads(path.read_text()))))
    with pytest.raises(VitexpError, match=message) as e:
        read_index(written)
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["train-000001.tar", "train-000001.tar.idx.npy", "index.json"])
def test_a_symlinked_shard_table_or_index_is_refused(written, tmp_path, name):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    victim = shutil.copy(written / name, elsewhere / name)  # a whole, valid copy: only the link is wrong
    before = Path(victim).read_bytes()
    (written / name).unlink()
    (written / name).symlink_to(victim)
    with pytest.raises(
        VitexpError, match=rf"^{re.escape(str(written / name))} is a symlink; .*replace the link with a copy"
    ):
        ShardSet(written)
    assert Path(victim).read_bytes() == before


def test_the_shard_writer_refuses_a_symlinked_output_folder_and_replaces_a_linked_file(tmp_path, capsys):
    root, out, elsewhere = _tree(tmp_path / "images"), tmp_path / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    victim = elsewhere / "victim.txt"
    victim.write_text("mine")
    out.mkdir()
    (out / "train").symlink_to(elsewhere)
    assert write_shards([str(root), "--out", str(out), "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {out / 'train'} is a symlink; vitexp writes and reads only real files and folders " + (
        "inside the folders it is given: replace the link with a copy, or pick another folder"
    )
    assert sorted(elsewhere.iterdir()) == [victim] and victim.read_text() == "mine"
    (out / "train").unlink()
    (out / "train").mkdir()
    for name in ("train-000000.tar", "train-000000.tar.idx.npy", "index.json"):  # links planted in a real folder
        (out / "train" / name).symlink_to(victim)
    assert write_shards([str(root), "--out", str(out), "--workers", "1"]) == 0
    assert victim.read_text() == "mine" and not any(p.is_symlink() for p in (out / "train").iterdir())
    assert len(ShardSet(out / "train")) == 6


def test_class_names_from_an_index_are_printed_as_data(written):
    val = written.parent / "val"
    shutil.copytree(written, val)
    index = json.loads((val / "index.json").read_text())
    (val / "index.json").write_text(json.dumps({**index, "classes": ["a\nerror: forged\x1b[2J", "b"]}))
    assert ShardSet(val).classes[0] == "a\nerror: forged\x1b[2J"  # kept as written: a label, printed as data
    with pytest.raises(VitexpError, match=r"val/ has classes \['a\\nerror: forged\\x1b\[2J', 'b'\]") as e:
        image_splits(replace(_data(written.parent, 0.1), name="shards"), 0, lambda x: x, lambda x: x)
    assert "\n" not in str(e.value) and "\x1b" not in str(e.value)
