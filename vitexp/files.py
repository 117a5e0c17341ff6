"""Files in folders someone may hand over, checked where the data flows out: the one reader (regular files only,
opened without blocking, no symlink followed inside a folder, sizes and JSON/YAML nesting bounded), the one writer (a
temporary file in the real folder, then a rename; never over a folder, device or FIFO), the one CSV writer (control
characters escaped, formula cells neutralised), folders refused when they hold symlinks, strings printed as data."""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
import logging
import os
import re
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from vitexp import VitexpError

# Links that wandb itself makes inside its own folder (`wandb/latest-run`, `wandb/debug.log`, ...): the only ones a
# folder vitexp wrote may hold.
WANDB_LINKS = re.compile(r"(latest-run|debug\.log|debug-internal\.log|debug-core\.log)")
# C0 and C1 control characters, DEL included: a newline or an ESC from a file must not start a line or move the cursor.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(value: Any, limit: int = 200) -> str:
    """`value` as text that is safe to print, log or write into a CSV cell: control characters escaped (`\\n`,
    `\\x1b`), cut at `limit` characters."""
    text = _CONTROL.sub(lambda m: repr(m.group())[1:-1], str(value))
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return text


def plot_text(value: Any, limit: int = 200) -> str:
    """`printable(value)` for a plot's title, label or legend: `$` escaped so that it is never mathtext."""
    return printable(value, limit).replace("$", r"\$")


def _link_error(path: Path, what: str) -> VitexpError:
    return VitexpError(
        f"{printable(path)} is a symlink; {what} writes and reads only real files and folders inside "
        f"the folders it is given: replace the link with a copy, or pick another folder"
    )


def check_inside(path: str | Path, root: str | Path, what: str = "vitexp") -> Path:
    """`path`, refused when it or a folder between `root` (itself trusted: the command line named it) and it is a
    symlink, or when it lies outside `root`."""
    path, root = Path(path), Path(root)
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        parts = Path(os.path.relpath(path, root)).parts
    if ".." in parts:
        raise VitexpError(f"{printable(path)} is outside {printable(root)}; refused")
    current = root
    for part in parts:
        current = current / part
        if current.is_symlink():
            raise _link_error(current, what)
    return path


