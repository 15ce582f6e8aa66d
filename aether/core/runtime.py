"""What this process may use, and settings that only the program owning the process applies.

The cores (`usable_cores`, `thread_budget`) are read, never changed. The glibc malloc settings
for tile-sized arrays (`keep_tile_buffers`) change the whole process, so the library never
applies them itself: the command line does, and so does each Dask task AETHER runs in a worker
AETHER started (`aether.core.cluster`).

glibc malloc settings for tile-sized arrays.

Pooling, inference and retrieval allocate and free arrays of a few to tens of MB per chunk or
tile, over and over. By default glibc maps each such array afresh and the kernel faults its pages
in again every time (and Dask starts its workers with MALLOC_TRIM_THRESHOLD_=65536, which pins
that behaviour). Serving arrays up to 32 MiB from the heap and keeping up to 128 MiB of freed
memory for reuse makes inference in a Dask worker as fast as in a plain process (it was 1.6 x
slower) and pooling about 5% faster (benchmarks/bench_pooling.py: 94,000 to 104,000 POIs/s in
four runs, against 85,000 to 99,000 before), for about 60 MiB more peak memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 2**20  # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD_BYTES = 128 * 2**20


@functools.cache
def keep_tile_buffers() -> bool:
    """Apply the settings above to this process (once; later calls do nothing). Returns whether
    they applied: False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        libc = None
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )


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
