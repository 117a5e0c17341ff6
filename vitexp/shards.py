"""Image data sets as webdataset tar shards: `python -m vitexp.shards <folder> --out <dir>` writes them and
`ShardSet` reads them back by sample index, so the loaders' own samplers split an epoch over ranks and workers.

A shard folder holds, per split (train/, and val/ and test/ when the source has them), tar files in webdataset's
layout (`<key>.<image suffix>` with the file's bytes as they were, `<key>.cls` the label, `<key>.txt` the source
path), each with its sample table (`<shard>.tar.idx.npy`: offsets, sizes and labels as plain integers), and an
`index.json` (classes, and each shard's file name, sample count and size). Reading seeks into the tar files by
offset: a sample costs one read however the epoch is shuffled, and any sample can be the first one after a
resume. All of it is data: the index names real files (no symlinks) inside its own folder only, every field and
sample table is checked before it is used, images are held to `images.MAX_PIXELS`, and nothing in a shard is
executed or unpickled.
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
from typing import IO, Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from vitexp import VitexpError, files
from vitexp.files import printable
from vitexp.images import UNREADABLE, image_folder, open_image, to_mode

log = logging.getLogger("vitexp")

INDEX = "index.json"
FORMAT = "vitexp-shards-1"
SPLITS = ("train", "val", "test")
OPEN_SHARDS = 64  # file handles each loader process keeps open (least recently used closed first)
REPLACE_TRIES = 64  # samples tried in turn in place of one that does not decode before the shards are refused


@dataclass(frozen=True)
class Shard:
    """One tar file of a split: its name inside the split's folder, its sample count and size in bytes."""

    file: str
    samples: int
    bytes: int


def read_index(folder: Path) -> tuple[list[str], list[Shard]]:
    """A split folder's classes and shards, checked against the files there (real files inside the folder, whole)."""
    classes, shards = _index_fields(_load_index(folder), folder / INDEX)
    for shard in shards:
        path = folder / shard.file
        if Path(shard.file).name != shard.file or not shard.file.endswith(".tar"):
            raise VitexpError(
                f"{printable(folder / INDEX)} names {printable(repr(shard.file))}, not a .tar file in that folder; "
                f"refused"
            )
        files.check_inside(path, folder)  # a symlinked shard would be read from wherever it points
        if not path.is_file():
            raise VitexpError(f"shard {printable(path)} is missing; copy it back or write the shards again")
        if path.stat().st_size != shard.bytes:
            raise VitexpError(
                f"shard {printable(path)} has {path.stat().st_size} bytes, its index says {shard.bytes} "
                f"(truncated or replaced); copy it again or write the shards again"
            )
    return classes, shards


def _load_index(folder: Path) -> Any:
    path = folder / INDEX
    try:
        return files.read_json(path, folder)
    except FileNotFoundError:
        raise VitexpError(
            f"no {INDEX} in {printable(folder)}: write the shards with python -m vitexp.shards "
            f"<image folder> --out {printable(folder.parent)}"
        ) from None
    except OSError as e:
        raise VitexpError(f"cannot read {printable(path)} ({e.strerror}); make it readable") from None
    except files.Malformed as e:
        raise VitexpError(
            f"{printable(path)} is not a shard index ({files.reason(e, path)}); write the shards again"
        ) from None


