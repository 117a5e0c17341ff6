"""Termination requests: a signal asks, the training loop stops where the run can resume from (after the current
optimizer step, with a checkpoint there), and a scheduler's own handler (submitit's requeue) runs after that."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
from typing import Any

from vitexp import distributed

# SIGTERM: kill, torchrun, a scheduler's end; SIGINT: Ctrl-C; SIGUSR1/SIGUSR2: SLURM's warning before the time
# limit (`#SBATCH --signal=USR1@120`; submitit sends USR2 `signal_delay_s` before it)
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)

_requested: list[str] = []
_deferring = 0
_chained: dict[str, Callable[[int, Any], Any]] = {}


def request_stop(reason: str) -> None:
    """Ask the running training loop to stop at its next step boundary (a termination signal arrived)."""
    _requested.append(reason)


def requested() -> str | None:
    """The reason of the stop asked for, if any."""
    return _requested[-1] if _requested else None


def _handle(signum: int, frame: object) -> None:
    # Inside a training loop the request waits for the end of the optimizer step, where the loop saves and stops;
    # raised anywhere else (or at a second signal: the user insists) it can land inside a C call that swallows
    # exceptions, so the request is kept for the loop to honour as well.
    name = signal.Signals(signum).name
    request_stop(name)
    if not _deferring or len(_requested) > 1:
        raise KeyboardInterrupt(name)


def install() -> None:
    """Handle SIGTERM, SIGINT, SIGUSR1 and SIGUSR2; a handler someone else installed before (submitit's, which
    requeues the job) is kept, and called once the run has saved where it stopped."""
    for signum in SIGNALS:
        previous = signal.getsignal(signum)
        if callable(previous) and previous is not _handle and previous is not signal.default_int_handler:
            _chained[signal.Signals(signum).name] = previous
        signal.signal(signum, _handle)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """While inside: a first stop request is only recorded, for `check_stop` to honour."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1


def agreed() -> bool:
    """Whether a stop was asked for in any process of the run (every rank gets the same answer, so all stop at the
    same step; one small all-reduce on the CPU under torchrun)."""
    return distributed.any_rank([requested() is not None])[0]


def check_stop() -> None:
    """Stop if a stop was requested (in any process of the run); called where the run can resume from, by every
    rank. A chained handler (submitit's) runs first, and may end the process (requeued); otherwise
    KeyboardInterrupt(reason)."""
    if not agreed():
        return
    reason = requested() or "stopped with the other processes"
    handler = _chained.get(reason)
    if handler is not None:
        handler(getattr(signal, reason), None)
    raise KeyboardInterrupt(reason)
