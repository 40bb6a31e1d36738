"""Image sources: the one definition, within-source weights, LOSO folds, robust scores."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from training import loso, sources
from training.data import Dataset, ImageInfo, Record, scan


def _dataset(n: int, manifest_sources: dict[int, str] | None = None) -> Dataset:
    manifest_sources = manifest_sources or {}
    records = [
        Record(Path(f"/x/{i}.png"), f"{i}.png", "benign", source=manifest_sources.get(i))
        for i in range(n)
    ]
    return Dataset(Path("/x"), records, ("benign", "malignant"))


def test_geometry_groups_common_sizes_and_pools_rare_ones():
    sizes = [(560, 360)] * 40 + [(300, 225)] * 30 + [(400 + i, 300) for i in range(25)] + [None]
    got = sources.assign_sources(_dataset(len(sizes)), [ImageInfo(s, 0) for s in sizes])
    assert Counter(got) == {"560x360": 40, "300x225": 30, "other": 26}


def test_a_geometry_needs_a_share_of_a_large_dataset():
    # 30 images of one size among 1,000: above MIN_SOURCE_IMAGES, below 5% -> 'other'.
    sizes = [(256, 256)] * 970 + [(640, 480)] * 30
    got = sources.assign_sources(_dataset(len(sizes)), [ImageInfo(s, 0) for s in sizes])
    assert Counter(got) == {"256x256": 970, "other": 30}


def test_manifest_source_wins_and_is_made_safe_for_metric_names():
    sizes = [(256, 256)] * 30
    got = sources.assign_sources(
        _dataset(30, {0: "GE Logiq E9", 1: "min", 2: "  ", 3: "site/2"}),
        [ImageInfo(s, 0) for s in sizes],
    )
    assert got[:4] == ["GE_Logiq_E9", "min_", "256x256", "site_2"]
    assert set(got[4:]) == {"256x256"}


def test_scan_reads_the_manifest_source_column(tmp_path):
    for label in ("benign", "malignant"):
        (tmp_path / label).mkdir()
        for i in range(2):
            (tmp_path / label / f"{i}.png").write_bytes(b"x")
    (tmp_path / "manifest.csv").write_text(
        "image,case_id,source\nbenign/0.png,c1,A\nbenign/1.png,c2,\nmalignant/0.png,,B\n"
    )
    got = {r.rel: (r.case_id, r.source) for r in scan(tmp_path).records}
    assert got == {
        "benign/0.png": ("c1", "A"),
        "benign/1.png": ("c2", None),
        "malignant/0.png": (None, "B"),
        "malignant/1.png": (None, None),
    }


def test_within_source_weights_balance_classes_inside_every_source():
    # Source a: 8 malignant / 2 benign; source b: 2 malignant / 8 benign.
    labels = np.array([1] * 8 + [0] * 2 + [1] * 2 + [0] * 8)
    src = ["a"] * 10 + ["b"] * 10
    w = sources.sample_weights(labels, src, 2, "source")
    for s in ("a", "b"):
        cells = [w[(np.array(src) == s) & (labels == c)].sum() for c in (0, 1)]
        assert cells[0] == pytest.approx(cells[1])  # benign = malignant within the source
    totals = [w[np.array(src) == s].sum() for s in ("a", "b")]
    assert totals[0] == pytest.approx(totals[1]) and w.sum() == pytest.approx(len(labels))
    # Global weighting keeps the confound: source a is still mostly malignant.
    g = sources.sample_weights(labels, src, 2, "global")
    assert g[:8].sum() > 3 * g[8:10].sum()


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 1)), min_size=2, max_size=60),
)
def test_source_part_of_the_weights_keeps_class_prevalence(cells):
    src = [s for s, _ in cells]
    labels = np.array([c for _, c in cells])
    w = sources.source_weights(labels, src)
    assert np.all(w > 0)
    if all({c for s2, c in cells if s2 == s} == {0, 1} for s in set(src)):
        # Every source has both classes: class totals are their counts, sources equal.
        for c in (0, 1):
            assert w[labels == c].sum() == pytest.approx((labels == c).sum())
        per_source = [w[np.array(src) == s].sum() for s in set(src)]
        assert max(per_source) == pytest.approx(min(per_source))


def test_unknown_weighting_is_refused():
    with pytest.raises(ValueError, match="unknown class weighting 'sourced'"):
        sources.sample_weights(np.array([0, 1]), ["a", "a"], 2, "sourced")


def test_shortcut_floor_sees_the_confound_and_is_chance_on_one_source():
    rng = np.random.default_rng(0)
    n = 200
    src = rng.choice(["a", "b"], size=n)
    y = np.where(src == "a", rng.random(n) < 0.9, rng.random(n) < 0.1).astype(int)
    sizes = [(560, 360) if s == "a" else (300, 225) for s in src]
    half = n // 2
    auc, low, high = sources.shortcut_floor(
        (sizes[:half], src[:half], y[:half]), (sizes[half:], src[half:], y[half:]), positive=1
    )
    assert low > 0.75 and low <= auc <= high
    same = [(256, 256)] * n
    one = ["256x256"] * n
    assert sources.shortcut_floor(
        (same[:half], one[:half], y[:half]), (same[half:], one[half:], y[half:]), positive=1
    ) == (0.5, 0.5, 0.5)


def test_per_source_metrics_round_trip_and_robust_score():
    y = np.array([0, 1] * 20 + [0, 1] * 20)
    scores = np.concatenate([y[:40] * 0.8 + 0.1, np.linspace(0, 1, 40)])
    src = ["a"] * 40 + ["b"] * 40
    m = sources.source_metrics("test", y == 1, scores, src)
    m.update(sources.source_metrics("val", y == 1, scores, src))
    assert m["test_auc_source_a"] == 1.0 and m["test_n_source_b"] == 40
    read = sources.per_source(m, "test_auc_source_")
    assert set(read) == {"a", "b"} and read["b"]["n"] == 40
    assert read["b"]["ci_low"] <= read["b"]["auc"] <= read["b"]["ci_high"]
    m.update({"loso_auc_a": 0.61, "loso_auc_a_ci_low": 0.5, "loso_auc_a_ci_high": 0.7})
    m.update({"loso_auc_b": 0.9, "loso_n_b": 30.0, "loso_auc_min": 0.61})
    scores_ = sources.robust_scores(m)
    within_b = m["test_auc_source_b"]
    assert scores_["robust_score"] == pytest.approx(min(1.0, within_b, 0.61, 0.9))
    assert scores_["val_robust_score"] == pytest.approx(min(m["val_auc_source_b"], 0.61))
    assert scores_["loso_auc_min"] == 0.61
    assert set(sources.per_source(m, "loso_auc_")) == {"a", "b"}  # 'min' is not a source
    few = sources.source_metrics("test", y[:12] == 1, scores[:12], ["a"] * 12)
    assert few == {"test_n_source_a": 12.0}  # too few images to report an AUC
    block = sources.card_block({**m, **scores_, "test_shortcut_auc": 0.5})
    assert block["loso"]["b"] == {"auc": 0.9, "n": 30.0}
    assert block["shortcut_floor"] == {"auc": 0.5, "ci_low": None, "ci_high": None}
    assert block["robust_score"] == scores_["robust_score"]


def test_robust_score_with_one_source_is_its_auc_and_no_loso():
    m = {"test_auc_source_256x256": 0.93, "val_auc_source_256x256": 0.9, "test_auc": 0.93}
    assert sources.robust_scores(m) == {"robust_score": 0.93, "val_robust_score": 0.9}
    assert sources.card_block(m)["loso"] is None


def test_loso_fold_never_sees_the_held_out_source_nor_any_test_image():
    src = ["a", "a", "a", "b", "b", "b", "c", "c", "c"]
    idx = {"train": [0, 3, 6, 7], "val": [1, 4], "test": [2, 5, 8]}
    groups = [0, 1, 2, 3, 4, 5, 6, 1, 8]  # image 7 (source c) is a near duplicate of 1 (a)
    fold = loso.holdout_indices(idx, src, "a", groups)
    assert fold == {"train": [3, 6, 7], "val": [4], "test": [0]}  # 1 left out: its twin trains
    assert not set(fold["test"]) & set(idx["test"])
    assert all(src[i] != "a" for i in fold["train"] + fold["val"])


def test_loso_candidates_need_two_sources_and_both_classes():
    src = ["a"] * 30 + ["b"] * 30 + ["c"] * 30
    labels = [0, 1] * 15 + [0, 1] * 15 + [1] * 30
    idx = {"train": list(range(0, 90, 2)), "val": list(range(1, 90, 2)), "test": []}
    groups = list(range(90))
    assert loso.candidates(idx, src, labels, groups) == ["a", "b"]  # c: malignant only
    one = ["a"] * 90
    assert loso.candidates(idx, one, labels, groups) == []


def test_auc_by_group_is_nan_for_a_one_class_group():
    from training.evaluate import auc_by_group

    got = auc_by_group(np.array([0, 1, 1, 1]), np.array([0.1, 0.9, 0.5, 0.4]), ["a", "a", "b", "b"])
    assert got["a"][0] == 1.0 and got["a"][3] == 2
    assert all(math.isnan(v) for v in got["b"][:3]) and got["b"][3] == 2
    with pytest.raises(ValueError, match="shape mismatch"):
        auc_by_group(np.array([0, 1]), np.array([0.1, 0.9]), ["a"])
