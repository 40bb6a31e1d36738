"""Inference statistics per model version, in the shape of Triton's statistics extension.

Counted from two places that every way of scoring passes through: the batcher's calls
(`event("batch", ...)`: executions, frames, compute time per batch size) and the audit
record of each answered request (`request(record)`: success or failure, the time spent
queued, decoding and preparing, in onnxruntime, and the rest). /v2/models/{name}/stats
serves them as Triton does, so `tritonclient`'s `get_inference_statistics` reads them.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict

STAGES = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")
BATCH_STAGES = ("compute_input", "compute_infer", "compute_output")


def _ns(ms: float | None) -> int:
    return int(round((ms or 0.0) * 1e6))


class _Version:
    def __init__(self) -> None:
        self.stages = {s: [0, 0] for s in STAGES}  # [count, ns]
        self.batches: dict[int, dict[str, list[int]]] = defaultdict(
            lambda: {s: [0, 0] for s in BATCH_STAGES}
        )
        self.inference_count = 0  # frames run
        self.execution_count = 0  # onnxruntime calls
        self.last_inference_ms = 0


class InferenceStats:
    """Thread-safe counters; `triton(name, versions)` gives the extension's JSON."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._versions: dict[int, _Version] = defaultdict(_Version)

    def event(self, kind: str, **labels) -> None:
        """A model manager event; only `batch` (one onnxruntime call) counts here."""
        if kind != "batch":
            return
        frames, ns = int(labels["frames"]), int(labels["seconds"] * 1e9)
        with self._lock:
            v = self._versions[int(labels["model_version"])]
            v.execution_count += 1
            v.inference_count += frames
            v.last_inference_ms = int(time.time() * 1e3)
            stage = v.batches[frames]["compute_infer"]
            stage[0], stage[1] = stage[0] + 1, stage[1] + ns

    def request(self, record: dict) -> None:
        """One answered request, from its audit record (none without a model version)."""
        version = record.get("model_version")
        if version is None:
            return
        t = record.get("timings") or {}
        total = _ns(t.get("total_ms"))
        inputs = _ns(t.get("decode_ms")) + _ns(t.get("preprocess_ms"))
        queue, infer = _ns(t.get("queue_ms")), _ns(t.get("inference_ms"))
        ok = record.get("status_code") == 200
        with self._lock:
            v = self._versions[int(version)]
            self._add(v, "success" if ok else "fail", total)
            if ok:
                self._add(v, "queue", queue)
                self._add(v, "compute_input", inputs)
                self._add(v, "compute_infer", infer)
                # Encoding the answer (heatmaps, JSON, binary outputs) and the checks.
                self._add(v, "compute_output", max(0, total - inputs - queue - infer))

    @staticmethod
    def _add(v: _Version, stage: str, ns: int) -> None:
        v.stages[stage][0] += 1
        v.stages[stage][1] += ns

    def triton(self, name: str, versions: list[int]) -> dict:
        """`{"model_stats": [...]}` for these versions, as Triton's statistics extension."""
        with self._lock:
            return {"model_stats": [self._one(name, n) for n in versions]}

    def _one(self, name: str, number: int) -> dict:
        v = self._versions.get(number) or _Version()
        return {
            "name": name,
            "version": str(number),
            "last_inference": v.last_inference_ms,
            "inference_count": v.inference_count,
            "execution_count": v.execution_count,
            "inference_stats": {
                **{s: {"count": c, "ns": ns} for s, (c, ns) in v.stages.items()},
                "cache_hit": {"count": 0, "ns": 0},  # no response cache
                "cache_miss": {"count": 0, "ns": 0},
            },
            "batch_stats": [
                {"batch_size": size, **{s: {"count": c, "ns": ns} for s, (c, ns) in b.items()}}
                for size, b in sorted(v.batches.items())
            ],
        }

    def versions(self) -> list[int]:
        """The versions that have statistics."""
        with self._lock:
            return sorted(self._versions)
