"""One scored image as a finding, and the codes the DICOM SR and the FHIR bundle share.

Both structured outputs (service/hospital/dicom_sr.py, service/hospital/fhir.py) are written from a
Finding, with the concepts below, so they say the same thing in the same words: one
thyroid nodule finding (SNOMED CT), its probabilities (DICOM "Probability of cancer"
for the malignant class), the decision at the model's operating point (DICOM "CAD
Operating Point"), the region used and the TI-RADS descriptor estimates when the
prediction carries them, and the model that made it. Standard codes where they exist,
local codes (scheme 99TCAD, docs/integration.md lists them) where they do not.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from service.inference.pipeline import Scored
from service.schemas import DISCLAIMER, ModelOut, PredictionOut

# Coding scheme designator (DICOM) and system URI (FHIR) of each scheme used.
SYSTEMS = {
    "SCT": "http://snomed.info/sct",
    "LN": "http://loinc.org",
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
    "UCUM": "http://unitsofmeasure.org",
    "99TCAD": "urn:thyroid-cad:codes",  # local: this project's own concepts
}
LOCAL = "99TCAD"
MANUFACTURER = "thyroid-cad"


@dataclass(frozen=True)
class Concept:
    code: str
    scheme: str  # a key of SYSTEMS
    meaning: str

    def dicom(self):
        """As a highdicom CodedConcept."""
        from highdicom.sr import CodedConcept

        return CodedConcept(self.code, self.scheme, self.meaning)

    def fhir(self) -> dict:
        """As a FHIR Coding (a dict)."""
        return {"system": SYSTEMS[self.scheme], "code": self.code, "display": self.meaning}


THYROID = Concept("69748006", "SCT", "Thyroid")
THYROID_NODULE = Concept("237495005", "SCT", "Thyroid nodule")
US_THYROID = Concept("25010-0", "LN", "US Thyroid Report")
PROBABILITY_OF_CANCER = Concept("111047", "DCM", "Probability of cancer")
CAD_OPERATING_POINT = Concept("111071", "DCM", "CAD Operating Point")
COMMENT = Concept("121106", "DCM", "Comment")
NO_UNITS = Concept("1", "UCUM", "no units")
POINTS = Concept("{points}", "UCUM", "points")
STANDARD_CLASSES = {
    "malignant": Concept("21594007", "SCT", "Malignant"),
    "benign": Concept("30807003", "SCT", "Benign"),
}
DECISION = Concept("decision", LOCAL, "Decision at the operating point")
MOST_PROBABLE = Concept("most-probable-class", LOCAL, "Most probable class")
ROI = Concept("roi", LOCAL, "Region of interest used by the model")
TIRADS_LEVEL = Concept("tirads-level", LOCAL, "ACR TI-RADS level (model estimate)")
TIRADS_POINTS = Concept("tirads-points", LOCAL, "ACR TI-RADS points (model estimate)")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")[:40] or "x"


def class_concept(name: str) -> Concept:
    """A class name of the model card as a value: SNOMED CT where it has one."""
    return STANDARD_CLASSES.get(name.lower()) or Concept(f"class-{_slug(name)}", LOCAL, name)


def probability_concept(name: str) -> Concept:
    """The measurement name of P(class): DICOM's "Probability of cancer" for malignant."""
    if name.lower() == "malignant":
        return PROBABILITY_OF_CANCER
    return Concept(f"probability-{_slug(name)}", LOCAL, f"Probability of {name}")


def descriptor_concept(descriptor: str) -> Concept:
    words = descriptor.replace("_", " ")
    return Concept(f"tirads-{_slug(descriptor)}", LOCAL, f"ACR TI-RADS {words} (model estimate)")


def descriptor_probability_concept(descriptor: str) -> Concept:
    words = descriptor.replace("_", " ")
    return Concept(
        f"tirads-{_slug(descriptor)}-probability", LOCAL, f"Probability of the {words} estimate"
    )


def value_concept(descriptor: str, value: str) -> Concept:
    return Concept(f"{_slug(descriptor)}-{_slug(value)}"[:64], LOCAL, str(value)[:64])


