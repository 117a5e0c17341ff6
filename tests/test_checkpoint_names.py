"""One checkpoint under several names (best.pt, epoch_NNNN.pt, last.pt): written once, each name replaced alone."""

from __future__ import annotations

import os

import pytest
import torch

from vitexp import VitexpError, checkpoint, files

STATE = {"model": {"w": torch.arange(6.0)}, "arch": {"builder": "vit", "name": "x", "kwargs": {}}, "epoch": 3}


def test_one_write_gives_every_name_and_a_later_save_replaces_one_name_only(tmp_path, monkeypatch):
    writes = []
    real = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f: writes.append(1) or real(obj, f))
    best, epoch, last = (tmp_path / "ckpt" / n for n in ("best.pt", "epoch_0003.pt", "last.pt"))
    checkpoint.save(STATE, best, tmp_path, also=[epoch, last])
    assert len(writes) == 1 and best.stat().st_ino == epoch.stat().st_ino == last.stat().st_ino
    checkpoint.save({**STATE, "epoch": 4}, last, tmp_path)
    assert [checkpoint.load(p)["epoch"] for p in (best, epoch, last)] == [3, 3, 4]
    assert sorted(p.name for p in best.parent.iterdir()) == ["best.pt", "epoch_0003.pt", "last.pt"]


def test_without_hard_links_each_name_is_a_full_copy(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    best, last = tmp_path / "best.pt", tmp_path / "last.pt"
    checkpoint.save(STATE, best, also=[last])
    assert best.stat().st_ino != last.stat().st_ino and best.read_bytes() == last.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]


def test_a_second_name_never_writes_through_a_link_or_over_a_fifo(tmp_path):
    mine = tmp_path / "mine.txt"
    mine.write_text("keep")
    (tmp_path / "last.pt").symlink_to(mine)
    checkpoint.save(STATE, tmp_path / "best.pt", also=[tmp_path / "last.pt"])
    assert mine.read_text() == "keep" and not (tmp_path / "last.pt").is_symlink()
    os.mkfifo(tmp_path / "fifo.pt")
    with pytest.raises(VitexpError, match="fifo.pt is a FIFO"):
        checkpoint.save(STATE, tmp_path / "best.pt", also=[tmp_path / "fifo.pt"])
    assert checkpoint.load(tmp_path / "best.pt")["epoch"] == 3
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_stale_temporary_name_is_cleared_by_the_next_save(tmp_path):
    stale = tmp_path / ".last.pt.dead.tmp"
    stale.write_bytes(b"half")
    checkpoint.save(STATE, tmp_path / "best.pt", also=[tmp_path / "last.pt"])
    assert not stale.exists() and files.read_bytes(tmp_path / "last.pt") == files.read_bytes(tmp_path / "best.pt")
