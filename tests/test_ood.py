"""The OOD score in the exported graph: card block, in- vs out-of-distribution frames."""

from __future__ import annotations

import json
import math

import numpy as np
import onnxruntime as ort
import pytest
import shifts
from scipy.stats import beta

from thyroid_cad import imaging, metrics
from training import ood, phantom


def _scores(export, frames: list[np.ndarray]) -> np.ndarray:
    card = json.loads((export / "model_card.json").read_text())
    size = card["input_size"]
    sess = ort.InferenceSession(str(export / "model.onnx"), providers=["CPUExecutionProvider"])
    batch = np.stack([imaging.prepare(f, size) for f in frames])
    (scores,) = sess.run([ood.OUTPUT_NAME], {"image": batch})
    return scores


def _phantom_frames(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [phantom.make_image(phantom.CLASS_NAMES_2[i % 2], rng) for i in range(n)]


def _shifted_frames(n: int, seed: int) -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {
        "colour photo": [shifts.colour_photo(rng) for _ in range(n)],
        "inverted": [shifts.inverted(f) for f in _phantom_frames(n, seed + 1)],
        "flat": [shifts.flat(rng) for _ in range(n)],
        "radiograph": [shifts.radiograph(rng) for _ in range(n)],
    }


def test_fit_recovers_the_mahalanobis_distance():
    rng = np.random.default_rng(0)
    cov = np.array([[4.0, 1.0], [1.0, 1.0]])
    a = rng.multivariate_normal([0, 0], cov, 4000)
    b = rng.multivariate_normal([6, 0], cov, 4000)
    ref = ood.fit(np.vstack([a, b]), np.repeat([0, 1], 4000), 2)
    point = np.array([[0.0, 2.0]])
    inv = np.linalg.inv(cov)
    expected = np.sqrt(point[0] @ inv @ point[0])  # nearest mean is class 0's
    assert ref.score(point)[0] == pytest.approx(expected, rel=0.03)
    assert ref.train_n == 8000 and 0 <= ref.shrinkage < 0.05


def test_fit_refuses_a_class_without_images():
    with pytest.raises(ValueError, match="no training image"):
        ood.fit(np.zeros((4, 3)), np.zeros(4, int), 2)


def test_export_has_ood_output_and_card(tiny_export):
    card = json.loads((tiny_export / "model_card.json").read_text())
    block = card["ood"]
    assert block["method"].startswith("mahalanobis") and block["quantile"] == 0.95
    assert block["train_n"] > 100 and block["validation"]["n"] > 20
    assert block["threshold"] == pytest.approx(block["validation"]["p95"])
    assert card["parity"]["passed"] and card["parity"]["ood_score_max_rel_diff"] < 1e-3
    assert "ood_score" in card["outputs"]


def _coverage_floor(block: dict, fresh: int) -> float:
    """The least share of fresh in-distribution frames a sound threshold keeps inside.

    The threshold is the empirical 95th percentile of `n` validation scores; the share
    of the distribution below it is Beta(k, n + 1 - k), k = floor(0.95 (n + 1)) (order
    statistics), whose mean is 0.93 for n = 60 but whose 0.5 % quantile is 0.83. Two
    binomial standard deviations of the `fresh` sample come off that. (A fixed 0.85 on
    60 frames failed a sound model on CI: 0.82, with 0.84-0.88 on 200 fresh frames.)
    """
    n, q = block["validation"]["n"], block["quantile"]
    k = math.floor(q * (n + 1))
    floor = float(beta.ppf(0.005, k, n + 1 - k))
    return floor - 2 * math.sqrt(floor * (1 - floor) / fresh)


def test_training_distribution_is_in_and_shifts_are_flagged(tiny_export):
    block = json.loads((tiny_export / "model_card.json").read_text())["ood"]
    threshold = block["threshold"]
    inside = _scores(tiny_export, _phantom_frames(200, seed=101))
    assert np.mean(inside <= threshold) >= _coverage_floor(block, len(inside)) > 0.7
    for name, frames in _shifted_frames(20, seed=7).items():
        out = _scores(tiny_export, frames)
        y = np.r_[np.zeros(len(inside)), np.ones(len(out))]
        auroc = metrics.roc_auc(y, np.r_[inside, out])
        assert auroc > 0.9, (name, auroc, float(np.mean(out > threshold)))
