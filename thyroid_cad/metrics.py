"""Classification metrics shared by training (training/evaluate.py) and the service's live
performance endpoint (service/store/performance.py): ROC AUC with a stratified bootstrap CI,
Wilson intervals, confusion-derived metrics at a threshold, calibration (ECE, temperature).

Conventions
-----------
* ``labels`` are integer class indices ``(N,)``; ``probs`` are class probabilities ``(N, K)``.
* Binary helpers take ``y_true_binary`` in {0, 1} (or bool) where 1 / True is the positive
  ("malignant") class, and a real-valued positive-class ``scores`` array ``(N,)``.
* A sample is predicted positive when ``score >= threshold``.
* Undefined quantities (division by zero, AUC with a single class present) are ``nan``;
  malformed input (shape mismatch, non-finite values, out-of-range labels) raises ``ValueError``.

numpy and scipy only: the service imports this, never training/.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import optimize, special, stats

__all__ = [
    "apply_temperature",
    "auc_by_group",
    "binary_metrics",
    "bootstrap_auc_ci",
    "case_probabilities",
    "choose_threshold",
    "confusion",
    "expected_calibration_error",
    "fit_temperature",
    "roc_auc",
    "wilson",
]

_Z95 = 1.959963984540054  # two-sided 95% normal quantile, used for Wilson intervals
_PROB_CLIP = 1e-12
# Cap on elements per chunk of bootstrap index matrices (keeps memory ~ tens of MB).
_BOOT_CHUNK_ELEMS = 2_000_000


# --------------------------------------------------------------------------- validation


def _as_binary(y_true, name: str = "y_true_binary") -> np.ndarray:
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {y.shape}")
    if y.dtype == bool:
        return y
    if y.size and not np.all(np.isin(y, (0, 1))):
        bad = np.unique(y[~np.isin(y, (0, 1))])[:5]
        raise ValueError(f"{name} must contain only 0/1 (or bool); found e.g. {bad.tolist()}")
    return y.astype(bool)


def _as_scores(scores, n: int, name: str = "scores") -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {s.shape}")
    if s.shape[0] != n:
        raise ValueError(f"shape mismatch: {name} has {s.shape[0]} entries but labels have {n}")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"{name} contains non-finite values")
    return s


def _as_probs(probs, name: str = "probs") -> np.ndarray:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, K), got shape {p.shape}")
    if p.shape[1] < 2:
        raise ValueError(f"{name} must have at least 2 classes (columns), got {p.shape[1]}")
    if not np.all(np.isfinite(p)):
        raise ValueError(f"{name} contains non-finite values")
    return p


def _as_labels(labels, n: int, k: int, name: str = "labels") -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D integer class indices, got shape {y.shape}")
    if y.shape[0] != n:
        raise ValueError(f"shape mismatch: {name} has {y.shape[0]} entries but probs has {n} rows")
    if y.dtype == bool:
        y = y.astype(np.int64)
    elif not np.issubdtype(y.dtype, np.integer):
        yf = np.asarray(y, dtype=np.float64)
        if not np.all(np.isfinite(yf)) or np.any(yf != np.round(yf)):
            raise ValueError(f"{name} must be integer class indices")
        y = yf.astype(np.int64)
    y = y.astype(np.int64, copy=False)
    if y.size and (y.min() < 0 or y.max() >= k):
        raise ValueError(f"{name} must lie in [0, {k}); got range [{y.min()}, {y.max()}]")
    return y


def _div(num: float, den: float) -> float:
    return float(num) / float(den) if den != 0 else math.nan


# --------------------------------------------------------------------------- AUC


def _mann_whitney_auc(y: np.ndarray, s: np.ndarray) -> float:
    """ROC AUC = P(score_pos > score_neg) + 0.5 P(tie), via tie-averaged ranks."""
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = stats.rankdata(s)  # average ranks for ties
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _bootstrap_aucs(
    pos: np.ndarray, neg: np.ndarray, pos_idx: np.ndarray, neg_idx: np.ndarray
) -> np.ndarray:
    """AUC of each resample given index matrices ``pos_idx (B, m)`` and ``neg_idx (B, n)``.

    O(B * (m + n)) without per-resample sorting: the negatives are sorted once, the position of
    every positive score among them is precomputed, and each resample only needs the cumulative
    multiplicity of its drawn negatives (a bincount + cumsum).
    """
    b = pos_idx.shape[0]
    m, n = pos_idx.shape[1], neg_idx.shape[1]
    order = np.argsort(neg, kind="stable")
    neg_sorted = neg[order]
    rank_of = np.empty(neg.size, dtype=np.int64)
    rank_of[order] = np.arange(neg.size)
    lt = np.searchsorted(neg_sorted, pos, side="left")  # negatives strictly below each positive
    le = np.searchsorted(neg_sorted, pos, side="right")  # ... below or tied

    offs = np.arange(b, dtype=np.int64)[:, None]
    neg_counts = np.bincount(
        (rank_of[neg_idx] + offs * neg.size).ravel(), minlength=b * neg.size
    ).reshape(b, neg.size)
    cum = np.zeros((b, neg.size + 1), dtype=np.int64)
    np.cumsum(neg_counts, axis=1, out=cum[:, 1:])
    pos_counts = np.bincount((pos_idx + offs * pos.size).ravel(), minlength=b * pos.size).reshape(
        b, pos.size
    )
    below = cum[:, lt]  # (B, n_pos): drawn negatives strictly below positive i
    tied = cum[:, le] - below
    wins = (pos_counts * (2 * below + tied)).sum(axis=1) / 2.0
    return wins / (m * n)


def bootstrap_auc_ci(
    y_true, scores, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float, float]:
    """(auc, low, high): ROC AUC with a stratified percentile bootstrap CI.

    Positives and negatives are resampled separately (with replacement, keeping their counts),
    so each resample has both classes. Returns ``(nan, nan, nan)`` if only one class is present.
    """
    y = _as_binary(y_true, "y_true")
    s = _as_scores(scores, y.size)
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    auc = _mann_whitney_auc(y, s)
    if math.isnan(auc):
        return math.nan, math.nan, math.nan
    pos, neg = s[y], s[~y]
    rng = np.random.default_rng(seed)
    n_boot = int(n_boot)
    chunk = max(1, _BOOT_CHUNK_ELEMS // (pos.size + neg.size))
    aucs = np.empty(n_boot)
    for start in range(0, n_boot, chunk):
        bsz = min(chunk, n_boot - start)
        pos_idx = rng.integers(0, pos.size, size=(bsz, pos.size))
        neg_idx = rng.integers(0, neg.size, size=(bsz, neg.size))
        aucs[start : start + bsz] = _bootstrap_aucs(pos, neg, pos_idx, neg_idx)
    low, high = np.quantile(aucs, [alpha / 2.0, 1.0 - alpha / 2.0])
    return auc, float(low), float(high)


def auc_by_group(
    y_true, scores, groups, n_boot: int = 1000, seed: int = 0
) -> dict[str, tuple[float, float, float, int]]:
    """{group: (auc, low, high, n)}: :func:`bootstrap_auc_ci` within every group.

    Groups are e.g. image sources; a group with one class only gets nan AUC and CI.
    """
    y = _as_binary(y_true, "y_true")
    s = _as_scores(scores, y.size)
    g = np.asarray(groups)
    if g.shape != y.shape:
        raise ValueError(f"shape mismatch: groups has {g.shape[0]} entries but labels {y.size}")
    out = {}
    for name in sorted(set(g.tolist())):
        mask = g == name
        out[str(name)] = (*bootstrap_auc_ci(y[mask], s[mask], n_boot, seed=seed), int(mask.sum()))
    return out


def _macro_ovr_auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """Unweighted mean of one-vs-rest AUCs; nan if any class is absent or is the only class."""
    aucs = [_mann_whitney_auc(labels == k, probs[:, k]) for k in range(probs.shape[1])]
    return float(np.mean(aucs))  # nan propagates


# --------------------------------------------------------------------------- calibration


def _reliability_bins(
    labels_or_onehot, probs, n_bins: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width bin of top-label confidence: (mean confidence, accuracy, count).

    Bins are (lo, hi] except the first, which is [0, hi]. Empty bins give nan mean/accuracy.
    """
    if int(n_bins) < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    n_bins = int(n_bins)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 1:  # binary positive-class probability
        p = np.stack([1.0 - p, p], axis=1)
    p = _as_probs(p)
    y = np.asarray(labels_or_onehot)
    if y.ndim == 2:
        if y.shape != p.shape:
            raise ValueError(f"shape mismatch: one-hot labels {y.shape} vs probs {p.shape}")
        y = y.argmax(axis=1)
    y = _as_labels(y, p.shape[0], p.shape[1])
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    counts = np.bincount(idx, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / counts
        acc = np.bincount(idx, weights=correct, minlength=n_bins) / counts
    return mean_conf, acc, counts


def expected_calibration_error(y_true_onehot_or_labels, probs, n_bins: int = 10) -> float:
    """Top-label ECE for multiclass probs (N, K); equal-width confidence bins.

    ECE = sum_b (n_b / N) * |acc_b - conf_b|. Labels may be class indices (N,) or one-hot
    (N, K). A 1-D ``probs`` is read as the positive-class probability of a binary problem.
    Empty input gives nan.
    """
    mean_conf, acc, counts = _reliability_bins(y_true_onehot_or_labels, probs, n_bins)
    total = counts.sum()
    if total == 0:
        return math.nan
    nz = counts > 0
    return float(np.sum(counts[nz] / total * np.abs(acc[nz] - mean_conf[nz])))


def fit_temperature(logits_or_log_probs, labels) -> float:
    """Temperature scaling (Guo et al. 2017).

    Returns the scalar T > 0 minimising the mean NLL of ``softmax(z / T)`` on (validation) data,
    searched over log T in [log 0.01, log 100] with a bounded scalar minimiser. ``z`` may be
    logits or log-probabilities (``log_softmax`` outputs); both give the same calibrated probs.
    """
    z = _as_probs(logits_or_log_probs, "logits_or_log_probs")
    y = _as_labels(labels, z.shape[0], z.shape[1])
    if y.size == 0:
        raise ValueError("fit_temperature needs at least one sample")
    rows = np.arange(y.size)

    def nll(log_t: float) -> float:
        return float(-special.log_softmax(z / math.exp(log_t), axis=1)[rows, y].mean())

    res = optimize.minimize_scalar(
        nll, bounds=(math.log(1e-2), math.log(1e2)), method="bounded", options={"xatol": 1e-6}
    )
    return float(math.exp(res.x))


def apply_temperature(probs, T: float) -> np.ndarray:
    """softmax(log(probs) / T) along the last axis; probs are clipped at 1e-12 first."""
    if not (math.isfinite(T) and T > 0):
        raise ValueError(f"temperature must be finite and > 0, got {T}")
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim < 1 or not np.all(np.isfinite(p)):
        raise ValueError("probs must be a finite array of class probabilities")
    return special.softmax(np.log(np.clip(p, _PROB_CLIP, 1.0)) / T, axis=-1)


# --------------------------------------------------------------------------- thresholds


def choose_threshold(y_true_binary, scores, target_sensitivity: float = 0.90) -> float:
    """Operating threshold: sensitivity >= target, best specificity, widest margin.

    Sensitivity only changes at positive scores, so the largest admissible threshold is
    the k-th largest positive score, k the smallest count with ``k / n_pos >= target``
    (the same float comparison :func:`binary_metrics` makes); specificity is maximal
    there. Every threshold down to the next negative score below it keeps that
    specificity and at least that sensitivity, so the midpoint of that gap is returned:
    on a well-separated validation set the largest admissible threshold sits right on a
    positive score (often ~1.0), and new data would fall on the wrong side of it.
    Returns nan when there are no positives.
    """
    y = _as_binary(y_true_binary)
    s = _as_scores(scores, y.size)
    if not 0.0 < target_sensitivity <= 1.0:
        raise ValueError(f"target_sensitivity must be in (0, 1], got {target_sensitivity}")
    pos = np.sort(s[y])[::-1]
    n_pos = pos.size
    if n_pos == 0:
        return math.nan
    ks = np.arange(1, n_pos + 1)
    k = int(ks[np.argmax(ks / n_pos >= target_sensitivity)])  # last entry always qualifies
    highest = float(pos[k - 1])
    below = s[~y][s[~y] < highest]
    if below.size == 0:
        return highest
    middle = (float(below.max()) + highest) / 2
    return middle if middle > below.max() else highest


def wilson(k: float, n: float, z: float = _Z95) -> tuple[float, float]:
    """Wilson score 95% interval of the proportion k / n ((nan, nan) when n is 0)."""
    if n <= 0:
        return math.nan, math.nan
    p = k / n
    denom = 1.0 + z * z / n
    center = (p + z * z / (2.0 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z * z / (4.0 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def binary_metrics(y_true_binary, scores, threshold: float) -> dict[str, float]:
    """Confusion-derived metrics at ``threshold`` (positive iff ``score >= threshold``).

    Keys: sensitivity, specificity, ppv, npv, f1, accuracy, balanced_accuracy (mean of
    sensitivity and specificity; nan if either is), tp, fp, tn, fn, and Wilson 95% intervals
    sensitivity_ci_low/high, specificity_ci_low/high. Zero denominators give nan.
    """
    y = _as_binary(y_true_binary)
    s = _as_scores(scores, y.size)
    pred = s >= threshold  # nan threshold -> nothing predicted positive
    tp = float(np.sum(pred & y))
    fp = float(np.sum(pred & ~y))
    tn = float(np.sum(~pred & ~y))
    fn = float(np.sum(~pred & y))
    sens = _div(tp, tp + fn)
    spec = _div(tn, tn + fp)
    sens_lo, sens_hi = wilson(tp, tp + fn)
    spec_lo, spec_hi = wilson(tn, tn + fp)
    return {
        "sensitivity": sens,
        "specificity": spec,
        "ppv": _div(tp, tp + fp),
        "npv": _div(tn, tn + fn),
        "f1": _div(2.0 * tp, 2.0 * tp + fp + fn),
        "accuracy": _div(tp + tn, y.size),
        "balanced_accuracy": (sens + spec) / 2.0,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "sensitivity_ci_low": sens_lo,
        "sensitivity_ci_high": sens_hi,
        "specificity_ci_low": spec_lo,
        "specificity_ci_high": spec_hi,
    }


def confusion(labels, probs) -> np.ndarray:
    """K x K argmax confusion matrix of counts (rows = true class, columns = predicted)."""
    p = _as_probs(probs)
    k = p.shape[1]
    y = _as_labels(labels, p.shape[0], k)
    pred = p.argmax(axis=1)
    return np.bincount(y * k + pred, minlength=k * k).reshape(k, k)


def roc_auc(y_true, scores) -> float:
    """ROC AUC (Mann-Whitney, ties count half); nan with a single class present."""
    y = _as_binary(y_true, "y_true")
    return _mann_whitney_auc(y, _as_scores(scores, y.size))


# --------------------------------------------------------------------------- cases

CASE_AGGREGATION = "mean of the class probabilities of the case's frames"


def case_probabilities(probs, case_ids) -> tuple[np.ndarray, list]:
    """(C x K probabilities, the C case ids in order of first appearance): one row per
    case, the mean of its frames' rows (CASE_AGGREGATION).

    The one aggregation of several frames of one nodule: training's case-level AUC and
    the service's multi-frame answer both use it.
    """
    p = _as_probs(probs)
    ids = list(case_ids)
    if len(ids) != p.shape[0]:
        raise ValueError(f"shape mismatch: {len(ids)} case ids for {p.shape[0]} rows")
    order = list(dict.fromkeys(ids))
    index = {c: i for i, c in enumerate(order)}
    rows = np.array([index[c] for c in ids], dtype=np.int64)
    sums = np.zeros((len(order), p.shape[1]))
    np.add.at(sums, rows, p)
    return sums / np.bincount(rows, minlength=len(order))[:, None], order
