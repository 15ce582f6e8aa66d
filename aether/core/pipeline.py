"""A three-stage pipeline: read (thread) -> compute (the caller's thread, or a few) -> write (thread).

Reading and writing GeoTIFF blocks spend most of their time in GDAL, which releases the
GIL, so they overlap with the NumPy/PyTorch compute in between. Queues are short, so at
most a few work items are in memory at once, and an error in any stage stops the others
and is raised in the caller's thread.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

QUEUE_SIZE = 2


def run_pipeline(
    produce: Callable[[], Iterator[tuple[Any, Any]]],
    compute: Callable[[Any, Any], Any],
    consume: Callable[[Any, Any], None],
    workers: int = 1,
) -> None:
    """Run `produce()` (yielding (task, data)) in a reader thread, `compute(task, data)` here
    (or in `workers` threads, that many tasks at a time), and `consume(task, result)` in a
    writer thread, in task order."""
    reads: queue.Queue = queue.Queue(maxsize=QUEUE_SIZE)
    writes: queue.Queue = queue.Queue(maxsize=QUEUE_SIZE)
    errors: list[BaseException] = []
    stop = threading.Event()
    end = object()

    def put(q: queue.Queue, item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(q: queue.Queue):
        while not stop.is_set():
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                continue
        return end

    def fail(exc: BaseException) -> None:
        errors.append(exc)
        stop.set()

    def reader() -> None:
        try:
            for item in produce():
                if not put(reads, item):
                    return
            put(reads, end)
        except BaseException as exc:  # handed to the caller's thread
            fail(exc)

    def writer() -> None:
        try:
            while (item := get(writes)) is not end:
                consume(*item)
        except BaseException as exc:
            fail(exc)

    threads = [threading.Thread(target=reader, daemon=True), threading.Thread(target=writer, daemon=True)]
    for t in threads:
        t.start()
    pool = ThreadPoolExecutor(max_workers=workers) if workers > 1 else None
    running: deque = deque()  # (task, future) in task order
    try:
        while (item := get(reads)) is not end:
            task, data = item
            if pool is None:
                if not put(writes, (task, compute(task, data))):
                    break
                continue
            running.append((task, pool.submit(compute, task, data)))
            if len(running) >= workers:
                task, future = running.popleft()
                if not put(writes, (task, future.result())):
                    break
        while running and not stop.is_set():
            task, future = running.popleft()
            put(writes, (task, future.result()))
        put(writes, end)  # a no-op when stopping; else the writer drains the queue and ends
    except BaseException:
        stop.set()
        raise
    finally:
        if pool is not None:
            for _, future in running:
                future.cancel()
            pool.shutdown(wait=True)
        for t in threads:
            t.join()
    if errors:
        raise errors[0]


def read_ahead(items: list, read: Callable[[Any], Any], readers: int = 1, name: str = "read") -> Iterator[tuple]:
    """(item, read(item)) for each item in order, `readers` items read ahead in threads (GDAL
    decodes without the GIL); pending reads are cancelled when the caller stops early."""
    pool = ThreadPoolExecutor(max_workers=max(1, readers), thread_name_prefix=name)
    pending: deque = deque()
    try:
        for item in items:
            pending.append((item, pool.submit(read, item)))
            if len(pending) > readers:
                first, future = pending.popleft()
                yield first, future.result()
        while pending:
            first, future = pending.popleft()
            yield first, future.result()
    finally:
        for _, future in pending:
            future.cancel()
        pool.shutdown(wait=True)
