"""Where work runs: the torch device a name picks, the precision that is fast there, and the cores
this process may use. (How inference spreads over them is aether.infer.pipeline.tile_workers; the
CUDA-specific details of its tile path are aether.infer.device_tiles'.)"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from aether.train import distributed
from aether.core.errors import AetherError


def pick_device(name: str) -> torch.device:
    """'auto' is CUDA when present, else CPU; under torchrun each process takes GPU LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise AetherError("device cuda was asked for, but PyTorch sees no CUDA GPU; use auto or cpu")
    if name == "cuda" and distributed.launched():
        n_local, n_gpus = int(os.environ.get("LOCAL_WORLD_SIZE", 1)), torch.cuda.device_count()
        if n_gpus < n_local:
            raise AetherError(f"torchrun started {n_local} processes on this machine but PyTorch sees {n_gpus} "
                              f"CUDA GPUs (one each); use --nproc_per_node {n_gpus} or set train.device=cpu")
        return torch.device("cuda", distributed.local_rank())
    return torch.device(name)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and taskset narrow), which
    bounds --workers: local worker processes beyond it only add memory and contention."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def thread_budget() -> int:
    """The threads this process should keep busy: its share where a launcher gave it one
    (OMP_NUM_THREADS, which each local Dask worker of `aether.core.cluster` gets: the cores over the
    workers), else every usable core."""
    try:
        share = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        share = 0
    return min(share, usable_cores()) if share > 0 else usable_cores()


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' is bf16 where it is fast (CUDA, or a CPU with AMX/AVX512-BF16), else fp32.

    On CPUs without native bf16, autocast to bf16 is several times slower than fp32.
    """
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "fp32"
    return "bf16" if ("amx_bf16" in flags or "avx512_bf16" in flags) else "fp32"
