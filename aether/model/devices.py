"""Where a model runs: the torch device a name picks and the precision that is fast there. (The
cores this process may use are `aether.core.runtime`'s; how inference spreads over them is
`aether.infer.pipeline.tile_workers`.)"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from aether.core.errors import AetherError
from aether.core.ranks import launched, local_rank


def pick_device(name: str) -> torch.device:
    """'auto' is CUDA when present, else CPU; under torchrun each process takes GPU LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise AetherError("device cuda was asked for, but PyTorch sees no CUDA GPU; use auto or cpu")
    if name == "cuda" and launched():
        n_local, n_gpus = int(os.environ.get("LOCAL_WORLD_SIZE", 1)), torch.cuda.device_count()
        if n_gpus < n_local:
            raise AetherError(
                f"torchrun started {n_local} processes on this machine but PyTorch sees {n_gpus} "
                f"CUDA GPUs (one each); use --nproc_per_node {n_gpus} or set train.device=cpu"
            )
        return torch.device("cuda", local_rank())
    return torch.device(name)


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
