"""A Finding as a DICOM Structured Report (highdicom): TID 1500 in a Comprehensive SR.

The report is a TID 1500 Measurement Report holding one measurement group for the
nodule finding: TID 1410 (planar ROI, with the region as an SCOORD polyline on the
source frame) when the model used an ROI, else TID 1501 (image-level, referencing the
source frame). The group carries the class probabilities, the operating point, the
decision, the TI-RADS estimates when present, the algorithm identification (model
name, version, ONNX sha256) and the disclaimer as a comment.

Comprehensive SR (not Comprehensive 3D SR): every coordinate here is a 2D SCOORD on
an ultrasound frame, and Comprehensive SR is the SR storage class PACS and viewers
have supported longest. The document is marked unverified (VerificationFlag) and its
content qualification RESEARCH: nobody has signed it and it is not a product result.

highdicom checks the content as it is built: a report it cannot build is a ValueError
here, never a bad object in the PACS.
"""

from __future__ import annotations

import io

import numpy as np
from pydicom import Dataset
from pydicom.uid import generate_uid

from service.hospital import findings as fx
from service.hospital.findings import Finding

REQUIRED = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
SERIES_NUMBER = 9901  # the CAD's series, apart from the scanner's
SERIES_DESCRIPTION = "thyroid-cad AI findings (research, not for diagnostic use)"


class SourceNotUsable(ValueError):
    """The source dataset lacks what an SR must reference (its UIDs)."""


def missing_uids(source: Dataset) -> list[str]:
    """The UIDs an SR must reference that `source` lacks."""
    return [k for k in REQUIRED if not str(source.get(k, "") or "").strip()]


def _algorithm(found: Finding):
    from highdicom.sr import AlgorithmIdentification

    m, p = found.model, found.prediction
    return AlgorithmIdentification(
        name=m.name,
        version=str(m.version),
        parameters=[
            f"onnx_sha256={m.onnx_sha256}",
            f"positive_class={p.positive_class}",
            f"threshold={p.threshold}",
        ],
    )


def _measurements(found: Finding) -> list:
    from highdicom.sr import Measurement

    unit = fx.NO_UNITS.dicom()
    p = found.prediction
    out = [
        Measurement(name=fx.probability_concept(name).dicom(), value=value, unit=unit)
        for name, value in p.probabilities.items()
    ]
    out.append(Measurement(name=fx.CAD_OPERATING_POINT.dicom(), value=p.threshold, unit=unit))
    for d in found.descriptors:
        name = fx.descriptor_probability_concept(d.descriptor).dicom()
        out.append(Measurement(name=name, value=d.probability, unit=unit))
    if found.tirads_points is not None:
        out.append(
            Measurement(
                name=fx.TIRADS_POINTS.dicom(), value=found.tirads_points, unit=fx.POINTS.dicom()
            )
        )
    return out


def _evaluations(found: Finding) -> list:
    from highdicom.sr import QualitativeEvaluation

    p = found.prediction
    out = [
        QualitativeEvaluation(fx.DECISION.dicom(), fx.class_concept(p.decision).dicom()),
        QualitativeEvaluation(fx.MOST_PROBABLE.dicom(), fx.class_concept(p.label).dicom()),
    ]
    for d in found.descriptors:
        name = fx.descriptor_concept(d.descriptor).dicom()
        out.append(QualitativeEvaluation(name, fx.value_concept(d.descriptor, d.value).dicom()))
    if found.tirads_level is not None:
        level = fx.level_concept(found.tirads_level).dicom()
        out.append(QualitativeEvaluation(fx.TIRADS_LEVEL.dicom(), level))
    return out


def box_polyline(roi: tuple[int, int, int, int]) -> np.ndarray:
    """A box (x, y, w, h) in pixels as a closed SCOORD polyline of (column, row) points."""
    x, y, w, h = roi
    return np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]], dtype=np.float32)


def _group(source: Dataset, found: Finding):
    import highdicom as hd

    frames = [found.frame] if found.frame else None
    common = {
        "tracking_identifier": hd.sr.TrackingIdentifier(
            uid=generate_uid(), identifier="thyroid nodule 1"
        ),
        "finding_type": fx.THYROID_NODULE.dicom(),
        "finding_sites": [hd.sr.FindingSite(fx.THYROID.dicom())],
        "algorithm_id": _algorithm(found),
        "measurements": _measurements(found),
        "qualitative_evaluations": _evaluations(found),
    }
    if found.roi is not None:
        region = hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=box_polyline(found.roi),
            source_image=hd.sr.SourceImageForRegion.from_source_image(source, frames),
        )
        group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            referenced_region=region, **common
        )
    else:
        image = hd.sr.SourceImageForMeasurementGroup.from_source_image(source, frames)
        group = hd.sr.MeasurementsAndQualitativeEvaluations(source_images=[image], **common)
    # The disclaimer travels inside the finding, where a reader of the numbers sees it.
    group[0].ContentSequence.append(
        hd.sr.TextContentItem(
            name=fx.COMMENT.dicom(),
            value=found.disclaimer,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    )
    return group


def build(
    source: Dataset,
    found: Finding,
    *,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
):
    """The SR (a highdicom ComprehensiveSR) of `found` on the image `source`.

    Same study and patient as the source (highdicom copies the patient and study
    modules from it), a new series (`series_instance_uid`, default a fresh UID).

    Raises:
        SourceNotUsable: the source lacks its Study/Series/SOP Instance or SOP Class UID.
        ValueError: highdicom refuses the content.
    """
    import highdicom as hd

    missing = missing_uids(source)
    if missing:
        raise SourceNotUsable(f"the source DICOM lacks {', '.join(missing)}")
    m = found.model
    observer = hd.sr.ObserverContext(
        observer_type=hd.sr.CodedConcept("121007", "DCM", "Device"),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=found.device_uid,
            name=m.name,
            manufacturer_name=fx.MANUFACTURER,
            model_name=m.name,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=fx.US_THYROID.dicom(),
        imaging_measurements=[_group(source, found)],
    )
    local = hd.coding_schemes.CodingSchemeIdentificationItem(
        designator=fx.LOCAL,
        name="thyroid-cad local codes (docs/integration.md)",
        responsible_organization=fx.MANUFACTURER,
    )
    sr = hd.sr.ComprehensiveSR(
        evidence=[source],
        content=report,
        series_instance_uid=series_instance_uid or generate_uid(),
        series_number=SERIES_NUMBER,
        sop_instance_uid=sop_instance_uid or generate_uid(),
        instance_number=1,
        manufacturer=fx.MANUFACTURER,
        manufacturer_model_name=m.name[:64],
        software_versions=f"model version {m.version}",
        device_serial_number=m.onnx_sha256[:64],
        series_description=SERIES_DESCRIPTION,
        content_qualification=hd.ContentQualificationValues.RESEARCH,
        coding_schemes=[local],
        is_complete=True,
        is_final=False,
        is_verified=False,
    )
    sr.preamble = b"\x00" * 128  # a Part 10 file, whoever writes it (STOW clients too)
    return sr


def to_bytes(sr: Dataset) -> bytes:
    """The SR as a DICOM Part 10 file."""
    buf = io.BytesIO()
    sr.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
