"""Which process this is in a launch of several (torchrun's environment), read from the environment
alone, so that any module may ask without importing torch. The collective operations between the
processes are `aether.core.collective`'s."""

from __future__ import annotations

import os

LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE")  # what torchrun sets in each process it starts


def launched() -> bool:
    """Whether torchrun (or a launcher that sets the same variables) started this process; a RANK
    alone, as some schedulers set, does not count."""
    return all(name in os.environ for name in LAUNCH_VARIABLES)


def launch_rank() -> int:
    """This process's rank as the launcher numbered it (0 without a launcher)."""
    return int(os.environ["RANK"]) if launched() else 0


def launch_world_size() -> int:
    """How many processes the launcher started (1 without a launcher)."""
    return int(os.environ["WORLD_SIZE"]) if launched() else 1


def local_rank() -> int:
    """This process's number on its machine (torchrun's LOCAL_RANK), which picks its GPU."""
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    """Rank 0, or the only process: the one that prints and writes files."""
    return launch_rank() == 0
