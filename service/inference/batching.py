"""Dynamic batching for one model, in the vocabulary of Triton's dynamic batcher.

Requests (each one or more prepared frames) wait in a bounded queue; one worker thread
takes whole requests until the batch holds `max_batch_size` frames or the oldest
request has waited `max_queue_delay`, runs them as one onnxruntime call and hands each
request its rows. A request larger than `max_batch_size` runs as a batch of its own.
When the queue holds `max_queue_size` frames, new requests are refused at once
(`Overloaded` -> 503 with Retry-After) instead of waiting without bound.

The worker also serialises inference: on a CPU host onnxruntime already spreads one
call over every core, so concurrent `session.run` calls only oversubscribe them.

With `max_batch_size` 1 (the CPU default: batches gain nothing there) there is nothing to
gather, so a request runs in its own thread, one at a time under a lock, with the same
queue limit: handing it to the worker and back cost two thread wake-ups, each waiting for
the GIL behind whatever Python code runs meanwhile (up to the 5 ms switch interval; this
was most of the gap between inference in the service and in a bare session).

Hot swap: `close()` lets the worker finish every request already queued, then stop;
a request that reaches a closed batcher (it took its model reference just before the
swap) runs directly in its own thread. Nothing queued is dropped.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

Outputs = dict[str, np.ndarray]  # the graph's outputs by name, each N x ...


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int = 1
    max_queue_delay_s: float = 0.002
    max_queue_size: int = 64

    def __post_init__(self):
        if self.max_batch_size < 1 or self.max_queue_size < 1 or self.max_queue_delay_s < 0:
            raise ValueError(f"invalid batch policy {self}")


class Overloaded(Exception):
    """The queue is full; the caller should answer 503 and ask the client to retry."""

    def __init__(self, queued: int, limit: int, retry_after_s: int):
        super().__init__(f"{queued} images queued (limit {limit})")
        self.retry_after_s = retry_after_s


@dataclass
class _Request:
    frames: np.ndarray
    enqueued: float = field(default_factory=time.perf_counter)
    done: threading.Event = field(default_factory=threading.Event)
    outputs: Outputs | None = None
    error: BaseException | None = None
    queue_s: float = 0.0
    batch_size: int = 0


@dataclass(frozen=True)
class Result:
    outputs: Outputs  # every output of the graph, by name (rows of this request only)
    queue_s: float  # time spent waiting before its batch ran
    batch_size: int  # frames in the onnxruntime call that served it

    @property
    def probabilities(self) -> np.ndarray:
        return self.outputs["probabilities"]

    @property
    def heatmap(self) -> np.ndarray | None:
        return self.outputs.get("heatmap")


class Batcher:
    def __init__(
        self,
        run: Callable[[np.ndarray], Outputs],
        policy: BatchPolicy,
        name: str = "",
        on_batch: Callable[[int, float], None] | None = None,
    ):
        """`on_batch(frames, seconds)` is told of every onnxruntime call (for metrics)."""
        self._run, self.policy, self.name = run, policy, name
        self._on_batch = on_batch or (lambda frames, seconds: None)
        self._queue: collections.deque[_Request] = collections.deque()
        self._queued_frames = 0
        self._cond = threading.Condition()
        self._closed = False
        self._busy_s = 0.0  # recent time per batch, for Retry-After
        self._inline = threading.Lock()  # max_batch_size 1: one caller runs at a time
        self._thread = threading.Thread(target=self._work, daemon=True, name=f"batcher-{name}")
        self._thread.start()

    @property
    def queued(self) -> int:
        """Frames waiting now."""
        return self._queued_frames

    def describe(self) -> dict:
        """The policy in the units of the settings, and the queue now (for /v1/models)."""
        return {
            "max_batch_size": self.policy.max_batch_size,
            "max_queue_delay_ms": self.policy.max_queue_delay_s * 1e3,
            "max_queue_size": self.policy.max_queue_size,
            "queued": self._queued_frames,
        }

    def _admit(self, frames: np.ndarray) -> None:
        """Count `frames` as queued, or raise Overloaded (call with the condition held)."""
        if self._queued_frames + len(frames) > self.policy.max_queue_size and self._queued_frames:
            per_frame = self._busy_s / max(self.policy.max_batch_size, 1)
            wait = per_frame * self._queued_frames
            raise Overloaded(self._queued_frames, self.policy.max_queue_size, max(1, round(wait)))
        self._queued_frames += len(frames)

    def submit(self, frames: np.ndarray) -> Result:
        """Run `frames` (N x S x S x 3 uint8) in some batch; blocks until done."""
        if self.policy.max_batch_size == 1:
            return self._run_inline(frames)
        request = _Request(frames)
        with self._cond:
            closed = self._closed
            if not closed:
                self._admit(frames)
                self._queue.append(request)
                self._cond.notify()
        if closed:  # outside the lock: the worker may still be draining the queue
            return Result(self._run(frames), 0.0, len(frames))
        request.done.wait()
        if request.error is not None:
            raise request.error
        return Result(request.outputs, request.queue_s, request.batch_size)

    def _run_inline(self, frames: np.ndarray) -> Result:
        """Batches of one: run in the caller's thread, one caller at a time (see above)."""
        enqueued = time.perf_counter()
        with self._cond:
            self._admit(frames)
        try:
            self._wait_turn()
        finally:
            with self._cond:
                self._queued_frames -= len(frames)  # running now, no longer queued
        try:
            start = time.perf_counter()
            out = self._run(frames)
            took = time.perf_counter() - start
        finally:
            self._inline.release()
        self._busy_s = 0.8 * self._busy_s + 0.2 * took if self._busy_s else took
        n = len(frames)
        rows = {name: value[:n] for name, value in out.items()}  # as the worker splits them
        try:
            self._on_batch(n, took)
        except Exception:  # noqa: BLE001 - metrics must never stop inference
            log.exception("batch hook failed for %s", self.name)
        return Result(rows, start - enqueued, n)

    def _wait_turn(self) -> None:
        """Wait for the session (its own frame, so a profile can tell waiting from work)."""
        self._inline.acquire()

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop taking requests; finish those queued, then end the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)

    # -- worker -------------------------------------------------------------------
    def _take(self) -> list[_Request] | None:
        """The next batch: whole requests, at most max_batch_size frames (or one request)."""
        policy = self.policy
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            deadline = self._queue[0].enqueued + policy.max_queue_delay_s
            while self._queued_frames < policy.max_batch_size and not self._closed:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch, frames = [], 0
            while self._queue and (
                not batch or frames + len(self._queue[0].frames) <= policy.max_batch_size
            ):
                request = self._queue.popleft()
                batch.append(request)
                frames += len(request.frames)
            self._queued_frames -= frames
            return batch

    def _work(self) -> None:
        while (batch := self._take()) is not None:
            try:
                self._serve(batch)
            except BaseException as e:  # noqa: BLE001 - handed to every waiting request
                for r in batch:
                    if not r.done.is_set():
                        r.error = e
                        r.done.set()

    def _serve(self, batch: list[_Request]) -> None:
        """Run one batch and hand each request its rows."""
        start = time.perf_counter()
        frames = batch[0].frames if len(batch) == 1 else np.concatenate([r.frames for r in batch])
        out = self._run(frames)
        took = time.perf_counter() - start
        self._busy_s = 0.8 * self._busy_s + 0.2 * took if self._busy_s else took
        outputs, row = [], 0
        for r in batch:  # split first: a malformed output fails every request alike
            n = len(r.frames)
            outputs.append({name: value[row : row + n] for name, value in out.items()})
            row += n
        for r, out in zip(batch, outputs, strict=True):
            r.outputs, r.queue_s, r.batch_size = out, start - r.enqueued, len(frames)
            r.done.set()
        try:
            self._on_batch(len(frames), took)
        except Exception:  # noqa: BLE001 - metrics must never stop inference
            log.exception("batch hook failed for %s", self.name)
