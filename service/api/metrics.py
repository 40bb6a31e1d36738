"""Prometheus metrics of one service process (its own registry, so tests can build many)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "thyroid_cad_requests",
            "Predict requests.",
            ["route", "model_version", "status"],
            registry=r,
        )
        self.errors = Counter(
            "thyroid_cad_request_errors",
            "Predict requests that failed.",
            ["route", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "thyroid_cad_request_seconds",
            "Predict latency.",
            ["route", "model_version"],
            registry=r,
        )
        self.inference = Histogram(
            "thyroid_cad_inference_seconds",
            "onnxruntime time per call (one batch).",
            ["model_version"],
            registry=r,
            buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
        )
        self.batch = Histogram(
            "thyroid_cad_batch_size",
            "Images per inference call.",
            registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64),
        )
        self.queue_time = Histogram(
            "thyroid_cad_queue_seconds",
            "Time a request waited in the batcher's queue before its batch ran.",
            ["model_version"],
            registry=r,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2),
        )
        self.rejected = Counter(
            "thyroid_cad_rejected",
            "Requests refused because the batcher's queue was full (503).",
            ["model_version"],
            registry=r,
        )
        self.ood_flagged = Counter(
            "thyroid_cad_ood_flagged",
            "Requests with an image out of distribution (answered with the flag: status 200, "
            "or refused: 422), per model version: a site sending something new shows here.",
            ["model_version", "status"],
            registry=r,
        )
        # Live performance against recorded outcomes, as of the last GET /v1/performance
        # (or `thyroid-cad performance log`) for that model version.
        self.live = {
            name: Gauge(
                f"thyroid_cad_live_{name}",
                f"Live {text} over requests with a binary outcome (GET /v1/performance).",
                ["model_version", "distribution"],
                registry=r,
            )
            for name, text in (
                ("n", "number of requests"),
                ("auc", "ROC AUC"),
                ("sensitivity", "sensitivity at the card's operating point"),
                ("specificity", "specificity at the card's operating point"),
                ("ece", "expected calibration error"),
            )
        }
        self.drift = Gauge(
            "thyroid_cad_live_drift_warning",
            "1 when live sensitivity's 95% CI upper bound is below the card's target.",
            ["model_version"],
            registry=r,
        )
        self.loads = Counter("thyroid_cad_model_loads", "Model loads.", ["result"], registry=r)
        self.swaps = Counter("thyroid_cad_model_swaps", "Champion swaps.", registry=r)
        self.registry_up = Gauge(
            "thyroid_cad_registry_reachable", "1 if the registry answered.", registry=r
        )
        self.from_cache = Gauge(
            "thyroid_cad_model_from_cache",
            "1 if the served model came from the local cache.",
            registry=r,
        )
        self.spooled = Gauge(
            "thyroid_cad_audit_spooled", "Audit records waiting for the DB.", registry=r
        )

    def event(self, kind: str, **labels) -> None:
        if kind == "load":
            self.loads.labels(**labels).inc()
        elif kind == "swap":
            self.swaps.inc()
        elif kind == "batch":  # one onnxruntime call of a batcher
            self.batch.observe(labels["frames"])
            self.inference.labels(labels["model_version"]).observe(labels["seconds"])