def refuse_links(folder: str | Path, what: str = "vitexp") -> None:
    """Refuse a folder someone handed over (a run, sweep or shard folder) that holds a symlink anywhere inside it,
    wandb's own links in its folder excepted: vitexp would write through it to wherever it points."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for top, dirs, names in os.walk(folder):  # os.walk does not descend into linked folders: they are listed here
        for name in dirs + names:
            entry = Path(top) / name
            if not entry.is_symlink():
                continue
            inside_wandb = "wandb" in entry.relative_to(folder).parts[:-1]
            target = Path(top) / os.readlink(entry)
            # a wandb run's logs/debug-core.log points at wandb's cache in the home folder; no one writes through
            # it later (a resumed run gets a new wandb run folder)
            core = name == "debug-core.log" and Path(top).name == "logs" and target.suffix == ".log"
            if inside_wandb and WANDB_LINKS.fullmatch(name) and (core or _within(target, Path(top))):
                continue
            raise _link_error(entry, what)


def _within(path: Path, folder: Path) -> bool:
    return os.path.normpath(path).startswith(os.path.normpath(folder) + os.sep)


def make_folder(folder: str | Path, root: str | Path | None = None) -> Path:
    """Create `folder` (and its parents); a symlink on the way from `root` (default: its parent) is refused."""
    folder = Path(folder)
    root = Path(root) if root is not None else folder.parent
    check_inside(folder, root)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise VitexpError(f"cannot create {printable(folder)} ({e.strerror}); pick a writable folder") from None
    return folder


@contextlib.contextmanager
def atomic(
    path: str | Path, root: str | Path | None = None, *, text: bool = False, durable: bool = False
) -> Iterator[IO]:
    """Open a temporary file beside `path` for writing; on success it is renamed over `path` (a rename replaces a
    symlink there, it never writes through it); on failure it is removed and `path` is unchanged. The folder is
    created, and a symlinked folder from `root` (default: the folder itself) down is refused; a folder, device, FIFO or
    socket at `path` is refused (`check_output`), before and again right before the rename. `durable`: fsync first."""
    path = check_output(path)
    make_folder(path.parent, root if root is not None else path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise VitexpError(
            f"cannot write {printable(path)} ({e.strerror}); make {printable(path.parent)} writable"
        ) from None
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600: the file gets the mode an open() would have given it
    try:
        with os.fdopen(fd, "w" if text else "wb", **({"newline": "", "encoding": "utf-8"} if text else {})) as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        check_output(path)  # one made there while this was written: a rename would replace it
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def second_name(source: str | Path, path: str | Path, root: str | Path | None = None) -> Path:
    """Give the file `source` (one this process just wrote through `atomic`) the name `path` in the same way: a hard
    link made under a temporary name, then renamed over `path`, so that a large file is written once whatever its
    names; a copy through `atomic` where the file system has no hard links. A later `atomic` write to either name
    replaces that name only."""
    source, path = Path(source), check_output(path)
    make_folder(path.parent, root if root is not None else path.parent)
    tmp = path.parent / f".{path.name}.{os.urandom(4).hex()}.tmp"
    try:
        os.link(source, tmp)
    except OSError:  # no hard links here (some network and FAT file systems), or another device
        with open_regular(source) as f, atomic(path, root, durable=True) as out:
            shutil.copyfileobj(f, out)
        return path
    try:
        check_output(path)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


@functools.cache
def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it: set it back at once, once per process
    os.umask(mask)
    return mask


def write_text(path: str | Path, text: str, root: str | Path | None = None) -> Path:
    """Write `text` to `path` through `atomic`."""
    with atomic(path, root, text=True) as f:
        f.write(text)
    return Path(path)


def write_bytes(path: str | Path, data: bytes, root: str | Path | None = None) -> Path:
    """Write `data` to `path` through `atomic`."""
    with atomic(path, root) as f:
        f.write(data)
    return Path(path)


def save_figure(fig: Any, path: str | Path, root: str | Path | None = None, dpi: int = 100) -> Path:
    """A matplotlib figure as a PNG at `path`, through `atomic`."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return write_bytes(path, buffer.getvalue(), root)


def open_append(path: str | Path, root: str | Path | None = None) -> IO[str]:
    """`path` opened to append text (a log), created if absent; a symlink there or on the way from `root` (default:
    its folder) is refused rather than followed."""
    path = Path(path)
    make_folder(path.parent, root if root is not None else path.parent)
    try:
        # non-blocking: a FIFO with no reader would wait forever
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        if path.is_symlink():
            raise _link_error(path, "vitexp") from None
        if _kind(path) is not None:
            raise _not_regular(path, _kind(path)) from None
        raise VitexpError(f"cannot write {printable(path)} ({e.strerror}); make its folder writable") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise _not_regular(path, _KINDS.get(stat.S_IFMT(mode), "special file"))
    os.set_blocking(fd, True)
    return os.fdopen(fd, "a", encoding="utf-8")


def read_text(
    path: str | Path, root: str | Path | None = None, *, max_bytes: int | None = None, follow: bool = False
) -> str:
    """A file's text through `read_bytes` (the one reader): bytes that are not UTF-8 are replaced."""
    return read_bytes(path, root, max_bytes=max_bytes, follow=follow).decode("utf-8", errors="replace")


def read_bytes(
    path: str | Path, root: str | Path | None = None, *, max_bytes: int | None = None, follow: bool = False
) -> bytes:
    """A file's bytes through `open_regular`, refused when it holds more than `max_bytes` or (unless `follow`) when it
    or a folder from `root` (default: its own) down is a symlink."""
    path = Path(path)
    if not follow:
        check_inside(path, root if root is not None else path.parent)
    with open_regular(path, follow=follow, max_bytes=max_bytes) as f:
        data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    if max_bytes is not None and len(data) > max_bytes:  # it grew after fstat
        raise _too_large(path, max_bytes)
    return data


