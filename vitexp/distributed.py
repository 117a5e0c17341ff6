"""torch.distributed for torchrun and SLURM: one process per device, rank 0 writes, the others compute.

Everything here is a no-op in a plain single-process run.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def launched() -> bool:
    """Whether this process is one of several started by torchrun (or exported from SLURM by `from_slurm`)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init() -> None:
    """Join the process group once: gloo for CPU tensors, NCCL for CUDA tensors when there are GPUs."""
    if not launched() or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        dist.init_process_group("cpu:gloo,cuda:nccl")
    else:
        dist.init_process_group("gloo")


def from_slurm() -> None:
    """In a multi-task SLURM job started by submitit, set torchrun's variables (RANK, WORLD_SIZE, ...)."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "WORLD_SIZE" not in os.environ:
        import submitit

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def rank() -> int:
    """This process's rank (0 without torch.distributed)."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """Number of processes (1 without torch.distributed)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def local_rank() -> int:
    """This process's index on its node: its GPU."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0: the process that writes logs, checkpoints, results and W&B."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (e.g. until rank 0 has written a checkpoint the others read)."""
    if dist.is_initialized():
        dist.barrier()


def sum_all(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over the ranks (itself in a single process)."""
    if dist.is_initialized():
        tensor = tensor.clone()
        dist.all_reduce(tensor)
    return tensor


def broadcast(value: object) -> object:
    """Rank 0's `value` on every rank."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: object) -> list[object]:
    """Every rank's `value`, in rank order, on every rank (`[value]` in a single process)."""
    if not dist.is_initialized():
        return [value]
    box: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(box, value)
    return box


def any_rank(flags: list[bool]) -> list[bool]:
    """Each flag, true if it is true on any rank: one small all-reduce on the CPU (gloo), so that every rank takes
    the same decision at the same step."""
    if not dist.is_initialized():
        return flags
    return [bool(v) for v in sum_all(torch.tensor(flags, dtype=torch.int64)).tolist()]
