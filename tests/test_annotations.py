"""Nodule annotations (training/annotations.py) and the phantom's outlines."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from training import annotations, phantom
from training.data import DataError, scan


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


# --------------------------------------------------------------------------- #
# phantom outlines
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("label", ["benign", "malignant"])
def test_phantom_outline_traces_the_drawn_nodule(label):
    for seed in range(8):
        frame = phantom.render_frame(label, np.random.default_rng(seed), 128)
        ann = annotations.Annotation(image=None, rel="x", polygons=(tuple(frame.outline),))
        assert _iou(ann.mask(128, 128), frame.nodule_mask) > 0.8


def test_phantom_normal_frames_have_no_outline():
    assert phantom.render_frame("normal", np.random.default_rng(0), 64).outline == []


def test_phantom_writes_ddti_style_annotations(tmp_path):
    out = tmp_path / "p"
    phantom.generate(out, per_class=6, classes=3, seed=2, size=64)
    with (out / "annotations.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == [
        "image", "case_id", "nodule_box_xywh", "nodule_polygons",
        "composition", "echogenicity", "margins", "calcifications",
    ]  # fmt: skip
    manifest = (out / "manifest.csv").read_text().splitlines()[1:]
    assert [f"{r['image']},{r['case_id']}" for r in rows] == manifest
    for r in rows:
        if r["image"].startswith("normal/"):
            assert r["nodule_box_xywh"] == r["nodule_polygons"] == ""
            continue
        x, y, w, h = json.loads(r["nodule_box_xywh"])
        (polygon,) = json.loads(r["nodule_polygons"])
        xs, ys = [p[0] for p in polygon], [p[1] for p in polygon]
        assert (x, y, x + w, y + h) == (min(xs), min(ys), max(xs), max(ys))
        assert 0 <= x and x + w < 64 and 0 <= y and y + h < 64 and w > 2 and h > 2
    # the dark malignant nodule sits inside its annotated outline: darker than the
    # parenchyma just around it (the frame as a whole varies in brightness per case)
    from scipy import ndimage

    table = annotations.read_annotations(out / "annotations.csv")
    for ann in table.values():
        if "malignant" in ann.rel:
            grey = np.asarray(Image.open(ann.image))[..., 0].astype(float)
            mask = ann.mask(64, 64)
            ring = ndimage.binary_dilation(mask, iterations=4) & ~mask & (grey > 0)
            assert grey[mask].mean() < grey[ring].mean() - 15


# --------------------------------------------------------------------------- #
# reading annotation files
# --------------------------------------------------------------------------- #
def _write(path, header, rows):
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


DDTI_HEADER = ["image", "ddti_case", "nodule_box_xywh", "nodule_polygons", "tirads"]


def test_ddti_style_rows(tmp_path):
    big = [[10, 10], [40, 10], [40, 30], [10, 30]]
    small = [[50, 5], [55, 5], [55, 9]]
    _write(
        tmp_path / "a.csv",
        DDTI_HEADER,
        [
            ["img/a.png", "7", "[10, 5, 45, 25]", json.dumps([small, big]), "4a"],
            ["img/b.png", "8", "", "", "2"],
        ],
    )
    table = annotations.read_annotations(tmp_path / "a.csv")
    a = table[(tmp_path / "img/a.png").resolve()]
    assert a.box == (10, 5, 45, 25) and a.case_id == "7" and a.row["tirads"] == "4a"
    assert a.roi() == (10, 10, 30, 20)  # the largest outline, not the union box
    mask = a.mask(40, 60)
    assert mask.shape == (40, 60) and mask[20, 25] and mask[6, 54] and not mask[35, 5]
    b = table[(tmp_path / "img/b.png").resolve()]
    assert b.box is None and not b.has_outline and b.mask(40, 60) is None and b.roi() is None


def test_mask_style_rows_union_masks(tmp_path):
    (tmp_path / "masks").mkdir()
    m1, m2 = np.zeros((20, 30), np.uint8), np.zeros((20, 30), np.uint8)
    m1[2:6, 3:9] = 255
    m2[10:18, 15:28] = 255
    Image.fromarray(m1).save(tmp_path / "masks/a_1.png")
    Image.fromarray(m2).save(tmp_path / "masks/a_2.png")
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(tmp_path / "masks/n.png")
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / "masks/bad.png")
    _write(
        tmp_path / "annotations.csv",
        ["image", "label", "width", "height", "masks"],
        [
            ["images/a.jpg", "benign", "30", "20", "masks/a_1.png;masks/a_2.png"],
            ["images/n.jpg", "normal", "30", "20", "masks/n.png"],
            ["images/bad.jpg", "benign", "30", "20", "masks/bad.png"],
        ],
    )
    table = annotations.read_annotations(tmp_path / "annotations.csv")
    a = table[(tmp_path / "images/a.jpg").resolve()]
    assert a.mask(20, 30).sum() == 4 * 6 + 8 * 13
    assert a.roi(20, 30) == (15, 10, 13, 8)  # the larger lesion
    n = table[(tmp_path / "images/n.jpg").resolve()]
    assert n.has_outline and not n.mask(20, 30).any() and n.roi(20, 30) is None
    with pytest.raises(DataError, match="5x5"):
        table[(tmp_path / "images/bad.jpg").resolve()].mask(20, 30)


@pytest.mark.parametrize(
    ("header", "row", "message"),
    [
        (["picture", "masks"], ["a.png", ""], "no 'image' column"),
        (["image", "label"], ["a.png", "x"], "none of"),
        (DDTI_HEADER, ["a.png", "1", "[1, 2, 3]", "", ""], "integers"),
        (DDTI_HEADER, ["a.png", "1", "[1, 2", "", ""], "not valid JSON"),
        (DDTI_HEADER, ["a.png", "1", "", "[[1, 2]]", ""], "lists of"),
    ],
)
def test_malformed_annotation_files(tmp_path, header, row, message):
    _write(tmp_path / "x.csv", header, [row])
    with pytest.raises(DataError, match=message):
        annotations.read_annotations(tmp_path / "x.csv")


def test_for_dataset_finds_the_phantom_annotations(tmp_path):
    out = tmp_path / "p"
    phantom.generate(out, per_class=4, classes=2, seed=0, size=64)
    dataset = scan(out)
    found = annotations.for_dataset(dataset)
    assert len(found) == len(dataset.records) and all(found)
    assert [a.image for a in found] == [r.path.resolve() for r in dataset.records]
    (out / "annotations.csv").unlink()
    with pytest.raises(DataError, match="no annotation file"):
        annotations.for_dataset(dataset)
    _write(tmp_path / "other.csv", DDTI_HEADER, [["elsewhere.png", "", "", "", ""]])
    with pytest.raises(DataError, match="names none"):
        annotations.for_dataset(dataset, tmp_path / "other.csv")
    with pytest.raises(DataError, match="not found"):
        annotations.for_dataset(dataset, tmp_path / "missing.csv")


# --------------------------------------------------------------------------- #
# the real annotation files
# --------------------------------------------------------------------------- #
@pytest.mark.shared_data
def test_ddti_annotations_of_thyroid_seed(thyroid_seed):
    dataset = scan(thyroid_seed)
    found = annotations.for_dataset(dataset, thyroid_seed / "ddti-annotations.csv")
    anns = [a for a in found if a]
    assert len(anns) == 314 and sum(a.has_outline for a in anns) == 308
    for ann in anns:
        if not ann.has_outline:
            assert ann.box is None
            continue
        with Image.open(ann.image) as im:
            width, height = im.size
        mask = ann.mask(height, width)
        x, y, w, h = ann.roi()
        assert 0 <= x and 0 <= y and x + w <= width and y + h <= height
        assert mask[y : y + h + 1, x : x + w + 1].any()
        bx, by, bw, bh = ann.box  # DDTI's box holds every outline
        assert bx <= x and by <= y and x + w <= bx + bw and y + h <= by + bh
    assert all(a.row.get("tirads") is not None for a in anns)  # raw row kept for descriptors


@pytest.mark.shared_data
def test_breast_us_lesion_masks(thyroid_seed):
    root = thyroid_seed.parent / "breast-us"
    if not root.is_dir():
        pytest.skip(f"real data not available: {root} is absent")
    table = annotations.read_annotations(root / "annotations.csv")
    assert len(table) == 780
    dataset = scan(root / "images")
    found = annotations.for_dataset(dataset, root / "annotations.csv")
    assert all(found)
    for ann in list(table.values())[::20]:
        row = ann.row
        height, width = int(row["height"]), int(row["width"])
        mask = ann.mask(height, width)
        if row["label"] == "normal":
            assert not mask.any() and ann.roi(height, width) is None
        else:
            x, y, w, h = ann.roi(height, width)
            assert mask[y : y + h, x : x + w].mean() > 0.3
