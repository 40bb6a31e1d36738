"""Tests for training.evaluate (metrics, bootstrap CI, calibration, plots)."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import special
from sklearn.metrics import roc_auc_score

from training.evaluate import (
    _bootstrap_aucs,
    _mann_whitney_auc,
    apply_temperature,
    binary_metrics,
    bootstrap_auc_ci,
    choose_threshold,
    confusion,
    evaluate,
    expected_calibration_error,
    fit_temperature,
    save_plots,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Scores drawn from a small grid so ties are common (the hard case for rank-based AUC).
_tie_scores = st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.5, 0.75, 0.9, 1.0])


@st.composite
def binary_data(draw, min_size=2, max_size=60, tied=False):
    n = draw(st.integers(min_size, max_size))
    y = draw(hnp.arrays(np.int64, n, elements=st.integers(0, 1)))
    # guarantee both classes
    i, j = draw(st.lists(st.integers(0, n - 1), min_size=2, max_size=2, unique=True))
    y[i], y[j] = 1, 0
    elem = _tie_scores if tied else st.floats(-5, 5, allow_nan=False, width=32)
    s = draw(hnp.arrays(np.float64, n, elements=elem))
    return y, s


def _probs_from(pos_scores):
    p = np.asarray(pos_scores, dtype=float)
    return np.stack([1 - p, p], axis=1)


# --------------------------------------------------------------------------- AUC


def test_perfect_classifier_auc_one_with_degenerate_ci():
    y = [0, 0, 0, 1, 1, 1]
    s = [0.1, 0.2, 0.3, 0.7, 0.8, 0.9]
    assert bootstrap_auc_ci(y, s, n_boot=200) == (1.0, 1.0, 1.0)


def test_reversed_classifier_auc_zero():
    y = [0, 0, 0, 1, 1, 1]
    s = [0.9, 0.8, 0.7, 0.3, 0.2, 0.1]
    assert bootstrap_auc_ci(y, s, n_boot=200) == (0.0, 0.0, 0.0)


def test_hand_computed_auc_with_tie():
    # pos {0.8, 0.4}, neg {0.4, 0.1}: pairs -> 1 + 1 + 0.5 (tie) + 1 = 3.5 / 4
    auc, _, _ = bootstrap_auc_ci([1, 1, 0, 0], [0.8, 0.4, 0.4, 0.1], n_boot=50)
    assert auc == pytest.approx(0.875)


def test_ci_contains_point_estimate_and_narrows_with_more_data():
    rng = np.random.default_rng(0)
    widths = []
    for n in (60, 600, 6000):
        y = rng.integers(0, 2, n)
        s = rng.normal(size=n) + 1.0 * y
        auc, lo, hi = bootstrap_auc_ci(y, s, n_boot=500, seed=1)
        assert lo <= auc <= hi
        assert 0.0 <= lo < hi <= 1.0
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]
    # ~1/sqrt(n) scaling: 100x more data should shrink the CI by far more than 3x
    assert widths[2] < widths[0] / 3


def test_bootstrap_is_seeded_and_alpha_widens():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 200)
    s = rng.normal(size=200) + y
    a = bootstrap_auc_ci(y, s, n_boot=300, seed=7)
    b = bootstrap_auc_ci(y, s, n_boot=300, seed=7)
    c = bootstrap_auc_ci(y, s, n_boot=300, seed=7, alpha=0.5)
    assert a == b
    assert (a[2] - a[1]) > (c[2] - c[1])


def test_bootstrap_fast_enough():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 1000)
    s = rng.normal(size=1000) + y
    t0 = time.perf_counter()
    bootstrap_auc_ci(y, s, n_boot=1000)
    assert time.perf_counter() - t0 < 1.0


@settings(max_examples=60, deadline=None)
@given(binary_data(tied=True) | binary_data(tied=False))
def test_mann_whitney_auc_matches_sklearn(data):
    y, s = data
    assert _mann_whitney_auc(y.astype(bool), s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert bootstrap_auc_ci(y, s, n_boot=5)[0] == pytest.approx(roc_auc_score(y, s), abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(binary_data(tied=True), st.integers(0, 2**31 - 1))
def test_vectorised_bootstrap_replicates_match_sklearn(data, seed):
    y, s = data
    yb = y.astype(bool)
    pos, neg = s[yb], s[~yb]
    rng = np.random.default_rng(seed)
    pi = rng.integers(0, pos.size, size=(4, pos.size))
    ni = rng.integers(0, neg.size, size=(4, neg.size))
    got = _bootstrap_aucs(pos, neg, pi, ni)
    for b in range(4):
        ys = np.r_[np.ones(pos.size), np.zeros(neg.size)]
        ss = np.r_[pos[pi[b]], neg[ni[b]]]
        assert got[b] == pytest.approx(roc_auc_score(ys, ss), abs=1e-12)


def test_single_class_gives_nan():
    for y in ([1, 1, 1], [0, 0, 0]):
        res = bootstrap_auc_ci(y, [0.1, 0.5, 0.9], n_boot=10)
        assert all(math.isnan(v) for v in res)
    assert math.isnan(choose_threshold([0, 0, 0], [0.1, 0.5, 0.9]))
    m = binary_metrics([0, 0, 0], [0.1, 0.5, 0.9], 0.5)
    assert math.isnan(m["sensitivity"]) and math.isnan(m["sensitivity_ci_low"])
    assert m["specificity"] == pytest.approx(1 / 3)  # 0.5 and 0.9 are >= 0.5
    out = evaluate([0, 0, 0], _probs_from([0.1, 0.5, 0.9]), ["benign", "malignant"], n_boot=10)
    assert all(math.isnan(out[k]) for k in ("auc", "auc_ci_low", "auc_ci_high"))
    assert math.isnan(out["threshold"]) and math.isnan(out["sensitivity"])
    assert out["accuracy"] == pytest.approx(2 / 3)


# --------------------------------------------------------------------------- thresholds / metrics


def test_binary_metrics_hand_computed():
    y = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    s = [0.9, 0.8, 0.6, 0.3, 0.7, 0.4, 0.2, 0.1, 0.05, 0.5]
    # threshold 0.5: predicted positive = {0.9, 0.8, 0.6, 0.7, 0.5} -> tp 3, fp 2, fn 1, tn 4
    m = binary_metrics(y, s, 0.5)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (3.0, 2.0, 4.0, 1.0)
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(4 / 6)
    assert m["ppv"] == pytest.approx(3 / 5)
    assert m["npv"] == pytest.approx(4 / 5)
    assert m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 4 / 6) / 2)
    assert m["sensitivity_ci_low"] < m["sensitivity"] < m["sensitivity_ci_high"]
    assert m["specificity_ci_low"] < m["specificity"] < m["specificity_ci_high"]


def test_wilson_interval_known_value():
    # 8/10 successes: Wilson 95% CI = (0.4902, 0.9433) (Newcombe 1998)
    m = binary_metrics([1] * 10, [1.0] * 8 + [0.0] * 2, 0.5)
    assert m["sensitivity_ci_low"] == pytest.approx(0.4902, abs=1e-4)
    assert m["sensitivity_ci_high"] == pytest.approx(0.9433, abs=1e-4)
    # all successes: upper bound is exactly 1, lower bound below 1
    m = binary_metrics([1] * 5, [1.0] * 5, 0.5)
    assert m["sensitivity_ci_high"] == pytest.approx(1.0)
    assert m["sensitivity_ci_low"] == pytest.approx(5 / (5 + 1.959963984540054**2))


def test_division_by_zero_is_nan_not_error():
    m = binary_metrics([1, 0], [0.1, 0.2], 0.9)  # nothing predicted positive
    assert math.isnan(m["ppv"])
    assert m["npv"] == pytest.approx(0.5)
    assert m["f1"] == 0.0


def test_choose_threshold_hand_case_and_ties():
    y = [1, 1, 1, 1, 0, 0]
    s = [0.9, 0.8, 0.7, 0.2, 0.75, 0.1]
    # 3/4 positives >= 0.7; the gap down to the next negative (0.1) is split
    assert choose_threshold(y, s, 0.75) == pytest.approx(0.4)
    assert choose_threshold(y, s, 0.76) == pytest.approx(0.15)
    assert choose_threshold(y, s, 1.0) == pytest.approx(0.15)
    # ties: with two positives at 0.5 the 0.5 threshold already gives 3/3
    assert choose_threshold([1, 1, 1, 0], [0.9, 0.5, 0.5, 0.4], 0.5) == pytest.approx(0.45)
    # no negative below: the largest admissible threshold itself
    assert choose_threshold([1, 1, 0], [0.3, 0.2, 0.9], 1.0) == 0.2


@settings(max_examples=100, deadline=None)
@given(
    binary_data(tied=True) | binary_data(tied=False),
    st.floats(0.01, 1.0, allow_nan=False),
)
def test_choose_threshold_property(data, target):
    y, s = data
    t = choose_threshold(y, s, target)
    assert binary_metrics(y, s, t)["sensitivity"] >= target
    # and specificity is the best attainable among thresholds meeting the target
    best = max(
        binary_metrics(y, s, c)["specificity"]
        for c in np.unique(s)
        if binary_metrics(y, s, c)["sensitivity"] >= target
    )
    assert binary_metrics(y, s, t)["specificity"] == best


# --------------------------------------------------------------------------- calibration


def test_ece_zero_for_calibrated_buckets():
    # bucket 1: confidence 0.7 with 7/10 correct; bucket 2: confidence 0.9 with 9/10 correct
    p_pos = np.r_[np.full(10, 0.7), np.full(10, 0.9)]
    y = np.r_[np.ones(7), np.zeros(3), np.ones(9), np.zeros(1)].astype(int)
    probs = _probs_from(p_pos)
    assert expected_calibration_error(y, probs) == pytest.approx(0.0, abs=1e-12)
    assert expected_calibration_error(np.eye(2)[y], probs) == pytest.approx(0.0, abs=1e-12)


def test_ece_large_for_overconfident_wrong_predictions():
    probs = np.tile([0.01, 0.01, 0.98], (50, 1))
    y = np.zeros(50, dtype=int)  # always wrong, conf 0.98
    assert expected_calibration_error(y, probs) == pytest.approx(0.98)
    # half right: ECE = |0.5 - 0.98|
    y[:25] = 2
    assert expected_calibration_error(y, probs) == pytest.approx(0.48)


def test_temperature_recovers_known_value():
    rng = np.random.default_rng(0)
    n, k, t_true = 5000, 3, 2.5
    base = rng.normal(scale=2.0, size=(n, k))  # calibrated logits
    labels = np.array([rng.choice(k, p=q) for q in special.softmax(base, axis=1)])
    logits = base * t_true  # overconfident model
    t_hat = fit_temperature(logits, labels)
    assert t_hat == pytest.approx(t_true, rel=0.10)
    # same answer from log-probabilities
    t_lp = fit_temperature(special.log_softmax(logits, axis=1), labels)
    assert t_lp == pytest.approx(t_hat, rel=1e-3)
    # applying it reduces NLL and ECE
    probs = special.softmax(logits, axis=1)
    cal = apply_temperature(probs, t_hat)
    nll = lambda q: -np.mean(np.log(q[np.arange(n), labels]))  # noqa: E731
    assert nll(cal) < nll(probs)
    assert expected_calibration_error(labels, cal) < expected_calibration_error(labels, probs)


def test_apply_temperature_properties():
    probs = np.array([[0.7, 0.2, 0.1], [0.0, 1.0, 0.0]])
    np.testing.assert_allclose(
        apply_temperature(probs, 1.0),
        np.clip(probs, 1e-12, 1) / np.clip(probs, 1e-12, 1).sum(1, keepdims=True),
        rtol=1e-9,
    )
    hot = apply_temperature(probs, 100.0)
    assert np.all(np.isfinite(hot))
    np.testing.assert_allclose(hot.sum(axis=1), 1.0)
    assert hot[0].max() - hot[0].min() < 0.02  # high T flattens towards uniform
    assert np.argmax(apply_temperature(probs, 0.5)[0]) == 0  # ranking preserved
    with pytest.raises(ValueError):
        apply_temperature(probs, 0.0)


# --------------------------------------------------------------------------- evaluate / confusion


def test_confusion_matrix_hand_case():
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8], [0.6, 0.3, 0.1]])
    labels = [0, 1, 2, 2]
    cm = confusion(labels, probs)
    np.testing.assert_array_equal(cm, [[1, 0, 0], [0, 1, 0], [1, 0, 1]])


def test_evaluate_binary_keys_and_values():
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    s = np.array([0.9, 0.8, 0.6, 0.3, 0.7, 0.4, 0.2, 0.1, 0.05, 0.5])
    probs = _probs_from(s)
    out = evaluate(y, probs, ["benign", "malignant"], threshold=0.5, n_boot=200)
    expected_keys = {
        "auc",
        "auc_ci_low",
        "auc_ci_high",
        "accuracy",
        "balanced_accuracy",
        "threshold",
        "sensitivity",
        "specificity",
        "ppv",
        "npv",
        "f1",
        "sensitivity_ci_low",
        "sensitivity_ci_high",
        "specificity_ci_low",
        "specificity_ci_high",
        "ece",
        "brier",
    }
    assert set(out) == expected_keys
    assert all(isinstance(v, float) for v in out.values())
    assert out["auc"] == pytest.approx(roc_auc_score(y, s))
    assert out["sensitivity"] == pytest.approx(0.75) and out["ppv"] == pytest.approx(0.6)
    # argmax accuracy (p > 0.5 wins; the 0.5 tie goes to class 0 = benign)
    assert out["accuracy"] == pytest.approx(np.mean((s > 0.5) == y))
    assert out["brier"] == pytest.approx(np.mean(2 * (s - y) ** 2))
    assert out["ece"] == pytest.approx(expected_calibration_error(y, probs))


def test_evaluate_positive_lookup_and_threshold_selection():
    rng = np.random.default_rng(2)
    n = 300
    labels = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 3)) + 2.0 * np.eye(3)[labels]
    probs = special.softmax(logits, axis=1)
    names = ["malignant", "benign", "indeterminate"]  # positive is column 0 here
    out = evaluate(labels, probs, names, n_boot=100)
    assert out["auc"] == pytest.approx(roc_auc_score(labels == 0, probs[:, 0]))
    assert out["sensitivity"] >= 0.90
    assert out["threshold"] == choose_threshold(labels == 0, probs[:, 0], 0.90)
    assert out["auc_macro_ovr"] == pytest.approx(
        roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    )
    assert out["balanced_accuracy"] == pytest.approx(
        np.mean([np.mean(probs[labels == c].argmax(1) == c) for c in range(3)])
    )
    # unknown positive name -> last class
    out2 = evaluate(labels, probs, ["a", "b", "c"], n_boot=50)
    assert out2["auc"] == pytest.approx(roc_auc_score(labels == 2, probs[:, 2]))
    # a passed-in threshold is used as-is
    out3 = evaluate(labels, probs, names, threshold=0.123, n_boot=50)
    assert out3["threshold"] == 0.123


def test_shape_mismatch_raises_value_error():
    probs = _probs_from([0.1, 0.9, 0.4])
    with pytest.raises(ValueError, match="mismatch"):
        evaluate([0, 1], probs, ["benign", "malignant"])
    with pytest.raises(ValueError, match="mismatch"):
        evaluate([0, 1, 1], probs, ["benign", "malignant", "other"])
    with pytest.raises(ValueError, match="mismatch"):
        bootstrap_auc_ci([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="mismatch"):
        binary_metrics([0, 1], [0.1, 0.2, 0.3], 0.5)
    with pytest.raises(ValueError, match="mismatch"):
        choose_threshold([0, 1], [0.1], 0.9)
    with pytest.raises(ValueError, match="mismatch"):
        expected_calibration_error(np.eye(3)[[0, 1, 2]], probs)
    with pytest.raises(ValueError, match="mismatch"):
        confusion([0, 1], probs)
    with pytest.raises(ValueError, match="mismatch"):
        fit_temperature(np.zeros((4, 2)), [0, 1])
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        confusion([0, 1, 2], probs)  # label out of range
    with pytest.raises(ValueError, match="0/1"):
        bootstrap_auc_ci([0, 2, 1], [0.1, 0.2, 0.3])


# --------------------------------------------------------------------------- plots


def _assert_pngs(paths, names):
    assert [p.name for p in paths] == names
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == PNG_MAGIC
        assert len(data) > 1000


def test_save_plots_binary(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 120)
    s = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1)
    history = {
        "loss": [0.9, 0.6, 0.5],
        "val_loss": [1.0, 0.7, 0.65],
        "auc": [0.6, 0.7, 0.8],
        "val_auc": [0.55, 0.68, 0.74],
    }
    paths = save_plots(
        tmp_path / "plots", y, _probs_from(s), ["benign", "malignant"], 0.4, history=history
    )
    _assert_pngs(
        paths,
        ["roc.png", "pr.png", "confusion_matrix.png", "reliability.png", "learning_curves.png"],
    )


def test_save_plots_three_class_no_history_and_no_pyplot_leak(tmp_path):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 90)
    probs = special.softmax(rng.normal(size=(90, 3)) + 1.5 * np.eye(3)[labels], axis=1)
    paths = save_plots(tmp_path, labels, probs, ["benign", "indeterminate", "malignant"], 0.5)
    _assert_pngs(paths, ["roc.png", "pr.png", "confusion_matrix.png", "reliability.png"])
    assert not (tmp_path / "learning_curves.png").exists()
    assert plt.get_fignums() == before


def test_save_plots_single_class_does_not_crash(tmp_path):
    paths = save_plots(
        tmp_path, [0, 0, 0], _probs_from([0.1, 0.6, 0.3]), ["benign", "malignant"], 0.5
    )
    _assert_pngs(paths, ["roc.png", "pr.png", "confusion_matrix.png", "reliability.png"])


def test_case_level_averages_each_cases_frames():
    from thyroid_cad.metrics import case_probabilities
    from training.evaluate import case_level

    probs = np.array([[0.9, 0.1], [0.7, 0.3], [0.2, 0.8], [0.4, 0.6], [0.6, 0.4]])
    combined, order = case_probabilities(probs, ["a", "a", "b", "b", "c"])
    assert order == ["a", "b", "c"]
    np.testing.assert_allclose(combined, [[0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    labels = [0, 0, 1, 1, 1]
    # frames without a case id are cases of their own; a mixed-label case splits by label
    out = case_level(labels, probs, ["a", "a", "b", None, "a"], ["benign", "malignant"], 0.5)
    assert out["n_cases"] == 4  # a/benign, b, the frame without id, a/malignant
    assert out["auc"] == 1.0 and out["sensitivity"] == 2 / 3
    with pytest.raises(ValueError, match="case ids"):
        case_level(labels, probs, ["a"], ["benign", "malignant"], 0.5)
