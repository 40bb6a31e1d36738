"""Live performance of a model version against recorded outcomes (docs/safety.md).

Over the answered requests (status 200, with probabilities) of one model version since
a date whose latest outcome is benign or malignant (service/store/outcomes.py): n, ROC AUC
with a stratified bootstrap 95% CI, sensitivity and specificity at the card's
operating point with Wilson 95% CIs, and the expected calibration error of
P(positive class): the functions training reports validation with (thyroid_cad.metrics),
so live and validation numbers are comparable. The same again for the images in and
out of distribution. A drift warning is raised when the upper end of live
sensitivity's CI is below the card's target sensitivity: the operating point no longer
delivers what it was chosen for, beyond what chance explains.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import numpy as np
from sqlalchemy import select

from service.store.db import RequestRecord, _as_utc
from service.store.outcomes import OutcomeStore
from thyroid_cad import metrics

N_BOOT = 1000


def _num(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 6)


def block(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, Any]:
    """n, AUC, sensitivity, specificity (each with its 95% CI) and ECE of one group."""
    y = np.asarray(y, bool)
    p = np.asarray(p, np.float64)
    out: dict[str, Any] = {
        "n": int(y.size),
        "positives": int(y.sum()),
        "negatives": int((~y).sum()),
    }
    if y.size == 0:
        empty = {"value": None, "ci_low": None, "ci_high": None}
        return {**out, "auc": empty, "sensitivity": empty, "specificity": empty, "ece": None}
    auc, low, high = metrics.bootstrap_auc_ci(y, p, n_boot=N_BOOT, seed=0)
    bm = metrics.binary_metrics(y, p, threshold)
    return {
        **out,
        "auc": {"value": _num(auc), "ci_low": _num(low), "ci_high": _num(high)},
        "sensitivity": {
            "value": _num(bm["sensitivity"]),
            "ci_low": _num(bm["sensitivity_ci_low"]),
            "ci_high": _num(bm["sensitivity_ci_high"]),
        },
        "specificity": {
            "value": _num(bm["specificity"]),
            "ci_low": _num(bm["specificity_ci_low"]),
            "ci_high": _num(bm["specificity_ci_high"]),
        },
        "ece": _num(metrics.expected_calibration_error(y.astype(int), p)),
    }


def rows(
    engine, model_name: str, model_version: int, since: datetime | None
) -> list[dict[str, Any]]:
    """Answered requests of a model version (since a date): id, probabilities, verdict."""
    table = RequestRecord.__table__
    conditions = [
        table.c.model_name == model_name,
        table.c.model_version == model_version,
        table.c.status_code == 200,
        table.c.probabilities.is_not(None),
    ]
    if since is not None:
        conditions.append(table.c.created_at >= _as_utc(since))
    query = select(
        table.c.request_id, table.c.probabilities, table.c.in_distribution, table.c.created_at
    ).where(*conditions)
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(query).mappings()]


def compute(
    store: OutcomeStore,
    card: dict,
    model_name: str,
    model_version: int,
    since: datetime | None = None,
) -> dict[str, Any]:
    """The performance report of one model version (the JSON of GET /v1/performance)."""
    positive = card.get("positive_class", card["class_names"][-1])
    threshold = float(card["threshold"])
    target = card.get("target_sensitivity")
    outcomes = store.latest()
    ys, ps, ins = [], [], []
    with_outcome = indeterminate = 0
    for row in rows(store.engine, model_name, model_version, since):
        outcome = outcomes.get(row["request_id"])
        if outcome is None:
            continue
        with_outcome += 1
        if outcome["truth"] == "indeterminate":
            indeterminate += 1
            continue
        prob = (row["probabilities"] or {}).get(positive)
        if prob is None:
            continue
        ys.append(outcome["truth"] == "malignant")
        ps.append(float(prob))
        ins.append(row["in_distribution"] is not False)  # unknown (older rows): in
    y, p, inside = np.array(ys, bool), np.array(ps, np.float64), np.array(ins, bool)
    overall = block(y, p, threshold)
    high = overall["sensitivity"]["ci_high"]
    drift = target is not None and high is not None and high < float(target)
    return {
        "model": {"name": model_name, "version": model_version},
        "since": None if since is None else _as_utc(since).isoformat(),
        "computed_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "positive_class": positive,
        "threshold": threshold,
        "target_sensitivity": target,
        "requests_with_outcome": with_outcome,
        "indeterminate": indeterminate,
        "overall": overall,
        "in_distribution": block(y[inside], p[inside], threshold),
        "out_of_distribution": block(y[~inside], p[~inside], threshold),
        "drift_warning": {
            "active": bool(drift),
            "message": (
                f"live sensitivity {overall['sensitivity']['value']:.3f} (95% CI up to "
                f"{high:.3f}) is below the target {float(target):.2f} the operating point "
                "was chosen for"
            )
            if drift
            else None,
        },
        "validation": (card.get("metrics") or {}).get("val"),
        "test": (card.get("metrics") or {}).get("test"),
    }


def update_gauges(gauges: dict, drift, report: dict) -> None:
    """Prometheus gauges (service.api.metrics.Metrics.live) from a report."""
    version = str(report["model"]["version"])
    for part, label in (
        ("overall", "all"),
        ("in_distribution", "in"),
        ("out_of_distribution", "out"),
    ):
        data = report[part]
        gauges["n"].labels(version, label).set(data["n"])
        for name in ("auc", "sensitivity", "specificity"):
            value = data[name]["value"]
            gauges[name].labels(version, label).set(math.nan if value is None else value)
        gauges["ece"].labels(version, label).set(math.nan if data["ece"] is None else data["ece"])
    drift.labels(version).set(1.0 if report["drift_warning"]["active"] else 0.0)


def mlflow_metrics(report: dict) -> dict[str, float]:
    """The report as flat MLflow metrics: live_auc, live_auc_ci_low, ..., live_in_n."""
    out: dict[str, float] = {
        "live_requests_with_outcome": float(report["requests_with_outcome"]),
        "live_indeterminate": float(report["indeterminate"]),
        "live_drift_warning": 1.0 if report["drift_warning"]["active"] else 0.0,
    }
    for part, prefix in (
        ("overall", "live"),
        ("in_distribution", "live_in"),
        ("out_of_distribution", "live_out"),
    ):
        data = report[part]
        out[f"{prefix}_n"] = float(data["n"])
        for name in ("auc", "sensitivity", "specificity"):
            for key, suffix in (("value", ""), ("ci_low", "_ci_low"), ("ci_high", "_ci_high")):
                if data[name][key] is not None:
                    out[f"{prefix}_{name}{suffix}"] = float(data[name][key])
        if data["ece"] is not None:
            out[f"{prefix}_ece"] = float(data["ece"])
    return out
