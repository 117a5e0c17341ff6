"""Hypothesis strategies that mutate honest inputs (a checkpoint's dict, a run folder's YAML and JSON, a sweep's
study, a shard folder's tables and bytes) and the harness that calls an entry point on them: it must return, or
refuse with one line, and touch nothing outside the folder it was handed (tests/test_fuzz.py)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import math
import os
import random
import re
import shutil
import stat
import traceback
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hypothesis import strategies as st

from tests.handed import no_hang
from vitexp import VitexpError

# Entry point -> cases run, and (entry point, how it ended) -> cases: printed by the last test for the suite's note.
COUNTS: Counter[str] = Counter()
OUTCOMES: Counter[tuple[str, str]] = Counter()
# C0 and C1 control characters, newline and tab excepted: what `files.printable` escapes before a string is printed.
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
NASTY_TEXT = [
    "",
    " ",
    "\n",
    "a\nb",
    "\r\n",
    "\x1b[2J\x1b[H",
    "\x9b31m",
    "nul\x00byte",
    "tab\there",
    "$x^2$",
    "${oc.env:HOME}",
    "${oc.create:{_target_: os.system}}",
    "${now:}",
    "../../victim",
    "~",
    "/",
    "hf-hub:someone/model",
    "torch.load",
    "-1",
    "nan",
    "1e999",
    "x" * 3000,
    "é漢🙂",
    "=1+1",
    "@SUM(A1)",
    "+cmd|' /C calc'!A0",
    "-2+3",
    "\tlead",
]
# Ints a field may hold: small ones (a model that still builds), and ones no allocation can satisfy. Sizes between
# (10**5..10**8) are left out on purpose: a model that large builds for minutes on a shared machine.
NASTY_INTS = [0, 1, -1, 2, 3, 7, -(2**63), 2**62, 2**64, 10**30]
NASTY_FLOATS = [math.nan, math.inf, -math.inf, 0.5, -0.0, 1e308, 5e-324]
CODE_KEYS = ["_target_", "_partial_", "_args_", "_recursive_", "_convert_"]


class Payload:
    """A pickle that touches a marker file when it is unpickled (tests/test_security.py's)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@dataclass(frozen=True)
class Plant:
    """What a case plants beside the folder it hands over: a victim folder that must stay as it is, a pickle whose
    unpickling touches `marker`, and the command line's working folder (empty, and to stay so)."""

    root: Path
    victim: Path
    payload: Path
    marker: Path
    cwd: Path


def plant(case: Path, payload_bytes: bytes, marker: Path) -> Plant:
    """Make the victim folder, the payload and the working folder of one case under `case`."""
    victim = case / "victim"
    victim.mkdir(parents=True)
    (victim / "secret.txt").write_text("mine, not vitexp's\n")
    (victim / "notes.yaml").write_text("- keep\n")
    (case / "payload.pt").write_bytes(payload_bytes)
    (case / "cwd").mkdir()
    return Plant(case, victim, case / "payload.pt", marker, case / "cwd")


def scalars(p: Plant | None, *, tensors: bool = False) -> st.SearchStrategy:
    """A value a field may be retyped to: None, bools, odd numbers, text with control characters, interpolations,
    the paths of the payload and the victim, and (in a checkpoint) tensors of the wrong shape or kind."""
    paths = [str(p.payload), str(p.victim / "secret.txt"), str(p.victim), "../victim/secret.txt"] if p else []
    options = [
        st.none(),
        st.booleans(),
        st.sampled_from(NASTY_INTS),
        st.integers(-3, 64),
        st.sampled_from(NASTY_FLOATS),
        st.sampled_from(NASTY_TEXT + paths),
        st.text(st.sampled_from("ab=.,_-/:{}$[]\n\x1b\x9b\x00 "), max_size=12),
    ]
    if tensors:
        options.append(
            st.sampled_from([torch.zeros(0), torch.zeros(3), torch.tensor(math.nan), torch.ones(2, 2).long()])
        )
    return st.one_of(options)


def code_nodes(p: Plant) -> st.SearchStrategy:
    """Config nodes that would run code if instantiated: load the payload, copy over the victim, run a shell."""
    return st.sampled_from(
        [
            {"_target_": "torch.load", "f": str(p.payload), "weights_only": False},
            {"_target_": "shutil.copy", "src": str(p.payload), "dst": str(p.victim / "secret.txt")},
            {"_target_": "os.system", "_args_": [f"touch {p.marker}"]},
            {"_target_": "pathlib.Path.touch", "self": str(p.marker)},
            {"_partial_": True, "_target_": "builtins.eval"},
        ]
    )


def values(p: Plant | None, *, tensors: bool = False) -> st.SearchStrategy:
    """Any value a mutated field takes: a scalar, a code node, or a small list or dict of them."""
    leaf = scalars(p, tensors=tensors)
    if p is not None:
        leaf = st.one_of(leaf, code_nodes(p))
    return st.recursive(
        leaf, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys(), inner, max_size=3), max_leaves=6
    )


