"""Bring image datasets in: folder layouts, class-name aliases, case manifests.

Accepted layouts (the ones hospitals and Kaggle use):
    ROOT/<class>/*            one pool, split later
    ROOT/<split>/<class>/*    a published split (train/val/test), audited for leaks
    ROOT/images/<class>/*     images beside other folders (breast-us: images/ and masks/);
                              paths stay relative to ROOT, as its annotations.csv has them
An optional manifest CSV (``image`` column relative to ROOT, plus ``case_id`` or
``patient_id``) groups images of one case; an optional ``source`` column names the
scanner / site each image came from (see training.sources). ``manifest.csv`` or
``cases.csv`` in ROOT is picked up when no manifest is given.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from thyroid_cad.files import sha256_file
from thyroid_cad.imaging import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)

# Class folders as published by the datasets we know (the thesis used French names).
CLASS_ALIASES = {
    "benign": "benign",
    "benin": "benign",
    "bénin": "benign",
    "benigne": "benign",
    "bénigne": "benign",
    "malignant": "malignant",
    "malin": "malignant",
    "maligne": "malignant",
    "malignancy": "malignant",
    "normal": "normal",
    "normal thyroid": "normal",
    "normal_thyroid": "normal",
    "normal-thyroid": "normal",
}
# Thyroid classes in the order models output them; other datasets sort their names.
THYROID_CLASS_ORDER = ("normal", "benign", "malignant")
SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}
MANIFEST_NAMES = ("manifest.csv", "cases.csv")
CASE_COLUMNS = ("case_id", "patient_id", "case", "patient")
SOURCE_COLUMN = "source"
# A dataset root whose images are in ROOT/images/<class>/ beside other folders (masks).
IMAGES_FOLDER = "images"


class DataError(ValueError):
    """The dataset cannot be used as given; the message says why."""


def canonical_class(name: str) -> str:
    """Map a class folder name to its canonical name (unknown names: lower case)."""
    key = " ".join(name.strip().lower().split())
    return CLASS_ALIASES.get(key, key)


@dataclass(frozen=True)
class Record:
    """One image: where it is, its class, the split it was published in, its case and
    the source (scanner, site) a manifest names for it."""

    path: Path
    rel: str
    label: str
    split: str | None = None
    case_id: str | None = None
    source: str | None = None


@dataclass
class Dataset:
    root: Path
    records: list[Record]
    class_names: tuple[str, ...]
    manifest: Path | None = None
    _sha256: list[str] | None = field(default=None, repr=False)

    @property
    def labels(self) -> list[int]:
        index = {c: i for i, c in enumerate(self.class_names)}
        return [index[r.label] for r in self.records]

    def class_counts(self) -> dict[str, int]:
        counts = Counter(r.label for r in self.records)
        return {c: counts[c] for c in self.class_names}

    def sha256(self) -> list[str]:
        """Content hash of every file (computed once, in parallel)."""
        if self._sha256 is None:
            with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
                self._sha256 = list(pool.map(sha256_file, (r.path for r in self.records)))
        return self._sha256

    def fingerprint(self) -> str:
        """Short hash of (relative path, label, content) of every image."""
        h = hashlib.sha256()
        for record, digest in sorted(
            zip(self.records, self.sha256(), strict=True), key=lambda x: x[0].rel
        ):
            h.update(f"{record.rel}\t{record.label}\t{digest}\n".encode())
        return h.hexdigest()[:16]

    def subset(self, indices: list[int]) -> Dataset:
        shas = self.sha256() if self._sha256 is not None else None
        return Dataset(
            root=self.root,
            records=[self.records[i] for i in indices],
            class_names=self.class_names,
            manifest=self.manifest,
            _sha256=[shas[i] for i in indices] if shas is not None else None,
        )


# Filled in by training.audit; here, below the audit and training.sources, which both read it.
@dataclass
class ImageInfo:
    """What one pass over the pixels learns about an image (None fields: unreadable)."""

    size: tuple[int, int] | None
    phash: int | None
    error: str | None = None


def _order_classes(names: set[str]) -> tuple[str, ...]:
    if names <= set(THYROID_CLASS_ORDER):
        return tuple(c for c in THYROID_CLASS_ORDER if c in names)
    return tuple(sorted(names))


def _images_in(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def read_manifest(path: Path) -> dict[str, str]:
    """Map image path (relative to the dataset root, '/'-separated) to case id."""
    return _read_manifest(path)[0]


def _read_manifest(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(image -> case id, image -> source); the source column is optional."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = [c.strip().lower() for c in reader.fieldnames or []]
        if "image" not in fields:
            raise DataError(f"manifest {path} has no 'image' column (columns: {fields})")
        case_col = next((c for c in CASE_COLUMNS if c in fields), None)
        if case_col is None:
            raise DataError(f"manifest {path} has none of the case columns {CASE_COLUMNS}")
        cases, sources = {}, {}
        for row in reader:
            row = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k}
            image = row["image"].replace("\\", "/")
            if image and row[case_col]:
                cases[image] = row[case_col]
            if image and row.get(SOURCE_COLUMN):
                sources[image] = row[SOURCE_COLUMN]
    return cases, sources


def scan(root: str | Path, manifest: str | Path | None = None) -> Dataset:
    """Find every image under ROOT in one of the accepted layouts.

    Raises:
        DataError: ROOT is missing, holds no images, or has fewer than two classes.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    split_dirs = [d for d in subdirs if d.name.lower() in SPLIT_ALIASES]
    images_dir = _images_folder(root) if not split_dirs else None
    if images_dir is not None:
        log.info("images/ layout: classes from %s, other folders ignored", images_dir)
        groups = [(None, c) for c in _class_dirs(images_dir)]
    elif split_dirs:
        ignored = [d.name for d in subdirs if d not in split_dirs]
        if ignored:
            log.warning("split layout: ignoring folders that are not splits: %s", ignored)
        groups = [(SPLIT_ALIASES[d.name.lower()], c) for d in split_dirs for c in _class_dirs(d)]
    else:
        groups = [(None, c) for c in subdirs]

    manifest_path = (
        Path(manifest)
        if manifest
        else next((root / n for n in MANIFEST_NAMES if (root / n).is_file()), None)
    )
    cases, sources = _read_manifest(manifest_path) if manifest_path else ({}, {})

    records = []
    for split, class_dir in groups:
        label = canonical_class(class_dir.name)
        for path in _images_in(class_dir):
            rel = path.relative_to(root).as_posix()
            records.append(Record(path, rel, label, split, cases.get(rel), sources.get(rel)))
    if not records:
        raise DataError(
            f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found under {root} in "
            "ROOT/<class>/* or ROOT/<split>/<class>/*"
        )
    class_names = _order_classes({r.label for r in records})
    if len(class_names) < 2:
        raise DataError(f"need at least two classes, found {list(class_names)} under {root}")
    if cases and not any(r.case_id for r in records):
        raise DataError(f"manifest {manifest_path} names none of the images under {root}")
    return Dataset(root=root, records=records, class_names=class_names, manifest=manifest_path)


def _images_folder(root: Path) -> Path | None:
    """ROOT/images when it holds class folders of images and no image itself (breast-us)."""
    folder = root / IMAGES_FOLDER
    if not folder.is_dir() or any(
        p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.iterdir()
    ):
        return None
    with_images = [d for d in _class_dirs(folder) if _images_in(d)]
    return folder if len(with_images) >= 2 else None


def _class_dirs(split_dir: Path) -> list[Path]:
    return sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
