"""Image data sets as webdataset tar shards: `python -m vitexp.shards <folder> --out <dir>` writes them and
`ShardSet` reads them back by sample index, so the loaders' own samplers split an epoch over ranks and workers.

A shard folder holds, per split (train/, and val/ and test/ when the source has them), tar files in webdataset's
layout (`<key>.<image suffix>` with the file's bytes as they were, `<key>.cls` the label, `<key>.txt` the source
path), each with its sample table (`<shard>.tar.idx.npy`: offsets, sizes and labels as plain integers), and an
`index.json` (classes, and each shard's file name, sample count and size). Reading seeks into the tar files by
offset: a sample costs one read however the epoch is shuffled, and any sample can be the first one after a
resume. The index names files inside its own folder only; nothing in a shard is executed or unpickled.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import tarfile
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from vitexp import VitexpError
from vitexp.images import image_folder, to_mode

log = logging.getLogger("vitexp")

INDEX = "index.json"
FORMAT = "vitexp-shards-1"
SPLITS = ("train", "val", "test")
OPEN_SHARDS = 64  # file handles each loader process keeps open (least recently used closed first)


@dataclass(frozen=True)
class Shard:
    """One tar file of a split: its name inside the split's folder, its sample count and size in bytes."""

    file: str
    samples: int
    bytes: int


def read_index(folder: Path) -> tuple[list[str], list[Shard]]:
    """A split folder's classes and shards, checked against the files there (present, whole, inside the folder)."""
    try:
        index = json.loads((folder / INDEX).read_text())
    except FileNotFoundError:
        raise VitexpError(f"no {INDEX} in {folder}: write the shards with python -m vitexp.shards <image folder> "
                          f"--out {folder.parent}") from None  # fmt: skip
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VitexpError(f"{folder / INDEX} is not a shard index ({e}); write the shards again") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise VitexpError(f"{folder / INDEX} is not a {FORMAT} index; write the shards again with vitexp.shards")
    classes, shards = index["classes"], [Shard(**s) for s in index["shards"]]
    for shard in shards:
        path = folder / shard.file
        if Path(shard.file).name != shard.file or not shard.file.endswith(".tar"):
            raise VitexpError(f"{folder / INDEX} names {shard.file!r}, not a .tar file in that folder; refused")
        if not path.is_file():
            raise VitexpError(f"shard {path} is missing; copy it back or write the shards again")
        if path.stat().st_size != shard.bytes:
            raise VitexpError(f"shard {path} has {path.stat().st_size} bytes, its index says {shard.bytes} "
                              f"(truncated or replaced); copy it again or write the shards again")  # fmt: skip
    return [str(c) for c in classes], shards


class ShardSet(Dataset):
    """The samples of one split's shards by index, as (PIL image in `mode`, label), like an ImageFolder."""

    def __init__(self, folder: str | Path, mode: str = "RGB") -> None:
        self.folder, self.mode = Path(folder), mode
        self.classes, self.shards = read_index(self.folder)
        self.ends = np.cumsum([s.samples for s in self.shards])
        self._tables: dict[int, np.ndarray] = {}  # per shard: each sample's offsets, sizes and label, read once
        self._files: OrderedDict[int, io.BufferedReader] = OrderedDict()

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": OrderedDict()}  # file handles stay in the process that opened them

    def source(self, i: int) -> str:
        """The path, relative to the image folder it was written from, of sample `i`."""
        s, stream, (_, _, _, name_at, name_size) = self._member(i)
        stream.seek(name_at)
        return stream.read(name_size).decode()

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        s, stream, (image_at, size, label, _, _) = self._member(i)
        stream.seek(image_at)
        try:
            return to_mode(Image.open(io.BytesIO(stream.read(size))), self.mode), int(label)
        except (OSError, SyntaxError, ValueError) as e:
            raise VitexpError(f"cannot decode {self.source(i)} in shard {self.folder / self.shards[s].file} ({e}); "
                              f"write the shards again from a good copy of that file") from None  # fmt: skip

    def _member(self, i: int) -> tuple[int, io.BufferedReader, np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} of {len(self)}")
        s = int(np.searchsorted(self.ends, i, side="right"))
        stream = self._file(s)
        if s not in self._tables:
            self._tables[s] = _table(stream, self.folder / self.shards[s].file, self.shards[s])
        return s, stream, self._tables[s][i - (int(self.ends[s - 1]) if s else 0)]

    def _file(self, s: int) -> io.BufferedReader:
        if s in self._files:
            self._files.move_to_end(s)
            return self._files[s]
        self._files[s] = open(self.folder / self.shards[s].file, "rb")  # noqa: SIM115 (closed when dropped)
        if len(self._files) > OPEN_SHARDS:
            self._files.popitem(last=False)[1].close()
        return self._files[s]


