"""vitexp: train, distill and prune Vision Transformers from Hydra configs."""

from collections.abc import Callable
from typing import Any

__version__ = "0.1.0"


class VitexpError(Exception):
    """A user-facing error: the message names the problem and the fix, and is printed as one line."""


def run_on_files(work: Callable[[], tuple[Any, list[str]]]) -> tuple[Any, list[str]]:
    """A console entry point's work over files (predict, explain): `work()` returns (result, skipped file lines); a
    `VitexpError` is one line on stderr and exit status 2, each skipped file one line on stdout. Returns the result."""
    import sys

    try:
        result, skipped = work()
    except VitexpError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for line in skipped:
        print(f"skipped {line}")
    return result, skipped
