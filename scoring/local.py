"""`--engine local`: a process pool on this machine, the model loaded once per worker.

The driver hands out small chunks of paths, collects the rows, and appends them to the
output every `flush_rows` rows, so an interruption (Ctrl-C, a killed worker) loses at
most that many images' work; the next run skips what was written.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait

from scoring import archive
from service.inference.models import Runtime

ENGINE = "local"


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def runtime_for(base: Runtime, workers: int) -> Runtime:
    """Each worker's onnxruntime takes its share of the cores, unless threads are set:
    N sessions each spreading over every core only fight over them."""
    if base.intra_op_threads:
        return base
    return dataclasses.replace(base, intra_op_threads=max(1, available_cores() // workers))


_worker: archive.Scorer | None = None


def _init_worker(files: archive.ModelFiles, runtime: Runtime, max_pixels: int) -> None:
    global _worker
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    _worker = archive.scorer_for(files, runtime, max_pixels, ENGINE)


def _score_chunk(paths: list[str]) -> list[dict]:
    return _worker.score_many((p, None) for p in paths)


def run(
    job: archive.Job,
    todo: list[str],
    workers: int,
    progress: Callable[[int], None] | None = None,
    chunk_size: int = 16,
    flush_rows: int = 512,
) -> int:
    """Score `todo` into job.out; returns the rows written. Rows are flushed before any
    exception (KeyboardInterrupt included) leaves."""
    if workers < 1:
        raise ValueError("--workers must be at least 1")
    progress = progress or (lambda n: None)
    runtime = runtime_for(job.runtime, workers)
    chunks = [todo[i : i + chunk_size] for i in range(0, len(todo), chunk_size)]
    buffer: list[dict] = []
    written = 0

    def take(rows: list[dict]) -> None:
        nonlocal written
        buffer.extend(rows)
        progress(len(rows))
        if len(buffer) >= flush_rows:
            archive.write_part(buffer, job.out, ENGINE)
            written += len(buffer)
            buffer.clear()

    try:
        if workers == 1:
            scorer = archive.scorer_for(job.files, runtime, job.max_pixels, ENGINE)
            for paths in chunks:
                take(scorer.score_many((p, None) for p in paths))
        else:
            _run_pool(job, runtime, chunks, workers, take)
    finally:
        archive.write_part(buffer, job.out, ENGINE)
        written += len(buffer)
    return written


def _run_pool(job, runtime, chunks, workers, take) -> None:
    # spawn: the driver holds threads (MLflow, the batcher), which fork would copy half-made.
    context = multiprocessing.get_context("spawn")
    pending: set[Future] = set()
    queue = iter(chunks)
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=_init_worker,
        initargs=(job.files, runtime, job.max_pixels),
    ) as pool:  # fmt: skip
        try:
            while True:
                while len(pending) < 2 * workers and (paths := next(queue, None)) is not None:
                    pending.add(pool.submit(_score_chunk, paths))
                if not pending:
                    break
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    take(future.result())
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
