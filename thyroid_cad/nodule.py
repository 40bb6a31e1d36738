"""The nodule a localiser outlined: its box (the ROI) and its shape.

Pure numpy/scipy, shared by training (ROI proposals for frames without an annotation)
and the service (ROI and shape for a frame sent without a box). The localiser's
output is a probability map over its square input; `propose` maps it back onto the
frame, keeps the largest connected component and boxes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from thyroid_cad.imaging import Box, Geometry, to_original

# Probability above which a pixel belongs to the nodule.
MASK_THRESHOLD = 0.5
# DICOM PhysicalUnitsX/YDirection code for centimetres (PS3.3 C.8.5.5.1.1).
_DICOM_CM = 3
# DICOM RegionSpatialFormat code for a 2D tissue image.
_DICOM_2D = 1


def largest_component(mask: np.ndarray, within: Box | None = None) -> np.ndarray:
    """The largest 8-connected component of a boolean mask (all False if none).

    With `within` (x, y, w, h), the component with the most pixels inside that box, kept
    whole: a box drawn a little tight must not cut the outline, or the nodule's width and
    depth (taller than wide) would be the box's, not the nodule's.
    """
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return np.zeros(mask.shape, dtype=bool)
    counted = labels
    if within is not None:
        x, y, w, h = within
        counted = labels[y : y + h, x : x + w]
    sizes = np.bincount(counted.ravel(), minlength=n + 1)[1:]
    if sizes.max() == 0:  # nothing inside the box
        return np.zeros(mask.shape, dtype=bool)
    return labels == int(np.argmax(sizes)) + 1


def box_of(mask: np.ndarray) -> Box | None:
    """(x, y, w, h) of the pixels set in a mask, or None when it is empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)


@dataclass(frozen=True)
class Proposal:
    """A localiser's answer on one frame: the largest nodule's box and outline."""

    box: Box | None  # None: nothing above the threshold
    mask: np.ndarray  # bool H x W over the frame: the largest component only
    score: float  # highest probability inside the component (0 when empty)


def propose(
    probability: np.ndarray,
    geometry: Geometry,
    threshold: float = MASK_THRESHOLD,
    within: Box | None = None,
) -> Proposal:
    """Localiser output over its square input -> the nodule's box and mask on the frame.

    With `within` (a box the user drew), the outline the box holds most of, whole: the
    nodule the user marked, for its shape. (Clipping the outline to the box made "taller
    than wide" follow the drawn box's own proportions whenever it cut the nodule, so it
    flipped between the proposed box and a drawn one.)
    """
    full = to_original(np.asarray(probability, dtype=np.float32), geometry)
    mask = largest_component(full > threshold, within)
    score = float(full[mask].max()) if mask.any() else 0.0
    return Proposal(box_of(mask), mask, score)


def shape(mask: np.ndarray, spacing_mm: tuple[float, float] | None = None) -> dict | None:
    """Shape of the largest nodule in a frame mask (ACR TI-RADS measures).

    Width is the extent across the beam (columns), depth along it (rows), as TI-RADS
    measures them on a transverse image; taller-than-wide means depth / width > 1
    (a malignancy sign, 3 points). With a pixel spacing (mm per pixel along x and y,
    e.g. from DICOM ultrasound regions) the sizes are also given in mm and the ratio
    uses physical lengths.

    Returns:
        None for an empty mask, else width_px, depth_px, area_px,
        taller_than_wide_ratio, taller_than_wide, and width_mm, depth_mm, area_mm2
        (None without a spacing).
    """
    component = largest_component(np.asarray(mask, dtype=bool))
    box = box_of(component)
    if box is None:
        return None
    _, _, width, depth = box
    area = int(component.sum())
    out: dict = {"width_px": width, "depth_px": depth, "area_px": area}
    dx, dy = spacing_mm if spacing_mm else (1.0, 1.0)
    ratio = (depth * dy) / (width * dx)
    out.update(taller_than_wide_ratio=round(float(ratio), 3), taller_than_wide=bool(ratio > 1))
    if spacing_mm:
        out.update(
            width_mm=round(width * dx, 2),
            depth_mm=round(depth * dy, 2),
            area_mm2=round(area * dx * dy, 2),
        )
    else:
        out.update(width_mm=None, depth_mm=None, area_mm2=None)
    out["spacing_mm"] = [float(dx), float(dy)] if spacing_mm else None
    return out


def ultrasound_spacing_mm(dataset, point: tuple[int, int] | None = None):
    """(mm per pixel along x, along y) from a DICOM dataset's ultrasound regions.

    Reads SequenceOfUltrasoundRegions (PS3.3 C.8.5.5): PhysicalDeltaX / Y of a 2D
    tissue region whose units are centimetres. With `point` (x, y), the region that
    contains it; otherwise the regions must agree. Works on anything with DICOM
    keyword attributes (a pydicom Dataset), so no DICOM library is needed here.

    Returns:
        The spacing, or None when the frame carries no usable calibration.
    """
    found = []
    for region in getattr(dataset, "SequenceOfUltrasoundRegions", None) or []:
        try:
            fmt = int(getattr(region, "RegionSpatialFormat", _DICOM_2D))
            ux = int(region.PhysicalUnitsXDirection)
            uy = int(region.PhysicalUnitsYDirection)
            dx, dy = float(region.PhysicalDeltaX), float(region.PhysicalDeltaY)
        except (AttributeError, TypeError, ValueError):
            continue
        if fmt != _DICOM_2D or ux != _DICOM_CM or uy != _DICOM_CM or dx <= 0 or dy <= 0:
            continue
        if point is not None:
            try:
                x0, y0 = int(region.RegionLocationMinX0), int(region.RegionLocationMinY0)
                x1, y1 = int(region.RegionLocationMaxX1), int(region.RegionLocationMaxY1)
            except (AttributeError, TypeError, ValueError):
                continue
            if not (x0 <= point[0] <= x1 and y0 <= point[1] <= y1):
                continue
        found.append((round(abs(dx) * 10, 6), round(abs(dy) * 10, 6)))
    if not found or len(set(found)) > 1:
        return None
    return found[0]
