"""Termination requests: a signal handler asks, the training loop stops where the run can resume from."""

from __future__ import annotations

_requested: list[str] = []


def request_stop(reason: str) -> None:
    """Ask the running training loop to stop after the current epoch (a termination signal arrived)."""
    _requested.append(reason)


def check_stop() -> None:
    """Stop with KeyboardInterrupt(reason) if a stop was requested; called where the run can resume from."""
    if _requested:
        raise KeyboardInterrupt(_requested[-1])