def open_regular(path: str | Path, *, follow: bool = False, max_bytes: int | None = None) -> IO[bytes]:
    """`path` opened to read, the one way vitexp opens a file it did not write: opened without blocking (a FIFO with
    no writer would wait forever) and kept only when fstat says it is a regular file (a FIFO, device, socket or folder
    is refused at once), then made blocking again; a symlink there is refused unless `follow` (a path the user typed,
    a data tree whose links the docs say are followed); more than `max_bytes` refused."""
    path = Path(path)
    flags = os.O_RDONLY | os.O_NONBLOCK | (0 if follow else getattr(os, "O_NOFOLLOW", 0))
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if not follow and path.is_symlink():
            raise _link_error(path, "vitexp") from None
        kind = _kind(path)
        if kind is not None:  # a socket cannot be opened at all
            raise _not_regular(path, kind) from None
        raise e from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _not_regular(path, _KINDS.get(stat.S_IFMT(info.st_mode), "special file"))
        if max_bytes is not None and info.st_size > max_bytes:
            raise _too_large(path, max_bytes)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


_KINDS = {
    stat.S_IFDIR: "folder",
    stat.S_IFIFO: "FIFO (named pipe)",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
    stat.S_IFSOCK: "socket",
}


def _kind(path: Path, *, follow: bool = False) -> str | None:
    """What `path` is when it exists and is neither a regular file nor (unless `follow`) a symlink; else None."""
    try:
        mode = (os.stat if follow else os.lstat)(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode) or stat.S_ISLNK(mode):
        return None
    return _KINDS.get(stat.S_IFMT(mode), "special file")


class Malformed(VitexpError):
    """A JSON or YAML file that does not parse as plain data, or nests too deep (`read_json`, `read_yaml`)."""


class NotRegular(VitexpError):
    """A FIFO, device, socket or folder where a regular file is read or written (`open_regular`, `check_output`)."""


def _not_regular(path: Path, kind: str) -> VitexpError:
    return NotRegular(
        f"{printable(path)} is a {kind}, not a regular file; vitexp reads and writes only regular files: "
        f"put the file itself there, or pick another path"
    )


def _too_large(path: Path, max_bytes: int) -> VitexpError:
    return VitexpError(
        f"{printable(path)} holds more than {max_bytes} bytes, more than such a file ever holds; refused"
    )


def check_output(path: str | Path) -> Path:
    """`path` as a file to write, refused in one line when it exists and is not a regular file (a folder, device,
    FIFO or socket, or a symlink to one): the one writer replaces files, never one of those. Commands call it on
    their outputs before any work; `atomic` calls it again before its rename."""
    path = Path(path)
    kind = _kind(path) or _kind(path, follow=True)
    if kind is not None:
        raise _not_regular(path, kind)
    return path


def check_output_folder(folder: str | Path, names: list[str]) -> Path:
    """`folder` as a folder to write the files `names` into: refused in one line when it exists and is not a folder,
    or when one of those files is refused by `check_output`."""
    folder = Path(folder)
    if os.path.lexists(folder) and not folder.is_dir():
        kind = _kind(folder) or _kind(folder, follow=True) or "file"
        raise VitexpError(f"{printable(folder)} is a {kind}, not a folder; pick a folder for --out")
    for name in names:
        check_output(folder / name)
    return folder


# The most a JSON or YAML document from a handed-over folder may hold, and its deepest nesting: vitexp's own files
# are a few kilobytes and a few levels deep.
MAX_DOCUMENT_BYTES = 64 << 20
MAX_DEPTH = 64


def read_json(
    path: str | Path,
    root: str | Path | None = None,
    *,
    max_bytes: int = MAX_DOCUMENT_BYTES,
    max_depth: int = MAX_DEPTH,
    follow: bool = False,
) -> Any:
    """A JSON file through `read_bytes`, parsed as data: `VitexpError` (one line) when it is not JSON, is larger than
    `max_bytes` or nested deeper than `max_depth`; OSError when it cannot be opened (FileNotFoundError: absent)."""
    data = read_bytes(path, root, max_bytes=max_bytes, follow=follow)
    try:
        value = json.loads(data)
    except RecursionError:
        raise _too_deep(Path(path), max_depth, "JSON") from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise Malformed(f"{printable(path)} is not JSON ({printable(e, 120)})") from None
    return _bounded(value, Path(path), max_depth, "JSON")


