"""`python -m vitexp` with one fault injected, for the kill-and-resume trials.

    python tests/reliability/inject.py step|eval|save N OVERRIDES...   SIGKILL at the N-th such event
    python tests/reliability/inject.py SIGTERM|SIGINT|SIGUSR1|SIGUSR2 N OVERRIDES...
                                                                       that signal, sent to itself (rank 0 only
                                                                       under torchrun) in the N-th optimizer step
    python tests/reliability/inject.py count FILE OVERRIDES...         run cleanly, write the event counts to FILE

(or `main([...])` in a child process, as `tests/cli.py` runs it)

Events: an optimizer step (before it runs), an evaluation pass (after its first batch), a checkpoint write
(after half of its bytes reached the disk; for a checkpoint's second name, best.pt and last.pt being one file,
after its hard link is made and before it is renamed into place). A run that ends without SIGKILL writes the number
of optimizer steps it completed to ./inject_steps.json, to be compared with the step counts its checkpoints hold.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

EVENTS = ("step", "eval", "save")
SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2")


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
    if mode not in (*EVENTS, *SIGNALS, "count"):
        raise SystemExit(f"unknown fault {mode}; choose one of {', '.join(EVENTS + SIGNALS)}, count")
    counts = dict.fromkeys(EVENTS, 0)
    done = [0]

    def hit(event: str) -> bool:
        counts[event] += 1
        return mode == event and counts[event] == int(arg)

    def before_step(*_) -> None:
        if hit("step"):
            die()
        if mode in SIGNALS and counts["step"] == int(arg) and os.environ.get("RANK", "0") == "0":
            os.kill(os.getpid(), getattr(signal, mode))  # handled here, in the step: the step itself completes

    register_optimizer_step_pre_hook(before_step)
    register_optimizer_step_post_hook(lambda *_: done.__setitem__(0, done[0] + 1))

    from vitexp import engine

    evaluate = engine.evaluate
    engine.evaluate = lambda model, loader, *a, **k: evaluate(
        model, DyingLoader(loader) if hit("eval") else loader, *a, **k
    )
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
    from vitexp import files

    second_name = files.second_name

    def dying_second_name(source, path, root=None):  # a checkpoint's other names (best.pt and last.pt: one file)
        if not hit("save"):
            return second_name(source, path, root)
        os.link(source, Path(path).parent / f".{Path(path).name}.killed.tmp")  # linked, not yet renamed
        die()

    files.second_name = dying_second_name
    sys.argv = ["vitexp", *overrides]
    from vitexp.__main__ import main as vitexp_main

    try:
        vitexp_main()
    finally:
        if mode == "count":
            Path(arg).write_text(json.dumps(counts))
        Path(f"inject_steps{os.environ.get('RANK', '')}.json").write_text(json.dumps({"completed": done[0]}))


if __name__ == "__main__":
    main(sys.argv[1:])
