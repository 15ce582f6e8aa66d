"""The read -> compute -> write pipeline: task order, and errors from any stage."""

import threading
import time

import pytest

from aether.core.pipeline import run_pipeline


@pytest.mark.parametrize("workers", [1, 3])
def test_results_are_written_in_task_order(workers):
    written, threads = [], set()

    def compute(task, data):
        threads.add(threading.get_ident())
        time.sleep(0.001 * ((7 * task) % 5))  # later tasks often finish first
        return data * 2

    run_pipeline(
        lambda: ((i, i) for i in range(40)),
        compute,
        lambda task, result: written.append((task, result)),
        workers=workers,
    )
    assert written == [(i, 2 * i) for i in range(40)]
    assert (len(threads) > 1) == (workers > 1)


@pytest.mark.parametrize("stage", ["produce", "compute", "consume"])
@pytest.mark.parametrize("workers", [1, 2])
def test_an_error_in_any_stage_is_raised_here(stage, workers):
    def produce():
        for i in range(50):
            if stage == "produce" and i == 10:
                raise ValueError("bad read")
            yield i, i

    def compute(task, data):
        if stage == "compute" and task == 10:
            raise ValueError("bad compute")
        return data

    def consume(task, result):
        if stage == "consume" and task == 10:
            raise ValueError("bad write")

    with pytest.raises(ValueError, match="bad"):
        run_pipeline(produce, compute, consume, workers=workers)