def _index_fields(index: Any, path: Path) -> tuple[list[str], list[Shard]]:
    """The classes and shards of a parsed `index.json`, every field checked for its type before it is used."""
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise VitexpError(f"{printable(path)} is not a {FORMAT} index; write the shards again with vitexp.shards")
    classes, shards = index.get("classes"), index.get("shards")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise VitexpError(
            f"{printable(path)}: classes is {printable(classes, 60)}, not a list of class names "
            f"(strings); write the shards again"
        )
    if not isinstance(shards, list):
        raise VitexpError(f"{printable(path)}: shards is {printable(shards, 60)}, not a list; write the shards again")
    for n, entry in enumerate(shards):
        if not (isinstance(entry, dict) and set(entry) == set(Shard.__dataclass_fields__)) or not (
            isinstance(entry["file"], str) and _count(entry["samples"]) and _count(entry["bytes"])
        ):
            raise VitexpError(
                f"{printable(path)}: shard {n} is {printable(entry, 100)}, not "
                f'{{"file": <name>.tar, "samples": <count>, "bytes": <count>}}; write the shards again'
            )
    total = sum(entry["samples"] for entry in shards)
    if not _count(index.get("samples")) or index["samples"] != total:
        raise VitexpError(
            f"{printable(path)}: samples is {printable(index.get('samples'), 60)}, its shards hold "
            f"{total}; write the shards again"
        )
    return classes, [Shard(**entry) for entry in shards]


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class ShardSet(Dataset):
    """The samples of one split's shards by index, as (PIL image in `mode`, label), like an ImageFolder.

    Every shard's sample table is read and checked when the set is made (offsets inside the shard, labels among
    the classes). A sample that does not decode (a decompression bomb, a broken file) is named in a warning and
    counted in `unreadable` (per loader process), and the next sample that decodes is read in its place: an epoch
    keeps its length and order, so a resumed run reads what the uninterrupted one did."""

    def __init__(self, folder: str | Path, mode: str = "RGB") -> None:
        self.folder, self.mode = Path(folder), mode
        self.classes, self.shards = read_index(self.folder)
        self.ends = np.cumsum([s.samples for s in self.shards], dtype=np.int64)
        self.unreadable: set[int] = set()
        self._files: OrderedDict[int, IO[bytes]] = OrderedDict()
        # per shard: each sample's image offset and size, label, source-path offset and size
        self._tables = [self._table(s) for s in range(len(self.shards))]

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": OrderedDict()}  # file handles stay in the process that opened them

    def source(self, i: int) -> str:
        """The path, relative to the image folder it was written from, of sample `i` (as written: print it through
        `files.printable`)."""
        s, stream, (_, _, _, name_at, name_size) = self._member(i)
        stream.seek(name_at)
        return stream.read(min(name_size, 4096)).decode(errors="replace")  # a path: at most PATH_MAX bytes

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} of {len(self)}")
        for j in range(i, i + REPLACE_TRIES):
            j %= len(self)
            s, stream, (image_at, size, label, _, _) = self._member(j)
            stream.seek(image_at)
            data = stream.read(size)
            try:
                image = open_image(io.BytesIO(data))
                image.load()
                return to_mode(image, self.mode), int(label)
            except UNREADABLE as e:
                self._skip(s, j, e)
        raise VitexpError(
            f"samples {i} to {i + REPLACE_TRIES - 1} of {printable(self.folder)} are not readable "
            f"images; write the shards again"
        )

    def _skip(self, s: int, i: int, error: BaseException) -> None:
        if i not in self.unreadable:
            self.unreadable.add(i)
            log.warning(
                f"shard {printable(self.folder / self.shards[s].file)} sample {i} ({printable(self.source(i))}) is "
                f"not a readable image ({type(error).__name__}: {printable(error)}): the next sample is read in its "
                f"place ({len(self.unreadable)} so far); write the shards again from a good copy of that file"
            )

    def _member(self, i: int) -> tuple[int, IO[bytes], np.ndarray]:
        s = int(np.searchsorted(self.ends, i, side="right"))
        return s, self._file(s), self._tables[s][i - (int(self.ends[s - 1]) if s else 0)]

    def _file(self, s: int) -> IO[bytes]:
        if s in self._files:
            self._files.move_to_end(s)
            return self._files[s]
        self._files[s] = files.open_regular(self.folder / self.shards[s].file)  # closed when dropped
        if len(self._files) > OPEN_SHARDS:
            self._files.popitem(last=False)[1].close()
        return self._files[s]

    def _table(self, s: int) -> np.ndarray:
        """Shard `s`'s sample table: from the `.idx.npy` file written beside it (plain integers, no pickle), or else
        read from the tar headers; checked to fit the shard and the classes."""
        shard, path = self.shards[s], self.folder / self.shards[s].file
        table = _sidecar(path, shard, self.folder)
        if table is None:
            table = _members(self._file(s), path, shard.samples)
        first = int(self.ends[s - 1]) if s else 0
        return _check_table(table, path, shard.bytes, first, len(self.classes))


def _sidecar(path: Path, shard: Shard, root: Path) -> np.ndarray | None:
    """The sample table written beside shard `path` (None when there is none), its header checked before anything
    is read: `samples` rows of 5 8-byte integers, never a pickle."""
    sidecar = path.with_name(f"{path.name}.idx.npy")
    if not sidecar.is_symlink() and not sidecar.exists():
        return None
    files.check_inside(sidecar, root)
    try:
        with files.open_regular(sidecar) as f:
            version = np.lib.format.read_magic(f)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f"format version {version}")
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(f)
            if shape != (shard.samples, 5) or fortran or dtype.kind != "i" or dtype.itemsize != 8:
                raise ValueError(f"a {dtype} table of shape {shape}, not {shard.samples} rows of 5 int64")
            f.seek(0)
            return np.load(f, allow_pickle=False).astype(np.int64)
    except (OSError, ValueError) as e:
        raise VitexpError(
            f"{printable(sidecar)} is not the sample table of {printable(path.name)} ({printable(e)}); "
            f"delete it (it is rebuilt from the shard) or write the shards again"
        ) from None