def keys() -> st.SearchStrategy:
    """A key a mutation adds to a dict: one that runs code, an interpolation, a dotted or odd one, or not a string."""
    odd = [
        "",
        "a.b",
        "${oc.env:HOME}",
        "\x1b[2J",
        "x\ny",
        "kwargs",
        "checkpoint_path",
        "pretrained_cfg_overlay",
        "pretrained",
        "model_name",
        "optim.momentum",
        "seed",
        "status",
    ]
    return st.one_of(st.sampled_from(CODE_KEYS + odd), st.text("abz_.", min_size=1, max_size=6))


def copy_tree(value: Any) -> Any:
    """`value` with every dict, list and tuple copied (tensors shared: a mutation replaces, never edits, them)."""
    if isinstance(value, OrderedDict):
        return OrderedDict((k, copy_tree(v)) for k, v in value.items())
    if isinstance(value, dict):
        return {k: copy_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(copy_tree(v) for v in value)
    return value


def _children(node: Any) -> list:
    if isinstance(node, dict):
        return list(node)
    if isinstance(node, list):
        return list(range(min(len(node), 4)))  # the first few: a long list's items are alike
    return []


class Mutated:
    """A mutated input and what was done to it: a failing example prints the edits, not the whole tree."""

    def __init__(self, value: Any, edits: list[str]) -> None:
        self.value, self.edits = value, edits

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text(f"honest input, then: {'; '.join(self.edits)}")


def short(value: Any) -> str:
    """`value` in an edit's description: tensors by shape, long values cut."""
    if torch.is_tensor(value):
        return f"tensor{tuple(value.shape)} {value.dtype}"
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


@st.composite
def mutation(draw, tree: Any, p: Plant | None, edits: list[str], *, tensors: bool = False) -> Any:
    """`tree` (already a copy) with one node, found by a random walk from the top (top-level fields most often),
    removed, retyped, wrapped in a list or dict, given an extra key, or (a tensor) reshaped or made NaN; the edit
    is described in `edits`."""
    parent, key, node, where = None, None, tree, []
    while _children(node) and (parent is None or draw(st.integers(0, 2)) > 0):
        parent, key = node, draw(st.sampled_from(_children(node)))
        node, where = parent[key], [*where, key]
    at = "".join(f"[{k!r}]" for k in where) or "the whole input"
    ops = ["replace", "wrap"] + (["delete"] if parent is not None else []) + (["add"] if isinstance(node, dict) else [])
    ops += ["tensor"] if torch.is_tensor(node) else []
    op = draw(st.sampled_from(ops))
    if op == "delete":
        del parent[key]
        edits.append(f"del {at}")
        return tree
    if op == "add":
        new_key, value = draw(keys()), draw(values(p, tensors=tensors))
        node[new_key] = value
        edits.append(f"{at}[{new_key!r}] = {short(value)}")
        return tree
    if op == "replace":
        new = draw(values(p, tensors=tensors))
    elif op == "wrap":
        new = draw(st.sampled_from([[node], {"value": node}, {"_target_": "builtins.id", "obj": node}]))
    else:
        how = draw(st.sampled_from(["short", "long", "nan", "scalar", "int"]))
        new = {
            "short": node.flatten()[:1],
            "long": torch.cat([node.flatten(), node.flatten()]),
            "nan": torch.full_like(node.float(), math.nan),
            "scalar": torch.tensor(1.0),
            "int": node.long(),
        }[how]
    edits.append(f"{at} = {short(new)}" if op != "wrap" else f"{at} wrapped: {short(new)}")
    if parent is None:
        return new
    parent[key] = new
    return tree


@st.composite
def mutated(draw, honest: Any, p: Plant | None, *, tensors: bool = False, most: int = 3) -> Mutated:
    """A copy of `honest` with one to `most` mutations."""
    tree, edits = copy_tree(honest), []
    for _ in range(draw(st.integers(1, most))):
        tree = draw(mutation(tree, p, edits, tensors=tensors))
    return Mutated(tree, edits)


@st.composite
def text_damage(draw, text: str) -> str:
    """`text` cut short, emptied, with garbage or control characters inserted, or a line doubled."""
    op = draw(st.sampled_from(["cut", "empty", "insert", "double", "binary"]))
    at = draw(st.integers(0, len(text)))
    if op == "cut":
        return text[:at]
    if op == "empty":
        return ""
    if op == "double":
        return text + text[at:]
    junk = (
        "\x00\xff\ufffd"
        if op == "binary"
        else draw(st.sampled_from(NASTY_TEXT[:16] + [": [", "{{", "- - -", "!!python/object:os.system"]))
    )
    return text[:at] + junk + text[at:]


def link_targets(p: Plant) -> list[Path]:
    """Where a planted symlink points: the victim's file and folder, the payload, nowhere (dangling)."""
    return [p.victim / "secret.txt", p.victim, p.payload, p.root / "nowhere"]


def inside_real(path: Path) -> bool:
    """Whether no folder above `path` is a link (a case never writes through one it planted, into the victim)."""
    return os.path.realpath(path.parent) == str(path.parent)


def plant_link(path: Path, target: Path) -> None:
    """Replace `path` (file or folder, if there) with a symlink to `target`."""
    if not inside_real(path):
        return
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    if path.parent.is_dir():
        path.symlink_to(target)


def plant_fifo(path: Path) -> None:
    """Replace the file `path` (if there, and reached without a link) with a FIFO that no one writes to: a reader
    that opens it blocking waits forever."""
    if not inside_real(path) or not path.parent.is_dir() or (path.is_dir() and not path.is_symlink()):
        return
    path.unlink(missing_ok=True)
    os.mkfifo(path)


def snapshot(root: Path, owned: list[Path]) -> dict[str, str]:
    """Every entry under `root` but the `owned` folders (which the command may write), with its bytes' hash."""
    seen = {}
    for top, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if Path(top) / d not in owned]
        for name in dirs + names:
            path = Path(top) / name
            if path in owned:
                continue
            rel = str(path.relative_to(root))
            if path.is_symlink():
                seen[rel] = f"link:{os.readlink(path)}"
            elif stat.S_ISFIFO(os.lstat(path).st_mode):
                seen[rel] = "fifo"
            elif path.is_file():
                seen[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                seen[rel] = "dir"
    return seen


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextlib.contextmanager
def _quiet_process(cwd: Path) -> Iterator[tuple[io.StringIO, _Lines]]:
    """The process as a command runs in it: in `cwd`, offline, output and vitexp's log captured; the working folder,
    environment and random generators put back after (an entry point may set them from a file)."""
    old_cwd, old_env = os.getcwd(), dict(os.environ)
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    out, handler, log = io.StringIO(), _Lines(), logging.getLogger("vitexp")
    os.environ.update(HF_HUB_OFFLINE="1", WANDB_MODE="disabled", NO_COLOR="1")
    os.chdir(cwd)
    log.addHandler(handler)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            yield out, handler
    finally:
        log.removeHandler(handler)
        os.chdir(old_cwd)
        os.environ.clear()
        os.environ.update(old_env)
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def check_message(message: str, where: str) -> None:
    """A refusal is one printable line: no newline, no control character, not a whole file's worth of text."""
    assert "\n" not in message, f"{where}: the error is several lines: {message!r}"
    assert not CONTROL.search(message), f"{where}: the error holds a control character: {message!r}"
    assert len(message) <= 1500, f"{where}: the error is {len(message)} characters (printable() cuts values)"


def call(name: str, p: Plant, owned: list[Path], entry: Callable[[], Any]) -> Any:
    """Run `entry` as the command `name` would: it returns (its value is returned), or raises `VitexpError` or
    `SystemExit(0 or 2)` with one printable line (None is returned); any other exception propagates. Either way the
    victim, the payload's marker and every file outside `owned` are checked untouched."""
    COUNTS[name] += 1
    try:
        return _checked(name, p, owned, entry)
    except Exception as e:
        # a finding already filed (VITEXP_FUZZ_KNOWN: one signature a line) lets the search go on to the next one
        sig = signature(name, e)
        known = os.environ.get("VITEXP_FUZZ_KNOWN")
        if known and Path(known).is_file() and sig in Path(known).read_text().splitlines():
            OUTCOMES[name, "known finding"] += 1
            return None
        e.add_note(f"fuzz signature: {sig}")
        raise


def signature(name: str, e: BaseException) -> str:
    """A finding's name: the entry point, the exception, and the innermost vitexp function it came from (or the
    rule it broke)."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if f"{os.sep}vitexp{os.sep}" in f.filename]
    where = f"{Path(frames[-1].filename).name}:{frames[-1].name}" if frames else ""
    if isinstance(e, AssertionError):
        where = str(e).split(": ", 2)[1] if str(e).count(": ") >= 1 else str(e)[:60]
    return f"{name} | {type(e).__name__} | {where}"


def _checked(name: str, p: Plant, owned: list[Path], entry: Callable[[], Any]) -> Any:
    before = snapshot(p.root, owned)
    result = None
    with no_hang(60), _quiet_process(p.cwd) as (out, log):  # a FIFO opened blocking fails the case, not the suite
        ended = "returned"
        try:
            result = entry()
        except VitexpError as e:
            ended = "refused"
            check_message(str(e), name)
        except SystemExit as e:
            code, ended = 0 if e.code is None else e.code, "exited"
            assert code in (0, 2), f"{name}: exits with {code!r} (status {code if isinstance(code, int) else 1})"
    OUTCOMES[name, ended] += 1
    assert not p.marker.exists(), f"{name}: the pickle payload ran"
    assert snapshot(p.root, owned) == before, f"{name}: files outside the folder it was handed changed"
    printed = out.getvalue() + "\n".join(log.lines)
    assert not CONTROL.search(printed), f"{name}: printed a control character from a file: {printed[-300:]!r}"
    return result


# --- Optuna studies and sweep folders: what a stored or enqueued trial may fix, and files that are no files --------

# Cells a spreadsheet would run, and text a terminal would obey.
FORMULAS = ["=cmd|' /C calc'!A0", "+1+1", "-2+3", "@SUM(A1)", "\tx", "\rx", '=HYPERLINK("http://x")', "\x1b]0;t\x07"]
SPECIAL = ["fifo", "folder"]


def fixed_params(space: dict[str, Any]) -> st.SearchStrategy:
    """What `study.enqueue_trial` may fix: values of the declared keys inside or far outside their interval, of
    another type, not finite, formulas; or keys the search does not declare (code keys, odd names, formulas)."""
    value = st.one_of(
        st.sampled_from(NASTY_FLOATS + NASTY_INTS + FORMULAS + ["1e-3", "0.001"]),
        st.floats(-1e3, 1e3),
        st.booleans(),
        st.none(),
    )
    key = st.one_of(st.sampled_from(sorted(space)), st.sampled_from(sorted(space)), keys(), st.sampled_from(FORMULAS))
    return st.dictionaries(key, value, min_size=1, max_size=3)


def plant_special(path: Path, kind: str) -> None:
    """Replace `path` (if there) with a FIFO or an empty folder: a read of a FIFO waits for a writer forever."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    os.mkfifo(path) if kind == "fifo" else path.mkdir()