def _table(stream: io.BufferedReader, path: Path, shard: Shard) -> np.ndarray:
    """A shard's sample table: from the `.idx.npy` file written beside it (plain integers, no pickle), checked to
    fit the shard, or else read from the tar headers (seconds for a large shard, once per loader process)."""
    sidecar = path.with_name(f"{path.name}.idx.npy")
    if sidecar.is_file():
        try:
            table = np.load(sidecar, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise VitexpError(
                f"{sidecar} is not a sample table ({e}); delete it (it is rebuilt from the shard)"
            ) from None
        ends = table[:, 0] + table[:, 1] if table.ndim == 2 and table.shape[1] == 5 else None
        if table.dtype != np.int64 or len(table) != shard.samples or ends is None or ends.max() > shard.bytes:
            raise VitexpError(f"{sidecar} does not match {path.name}; delete it (it is rebuilt from the shard)")
        return table
    return _members(stream, path, shard.samples)


def _members(stream: io.BufferedReader, path: Path, expected: int) -> np.ndarray:
    """Each sample of a shard as a row (image offset, image size, label, source-path offset, source-path size),
    in the order written; checked against the sample count of the index."""
    try:
        stream.seek(0)
        with tarfile.open(fileobj=stream, mode="r:") as tar:
            groups: dict[str, dict[str, tarfile.TarInfo]] = {}
            for member in tar.getmembers():
                if member.isfile():
                    key, suffix = member.name.split(".", 1)
                    groups.setdefault(key, {})[suffix] = member
        rows = []
        for key in sorted(groups):  # keys are zero-padded sample numbers: the order written
            files = groups[key]
            image = next(m for suffix, m in files.items() if suffix not in ("cls", "txt"))
            label, name = int(_read(stream, files["cls"])), files["txt"]
            rows.append((image.offset_data, image.size, label, name.offset_data, name.size))
    except (tarfile.TarError, KeyError, StopIteration, ValueError, UnicodeDecodeError) as e:
        raise VitexpError(f"shard {path} is not a readable vitexp shard ({type(e).__name__}: {e}); copy it again "
                          f"or write the shards again") from None  # fmt: skip
    if len(rows) != expected:
        raise VitexpError(f"shard {path} holds {len(rows)} samples, its index says {expected}; write the shards again")
    return np.array(rows, dtype=np.int64).reshape(-1, 5)


def _read(stream: io.BufferedReader, member: tarfile.TarInfo) -> str:
    stream.seek(member.offset_data)
    return stream.read(member.size).decode()


def _write_shard(path: Path, first: int, files: Sequence[tuple[str, int]], root: Path) -> Shard:
    """Write `files` ((path, label) pairs, numbered from `first`) to the tar file `path`, atomically."""
    import webdataset

    partial = path.with_suffix(".tar.partial")
    with webdataset.TarWriter(str(partial)) as tar:
        for n, (file, label) in enumerate(files, first):
            suffix = Path(file).suffix.lower().lstrip(".").replace("jpeg", "jpg")
            tar.write({"__key__": f"{n:09d}", suffix: Path(file).read_bytes(), "cls": str(label),
                       "txt": os.path.relpath(file, root)})  # fmt: skip
    with open(partial, "rb") as stream:
        table = _members(stream, path, len(files))
    np.save(path.with_name(f"{path.name}.idx.npy"), table, allow_pickle=False)
    os.replace(partial, path)
    return Shard(path.name, len(files), path.stat().st_size)


def write_split(source: Path, out: Path, samples_per_shard: int, workers: int) -> int:
    """Write the class folders under `source` (an ImageFolder split) as shards and an index under `out`;
    unreadable files are skipped and counted, as the folder loader does. Returns the number of samples."""
    folder = image_folder(source, "RGB", check=True)
    out.mkdir(parents=True, exist_ok=True)
    chunks = [folder.samples[i : i + samples_per_shard] for i in range(0, len(folder.samples), samples_per_shard)]
    paths = [out / f"{out.name}-{n:06d}.tar" for n in range(len(chunks))]
    firsts = [n * samples_per_shard for n in range(len(chunks))]
    with ProcessPoolExecutor(max(1, workers)) as pool:
        shards = list(pool.map(_write_shard, paths, firsts, chunks, [source] * len(chunks)))
    index = {"format": FORMAT, "classes": folder.classes, "samples": len(folder.samples),
             "shards": [s.__dict__ for s in shards]}  # fmt: skip
    (out / f"{INDEX}.partial").write_text(json.dumps(index, indent=1))
    os.replace(out / f"{INDEX}.partial", out / INDEX)  # last: a folder without an index was never finished
    return len(folder.samples)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m vitexp.shards`: write an ImageFolder tree (train/, and val/ and test/ if present) as shards."""
    parser = argparse.ArgumentParser(prog="python -m vitexp.shards", description=main.__doc__)
    parser.add_argument("folder", type=Path, help="ImageFolder root: train/<class>/* and optionally val/, test/")
    parser.add_argument("--out", type=Path, required=True, help="folder to write <split>/*.tar and index.json to")
    parser.add_argument("--samples-per-shard", type=int, default=2000,
                        help="samples per tar file (aim for shards of 100 MB-1 GB on large data)")  # fmt: skip
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes writing shards")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        splits = [s for s in SPLITS if (args.folder / s).is_dir()]
        if "train" not in splits:
            raise VitexpError(f"no train/ folder under {args.folder}: lay the images out as train/<class>/*.jpg")
        if args.samples_per_shard < 1:
            raise VitexpError("--samples-per-shard must be at least 1")
        for split in splits:
            n = write_split(args.folder / split, args.out / split, args.samples_per_shard, args.workers)
            log.info(f"{split}: {n} samples in {args.out / split}")
    except VitexpError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
