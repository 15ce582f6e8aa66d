"""Raster work as Dask tasks: a local cluster of worker processes, or an existing scheduler.

Each task does one independent piece (a tile, or a band of rows of one large raster) and
writes its own output atomically, so a lost worker costs only its task and a rerun skips
what is finished. Without a cluster the same tasks run here, one after another.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from aether.core.errors import AetherError, first_line, install_hint
from aether.core.runtime import keep_tile_buffers, usable_cores

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cluster:
    """Where tasks run: `workers` local Dask worker processes, or the existing Dask cluster at
    `scheduler` (tcp://HOST:PORT); neither: one after another in this process."""

    workers: int | None = None
    scheduler: str | None = None

    @property
    def given(self) -> bool:
        return self.workers is not None or self.scheduler is not None

    def check(self) -> Cluster:
        """Refuse, before any work, a cluster that cannot be asked for; returns itself."""
        workers, scheduler = self.workers, self.scheduler
        if workers is not None and scheduler is not None:
            raise AetherError("give --workers (a local Dask cluster) or --scheduler (an existing one), not both")
        if workers is not None and workers < 1:
            raise AetherError(f"--workers must be 1 or more, got {workers}")
        if workers is not None and workers > usable_cores():
            raise AetherError(
                f"--workers {workers} is more worker processes than the {usable_cores()} cores this "
                f"process may use; give at most {usable_cores()} (more machines: --scheduler with a "
                f"Dask cluster)"
            )
        if scheduler is not None and "://" not in scheduler:
            raise AetherError(
                f"--scheduler must be a Dask scheduler address such as tcp://HOST:8786, got {scheduler!r}"
            )
        return self


@contextmanager
def dask_client(cluster: Cluster | None = None) -> Iterator[Any]:
    """A dask.distributed Client for the cluster's scheduler, or for a new local cluster of its
    `workers` processes with one task each (PyTorch and GDAL threads split the cores between
    them); None when no cluster is given, and tasks then run in this process."""
    cluster = (cluster or Cluster()).check()
    if not cluster.given:
        yield None
        return
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise AetherError(f"Dask is not installed: {install_hint('dask')}") from None
    if cluster.scheduler is not None:
        try:
            client = Client(cluster.scheduler, timeout="20s")
        except (OSError, TimeoutError) as exc:
            raise AetherError(f"cannot reach Dask scheduler {cluster.scheduler}: {exc}") from None
        n = len(client.scheduler_info().get("workers", {}))
        logger.info(f"Dask: scheduler {cluster.scheduler} with {n} workers")
        try:
            yield client
        finally:
            client.close()
        return
    threads = str(max(1, usable_cores() // cluster.workers))
    env = {name: threads for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    env["GDAL_NUM_THREADS"] = threads
    local = LocalCluster(
        n_workers=cluster.workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        silence_logs=logging.ERROR,
        env=env,
    )
    client = Client(local)
    logger.info(f"Dask: local cluster of {cluster.workers} worker processes, {threads} threads each")
    try:
        yield client
    finally:
        client.close()
        local.close()


def _in_worker(fn: Callable, *args):
    """A task as a worker runs it: with the process settings AETHER's command line gives its own
    process (`aether.core.runtime.keep_tile_buffers`), which a worker's process has not had."""
    keep_tile_buffers()
    return fn(*args)


def run_tasks(
    client,
    fn: Callable,
    tasks: Sequence[tuple],
    weights: Sequence[float] | None = None,
    desc: str = "tasks",
    unit: str = "task",
    progress: bool = True,
    on_result: Callable | None = None,
) -> list:
    """fn(*task) for every task, on the cluster's workers (or here when `client` is None); the
    results in task order. As each task ends, `on_result(task_index, result)` runs here and the
    bar advances by its weight (e.g. its pixels). The first task to fail cancels the rest and its
    error is raised here."""
    weights = list(weights) if weights is not None else [1] * len(tasks)
    bar = tqdm(total=sum(weights), desc=desc, unit=unit, unit_scale=True, disable=not progress or not tasks)
    try:
        if client is None:
            results = []
            for task, weight in zip(tasks, weights):
                results.append(fn(*task))
                if on_result is not None:
                    on_result(len(results) - 1, results[-1])
                bar.update(weight)
            return results
        from distributed import as_completed

        futures = [client.submit(_in_worker, fn, *task, pure=False) for task in tasks]
        index_of = {f.key: i for i, f in enumerate(futures)}
        results = [None] * len(tasks)
        try:
            for future in as_completed(futures):
                i = index_of[future.key]
                try:
                    result = future.result()  # raises the task's own error
                except AetherError:
                    raise
                except Exception as exc:  # a lost worker, a worker without aether, a bug in a task
                    raise AetherError(
                        f"a Dask task failed ({type(exc).__name__}: {first_line(exc)}); "
                        f"run the same command again: finished outputs are skipped"
                    ) from exc
                results[i] = result
                if on_result is not None:
                    on_result(i, result)
                bar.update(weights[i])
            return results
        finally:
            client.cancel([f for f in futures if not f.done()])
    finally:
        bar.close()