def read_yaml(
    path: str | Path,
    root: str | Path | None = None,
    *,
    max_bytes: int = MAX_DOCUMENT_BYTES,
    max_depth: int = MAX_DEPTH,
    follow: bool = False,
) -> Any:
    """A YAML file through `read_bytes`, parsed with the safe loader (no tags, no objects) as `read_json` parses
    JSON."""
    import yaml

    text = read_text(path, root, max_bytes=max_bytes, follow=follow)
    try:
        value = yaml.safe_load(text)
    except RecursionError:
        raise _too_deep(Path(path), max_depth, "plain YAML") from None
    except (yaml.YAMLError, ValueError, TypeError):  # ValueError: a date such as 2001-13-45
        raise Malformed(f"{printable(path)} is not plain YAML: a syntax error or a tag such as !!python/...") from None
    return _bounded(value, Path(path), max_depth, "plain YAML")


def _bounded(value: Any, path: Path, max_depth: int, kind: str) -> Any:
    """`value`, refused when its lists and mappings nest deeper than `max_depth` (walked without recursion; a YAML
    alias met twice is walked once)."""
    stack, seen = [(value, 0)], set()
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, (dict, list)) or id(node) in seen:
            continue
        if depth >= max_depth:
            raise _too_deep(path, max_depth, kind)
        seen.add(id(node))
        stack += [(child, depth + 1) for child in (node.values() if isinstance(node, dict) else node)]
    return value


def _too_deep(path: Path, max_depth: int, kind: str) -> VitexpError:
    return Malformed(
        f"{printable(path)} is not {kind} as vitexp writes it: lists or mappings nested deeper than {max_depth} levels"
    )


def reason(error: BaseException, path: str | Path) -> str:
    """The reader's refusal of `path` without the path it starts with ("is a FIFO ...", "not JSON (...)"), for a
    message that names the path itself."""
    text = str(error)
    for prefix in (f"{printable(path)} is ", f"{printable(path)} "):
        text = text.removeprefix(prefix)
    return text


# Cells a spreadsheet reads as a formula (OWASP, "CSV injection"): a leading `'` makes them text.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def csv_cell(value: Any, limit: int = 100_000) -> Any:
    """`value` as a CSV cell that is data in any reader: a number (an int or float, or text that is a plain decimal
    number such as `-0.5`) as it is; None empty; any other text with its control characters escaped
    (`printable`) and, when it starts with `=`, `+`, `-`, `@`, tab or CR, a `'` in front."""
    if value is None:
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    text = str(value)
    if _NUMBER.fullmatch(text):
        return text
    escaped = printable(text, limit)
    return "'" + escaped if text.startswith(_FORMULA_START) else escaped


def write_csv(
    path: str | Path, header: list[str], rows: Iterable[Iterable[Any] | dict[str, Any]], root: str | Path | None = None
) -> Path:
    """The one CSV writer: `header`, then `rows` (lists, or dicts keyed by the header, missing keys empty), every cell
    through `csv_cell`, written through `atomic`."""
    with atomic(path, root, text=True) as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow([csv_cell(h) for h in header])
        for row in rows:
            cells = [row.get(h) for h in header] if isinstance(row, dict) else row
            writer.writerow([csv_cell(c) for c in cells])
    return Path(path)


class SafeFormatter(logging.Formatter):
    """Hydra's log format, with every message's control characters escaped: a name read from a file cannot start
    a new log line or send escape sequences to the terminal (tracebacks keep their own lines)."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        record.message = printable(record.message, limit=100_000)
        return super().formatMessage(record)


class NoFollowFileHandler(logging.FileHandler):
    """The run's log file, opened to append without following a symlink (`open_append`)."""

    def _open(self) -> IO[str]:
        return open_append(self.baseFilename)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        """A link planted after the run folder was checked: one line on stderr (not logging's traceback), and the
        file is not written."""
        error = sys.exc_info()[1]
        if isinstance(error, VitexpError):
            print(f"error: {error}", file=sys.stderr)
        else:
            super().handleError(record)