def level_concept(level: str) -> Concept:
    return Concept(f"tirads-{_slug(level)}", LOCAL, f"ACR TI-RADS {level}")


@dataclass(frozen=True)
class Descriptor:
    """One TI-RADS descriptor estimate: the most probable value, its probability, points."""

    descriptor: str
    value: str
    probability: float
    points: int | None


@dataclass(frozen=True)
class Finding:
    """What the structured outputs report about one image (never patient data)."""

    model: ModelOut
    prediction: PredictionOut
    # (x, y, width, height) in pixels of the source frame, when the model used an ROI
    roi: tuple[int, int, int, int] | None = None
    frame: int | None = None  # 1-based frame of a multi-frame source
    descriptors: tuple[Descriptor, ...] = ()
    tirads_level: str | None = None
    tirads_points: int | None = None
    disclaimer: str = DISCLAIMER

    @property
    def device_uid(self) -> str:
        """A UID for this model version (same name, version and file: same UID)."""
        from pydicom.uid import generate_uid

        m = self.model
        return generate_uid(entropy_srcs=[MANUFACTURER, m.name, str(m.version), m.onnx_sha256])


def _as_dict(value: Any) -> Any:
    return value.model_dump() if hasattr(value, "model_dump") else value


def _box(value: Any) -> tuple[int, int, int, int] | None:
    """An ROI as the prediction may carry it: (x, y, w, h), a dict or an object with them."""
    value = _as_dict(value)
    if value is None:
        return None
    if isinstance(value, Mapping):
        value = (
            value["x"],
            value["y"],
            value.get("w", value.get("width")),
            value.get("h", value.get("height")),
        )
    x, y, w, h = (int(v) for v in value)
    if w < 1 or h < 1:
        raise ValueError(f"ROI of non-positive size: {value}")
    return x, y, w, h


def finding(
    model: ModelOut,
    prediction: PredictionOut,
    *,
    roi: Any = None,
    frame: int | None = None,
    origin: tuple[int, int] = (0, 0),
    descriptors: Any = None,
    tirads: Any = None,
) -> Finding:
    """A Finding; `roi` is in the decoded image's pixels, `origin` where that image starts in
    the source frame (the ultrasound-region crop), so the Finding's ROI is on the source.

    `descriptors`: [{'descriptor', 'value', 'probability', 'points'}, ...] and `tirads`:
    {'level', 'points', ...} as thyroid_cad.tirads.describe() gives them.
    """
    box = _box(roi)
    if box is not None:
        box = (box[0] + origin[1], box[1] + origin[0], box[2], box[3])
    found = tuple(
        Descriptor(
            str(d["descriptor"]),
            str(d["value"]),
            round(float(d["probability"]), 6),
            None if d.get("points") is None else int(d["points"]),
        )
        for d in (_as_dict(x) for x in (_as_dict(descriptors) or ()))
    )
    tirads = _as_dict(tirads) or {}
    return Finding(
        model=model,
        prediction=prediction,
        roi=box,
        frame=frame,
        descriptors=found,
        tirads_level=tirads.get("level"),
        tirads_points=None if tirads.get("points") is None else int(tirads["points"]),
    )


def from_scored(scored: Scored, model: ModelOut) -> Finding:
    """The Finding of one scored image. The ROI and TI-RADS descriptors are read from the
    prediction when it carries them (`roi`, `descriptors`, `tirads`), else left out."""
    prediction = scored.prediction
    found = finding(
        model,
        prediction,
        roi=getattr(prediction, "roi", None),
        frame=scored.prepared.frame,
        origin=scored.prepared.origin,
        descriptors=getattr(prediction, "descriptors", None),
        tirads=getattr(prediction, "tirads", None),
    )
    ood = scored.ood
    if ood is not None and not ood.in_distribution:
        # The flag travels where the disclaimer does: the SR's comment, the FHIR conclusion.
        warning = f"OUT OF DISTRIBUTION: {ood.reason}. Do not rely on these probabilities. "
        found = dataclasses.replace(found, disclaimer=warning + found.disclaimer)
    return found
