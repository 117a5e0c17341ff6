"""Peak training memory and step time of a ViT with and without gradient checkpointing (timm's
`set_grad_checkpointing`, what `trainer.grad_checkpointing=true` turns on), on this machine's CPU or GPU.

    python -m vitexp.bench.grad_ckpt_memory [--model vit_small_patch16_224] [--img-size 224] [--batch 64]

Memory: each setting in a fresh process (peak resident memory is a high-water mark that never falls, so two settings
in one process would hide each other): the process's peak resident set (ru_maxrss) over two AdamW steps, with the
model, optimizer and batch built before them (`before_steps_mb`, what the steps add to). On a GPU: torch's peak
allocated memory. Time: one process alternating the two settings step by step (so that a neighbour's
load hits both alike), the median of `--rounds` steps each after one warm-up step, in wall-clock seconds and in
seconds of this process's CPU time (what one thread computes, less sensitive to other processes on a shared
machine)."""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import timm
import torch
import torch.nn.functional as F


def _setup(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = timm.create_model(args.model, pretrained=False, img_size=args.img_size, drop_path_rate=0.1).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    y = torch.randint(0, model.num_classes, (args.batch,), device=device)
    return model, optimizer, x, y


def _step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> tuple[float, float]:
    start, cpu = time.perf_counter(), time.process_time()
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu


def child(args: argparse.Namespace) -> dict[str, float]:
    """One setting in this process: peak memory over two optimizer steps."""
    model, optimizer, x, y = _setup(args)
    model.set_grad_checkpointing(args.checkpointing == "on")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if x.is_cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        _step(model, optimizer, x, y)
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if x.is_cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {"peak_mb": peak, "before_steps_mb": before}


def _memory_figures(memory: dict[str, dict[str, float]]) -> dict[str, float]:
    if not memory:  # --no-memory
        return {}
    off, on = memory["off"]["peak_mb"], memory["on"]["peak_mb"]
    return {
        "peak_mb_off": round(off),
        "peak_mb_on": round(on),
        "peak_saving": round(1 - on / off, 3),
        "before_steps_mb": round(memory["off"]["before_steps_mb"]),
    }


def main() -> None:
    """Print one JSON line per setting and one with both and their ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-memory", action="store_true", help="time the steps only")
    parser.add_argument("--checkpointing", choices=["on", "off"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.checkpointing:
        print(json.dumps(child(args)))
        return
    memory = {}
    for setting in () if args.no_memory else ("off", "on"):
        command = [sys.executable, "-m", "vitexp.bench.grad_ckpt_memory", *sys.argv[1:], "--checkpointing", setting]
        memory[setting] = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
        print(json.dumps({"grad_checkpointing": setting, **memory[setting]}), flush=True)
    model, optimizer, x, y = _setup(args)
    times: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for on in (False, True):  # warm-up
        model.set_grad_checkpointing(on)
        _step(model, optimizer, x, y)
    for _ in range(args.rounds):
        for on in (False, True):
            model.set_grad_checkpointing(on)
            times[on].append(_step(model, optimizer, x, y))
            print(
                json.dumps({"grad_checkpointing": on, "step_s": times[on][-1][0], "cpu_s": times[on][-1][1]}),
                flush=True,
            )
    off_s, on_s = (statistics.median(t for t, _ in times[on]) for on in (False, True))
    off_cpu, on_cpu = (statistics.median(c for _, c in times[on]) for on in (False, True))
    summary = {
        "model": args.model,
        "img_size": args.img_size,
        "batch": args.batch,
        "device": args.device,
        "threads": torch.get_num_threads(),
        **_memory_figures(memory),
        "step_s_off": round(off_s, 2),
        "step_s_on": round(on_s, 2),
        "step_time_increase": round(on_s / off_s - 1, 3),
        "step_cpu_s_off": round(off_cpu, 2),
        "step_cpu_s_on": round(on_cpu, 2),
        "step_cpu_increase": round(on_cpu / off_cpu - 1, 3),
        "step_s_all": {k: [round(t, 2) for t, _ in times[on]] for k, on in (("off", False), ("on", True))},
        "step_cpu_s_all": {k: [round(c, 2) for _, c in times[on]] for k, on in (("off", False), ("on", True))},
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