def _check_table(table: np.ndarray, path: Path, size: int, first: int, num_classes: int) -> np.ndarray:
    """`table`, refused in one line naming the first sample (numbered in the split from `first`) whose image or
    source path lies outside the shard's `size` bytes or whose label is not one of the `num_classes` classes."""
    for (at, length), what in (((table[:, 0], table[:, 1]), "image"), ((table[:, 3], table[:, 4]), "source path")):
        outside = (at < 0) | (length < 0) | (at > size) | (length > size - at)  # no sum: it could overflow
        if outside.any():
            row = int(outside.argmax())
            raise VitexpError(
                f"shard {printable(path)} sample {first + row}: {what} at offset {at[row]} of size "
                f"{length[row]} is outside the shard ({size} bytes); write the shards again"
            )
    wrong = (table[:, 2] < 0) | (table[:, 2] >= num_classes)
    if wrong.any():
        row = int(wrong.argmax())
        raise VitexpError(
            f"shard {printable(path)} sample {first + row}: label {table[row, 2]} is not one of the "
            f"{num_classes} classes [0, {num_classes}) of its index; write the shards again"
        )
    return table


def _members(stream: IO[bytes], path: Path, expected: int) -> np.ndarray:
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
            group = groups[key]
            image = next(m for suffix, m in group.items() if suffix not in ("cls", "txt"))
            label, name = int(_read(stream, group["cls"])), group["txt"]
            rows.append((image.offset_data, image.size, label, name.offset_data, name.size))
        table = np.array(rows, dtype=np.int64).reshape(-1, 5)
    except (tarfile.TarError, KeyError, StopIteration, ValueError, UnicodeDecodeError, OverflowError) as e:
        raise VitexpError(
            f"shard {printable(path)} is not a readable vitexp shard ({type(e).__name__}: "
            f"{printable(e)}); copy it again or write the shards again"
        ) from None
    if len(table) != expected:
        raise VitexpError(
            f"shard {printable(path)} holds {len(table)} samples, its index says {expected}; write the shards again"
        )
    return table


def _read(stream: IO[bytes], member: tarfile.TarInfo) -> str:
    stream.seek(member.offset_data)
    return stream.read(min(member.size, 64)).decode()  # a label: a few digits


def _write_shard(path: Path, first: int, samples: Sequence[tuple[str, int]], root: Path) -> Shard:
    """Write `samples` ((path, label) pairs, numbered from `first`) to the tar file `path` and its sample table,
    each through `files.atomic`."""
    import webdataset

    sidecar = path.with_name(f"{path.name}.idx.npy")
    sidecar.unlink(missing_ok=True)  # a table left from an earlier write must not describe the new shard
    with files.atomic(path) as f, webdataset.TarWriter(f) as tar:
        for n, (file, label) in enumerate(samples, first):
            suffix = Path(file).suffix.lower().lstrip(".").replace("jpeg", "jpg")
            tar.write(
                {
                    "__key__": f"{n:09d}",
                    suffix: files.read_bytes(file, follow=True),  # the docs: links in the source tree are followed
                    "cls": str(label),
                    "txt": os.path.relpath(file, root),
                }
            )
    with files.open_regular(path) as stream:
        table = _members(stream, path, len(samples))
    with files.atomic(sidecar) as f:
        np.save(f, table, allow_pickle=False)
    return Shard(path.name, len(samples), path.stat().st_size)


def write_split(source: Path, out: Path, samples_per_shard: int, workers: int) -> int:
    """Write the class folders under `source` (an ImageFolder split) as shards and an index under `out` (a
    symlinked `out` is refused); unreadable files are skipped and counted, as the folder loader does. Returns the
    number of samples."""
    files.make_folder(out, out.parent)
    folder = image_folder(source, "RGB", check=True)
    chunks = [folder.samples[i : i + samples_per_shard] for i in range(0, len(folder.samples), samples_per_shard)]
    paths = [out / f"{out.name}-{n:06d}.tar" for n in range(len(chunks))]
    firsts = [n * samples_per_shard for n in range(len(chunks))]
    with ProcessPoolExecutor(max(1, workers)) as pool:
        shards = list(pool.map(_write_shard, paths, firsts, chunks, [source] * len(chunks)))
    index = {
        "format": FORMAT,
        "classes": folder.classes,
        "samples": len(folder.samples),
        "shards": [s.__dict__ for s in shards],
    }
    files.write_text(out / INDEX, json.dumps(index, indent=1), out)  # last: a folder without an index is unfinished
    return len(folder.samples)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m vitexp.shards`: write an ImageFolder tree (train/, and val/ and test/ if present) as shards."""
    parser = argparse.ArgumentParser(prog="python -m vitexp.shards", description=main.__doc__)
    parser.add_argument("folder", type=Path, help="ImageFolder root: train/<class>/* and optionally val/, test/")
    parser.add_argument("--out", type=Path, required=True, help="folder to write <split>/*.tar and index.json to")
    parser.add_argument(
        "--samples-per-shard",
        type=int,
        default=2000,
        help="samples per tar file (aim for shards of 100 MB-1 GB on large data)",
    )
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
            log.info(f"{split}: {n} samples in {printable(args.out / split)}")
    except VitexpError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
