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

Sources as hospitals send them (conform()): the SR copies the Patient and General Study
modules of its source, and anonymisers and some modalities drop their Type 2 attributes
or write values the standard does not allow. Absent Type 2 attributes are written empty
(what Type 2 means), malformed ones (a PatientSex other than M, F or O, a date or time
that is no DICOM DA/TM) are written empty too, and each such change is said in the SR's
comments (and by /v1 in a response header), naming the attribute, never its value. The
SR is always UTF-8 (ISO_IR 192), whatever character set the source declared.
"""

from __future__ import annotations

import io

import numpy as np
from pydicom import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import generate_uid
from pydicom.valuerep import DA, TM

from service.hospital import findings as fx
from service.hospital.findings import Finding

REQUIRED = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
SERIES_NUMBER = 9901  # the CAD's series, apart from the scanner's
SERIES_DESCRIPTION = "thyroid-cad AI findings (research, not for diagnostic use)"
# Type 2 attributes of the Patient and General Study modules (PS3.3 C.7.1.1, C.7.2.1) that
# highdicom writes into the SR from its source: absent ones are written empty.
TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
SEXES = ("M", "F", "O")  # PatientSex's enumerated values
# What each malformed value is checked with (pydicom's DA and TM raise on what is no date).
_CHECKS = {"PatientBirthDate": DA, "StudyDate": DA, "StudyTime": TM}
# Modalities highdicom refuses as the source of a measurement (not images of a patient).
NOT_IMAGES = ("SEG", "SR", "DOC", "KO", "PR", "PLAN", "RWV", "REG", "FID", "RTDOSE", "RTPLAN")
_PIXEL_DATA = 0x7FE00010
UTF8 = "ISO_IR 192"


class SourceNotUsable(ValueError):
    """The source dataset cannot be the image an SR references (said why)."""


def missing_uids(source: Dataset) -> list[str]:
    """The UIDs an SR must reference that `source` lacks."""
    return [k for k in REQUIRED if not str(source.get(k, "") or "").strip()]


def unusable(source: Dataset) -> str | None:
    """Why no SR can reference `source`, or None: lacking UIDs, a SOP class that is no
    standard storage class (highdicom copies modules by its IOD), or no image at all."""
    from highdicom._standard_utils import get_sop_class_iod_map  # the IODs highdicom knows

    missing = missing_uids(source)
    if missing:
        return f"an SR must reference its source, and this DICOM lacks {', '.join(missing)}"
    if str(source.SOPClassUID) not in get_sop_class_iod_map():
        return "the source's SOP Class UID is no standard storage class an SR can reference"
    modality = str(source.get("Modality", "") or "")
    if modality in NOT_IMAGES:
        return f"a {modality} instance is not an image an SR measurement can reference"
    return None


def _malformed(keyword: str, value) -> bool:
    if isinstance(value, MultiValue):  # all of them are single-valued
        return True
    text = str(value).strip()
    if not text:
        return False
    if keyword == "PatientSex":
        return text.upper() not in SEXES
    check = _CHECKS.get(keyword)
    if check is None:
        return False
    try:
        check(text)
    except (ValueError, TypeError, OverflowError):
        return True
    return False


def conform(source: Dataset) -> tuple[Dataset, list[str]]:
    """A copy of `source`'s header an SR can be written from, and the changes made to it.

    Every top-level attribute but the pixel data is shared with `source` (which is not
    changed); absent or malformed Type 2 attributes (TYPE2) become empty ones, and each
    change is a note like "PatientSex not M, F or O: written empty" (no values quoted,
    they may identify the patient).
    """
    header = Dataset()
    for element in source:
        if element.tag < _PIXEL_DATA:
            header[element.tag] = element
    notes = []
    for keyword in TYPE2:
        value = header.get(keyword)
        if value is None and keyword in header:
            continue  # present and empty already
        if keyword not in header:
            notes.append(f"{keyword} absent: written empty")
        elif _malformed(keyword, value):
            what = "not M, F or O" if keyword == "PatientSex" else "malformed"
            notes.append(f"{keyword} {what}: written empty")
        else:
            continue
        if keyword in header:
            del header[keyword]
        setattr(header, keyword, None)
    if "Modality" not in header:  # Type 1 of the source's series; the SR's own is "SR"
        header.Modality = ""
    header.SpecificCharacterSet = UTF8  # values are decoded already; written as UTF-8
    return header, notes


def corrections(source: Dataset) -> list[str]:
    """What conform() changes in `source` to write its SR (empty: nothing)."""
    return conform(source)[1]


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


def _text(value: str):
    import highdicom as hd

    return hd.sr.TextContentItem(
        name=fx.COMMENT.dicom(),
        value=value,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )


def _group(source: Dataset, found: Finding, notes: list[str]):
    import highdicom as hd
    from highdicom._standard_utils import is_multiframe_image  # as highdicom checks it

    # Frame numbers only where the SOP class has frames (a 2-frame Secondary Capture has
    # none to reference): the frame scored is then said in a comment.
    frames = [found.frame] if found.frame and is_multiframe_image(source) else None
    if found.frame and frames is None:
        notes = [f"frame {found.frame} of the source image was scored", *notes]
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
    # The disclaimer travels inside the finding, where a reader of the numbers sees it;
    # so do the changes made to the source's header and the frame when it is not referenced.
    group[0].ContentSequence.append(_text(found.disclaimer))
    for note in notes:
        group[0].ContentSequence.append(_text(f"Source header: {note}"[:1024]))
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
    modules from it, as conform() makes them), a new series (`series_instance_uid`,
    default a fresh UID).

    Raises:
        SourceNotUsable: no SR can reference the source (unusable() says why).
        ValueError: highdicom refuses the content.
    """
    import highdicom as hd

    why = unusable(source)
    if why:
        raise SourceNotUsable(why)
    source, notes = conform(source)
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
        imaging_measurements=[_group(source, found, notes)],
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
