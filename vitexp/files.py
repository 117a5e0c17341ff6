"""Files in folders someone may hand over: the one writer (a temporary file in the real folder, then a rename), reads
that stay inside their folder, folders refused when they hold symlinks, and strings from files printed as data."""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import re
import stat
import sys
import tempfile
from collections.abc import Iterator
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
    created, and a symlinked folder from `root` (default: the folder itself) down is refused. `durable`: fsync first."""
    path = Path(path)
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
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as e:
        if path.is_symlink():
            raise _link_error(path, "vitexp") from None
        raise VitexpError(f"cannot write {printable(path)} ({e.strerror}); make its folder writable") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise VitexpError(f"{printable(path)} is not a regular file; move it away")
    return os.fdopen(fd, "a", encoding="utf-8")


def read_text(path: str | Path, root: str | Path | None = None) -> str:
    """A file's text, refused when it (or a folder from `root` down) is a symlink: it must stay inside its folder."""
    return read_bytes(path, root).decode("utf-8", errors="replace")


def read_bytes(path: str | Path, root: str | Path | None = None) -> bytes:
    """A file's bytes, refused when it (or a folder from `root` down) is a symlink."""
    path = Path(path)
    check_inside(path, root if root is not None else path.parent)
    with open_regular(path) as f:
        return f.read()


def open_regular(path: str | Path) -> IO[bytes]:
    """`path` opened to read, never through a symlink (O_NOFOLLOW) and only when it is a regular file (opened
    non-blocking, so that a FIFO is refused at once instead of waiting for a writer)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        if path.is_symlink():
            raise _link_error(path, "vitexp") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise VitexpError(f"{printable(path)} is not a regular file; refused")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


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
