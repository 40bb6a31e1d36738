"""Tests for the synthetic thyroid-ultrasound phantom (training/phantom.py)."""

from __future__ import annotations

import csv
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from training.phantom import (
    CLASS_NAMES_2,
    CLASS_NAMES_3,
    README_FIRST_LINE,
    generate,
    make_image,
    render_frame,
)

SIZE = 64  # small frames keep the suite fast


def _read_manifest(out: Path) -> list[dict[str, str]]:
    with (out / "manifest.csv").open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == ["image", "case_id"]
        return list(reader)


def _png_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.png"))}


# --------------------------------------------------------------------------- #
# layout, manifest, README
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(("classes", "names"), [(2, CLASS_NAMES_2), (3, CLASS_NAMES_3)])
def test_layout_and_counts(tmp_path: Path, classes: int, names: tuple[str, ...]) -> None:
    out = tmp_path / "nested" / "phantom"  # parent does not exist yet
    counts = generate(out, per_class=5, classes=classes, seed=3, size=SIZE)

    assert counts == {name: 5 for name in names}
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*names, "README.txt", "manifest.csv", "annotations.csv"]
    )
    for name in names:
        files = sorted(p.name for p in (out / name).iterdir())
        assert files == [f"{name}_{i:04d}.png" for i in range(5)]


def test_manifest_matches_files_and_cases_have_one_label(tmp_path: Path) -> None:
    out = tmp_path / "p"
    generate(out, per_class=12, classes=3, seed=5, size=SIZE)
    rows = _read_manifest(out)

    on_disk = {str(p.relative_to(out).as_posix()) for p in out.rglob("*.png")}
    listed = [r["image"] for r in rows]
    assert len(listed) == len(set(listed)) == 36
    assert set(listed) == on_disk

    labels_per_case: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        label = r["image"].split("/")[0]
        assert r["case_id"].startswith(f"phantom-{label}-")
        labels_per_case[r["case_id"]].add(label)
    assert all(len(v) == 1 for v in labels_per_case.values())

    sizes = Counter(r["case_id"] for r in rows)
    assert max(sizes.values()) <= 3
    # grouped splitting needs some cases with several images, and fewer cases than images
    assert any(n >= 2 for n in sizes.values())
    assert len(sizes) < len(rows)


