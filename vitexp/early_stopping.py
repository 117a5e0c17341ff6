"""Early stopping as Lightning's EarlyStopping decides it (monitor, mode, patience, min_delta): the state after each
epoch, kept in the checkpoint so that a resumed run stops where an uninterrupted one would."""

from __future__ import annotations

import logging
import math
from typing import Any

from vitexp import VitexpError
from vitexp.schema import EarlyStopping

log = logging.getLogger("vitexp")

# The state's fields: the best value so far and its epoch, the epochs since, and why the run stopped (None: it goes on)
BEST, BEST_EPOCH, WAIT, REASON = "best", "best_epoch", "wait", "reason"


def update(settings: EarlyStopping, state: dict[str, Any], metrics: dict[str, Any], epoch: int) -> dict[str, Any]:
    """The state after `epoch` with its `metrics`: an improvement is a change beyond `min_delta` in `mode`'s
    direction (Lightning's rule); `patience` epochs in a row without one set the reason to stop."""
    monitor = settings.monitor
    if monitor is None:
        return state
    if monitor not in metrics:
        logged = ", ".join(k for k in metrics if k.startswith("val"))
        raise VitexpError(
            f"trainer.early_stopping.monitor={monitor} is not a figure this run logs ({logged}); pick one of them"
        )
    state = state or {BEST: None, BEST_EPOCH: None, WAIT: 0, REASON: None}
    value, best = float(metrics[monitor]), state[BEST]
    sign = -1.0 if settings.mode == "min" else 1.0
    improved = math.isfinite(value) and (best is None or sign * (value - best) > settings.min_delta)
    if improved:
        return {BEST: value, BEST_EPOCH: epoch, WAIT: 0, REASON: None}
    state = {**state, WAIT: state[WAIT] + 1}
    if state[WAIT] >= settings.patience:
        since = f"best {best:.6g} at epoch {state[BEST_EPOCH]}" if best is not None else "no finite value"
        state[REASON] = (
            f"{monitor} did not {'fall' if settings.mode == 'min' else 'rise'} by more than {settings.min_delta} "
            f"for {settings.patience} epochs ({since})"
        )
        log.info(f"stopped early at epoch {epoch}: {state[REASON]}")
    return state


def check(state: Any, source: str) -> dict[str, Any]:
    """A checkpoint's early-stopping state as `update` writes it (None or {} when off), or a one-line error."""
    if state is None or state == {}:
        return {}
    number = (int, float)
    ok = (
        isinstance(state, dict)
        and set(state) == {BEST, BEST_EPOCH, WAIT, REASON}
        and (state[BEST] is None or isinstance(state[BEST], number) and not isinstance(state[BEST], bool))
        and (state[BEST_EPOCH] is None or type(state[BEST_EPOCH]) is int)
        and type(state[WAIT]) is int
        and state[WAIT] >= 0
        and (state[REASON] is None or isinstance(state[REASON], str))
    )
    if not ok:
        raise VitexpError(
            f"{source} is not a checkpoint vitexp wrote: its early_stopping is not best, best_epoch, wait and reason; "
            f"start a new run (ckpt_path=<it> keeps its weights)"
        )
    return dict(state)
