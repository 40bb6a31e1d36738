"""Evaluation metrics, calibration and plots for the thyroid-nodule classifier.

Conventions
-----------
* ``labels`` are integer class indices ``(N,)``; ``probs`` are class probabilities ``(N, K)``.
* Binary helpers take ``y_true_binary`` in {0, 1} (or bool) where 1 / True is the positive
  ("malignant") class, and a real-valued positive-class ``scores`` array ``(N,)``.
* A sample is predicted positive when ``score >= threshold``.
* Undefined quantities (division by zero, AUC with a single class present) are ``nan``;
  malformed input (shape mismatch, non-finite values, out-of-range labels) raises ``ValueError``.

Nothing here imports TensorFlow; matplotlib is imported lazily inside :func:`save_plots` and
only through its object-oriented API (no pyplot, so no global figure state or backend change).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

# The metric functions live in thyroid_cad.metrics so the service's live performance
# numbers are computed by the very same code; re-exported here for training's callers.
from thyroid_cad.metrics import (  # noqa: F401
    CASE_AGGREGATION,
    _as_labels,
    _as_probs,
    _bootstrap_aucs,
    _macro_ovr_auc,
    _mann_whitney_auc,
    _reliability_bins,
    apply_temperature,
    auc_by_group,
    binary_metrics,
    bootstrap_auc_ci,
    case_probabilities,
    choose_threshold,
    confusion,
    expected_calibration_error,
    fit_temperature,
)

__all__ = [
    "apply_temperature",
    "auc_by_group",
    "binary_metrics",
    "bootstrap_auc_ci",
    "case_level",
    "choose_threshold",
    "confusion",
    "evaluate",
    "expected_calibration_error",
    "fit_temperature",
    "save_plots",
]

# --------------------------------------------------------------------------- split-level


def _positive_index(class_names: Sequence[str], positive: str) -> int:
    names = list(class_names)
    return names.index(positive) if positive in names else len(names) - 1


def _check_split(labels, probs, class_names) -> tuple[np.ndarray, np.ndarray]:
    p = _as_probs(probs)
    if len(class_names) != p.shape[1]:
        raise ValueError(
            f"shape mismatch: probs has {p.shape[1]} columns but {len(class_names)} class names"
        )
    y = _as_labels(labels, p.shape[0], p.shape[1])
    return y, p


def evaluate(
    labels,
    probs,
    class_names: Sequence[str],
    threshold: float | None = None,
    target_sensitivity: float = 0.90,
    positive: str = "malignant",
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """Full metric set for one split (flat dict of floats).

    Positive score = ``probs[:, class_names.index(positive)]`` (last class if absent). With
    ``threshold=None`` the threshold is chosen on these data by :func:`choose_threshold` (do
    this on validation) and reused for test by passing it in.

    Keys: auc, auc_ci_low, auc_ci_high (positive vs rest, stratified bootstrap), accuracy and
    balanced_accuracy (argmax over all classes; macro recall over classes present in
    ``labels``), threshold, sensitivity, specificity, ppv, npv, f1 and the Wilson CI keys
    (positive vs rest at the threshold), ece (top-label, 10 bins), brier (multiclass:
    mean_n sum_k (p_k - y_k)^2), and auc_macro_ovr when K > 2.
    """
    y, p = _check_split(labels, probs, class_names)
    if y.size == 0:
        raise ValueError("evaluate needs at least one sample")
    k = p.shape[1]
    pos_idx = _positive_index(class_names, positive)
    y_bin = y == pos_idx
    scores = p[:, pos_idx]

    auc, auc_lo, auc_hi = bootstrap_auc_ci(y_bin, scores, n_boot=n_boot, seed=seed)
    if threshold is None:
        threshold = choose_threshold(y_bin, scores, target_sensitivity)
    bm = binary_metrics(y_bin, scores, float(threshold))

    pred = p.argmax(axis=1)
    present = np.unique(y)
    recalls = [np.mean(pred[y == c] == c) for c in present]
    onehot = np.eye(k)[y]

    out: dict[str, float] = {
        "auc": auc,
        "auc_ci_low": auc_lo,
        "auc_ci_high": auc_hi,
        "accuracy": float(np.mean(pred == y)),
        "balanced_accuracy": float(np.mean(recalls)),
        "threshold": float(threshold),
    }
    for key in (
        "sensitivity",
        "specificity",
        "ppv",
        "npv",
        "f1",
        "sensitivity_ci_low",
        "sensitivity_ci_high",
        "specificity_ci_low",
        "specificity_ci_high",
    ):
        out[key] = bm[key]
    out["ece"] = expected_calibration_error(y, p)
    out["brier"] = float(np.mean(np.sum((p - onehot) ** 2, axis=1)))
    if k > 2:
        out["auc_macro_ovr"] = _macro_ovr_auc(y, p)
    return out


def case_level(
    labels,
    probs,
    case_ids: Sequence[str | None],
    class_names: Sequence[str],
    threshold: float,
    positive: str = "malignant",
    seed: int = 0,
) -> dict[str, float]:
    """:func:`evaluate` on one row per case instead of per frame, plus ``n_cases``.

    A case's probabilities are the mean of its frames' (thyroid_cad.metrics.
    CASE_AGGREGATION); its label is theirs. A frame without a case id is a case of its
    own; frames of one case id with different labels (not expected: DDTI labels are per
    case) count as one case per label rather than inventing a label. ``threshold`` is the
    frame-level one chosen on validation, so both levels decide alike.
    """
    y, p = _check_split(labels, probs, class_names)
    if len(case_ids) != y.size:
        raise ValueError(f"shape mismatch: {len(case_ids)} case ids for {y.size} frames")
    keys = [
        (f"case:{c}", int(label)) if c else (f"frame:{i}", int(label))
        for i, (c, label) in enumerate(zip(case_ids, y, strict=True))
    ]
    case_probs, order = case_probabilities(p, keys)
    case_labels = np.array([label for _, label in order])
    out = evaluate(case_labels, case_probs, class_names, threshold, positive=positive, seed=seed)
    return {**out, "n_cases": float(len(order))}


# --------------------------------------------------------------------------- plots


def save_plots(
    out_dir,
    labels,
    probs,
    class_names: Sequence[str],
    threshold: float,
    history: Mapping[str, Sequence[float]] | None = None,
    positive: str = "malignant",
) -> list[Path]:
    """Write roc.png, pr.png, confusion_matrix.png, reliability.png (+ learning_curves.png).

    ROC/PR are positive-vs-rest with the operating point at ``threshold`` marked. Uses
    matplotlib's object-oriented API only (``Figure`` + Agg canvas): no pyplot state, no backend
    switch. Returns the written paths in that order.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_curve

    y, p = _check_split(labels, probs, class_names)
    names = [str(c) for c in class_names]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pos_idx = _positive_index(names, positive)
    pos_name = names[pos_idx]
    y_bin = y == pos_idx
    scores = p[:, pos_idx]
    both = bool(y_bin.any() and (~y_bin).any())
    bm = binary_metrics(y_bin, scores, float(threshold))
    written: list[Path] = []

    def new_fig(w: float, h: float) -> Figure:
        fig = Figure(figsize=(w, h), layout="constrained")
        FigureCanvasAgg(fig)
        return fig

    def save(fig: Figure, name: str) -> None:
        path = out / name
        fig.savefig(path, dpi=110)
        fig.clear()
        written.append(path)

    # ROC
    fig = new_fig(5, 5)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    if both:
        fpr, tpr, _ = roc_curve(y_bin, scores)
        auc = _mann_whitney_auc(y_bin, scores)
        ax.plot(fpr, tpr, lw=2, label=f"{pos_name} vs rest (AUC = {auc:.3f})")
        op_x, op_y = 1.0 - bm["specificity"], bm["sensitivity"]
        ax.plot(
            op_x,
            op_y,
            "o",
            ms=8,
            color="C3",
            label=f"threshold {threshold:.3g}: sens {op_y:.2f}, spec {1 - op_x:.2f}",
        )
    else:
        ax.set_title("ROC undefined (single class)")
    ax.set(xlabel="1 - specificity (FPR)", ylabel="sensitivity (TPR)", xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower right", fontsize=8)
    save(fig, "roc.png")

    # Precision-recall
    fig = new_fig(5, 5)
    ax = fig.add_subplot()
    if both:
        prec, rec, _ = precision_recall_curve(y_bin, scores)
        ap = average_precision_score(y_bin, scores)
        ax.plot(rec, prec, lw=2, label=f"{pos_name} vs rest (AP = {ap:.3f})")
        ax.axhline(y_bin.mean(), ls="--", color="grey", lw=1, label="prevalence")
        if not math.isnan(bm["ppv"]):
            ax.plot(
                bm["sensitivity"],
                bm["ppv"],
                "o",
                ms=8,
                color="C3",
                label=f"threshold {threshold:.3g}",
            )
        ax.legend(loc="lower left", fontsize=8)
    else:
        ax.set_title("PR curve undefined (single class)")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", xlim=(0, 1), ylim=(0, 1.02))
    save(fig, "pr.png")

    # Confusion matrix (argmax)
    cm = confusion(y, p)
    k = len(names)
    fig = new_fig(1.6 + 1.1 * k, 1.4 + 1.0 * k)
    ax = fig.add_subplot()
    im = ax.imshow(cm, cmap="Blues", vmin=0)
    fig.colorbar(im, ax=ax, shrink=0.8)
    vmax = cm.max() if cm.size else 0
    for i in range(k):
        for j in range(k):
            ax.text(
                j,
                i,
                str(int(cm[i, j])),
                ha="center",
                va="center",
                color="white" if vmax and cm[i, j] > vmax / 2 else "black",
            )
    ax.set_xticks(range(k), names, rotation=30, ha="right")
    ax.set_yticks(range(k), names)
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix (argmax)")
    save(fig, "confusion_matrix.png")

    # Reliability diagram (top-label)
    n_bins = 10
    mean_conf, acc, counts = _reliability_bins(y, p, n_bins)
    ece = expected_calibration_error(y, p, n_bins)
    centers = (np.arange(n_bins) + 0.5) / n_bins
    nz = counts > 0
    fig = new_fig(5, 6)
    ax, ax_h = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    ax.bar(
        centers[nz], acc[nz], width=1.0 / n_bins, edgecolor="black", color="C0", label="accuracy"
    )
    ax.bar(
        centers[nz],
        mean_conf[nz] - acc[nz],
        bottom=acc[nz],
        width=1.0 / n_bins,
        color="C3",
        alpha=0.3,
        edgecolor="C3",
        hatch="//",
        label="gap to confidence",
    )
    ax.plot([0, 1], [0, 1], ls="--", color="grey", label="perfect calibration")
    ax.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title=f"Reliability (ECE = {ece:.3f})")
    ax.legend(loc="upper left", fontsize=8)
    ax_h.bar(centers, counts, width=1.0 / n_bins, edgecolor="black", color="grey")
    ax_h.set(xlabel="top-label confidence", ylabel="count")
    save(fig, "reliability.png")

    # Learning curves
    if history:
        series = {kname: list(v) for kname, v in history.items() if v is not None and len(v)}
        bases = sorted({kname.removeprefix("val_") for kname in series})
        if bases:
            fig = new_fig(4.5 * min(len(bases), 3), 3.5 * math.ceil(len(bases) / 3))
            axes = np.atleast_1d(
                fig.subplots(math.ceil(len(bases) / 3), min(len(bases), 3), squeeze=False)
            ).ravel()
            for ax, base in zip(axes, bases, strict=False):
                for kname, style in ((base, "-"), (f"val_{base}", "--")):
                    if kname in series:
                        vals = np.asarray(series[kname], dtype=np.float64)
                        ax.plot(np.arange(1, vals.size + 1), vals, style, marker=".", label=kname)
                ax.set(xlabel="epoch", title=base)
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                ax.legend(fontsize=8)
            for ax in axes[len(bases) :]:
                ax.set_visible(False)
            save(fig, "learning_curves.png")

    return written
