"""Raster work as Dask tasks: a local cluster of worker processes, or an existing scheduler.

Each task does one independent piece (a tile, or a band of rows of one large raster) and
writes its own output atomically, so a lost worker costs only its task and a rerun skips
what is finished. Without a cluster the same tasks run here, one after another.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

from tqdm.auto import tqdm

from aether.core.log import log
from aether.model.devices import usable_cores
from aether.core.errors import AetherError, first_line


def check_cluster_args(workers: int | None, scheduler: str | None) -> None:
    if workers is not None and scheduler is not None:
        raise AetherError("give --workers (a local Dask cluster) or --scheduler (an existing one), not both")
    if workers is not None and workers < 1:
        raise AetherError(f"--workers must be 1 or more, got {workers}")
    if workers is not None and workers > usable_cores():
        raise AetherError(f"--workers {workers} is more worker processes than the {usable_cores()} cores this process "
                          f"may use; give at most {usable_cores()} (more machines: --scheduler with a Dask cluster)")
    if scheduler is not None and "://" not in scheduler:
        raise AetherError(f"--scheduler must be a Dask scheduler address such as tcp://HOST:8786, got {scheduler!r}")


@contextmanager
def dask_client(workers: int | None = None, scheduler: str | None = None) -> Iterator[Any]:
    """A dask.distributed Client for `scheduler` (tcp://HOST:PORT), or for a new local cluster of
    `workers` processes with one task each (PyTorch and GDAL threads split the cores between
    them); None when neither is given, and tasks then run in this process."""
    check_cluster_args(workers, scheduler)
    if workers is None and scheduler is None:
        yield None
        return
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise AetherError("Dask is not installed: pip install 'dask[distributed]'") from None
    if scheduler is not None:
        try:
            client = Client(scheduler, timeout="20s")
        except (OSError, TimeoutError) as exc:
            raise AetherError(f"cannot reach Dask scheduler {scheduler}: {exc}") from None
        n = len(client.scheduler_info().get("workers", {}))
        log(f"Dask: scheduler {scheduler} with {n} workers")
        try:
            yield client
        finally:
            client.close()
        return
    threads = str(max(1, usable_cores() // workers))
    env = {name: threads for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    env["GDAL_NUM_THREADS"] = threads
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                           silence_logs=logging.ERROR, env=env)
    client = Client(cluster)
    log(f"Dask: local cluster of {workers} worker processes, {threads} threads each")
    try:
        yield client
    finally:
        client.close()
        cluster.close()


def run_tasks(client, fn: Callable, tasks: Sequence[tuple], weights: Sequence[float] | None = None,
              desc: str = "tasks", unit: str = "task", progress: bool = True,
              on_result: Callable | None = None) -> list:
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

        futures = [client.submit(fn, *task, pure=False) for task in tasks]
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
                    raise AetherError(f"a Dask task failed ({type(exc).__name__}: {first_line(exc)}); "
                                      f"run the same command again: finished outputs are skipped") from exc
                results[i] = result
                if on_result is not None:
                    on_result(i, result)
                bar.update(weights[i])
            return results
        finally:
            client.cancel([f for f in futures if not f.done()])
    finally:
        bar.close()
