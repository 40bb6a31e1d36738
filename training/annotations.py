"""Nodule annotations: boxes, outlines and lesion masks beside a dataset.

Two CSV layouts are read, both with an ``image`` column relative to the CSV's folder:

* DDTI-style (``thyroid-seed/ddti-annotations.csv``, and the phantom's
  ``annotations.csv``): ``nodule_box_xywh`` (JSON ``[x, y, w, h]`` in the file's
  pixels) and ``nodule_polygons`` (JSON list of ``[[x, y], ...]`` outlines); an empty
  outline means none was drawn (unknown, not "no nodule"). Other columns (the case,
  TI-RADS descriptors) are kept as the raw row.
* mask-style (``breast-us/annotations.csv``): ``masks``, ``;``-separated paths of
  binary mask PNGs, one per lesion, whose union is the image's mask (an all-black
  mask means no lesion, which is known).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from thyroid_cad.imaging import Box
from thyroid_cad.nodule import box_of, largest_component
from training.data import DataError, Dataset

# Annotation files picked up in a dataset root when none is given.
ANNOTATION_NAMES = ("annotations.csv", "ddti-annotations.csv")
CASE_COLUMNS = ("ddti_case", "case_id", "patient_id")

Polygon = tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class Annotation:
    """What is known about the nodule(s) of one image."""

    image: Path  # resolved path of the image file
    rel: str  # the image column as written (relative to the CSV's folder)
    box: Box | None = None  # as given (DDTI: around every outlined nodule)
    polygons: tuple[Polygon, ...] = ()
    mask_files: tuple[Path, ...] = ()
    case_id: str | None = None
    row: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def has_outline(self) -> bool:
        """True when a per-pixel truth exists (outlines or mask files)."""
        return bool(self.polygons or self.mask_files)

    def mask(self, height: int, width: int) -> np.ndarray | None:
        """Boolean height x width mask of every outlined nodule, or None if unknown."""
        if self.polygons:
            canvas = Image.new("1", (width, height), 0)
            draw = ImageDraw.Draw(canvas)
            for polygon in self.polygons:
                if len(polygon) >= 3:
                    draw.polygon([tuple(p) for p in polygon], fill=1, outline=1)
            return np.asarray(canvas, dtype=bool)
        if self.mask_files:
            out = np.zeros((height, width), dtype=bool)
            for path in self.mask_files:
                with Image.open(path) as im:
                    m = np.asarray(im.convert("L")) > 127
                if m.shape != out.shape:
                    raise DataError(
                        f"mask {path} is {m.shape[1]}x{m.shape[0]}, its image {width}x{height}"
                    )
                out |= m
            return out
        return None

    def roi(self, height: int | None = None, width: int | None = None) -> Box | None:
        """Box of the largest outlined nodule (what a user marks, and what the
        localiser proposes); the given box when there is no outline.

        DDTI's own box surrounds every outline of a frame, which on split-screen
        frames (two views of one nodule) spans both halves. Mask files need the
        image's height and width.
        """
        if self.polygons:
            largest = max(self.polygons, key=_polygon_area)
            return _polygon_box(largest)
        if self.mask_files and height and width:
            return box_of(largest_component(self.mask(height, width)))
        return self.box


def _polygon_area(polygon: Polygon) -> float:
    if len(polygon) < 3:
        return 0.0
    xy = np.asarray(polygon, dtype=float)
    x, y = xy[:, 0], xy[:, 1]
    return float(abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))) / 2)


def _polygon_box(polygon: Polygon) -> Box:
    """DDTI's convention: [min x, min y, max x - min x, max y - min y], at least 1 x 1."""
    xy = np.asarray(polygon, dtype=float)
    x0, y0 = np.floor(xy.min(axis=0))
    x1, y1 = np.ceil(xy.max(axis=0))
    return int(x0), int(y0), max(1, int(x1 - x0)), max(1, int(y1 - y0))


def _json_field(value: str, what: str, where: str):
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: {what} is not valid JSON: {e}") from e


def _parse_box(value: str, where: str) -> Box | None:
    if not value:
        return None
    box = _json_field(value, "nodule_box_xywh", where)
    if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, int) for v in box)):
        raise DataError(f"{where}: nodule_box_xywh must be [x, y, w, h] integers, got {value}")
    return tuple(box)  # type: ignore[return-value]


def _parse_polygons(value: str, where: str) -> tuple[Polygon, ...]:
    if not value:
        return ()
    polygons = _json_field(value, "nodule_polygons", where)
    try:
        return tuple(tuple((float(x), float(y)) for x, y in poly) for poly in polygons)
    except (TypeError, ValueError) as e:
        raise DataError(f"{where}: nodule_polygons must be lists of [x, y] points") from e


def read_annotations(path: str | Path) -> dict[Path, Annotation]:
    """Every row of an annotation CSV, keyed by the image's resolved path.

    Raises:
        DataError: the file is missing, has no image column or neither layout's
            columns, or a row is malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"annotation file not found: {path}")
    base = path.parent
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = {c.strip().lower() for c in reader.fieldnames or []}
        if "image" not in columns:
            raise DataError(f"annotation file {path} has no 'image' column")
        if not ({"nodule_box_xywh", "nodule_polygons", "masks"} & columns):
            raise DataError(
                f"annotation file {path} has none of nodule_box_xywh, nodule_polygons, masks"
            )
        case_col = next((c for c in CASE_COLUMNS if c in columns), None)
        out: dict[Path, Annotation] = {}
        for line, raw in enumerate(reader, start=2):
            row = {k.strip().lower(): (v or "").strip() for k, v in raw.items() if k}
            if not row.get("image"):
                continue
            where = f"{path}:{line}"
            rel = row["image"].replace("\\", "/")
            masks = tuple(base / m.strip() for m in row.get("masks", "").split(";") if m.strip())
            ann = Annotation(
                image=(base / rel).resolve(),
                rel=rel,
                box=_parse_box(row.get("nodule_box_xywh", ""), where),
                polygons=_parse_polygons(row.get("nodule_polygons", ""), where),
                mask_files=masks,
                case_id=(row.get(case_col) or None) if case_col else None,
                row=row,
            )
            out[ann.image] = ann
    return out


def find_annotations(root: str | Path) -> Path | None:
    """The annotation file of a dataset root, if it has one of the usual names."""
    return next((Path(root) / n for n in ANNOTATION_NAMES if (Path(root) / n).is_file()), None)


def for_dataset(dataset: Dataset, path: str | Path | None = None) -> list[Annotation | None]:
    """The annotation of every record of a dataset (None where there is none).

    Args:
        path: the annotation CSV; default: one of ANNOTATION_NAMES in the dataset root.

    Raises:
        DataError: no annotation file, or it names none of the dataset's images.
    """
    path = Path(path) if path else find_annotations(dataset.root)
    if path is None:
        raise DataError(
            f"no annotation file given and none of {ANNOTATION_NAMES} in {dataset.root}"
        )
    table = read_annotations(path)
    found = [table.get(r.path.resolve()) for r in dataset.records]
    if table and not any(found):
        raise DataError(f"annotation file {path} names none of the images under {dataset.root}")
    return found
