"""CPU-seconds per stage of raster inference (decode, pool, project, quantize, encode, write),
summed over the threads that do them, for the benchmark's table of where time goes.

Off unless `measure()` is active: then each `stage(name)` block adds the CPU time its thread
spent in it (time.thread_time, so other threads' work and waiting do not count).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter

_totals: Counter = Counter()
_lock = threading.Lock()
_on = False


@contextlib.contextmanager
def stage(name: str):
    """Count this thread's CPU time inside the block as stage `name` (when measuring)."""
    if not _on:
        yield
        return
    t0 = time.thread_time()
    try:
        yield
    finally:
        spent = time.thread_time() - t0
        with _lock:
            _totals[name] += spent


@contextlib.contextmanager
def measure():
    """Within the block, stages are counted; yields the Counter of CPU-seconds by stage."""
    global _on
    with _lock:
        _totals.clear()
    _on = True
    try:
        yield _totals
    finally:
        _on = False