def test_images_of_one_case_are_related_but_not_identical(tmp_path: Path) -> None:
    out = tmp_path / "p"
    generate(out, per_class=10, classes=2, seed=0, size=SIZE)
    rows = _read_manifest(out)
    by_case: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        by_case[r["case_id"]].append(r["image"])

    def coarse(rel: str) -> np.ndarray:  # 8x8 block means: anatomy, not speckle
        a = np.asarray(Image.open(out / rel), dtype=np.float32)[..., 0]
        return a.reshape(8, SIZE // 8, 8, SIZE // 8).mean(axis=(1, 3))

    same, other = [], []
    for case_id, imgs in by_case.items():
        if len(imgs) < 2:
            continue
        a, b = coarse(imgs[0]), coarse(imgs[1])
        raw_a, raw_b = (np.asarray(Image.open(out / i)) for i in imgs[:2])
        assert not np.array_equal(raw_a, raw_b)  # new speckle / shift
        same.append(np.abs(a - b).mean())
        foreign = next(k for k in by_case if k != case_id)
        other.append(np.abs(a - coarse(by_case[foreign][0])).mean())
    assert same
    assert np.mean(same) < 0.5 * np.mean(other)


def test_phantom_passes_its_own_audit(tmp_path: Path) -> None:
    """Frames of different nodules must not look like copies of one frame to the audit.

    Before the phantom varied its anatomy per case (lobe position, probe contact,
    attenuation), the demo data had 13 near-duplicate groups mixing benign and
    malignant images: the split dropped them, and a near-duplicate leak test on the
    phantom tested little. Real frames of different DDTI cases never come within
    12 bits (docs/training.md); 100 cases a class at 128 px keep every pair of different
    cases above the audit's 8 bits.
    """
    from training import audit, data

    out = tmp_path / "p"
    generate(out, per_class=100, classes=2, seed=0, size=128)
    report = audit.audit(data.scan(out))
    assert report["near_duplicate_groups"]  # frames of one case do look alike
    assert report["near_duplicate_groups_across_cases"] == []
    assert report["label_conflicts"] == []
    text = audit.format_report(report)
    assert "within one manifest case: " in text and "at most 8 of 64 bits" in text


def test_readme_says_synthetic(tmp_path: Path) -> None:
    out = tmp_path / "p"
    generate(out, per_class=1, classes=3, seed=42, size=48)
    text = (out / "README.txt").read_text(encoding="utf-8")
    assert text.splitlines()[0] == README_FIRST_LINE
    low = text.lower()
    assert "synthetic" in low
    assert "not patient images" in low
    assert "not for diagnostic use" in low
    assert "seed=42" in text and "classes=3" in text and "size=48" in text


# --------------------------------------------------------------------------- #
# determinism and image properties
# --------------------------------------------------------------------------- #
def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    generate(tmp_path / "a", per_class=4, classes=3, seed=7, size=SIZE)
    generate(tmp_path / "b", per_class=4, classes=3, seed=7, size=SIZE)
    a, b = _png_bytes(tmp_path / "a"), _png_bytes(tmp_path / "b")
    assert a.keys() == b.keys() and len(a) == 12
    assert a == b
    assert (tmp_path / "a" / "manifest.csv").read_bytes() == (
        tmp_path / "b" / "manifest.csv"
    ).read_bytes()


def test_different_seed_gives_different_images(tmp_path: Path) -> None:
    generate(tmp_path / "a", per_class=3, classes=2, seed=1, size=SIZE)
    generate(tmp_path / "b", per_class=3, classes=2, seed=2, size=SIZE)
    a, b = _png_bytes(tmp_path / "a"), _png_bytes(tmp_path / "b")
    assert a.keys() == b.keys()
    assert all(a[k] != b[k] for k in a)


def test_make_image_deterministic_given_rng_state() -> None:
    x = make_image("malignant", np.random.default_rng(11), size=SIZE)
    y = make_image("malignant", np.random.default_rng(11), size=SIZE)
    z = make_image("malignant", np.random.default_rng(12), size=SIZE)
    assert np.array_equal(x, y)
    assert not np.array_equal(x, z)
    # render_frame consumes the generator the same way
    assert np.array_equal(render_frame("malignant", np.random.default_rng(11), SIZE).image, x)


@pytest.mark.parametrize("label", CLASS_NAMES_3)
@pytest.mark.parametrize("size", [32, 64, 100])
def test_image_dtype_shape_and_content(label: str, size: int) -> None:
    img = make_image(label, np.random.default_rng(0), size=size)
    assert img.dtype == np.uint8
    assert img.shape == (size, size, 3)
    assert np.array_equal(img[..., 0], img[..., 1])
    assert np.array_equal(img[..., 0], img[..., 2])
    assert img.std() > 10  # speckle, anatomy: not a constant frame


def test_written_pngs_are_rgb_uint8(tmp_path: Path) -> None:
    generate(tmp_path / "p", per_class=2, classes=2, seed=0, size=SIZE)
    for p in (tmp_path / "p").rglob("*.png"):
        with Image.open(p) as im:
            assert im.mode == "RGB" and im.size == (SIZE, SIZE)
            arr = np.asarray(im)
        assert arr.dtype == np.uint8 and arr.shape == (SIZE, SIZE, 3)
        assert len(np.unique(arr)) > 20


def test_scanner_frame_black_border_text_and_ruler() -> None:
    size = 128
    for seed in range(6):
        f = render_frame("benign", np.random.default_rng(seed), size)
        grey = f.image[..., 0]
        fov = f.fov_mask
        ys, xs = np.nonzero(fov)
        # field of view leaves a border on every side
        assert ys.min() > 0 and xs.min() > 0 and ys.max() < size - 1 and xs.max() < size - 1
        # burned-in text: bright pixels in the top-left corner, above the field of view
        corner = grey[: ys.min(), : size // 2]
        assert (corner > 200).sum() >= 10
        # ruler: bright tick marks right of the field of view
        right = grey[:, xs.max() + 1 :]
        tick_rows = np.nonzero((right > 150).any(axis=1))[0]
        assert len(tick_rows) >= 10
        # everything else outside the field of view is black
        outside = ~fov
        outside[: ys.min(), : size // 2] = False
        outside[:, xs.max() + 1 :] = False
        assert grey[outside].max() == 0
        # attenuation: the bottom of the field of view is darker than the top half
        rows = np.nonzero(fov.any(axis=1))[0]
        h = len(rows)
        top_half = grey[rows[h // 8 : h // 2]][fov[rows[h // 8 : h // 2]]].mean()
        bottom = grey[rows[-h // 6 :]][fov[rows[-h // 6 :]]].mean()
        assert bottom < top_half


# --------------------------------------------------------------------------- #
# class signals
# --------------------------------------------------------------------------- #
def _frames(label: str, n: int, size: int = SIZE, start: int = 100):
    return [render_frame(label, np.random.default_rng(start + i), size) for i in range(n)]


def _inside_and_contrast(f) -> tuple[float, float]:
    """Median grey level inside the nodule, and minus that of a ring around it."""
    grey = f.image[..., 0].astype(np.float32)
    m = f.nodule_mask
    ring = ndimage.binary_dilation(m, iterations=3) & ~ndimage.binary_dilation(m) & f.fov_mask
    inside = float(np.median(grey[m]))  # median: robust against the echogenic foci
    return inside, inside - float(np.median(grey[ring]))


def test_malignant_nodules_darker_than_benign() -> None:
    benign, malignant = _frames("benign", 40), _frames("malignant", 40)
    b = np.array([_inside_and_contrast(f) for f in benign])
    m = np.array([_inside_and_contrast(f) for f in malignant])

    assert m[:, 0].mean() < b[:, 0].mean() - 10  # darker on average, all benign kinds
    # against the surrounding parenchyma: every malignant nodule is markedly hypoechoic,
    # every solid benign one iso- or hyperechoic, cysts anechoic (darker still)
    kinds = np.array([f.features["kind"] for f in benign])
    assert set(kinds) == {"iso", "hyper", "cystic"}
    assert m[:, 1].max() < -15
    assert b[kinds != "cystic", 1].min() > -15
    assert b[kinds == "cystic", 1].max() < m[:, 1].mean()


def test_nodule_shape_and_foci_features() -> None:
    for f in _frames("benign", 20, size=128):
        assert f.nodule_mask.sum() > 50
        assert f.features["taller_than_wide"] is False
        assert f.features["echogenic_foci"] == 0
        assert f.features["kind"] in {"iso", "hyper", "cystic"}
    mal = _frames("malignant", 20, size=128)
    for f in mal:
        assert f.nodule_mask.sum() > 50
        assert f.features["taller_than_wide"] is True
        assert f.features["kind"] == "hypo"
    assert sum(f.features["echogenic_foci"] > 0 for f in mal) >= 12
    assert any(f.features["posterior"] == "shadowing" for f in mal)


def test_normal_has_no_nodule() -> None:
    for f in _frames("normal", 5):
        assert not f.nodule_mask.any()
        assert f.features["kind"] == "none"


# --------------------------------------------------------------------------- #
# argument validation and directory safety
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"classes": 4}, "classes"),
        ({"classes": 1}, "classes"),
        ({"classes": 2.0}, "classes"),
        ({"classes": "3"}, "classes"),
        ({"per_class": 0}, "per_class"),
        ({"per_class": -3}, "per_class"),
        ({"per_class": 2.5}, "per_class"),
        ({"size": 31}, "size"),
        ({"size": 16}, "size"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_arguments_raise(tmp_path: Path, kwargs: dict, match: str) -> None:
    args = {"per_class": 1, "classes": 2, "seed": 0, "size": 32} | kwargs
    out = tmp_path / "p"
    with pytest.raises(ValueError, match=match):
        generate(out, **args)
    assert not out.exists()  # nothing written before validation


def test_make_image_rejects_bad_label_and_size() -> None:
    with pytest.raises(ValueError, match="label"):
        make_image("suspicious", np.random.default_rng(0), 64)
    with pytest.raises(ValueError, match="size"):
        make_image("benign", np.random.default_rng(0), 8)


def test_refuses_non_empty_foreign_directory(tmp_path: Path) -> None:
    out = tmp_path / "user"
    out.mkdir()
    (out / "scan_001.png").write_bytes(b"not ours")
    with pytest.raises(ValueError, match="not empty"):
        generate(out, per_class=1, classes=2, size=32)
    assert sorted(p.name for p in out.iterdir()) == ["scan_001.png"]
    assert (out / "scan_001.png").read_bytes() == b"not ours"


def test_refuses_file_path(tmp_path: Path) -> None:
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(ValueError):
        generate(f, per_class=1, size=32)


def test_empty_existing_directory_is_fine(tmp_path: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    assert generate(out, per_class=1, classes=2, size=32) == {"benign": 1, "malignant": 1}


def test_regenerates_over_previous_phantom_without_stale_files(tmp_path: Path) -> None:
    out = tmp_path / "p"
    generate(out, per_class=6, classes=3, seed=0, size=32)
    counts = generate(out, per_class=2, classes=2, seed=1, size=32)
    assert counts == {"benign": 2, "malignant": 2}
    assert not (out / "normal").exists()
    assert len(list(out.rglob("*.png"))) == 4
    assert len(_read_manifest(out)) == 4
    assert "seed=1" in (out / "README.txt").read_text(encoding="utf-8")


def test_refuses_previous_phantom_with_user_files_mixed_in(tmp_path: Path) -> None:
    out = tmp_path / "p"
    generate(out, per_class=2, classes=2, seed=0, size=32)
    (out / "benign" / "my_patient.png").write_bytes(b"user data")
    with pytest.raises(ValueError, match="not empty"):
        generate(out, per_class=2, classes=2, seed=0, size=32)
    assert (out / "benign" / "my_patient.png").read_bytes() == b"user data"
    assert (out / "benign" / "benign_0000.png").exists()


def test_refuses_directory_with_foreign_readme(tmp_path: Path) -> None:
    out = tmp_path / "p"
    out.mkdir()
    (out / "README.txt").write_text("My thesis data\n", encoding="utf-8")
    with pytest.raises(ValueError):
        generate(out, per_class=1, size=32)
    assert (out / "README.txt").read_text(encoding="utf-8") == "My thesis data\n"


def test_refuses_phantom_whose_class_dir_is_a_symlink(tmp_path: Path) -> None:
    out = tmp_path / "p"
    generate(out, per_class=1, classes=2, seed=0, size=32)
    user = tmp_path / "user_scans"
    user.mkdir()
    (user / "benign_0000.png").write_bytes(b"user data")
    for p in (out / "benign").iterdir():
        p.unlink()
    (out / "benign").rmdir()
    (out / "benign").symlink_to(user, target_is_directory=True)
    with pytest.raises(ValueError, match="not empty"):
        generate(out, per_class=1, classes=2, seed=0, size=32)
    assert (user / "benign_0000.png").read_bytes() == b"user data"
