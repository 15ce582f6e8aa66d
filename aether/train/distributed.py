"""Training across processes: `torchrun --nproc_per_node N train.py --cfg ...`.

torchrun starts N copies of train.py with RANK, LOCAL_RANK and WORLD_SIZE in their environment;
`process_group` joins them (NCCL with one GPU per process on CUDA, gloo on CPU). Without torchrun
there is no process group and every helper here passes its input through or does nothing: one
process is the whole world, and training is exactly what it was.

train.batch_size is the global batch B. Every rank draws the same permutation, takes its share of
each batch (`shard_sizes`: B/N rows, the first B mod N ranks one more) and projects it; `gather_rows`
joins every rank's projections, keeping their gradients, so every rank computes the loss of the
whole global batch. Backward through the gather hands each rank the sum over the N ranks of its
rows' gradients, N times the one-process gradient, and DDP's average over the ranks brings it back:
N processes take the steps that one process takes with the whole batch (up to float rounding).
That holds with model.dropout 0; with dropout each rank draws its own masks (`seed_own_stream`),
which trains as well but not identically.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from aether.core.collective import (
    active,
    barrier,
    gather_objects,
    max_over_ranks,
    raise_if_any_failed,
    rank,
    world_size,
)
from aether.core.ranks import is_main, launched, local_rank

__all__ = [
    "active",
    "barrier",
    "gather_objects",
    "gather_rows",
    "is_main",
    "launched",
    "local_rank",
    "max_over_ranks",
    "my_rows",
    "process_group",
    "raise_if_any_failed",
    "rank",
    "seed_own_stream",
    "shard_sizes",
    "world_size",
    "wrap",
]


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """Join torchrun's processes for the duration (NCCL for a CUDA device, else gloo); without
    torchrun, do nothing."""
    if not launched():
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` under DistributedDataParallel (which averages gradients over the ranks) in a process
    group, else `model` itself."""
    if not active():
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def shard_sizes(n_rows: int) -> list[int]:
    """How many of `n_rows` each rank takes, in rank order: as even as can be, the first ones one more."""
    n = world_size()
    return [n_rows // n + (r < n_rows % n) for r in range(n)]


def my_rows(n_rows: int) -> slice:
    """This rank's rows of `n_rows` (by `shard_sizes`)."""
    sizes = shard_sizes(n_rows)
    start = sum(sizes[: rank()])
    return slice(start, start + sizes[rank()])


class _AllGather(torch.autograd.Function):
    """All ranks' equal-shaped `x` stacked in rank order; backward hands each rank the gradient of
    its own rows summed over the ranks (every rank's copy of the loss used them)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad.chunk(world_size())[rank()]


def gather_rows(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Every rank's rows of `x` (rank r holds sizes[r] rows) stacked in rank order. Gradients flow
    back to the rank that holds the rows, summed over the ranks that used them."""
    if not active():
        return x
    longest = max(sizes)
    gathered = _AllGather.apply(F.pad(x, (0, 0, 0, longest - x.shape[0])))  # all_gather needs equal shapes
    return torch.cat([part[:n] for part, n in zip(gathered.split(longest), sizes)])


def seed_own_stream(seed: int) -> None:
    """Give the ranks other than 0 their own torch random stream (dropout masks), seeded from
    (seed, rank), so they draw other masks than rank 0; rank 0 keeps the one-process stream."""
    if rank() > 0:
        torch.manual_seed(int(np.random.SeedSequence([seed, rank()]).generate_state(1)[0]))
