"""A Finding as a FHIR R4 Bundle: DiagnosticReport, Observations, Device (fhir.resources).

Built after the HL7 "DICOM SR to FHIR Resource Mapping" IG, so the bundle and the SR say
the same thing in the same structure: one Observation per measurement or qualitative
evaluation of the SR's measurement group (class probabilities, the decision with the
operating point, each TI-RADS estimate), a DiagnosticReport around them, a Device for the
model version, and an ImagingStudy for the DICOM source. FHIR R4 has no ImagingSelection
(R5): the region used is a component of the decision Observation (a polyline in the
source frame's pixels, as in the SR's SCOORD).

fhir.resources ships R5 (default), R4B and STU3; the resources are built with its R4B
models, whose DiagnosticReport, Observation, Device, ImagingStudy and Bundle have the same
elements as R4 (4.0.1) for everything used here. Every resource is validated by its model
as it is built, and the bundle once more as a whole.

Everything is `status: preliminary`: a model's estimate that no clinician has verified.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from pydicom import Dataset

from service.hospital import findings as fx
from service.hospital.dicom_sr import box_polyline, missing_uids
from service.hospital.findings import Finding

FHIR_JSON = "application/fhir+json"
DICOM_UID = "urn:dicom:uid"  # identifier system for DICOM UIDs (value urn:oid:...)
RADIOLOGY = {
    "system": "http://terminology.hl7.org/CodeSystem/v2-0074",
    "code": "RAD",
    "display": "Radiology",
}
IMAGING = {
    "system": "http://terminology.hl7.org/CodeSystem/observation-category",
    "code": "imaging",
    "display": "Imaging",
}
DCM_US = {"system": fx.SYSTEMS["DCM"], "code": "US", "display": "Ultrasound"}


def _concept(c: fx.Concept) -> dict:
    return {"coding": [c.fhir()], "text": c.meaning}


def _ratio(value: float) -> dict:
    return {"value": value, "unit": "1", "system": fx.SYSTEMS["UCUM"], "code": "1"}


def _uid(value: str) -> dict:
    return {"system": DICOM_UID, "value": f"urn:oid:{value}"}


def _ref(resource: dict) -> dict:
    return {"reference": f"urn:uuid:{resource['id']}"}


def _subject(source: Dataset | None) -> dict | None:
    """The patient, by identifier only (the EHR resolves it); nothing else is copied."""
    patient_id = str(source.get("PatientID", "") or "").strip() if source is not None else ""
    if not patient_id:
        return None
    identifier: dict = {"value": patient_id}
    issuer = str(source.get("IssuerOfPatientID", "") or "").strip()
    if issuer:
        identifier["assigner"] = {"display": issuer}
    return {"type": "Patient", "identifier": identifier}


def _device(found: Finding) -> dict:
    m = found.model
    return {
        "resourceType": "Device",
        "id": str(uuid.uuid4()),
        "identifier": [_uid(found.device_uid)],
        "status": "active",
        "manufacturer": fx.MANUFACTURER,
        "deviceName": [{"name": m.name, "type": "model-name"}],
        "modelNumber": m.name,
        "type": {"text": "AI software: thyroid nodule ultrasound CAD (research)"},
        "version": [
            {"type": {"text": "model version"}, "value": str(m.version)},
            {"type": {"text": "ONNX sha256"}, "value": m.onnx_sha256},
        ],
        "note": [{"text": found.disclaimer}],
    }


def _imaging_study(source: Dataset, subject: dict) -> dict:
    instance = {
        "uid": str(source.SOPInstanceUID),
        "sopClass": {"system": "urn:ietf:rfc:3986", "code": f"urn:oid:{source.SOPClassUID}"},
    }
    return {
        "resourceType": "ImagingStudy",
        "id": str(uuid.uuid4()),
        "identifier": [_uid(str(source.StudyInstanceUID))],
        "status": "available",
        "subject": subject,
        "modality": [DCM_US],
        "series": [
            {
                "uid": str(source.SeriesInstanceUID),
                "modality": DCM_US,
                "instance": [instance],
            }
        ],
    }


def _roi_text(found: Finding, source: Dataset | None) -> str:
    points = " ".join(f"{x:g},{y:g}" for x, y in box_polyline(found.roi).tolist())
    where = f"frame {found.frame} of " if found.frame else ""
    image = f"SOP Instance {source.SOPInstanceUID}" if source is not None else "the image sent"
    return f"POLYLINE {points} (column,row pixels of {where}{image})"


def _observations(found: Finding, common: dict, source: Dataset | None) -> list[dict]:
    p = found.prediction

    def observation(code: fx.Concept, **value) -> dict:
        return {
            "resourceType": "Observation",
            "id": str(uuid.uuid4()),
            **common,
            "code": _concept(code),
            **value,
        }

    out = [
        observation(fx.probability_concept(name), valueQuantity=_ratio(value))
        for name, value in p.probabilities.items()
    ]
    components = [
        {"code": _concept(fx.CAD_OPERATING_POINT), "valueQuantity": _ratio(p.threshold)},
        {
            "code": _concept(fx.MOST_PROBABLE),
            "valueCodeableConcept": _concept(fx.class_concept(p.label)),
        },
    ]
    if found.roi is not None:
        components.append({"code": _concept(fx.ROI), "valueString": _roi_text(found, source)})
    out.append(
        observation(
            fx.DECISION,
            valueCodeableConcept=_concept(fx.class_concept(p.decision)),
            component=components,
        )
    )
    for d in found.descriptors:
        parts = [
            {
                "code": _concept(fx.descriptor_probability_concept(d.descriptor)),
                "valueQuantity": _ratio(d.probability),
            }
        ]
        if d.points is not None:
            parts.append({"code": _concept(fx.TIRADS_POINTS), "valueInteger": d.points})
        out.append(
            observation(
                fx.descriptor_concept(d.descriptor),
                valueCodeableConcept=_concept(fx.value_concept(d.descriptor, d.value)),
                component=parts,
            )
        )
    if found.tirads_level is not None:
        parts = []
        if found.tirads_points is not None:
            parts = [{"code": _concept(fx.TIRADS_POINTS), "valueInteger": found.tirads_points}]
        out.append(
            observation(
                fx.TIRADS_LEVEL,
                valueCodeableConcept=_concept(fx.level_concept(found.tirads_level)),
                **({"component": parts} if parts else {}),
            )
        )
    return out


def conclusion(found: Finding) -> str:
    m, p = found.model, found.prediction
    positive = p.probabilities.get(p.positive_class)
    return (
        f"Model estimate ({m.name} version {m.version}): {p.decision} at the operating point "
        f"P({p.positive_class}) >= {p.threshold} (P({p.positive_class}) = {positive}). "
        f"{found.disclaimer}"
    )


def bundle(found: Finding, source: Dataset | None = None, report_id: str | None = None):
    """The FHIR Bundle (type collection) of `found`; `source` is the DICOM header of the
    image, when it was one (patient identifier, study, series and instance UIDs).

    Returns a validated fhir.resources R4B Bundle (`.model_dump(mode="json")` for JSON).

    Raises:
        pydantic.ValidationError: a resource fails its model (a bug, not bad input).
    """
    from fhir.resources.R4B.bundle import Bundle
    from fhir.resources.R4B.device import Device
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport
    from fhir.resources.R4B.imagingstudy import ImagingStudy
    from fhir.resources.R4B.observation import Observation

    issued = datetime.now(UTC).isoformat(timespec="seconds")
    device = _device(found)
    subject = _subject(source)
    study = None
    if source is not None and subject and not missing_uids(source):
        study = _imaging_study(source, subject)
    common: dict = {
        "status": "preliminary",
        "category": [{"coding": [IMAGING]}],
        "issued": issued,
        "device": _ref(device),
        "bodySite": _concept(fx.THYROID),
    }
    if subject:
        common["subject"] = subject
    if study:
        common["derivedFrom"] = [_ref(study)]
    observations = _observations(found, common, source)
    report = {
        "resourceType": "DiagnosticReport",
        "id": str(uuid.uuid4()),
        "status": "preliminary",
        "category": [{"coding": [RADIOLOGY]}],
        "code": _concept(fx.US_THYROID),
        "issued": issued,
        "result": [_ref(o) for o in observations],
        "conclusion": conclusion(found),
        "conclusionCode": [_concept(fx.class_concept(found.prediction.decision))],
    }
    if report_id:
        report["identifier"] = [{"system": "urn:thyroid-cad:request-id", "value": report_id}]
    if subject:
        report["subject"] = subject
    if study:
        report["imagingStudy"] = [_ref(study)]
    resources = [
        DiagnosticReport.model_validate(report),
        *(Observation.model_validate(o) for o in observations),
        Device.model_validate(device),
    ]
    if study:
        resources.append(ImagingStudy.model_validate(study))
    return Bundle.model_validate(
        {
            "resourceType": "Bundle",
            "type": "collection",
            "timestamp": issued,
            "entry": [
                {"fullUrl": f"urn:uuid:{r.id}", "resource": r.model_dump(mode="json")}
                for r in resources
            ],
        }
    )
