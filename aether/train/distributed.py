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
import os
from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from aether.core.errors import AetherError
from aether.text.encoders import EmbeddingCache, SentenceTransformerEncoder, TextEncoder, encode_texts, uncached_texts


def launched() -> bool:
    """Whether torchrun (or a launcher that sets the same variables) started this process."""
    return all(name in os.environ for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))


def active() -> bool:
    """Whether this process is in a process group."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank: in the process group, or as torchrun numbered it before joining; else 0."""
    if active():
        return dist.get_rank()
    return int(os.environ["RANK"]) if launched() else 0


def world_size() -> int:
    """How many processes train together: the process group's, or torchrun's count before joining; else 1."""
    if active():
        return dist.get_world_size()
    return int(os.environ["WORLD_SIZE"]) if launched() else 1


def is_main() -> bool:
    """Rank 0, or the only process: the one that writes files."""
    return rank() == 0


def local_rank() -> int:
    """This process's number on its machine (torchrun's LOCAL_RANK), which picks its GPU."""
    return int(os.environ.get("LOCAL_RANK", 0))


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
    start = sum(sizes[:rank()])
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


def seed_own_stream(seed: int) -> None:
    """Give the ranks other than 0 their own torch random stream (dropout masks), seeded from
    (seed, rank), so they draw other masks than rank 0; rank 0 keeps the one-process stream."""
    if rank() > 0:
        torch.manual_seed(int(np.random.SeedSequence([seed, rank()]).generate_state(1)[0]))


def encode_texts_sharded(encoder: TextEncoder, texts: list[str], cache: EmbeddingCache, batch_size: int = 64,
                         progress: bool = True) -> tuple[np.ndarray, int]:
    """What `encode_texts` returns, with the work split across the ranks of a process group.

    The unique texts not yet in the cache are dealt out to the ranks; each encodes its share (on
    GPU LOCAL_RANK when a sentence-transformers encoder runs on CUDA) into the one shared cache;
    after a barrier every rank reads every vector from the cache. Each text is encoded once in all.
    Without a process group this is `encode_texts`.
    """
    if not active():
        return encode_texts(encoder, texts, cache, batch_size, progress)
    if (isinstance(encoder, SentenceTransformerEncoder) and encoder.device in ("auto", "cuda")
            and torch.cuda.device_count() > local_rank()):
        encoder.device = f"cuda:{local_rank()}"  # not the first GPU for every rank (takes effect before loading)
    todo = uncached_texts(encoder, texts, cache)
    barrier()  # every rank has read the same cache before any rank writes to it
    error = None
    try:
        encode_texts(encoder, todo[rank()::world_size()], cache, batch_size, progress and is_main())
    except AetherError as exc:
        error = str(exc)
    raise_if_any_failed(error)
    vectors, _ = encode_texts(encoder, texts, cache, batch_size, progress=False)  # all cached by now
    return vectors, len(todo)
