"""Several frames of one nodule: how many a DICOM holds, and the nodule's answer.

The frames' probabilities are combined by thyroid_cad.metrics.case_probabilities, the
same mean that training's case-level AUC uses (docs/training.md), so a nodule scored
here and a case scored in evaluation agree.
"""

from __future__ import annotations

import io

import numpy as np

from service.errors import ApiError
from thyroid_cad import metrics

# Frames one request may hold, uploads and DICOM frames together: the work is linear in
# them and they run one by one through the batcher.
MAX_FRAMES = 32
AGGREGATION = metrics.CASE_AGGREGATION


def dicom_frames(data: bytes) -> int:
    """NumberOfFrames of a DICOM upload (1 for other images), read without pixel data."""
    if not (len(data) > 132 and data[128:132] == b"DICM"):
        return 1
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (InvalidDicomError, ValueError, TypeError, OSError, EOFError) as e:
        raise ApiError(400, "corrupt_dicom", f"cannot read the DICOM header: {e}") from e


def check_count(n: int) -> None:
    if n > MAX_FRAMES:
        raise ApiError(400, "too_many_frames", f"{n} frames in one request; at most {MAX_FRAMES}")


def nodule_probabilities(probabilities: list[np.ndarray]) -> np.ndarray:
    """The nodule's K probabilities from its frames' (AGGREGATION)."""
    combined, _ = metrics.case_probabilities(np.stack(probabilities), [0] * len(probabilities))
    return combined[0]
