"""Loading layouts, class aliases, manifests, audit and leak-free splits."""

import io
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from training import audit, data, splits


def _noise_image(path: Path, seed: int, size=(96, 80), fmt=None) -> None:
    rng = np.random.default_rng(seed)
    arr = rng.integers(30, 230, size=(size[1] // 8, size[0] // 8), dtype=np.uint8)
    image = Image.fromarray(arr).resize(size, Image.Resampling.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, fmt)


@pytest.fixture
def split_layout(tmp_path) -> Path:
    """train/test x benin/malin, with one byte-identical copy across splits and a near copy."""
    root = tmp_path / "ds"
    for i in range(6):
        _noise_image(root / "train" / "benin" / f"b{i}.png", i)
        _noise_image(root / "train" / "malin" / f"m{i}.jpg", 100 + i)
    for i in range(6, 9):
        _noise_image(root / "test" / "benin" / f"b{i}.png", i)
        _noise_image(root / "test" / "Malignant" / f"m{i}.jpg", 100 + i)
    shutil.copy(root / "train" / "malin" / "m0.jpg", root / "test" / "Malignant" / "copy_of_m0.jpg")
    # Near duplicate: the same picture re-encoded at another quality and size.
    Image.open(root / "train" / "benin" / "b1.png").resize((100, 84)).save(
        root / "test" / "benin" / "b1_resaved.jpg", quality=70
    )
    return root


def test_canonical_class_aliases():
    assert data.canonical_class("benin") == "benign"
    assert data.canonical_class("Benign") == "benign"
    assert data.canonical_class("malin") == "malignant"
    assert data.canonical_class("MALIGNANT") == "malignant"
    assert data.canonical_class("Normal  Thyroid") == "normal"
    assert data.canonical_class("PNEUMONIA") == "pneumonia"


def test_scan_split_layout_with_aliases(split_layout):
    ds = data.scan(split_layout)
    assert ds.class_names == ("benign", "malignant")
    assert len(ds.records) == 20
    assert Counter(r.split for r in ds.records) == {"train": 12, "test": 8}
    assert ds.class_counts() == {"benign": 10, "malignant": 10}


def test_scan_class_layout_three_classes_orders_thyroid_classes(tmp_path):
    for name, seed in (("malignant", 1), ("normal thyroid", 2), ("Benign", 3)):
        _noise_image(tmp_path / name / "a.bmp", seed, fmt="BMP")
        _noise_image(tmp_path / name / "b.tif", seed + 10, fmt="TIFF")
    ds = data.scan(tmp_path)
    assert ds.class_names == ("normal", "benign", "malignant")
    assert all(r.split is None for r in ds.records)
    assert len(ds.records) == 6


def test_scan_reads_manifest_and_auto_detects_it(split_layout):
    (split_layout / "cases.csv").write_text(
        "image,case_id,tirads\ntrain/benin/b0.png,C1,3\ntest/benin/b6.png,C1,3\n"
    )
    ds = data.scan(split_layout)
    cases = {r.rel: r.case_id for r in ds.records if r.case_id}
    assert cases == {"train/benin/b0.png": "C1", "test/benin/b6.png": "C1"}


@pytest.mark.parametrize(
    "content,match",
    [
        ("picture,case_id\nx.png,1\n", "no 'image' column"),
        ("image,tirads\nx.png,3\n", "case columns"),
    ],
)
def test_manifest_errors_are_clear(split_layout, tmp_path, content, match):
    bad = tmp_path / "bad.csv"
    bad.write_text(content)
    with pytest.raises(data.DataError, match=match):
        data.scan(split_layout, bad)


def test_scan_errors(tmp_path):
    with pytest.raises(data.DataError, match="not found"):
        data.scan(tmp_path / "missing")
    (tmp_path / "benign").mkdir()
    with pytest.raises(data.DataError, match="no images"):
        data.scan(tmp_path)
    _noise_image(tmp_path / "benign" / "x.png", 0)
    with pytest.raises(data.DataError, match="at least two classes"):
        data.scan(tmp_path)


def test_audit_finds_duplicates_and_leaks(split_layout):
    (split_layout / "train" / "benin" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    report = audit.audit(data.scan(split_layout))
    assert report["images"] == 21
    assert report["exact_duplicate_groups"] == [
        ["test/Malignant/copy_of_m0.jpg", "train/malin/m0.jpg"]
    ]
    assert ["test/benin/b1_resaved.jpg", "train/benin/b1.png"] in report["near_duplicate_groups"]
    leaks = {tuple(g["paths"]): g["kind"] for g in report["cross_split_groups"]}
    assert leaks[("test/Malignant/copy_of_m0.jpg", "train/malin/m0.jpg")] == "exact"
    assert leaks[("test/benin/b1_resaved.jpg", "train/benin/b1.png")] == "near"
    assert [u["path"] for u in report["unreadable"]] == ["train/benin/broken.png"]
    # no manifest case explains the re-saved copy: the report lists it for a look
    assert ["test/benin/b1_resaved.jpg", "train/benin/b1.png"] in report[
        "near_duplicate_groups_across_cases"
    ]
    text = audit.format_report(report)
    assert "at most 8 of 64 bits" in text and "give them one case_id" in text
    assert "near duplicates across cases: test/benin/b1_resaved.jpg | train/benin/b1.png" in text
    json.dumps(report)  # the CLI prints it as JSON


def test_grouped_split_is_leak_free_deduplicated_and_deterministic(split_layout):
    (split_layout / "cases.csv").write_text(
        "image,case_id\ntrain/benin/b2.png,C\ntrain/benin/b3.png,C\n"
    )
    ds = data.scan(split_layout)
    a = splits.grouped_split(ds, val=0.25, test=0.25, seed=3)
    b = splits.grouped_split(ds, val=0.25, test=0.25, seed=3)
    assert a.assignment == b.assignment and a.split_id == b.split_id
    where = dict(zip(a.rel_paths, a.assignment, strict=True))
    copies = [where["test/Malignant/copy_of_m0.jpg"], where["train/malin/m0.jpg"]]
    assert sorted(c == "dropped" for c in copies) == [False, True]  # kept exactly once
    assert where["train/benin/b1.png"] == where["test/benin/b1_resaved.jpg"]
    assert where["train/benin/b2.png"] == where["train/benin/b3.png"]
    assert set(a.assignment) == {"train", "val", "test", "dropped"}


def test_conflicting_duplicates_are_dropped(tmp_path):
    for i in range(4):
        _noise_image(tmp_path / "benign" / f"b{i}.png", i)
        _noise_image(tmp_path / "malignant" / f"m{i}.png", 50 + i)
    shutil.copy(tmp_path / "benign" / "b0.png", tmp_path / "malignant" / "same_as_b0.png")
    dataset = data.scan(tmp_path)
    # the audit counts what the split drops, and says what to do about it
    report = audit.audit(dataset)
    assert report["label_conflicts"] == [["benign/b0.png", "malignant/same_as_b0.png"]]
    text = audit.format_report(report)
    assert "duplicate groups with conflicting labels: 1  (exact copies" in text
    assert "check the labels" in text
    assert "conflicting labels: benign/b0.png | malignant/same_as_b0.png" in text
    split = splits.grouped_split(dataset, val=0.25, test=0.25)
    assert split.dropped == {
        "benign/b0.png": "duplicates disagree on the label",
        "malignant/same_as_b0.png": "duplicates disagree on the label",
    }


@settings(max_examples=60, deadline=None)
@given(
    groups=st.lists(st.integers(0, 25), min_size=10, max_size=120),
    seed=st.integers(0, 10_000),
    k=st.integers(2, 5),
)
def test_assign_groups_never_splits_a_group(groups, seed, k):
    labels = [g % 2 for g in groups]  # one label per group, as after de-duplication
    parts = splits.assign_groups(labels, groups, [1.0] * k, seed)
    by_group: dict[int, set[int]] = {}
    for g, p in zip(groups, parts, strict=True):
        by_group.setdefault(g, set()).add(p)
    assert all(len(v) == 1 for v in by_group.values())
    assert parts == splits.assign_groups(labels, groups, [1.0] * k, seed)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(200, 600), seed=st.integers(0, 1000), pos=st.floats(0.2, 0.8))
def test_assign_groups_stratifies_singletons(n, seed, pos):
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < pos).astype(int).tolist()
    parts = splits.assign_groups(labels, list(range(n)), [0.7, 0.15, 0.15], seed)
    for c in (0, 1):
        total = labels.count(c)
        for part, frac in enumerate((0.7, 0.15, 0.15)):
            got = sum(1 for lab, p in zip(labels, parts, strict=True) if lab == c and p == part)
            assert abs(got - frac * total) < 2  # whole images: within rounding of the quota


def test_kfold_keeps_groups_together(split_layout):
    folds = splits.grouped_kfold(data.scan(split_layout), k=3, seed=0)
    ds = data.scan(split_layout)
    fold_of = {r.rel: f for r, f in zip(ds.records, folds, strict=True)}
    assert fold_of["train/benin/b1.png"] == fold_of["test/benin/b1_resaved.jpg"]
    assert (
        sorted([fold_of["test/Malignant/copy_of_m0.jpg"], fold_of["train/malin/m0.jpg"]])[0] == -1
    )
    assert set(folds) - {-1} == {0, 1, 2}


def test_split_rejects_bad_fractions(split_layout):
    with pytest.raises(ValueError, match="val"):
        splits.grouped_split(data.scan(split_layout), val=0.6, test=0.5)


def test_jpeg_bytes_roundtrip_used_by_fixture():
    buf = io.BytesIO()
    Image.new("L", (8, 8), 128).save(buf, "JPEG")
    assert buf.getvalue()[:2] == b"\xff\xd8"
