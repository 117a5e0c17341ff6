"""`python -m vitexp` with one fault injected, for the kill-and-resume trials.

    python tests/reliability/inject.py step|eval|save N OVERRIDES...   SIGKILL at the N-th such event
    python tests/reliability/inject.py count FILE OVERRIDES...         run cleanly, write the event counts to FILE

(or `main([...])` in a child process, as `tests/cli.py` runs it)

Events: an optimizer step (before it runs), an evaluation pass (after its first batch), a checkpoint write
(after half of its bytes reached the disk).
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

EVENTS = ("step", "eval", "save")


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class DyingLoader:
    """`loader`, but the process is killed after its first batch."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i == 1:
                die()
            yield batch
        die()


def main(argv: list[str]) -> None:
    """Run `python -m vitexp OVERRIDES` with the fault `argv[0]` at its `argv[1]`-th event (or count the events)."""
    mode, arg, overrides = argv[0], argv[1], argv[2:]
    if mode not in (*EVENTS, "count"):
        raise SystemExit(f"unknown fault {mode}; choose one of {', '.join(EVENTS)}, count")
    counts = dict.fromkeys(EVENTS, 0)

    def hit(event: str) -> bool:
        counts[event] += 1
        return mode == event and counts[event] == int(arg)

    register_optimizer_step_pre_hook(lambda *_: die() if hit("step") else None)

    from vitexp import engine

    evaluate = engine.evaluate
    engine.evaluate = lambda model, loader, *a, **k: evaluate(model, DyingLoader(loader) if hit("eval") else loader,
                                                              *a, **k)  # fmt: skip
    save = torch.save

    def half_save(obj, f, *a, **k):
        if not hit("save"):
            return save(obj, f, *a, **k)
        buffer = io.BytesIO()
        save(obj, buffer, *a, **k)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        f.flush()
        os.fsync(f.fileno())
        die()

    torch.save = half_save
    sys.argv = ["vitexp", *overrides]
    from vitexp.__main__ import main as vitexp_main

    try:
        vitexp_main()
    finally:
        if mode == "count":
            Path(arg).write_text(json.dumps(counts))


if __name__ == "__main__":
    main(sys.argv[1:])
