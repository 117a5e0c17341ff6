"""The command line for the tests: `python -m vitexp ARGS` in a child process forked from a server that has imported
vitexp once.

Each child runs the console entry point (`vitexp.__main__.main`) with its own argv, working folder, environment,
stdout and stderr, and ends with the CLI's exit status, or dies by the signal that killed it, as `python -m vitexp`
does; it only skips the interpreter start and the 5 to 20 s of importing torch, timm and Hydra. The server imports
modules and runs nothing, so each child starts from the state a fresh interpreter would have. Tests that need a
fresh interpreter itself (a signal from outside, torchrun, an installed copy) start `python -m vitexp`.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

# imported once by the server, before it forks the children
PRELOAD = [
    "tests.cli",
    "vitexp.__main__",
    "vitexp.tasks.train",
    "vitexp.tasks.distill",
    "vitexp.tasks.prune",
    "vitexp.tasks.evaluate",
    "vitexp.tasks.benchmark",
    "vitexp.report",
    "tests.reliability.inject",
    "wandb",
]
_context = None


def _server() -> multiprocessing.context.ForkServerContext:
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _child(entry: str, argv: list[str], cwd: str, env: dict[str, str], out: str, err: str, limits: dict) -> None:
    """In the forked child: become `python -m vitexp ARGV` (or the fault injector, or the report) in `cwd` with
    `env` and the resource `limits` ({resource.RLIMIT_*: bytes})."""
    for name, limit in limits.items():
        resource.setrlimit(name, (limit, limit))
    os.chdir(cwd)
    # A child of the forkserver inherits its start method; `python -m vitexp` starts loader workers by fork, and
    # forked workers end when their process is SIGKILLed (a forkserver's never notice and are left behind).
    multiprocessing.set_start_method("fork", force=True)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    code = 0
    try:
        if entry == "inject":
            from tests.reliability import inject

            inject.main(argv)
        elif entry == "report":
            from vitexp.report import main

            main(argv)
        else:
            from vitexp.__main__ import main

            sys.argv = ["vitexp", *argv]
            main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - what the interpreter does with an uncaught exception
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


class Child:
    """A running CLI child: `.pid`, `.kill()`, `.wait(timeout)` -> a CompletedProcess (returncode < 0: killed)."""

    def __init__(
        self,
        argv: list[str],
        cwd: Path,
        entry: str = "vitexp",
        env: dict[str, str] | None = None,
        limits: dict[int, int] | None = None,
    ) -> None:
        self.argv = [{"vitexp": "vitexp", "inject": "inject.py", "report": "python -m vitexp.report"}[entry], *argv]
        folder = Path(tempfile.mkdtemp(prefix="vitexp-cli-"))
        self.out, self.err = folder / "stdout", folder / "stderr"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.process = _server().Process(
            target=_child, args=(entry, list(argv), str(cwd), env, str(self.out), str(self.err), limits or {})
        )
        self.process.start()
        self.pid = self.process.pid

    def kill(self) -> None:
        self.process.kill()

    def wait(self, timeout: float | None = None) -> subprocess.CompletedProcess:
        self.process.join(timeout)
        if self.process.exitcode is None:
            self.process.kill()
            self.process.join()
            raise subprocess.TimeoutExpired(self.argv, timeout)
        result = subprocess.CompletedProcess(
            self.argv, self.process.exitcode, self.out.read_text(), self.err.read_text()
        )
        for path in (self.out, self.err):
            path.unlink()
        self.out.parent.rmdir()
        return result


def run(
    argv: list[str],
    cwd: Path,
    timeout: float = 600,
    entry: str = "vitexp",
    env: dict[str, str] | None = None,
    limits: dict[int, int] | None = None,
) -> subprocess.CompletedProcess:
    """Run the CLI to its end: a CompletedProcess with returncode, stdout and stderr."""
    return Child(argv, cwd, entry, env, limits).wait(timeout)
