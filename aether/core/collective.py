"""Operations across the processes of a torchrun launch once they have joined a process group
(`aether.train.distributed.process_group`); without one, each passes its input through or does
nothing, so one process is the whole world."""

from __future__ import annotations

import torch
import torch.distributed as dist

from aether.core.errors import AetherError
from aether.core.ranks import launch_rank, launch_world_size


def active() -> bool:
    """Whether this process is in a process group."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank: in the process group, or as the launcher numbered it before joining; else 0."""
    return dist.get_rank() if active() else launch_rank()


def world_size() -> int:
    """How many processes work together: the process group's, or the launcher's count before joining; else 1."""
    return dist.get_world_size() if active() else launch_world_size()


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def max_over_ranks(value: int) -> int:
    """The largest of the ranks' `value`s, on every rank (a stop flag every rank agrees on)."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def gather_objects(obj) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank."""
    if not active():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if active():
        dist.barrier()


def raise_if_any_failed(error: str | None) -> None:
    """A barrier that fails on every rank when it failed on one: each raises the first failing rank's
    message, so rank 0 (the one that prints) reports an error another rank met."""
    failed = [e for e in gather_objects(error) if e is not None]
    if failed:
        raise AetherError(failed[0])
