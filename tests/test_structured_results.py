"""The DICOM SR and FHIR builders on their own: what they write, read back with the field's
libraries (pydicom, highdicom, fhir.resources). With an ROI and TI-RADS descriptors (what
nodule-centred models will give) and without (today's whole-image models).

No model here: the finding is made from a prediction directly.
"""

from __future__ import annotations

import copy
import io
import json

import dicom_factory as factory
import highdicom as hd
import numpy as np
import pydicom
import pytest
from fhir.resources.R4B.bundle import Bundle

from service.hospital import dicom_sr, fhir, findings
from service.schemas import DISCLAIMER, ModelOut, PredictionOut

MODEL = ModelOut(
    name="thyroid-nodule-classifier",
    version=7,
    alias="champion",
    source_run_id="run-1",
    onnx_sha256="5e" * 32,
    provider="CPUExecutionProvider",
)
PREDICTION = PredictionOut(
    label="malignant",
    probabilities={"benign": 0.231404, "malignant": 0.768596},
    positive_class="malignant",
    threshold=0.4647,
    decision="malignant",
)
DESCRIPTORS = [
    {"descriptor": "composition", "value": "solid or almost completely solid", "probability": 0.81,
     "points": 2},
    {"descriptor": "echogenicity", "value": "very hypoechoic", "probability": 0.62, "points": 3},
]  # fmt: skip
TIRADS = {"level": "TR5", "points": 7, "complete": False}


@pytest.fixture(scope="module")
def source():
    """A 3-frame ultrasound instance, screen layout with an image region."""
    screen, region = factory.on_screen(factory.image())
    return factory.ultrasound([screen] * 3, region=region)


def _with_roi(source_frame: int = 2) -> findings.Finding:
    # The ROI is in the decoded (region-cropped) image; origin is where that image starts.
    return findings.finding(
        MODEL,
        PREDICTION,
        roi=(10, 20, 30, 40),
        frame=source_frame,
        origin=(24, 16),
        descriptors=DESCRIPTORS,
        tirads=TIRADS,
    )


def _read(sr) -> hd.sr.ComprehensiveSR:
    data = dicom_sr.to_bytes(sr)
    assert pydicom.dcmread(io.BytesIO(data)).SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"
    return hd.sr.srread(io.BytesIO(data))


def _items(dataset) -> list:
    """Every content item of an SR, depth first."""
    out = []
    for item in dataset.get("ContentSequence", []):
        out.append(item)
        out.extend(_items(item))
    return out


def _text(sr, meaning: str) -> list[str]:
    return [
        i.TextValue
        for i in _items(sr)
        if i.ValueType == "TEXT" and i.ConceptNameCodeSequence[0].CodeMeaning == meaning
    ]


def test_the_roi_is_the_offset_box_on_the_source_frame():
    found = _with_roi()
    assert found.roi == (10 + 16, 20 + 24, 30, 40)  # x + left, y + top
    assert dicom_sr.box_polyline(found.roi).tolist() == [
        [26, 44], [56, 44], [56, 84], [26, 84], [26, 44]
    ]  # fmt: skip


def test_sr_with_roi_and_descriptors_reads_back(source):
    found = _with_roi()
    sr = _read(dicom_sr.build(source, found))
    # Same patient and study, a new series; the document is unverified research output.
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "StudyInstanceUID"):
        assert sr.get(keyword) == source.get(keyword), keyword
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert sr.SOPInstanceUID not in (source.SOPInstanceUID,)
    assert (sr.VerificationFlag, sr.CompletionFlag) == ("UNVERIFIED", "COMPLETE")
    assert sr.ContentQualification == "RESEARCH"
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == source.StudyInstanceUID
    referenced = evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert referenced.ReferencedSOPInstanceUID == source.SOPInstanceUID

    groups = sr.content.get_planar_roi_measurement_groups()
    assert len(groups) == 1 and not sr.content.get_image_measurement_groups()
    group = groups[0]
    assert group.finding_type.value == findings.THYROID_NODULE.code
    assert group.roi.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
    np.testing.assert_array_equal(group.roi.value, dicom_sr.box_polyline(found.roi))
    region_ref = group.roi.ContentSequence[0].ReferencedSOPSequence[0]  # SELECTED FROM
    assert region_ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert list(np.atleast_1d(region_ref.ReferencedFrameNumber)) == [2]

    measured = {m.name.meaning: m.value for m in group.get_measurements()}
    assert measured["Probability of cancer"] == pytest.approx(0.768596, abs=1e-9)
    assert measured["Probability of benign"] == pytest.approx(0.231404, abs=1e-9)
    assert measured["CAD Operating Point"] == pytest.approx(0.4647, abs=1e-9)
    assert measured["Probability of the composition estimate"] == pytest.approx(0.81)
    assert measured["ACR TI-RADS points (model estimate)"] == 7
    evaluated = {q.name.meaning: q.value for q in group.get_qualitative_evaluations()}
    assert evaluated["Decision at the operating point"].value == "21594007"  # SNOMED malignant
    assert evaluated["ACR TI-RADS echogenicity (model estimate)"].meaning == "very hypoechoic"
    assert evaluated["ACR TI-RADS level (model estimate)"].meaning == "ACR TI-RADS TR5"

    assert _text(sr, "Algorithm Name") == [MODEL.name]
    assert _text(sr, "Algorithm Version") == ["7"]
    assert f"onnx_sha256={MODEL.onnx_sha256}" in _text(sr, "Algorithm Parameters")
    assert _text(sr, "Comment") == [DISCLAIMER]
    assert sr.ManufacturerModelName == MODEL.name and sr.DeviceSerialNumber == MODEL.onnx_sha256
    schemes = {s.CodingSchemeDesignator for s in sr.CodingSchemeIdentificationSequence}
    assert findings.LOCAL in schemes


def test_sr_without_roi_is_an_image_level_finding(source):
    found = findings.finding(MODEL, PREDICTION, frame=1)
    sr = _read(dicom_sr.build(source, found))
    assert not sr.content.get_planar_roi_measurement_groups()
    (group,) = sr.content.get_image_measurement_groups()
    names = {m.name.meaning for m in group.get_measurements()}
    assert names == {"Probability of benign", "Probability of cancer", "CAD Operating Point"}
    assert not [i for i in _items(sr) if i.ValueType == "SCOORD"]
    assert not [n for n in names if "TI-RADS" in n]
    (image,) = group.source_images
    assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID


def test_sr_refuses_a_source_without_its_uids(source):
    broken = copy.deepcopy(source)
    del broken.StudyInstanceUID
    with pytest.raises(dicom_sr.SourceNotUsable, match="StudyInstanceUID"):
        dicom_sr.build(broken, findings.finding(MODEL, PREDICTION))


def _resources(bundle_json: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for entry in bundle_json["entry"]:
        out.setdefault(entry["resource"]["resourceType"], []).append(entry["resource"])
    return out


def _by_code(observations: list[dict]) -> dict[str, dict]:
    return {o["code"]["coding"][0]["code"]: o for o in observations}


def test_fhir_bundle_with_roi_and_descriptors_validates_and_matches(source):
    found = _with_roi()
    built = fhir.bundle(found, source, "req-1")
    text = built.model_dump_json()
    again = Bundle.model_validate(json.loads(text))  # fhir.resources validates it all again
    resources = _resources(again.model_dump(mode="json"))
    (report,) = resources["DiagnosticReport"]
    (device,) = resources["Device"]
    (study,) = resources["ImagingStudy"]
    observations = _by_code(resources["Observation"])
    assert report["status"] == "preliminary" and report["code"]["coding"][0]["code"] == "25010-0"
    assert len(report["result"]) == len(resources["Observation"]) == 2 + 1 + 2 + 1
    assert DISCLAIMER in report["conclusion"]
    assert observations["111047"]["valueQuantity"]["value"] == pytest.approx(0.768596)
    assert observations["probability-benign"]["valueQuantity"]["value"] == pytest.approx(0.231404)
    decision = observations["decision"]
    assert decision["valueCodeableConcept"]["coding"][0]["code"] == "21594007"
    parts = {c["code"]["coding"][0]["code"]: c for c in decision["component"]}
    assert parts["111071"]["valueQuantity"]["value"] == pytest.approx(0.4647)
    assert "POLYLINE 26,44 56,44 56,84 26,84 26,44" in parts["roi"]["valueString"]
    assert "frame 2" in parts["roi"]["valueString"]
    assert observations["tirads-level"]["valueCodeableConcept"]["text"] == "ACR TI-RADS TR5"
    composition = observations["tirads-composition"]
    assert composition["component"][0]["valueQuantity"]["value"] == pytest.approx(0.81)
    versions = {v["type"]["text"]: v["value"] for v in device["version"]}
    assert versions == {"model version": "7", "ONNX sha256": MODEL.onnx_sha256}
    assert device["identifier"][0]["value"] == f"urn:oid:{found.device_uid}"
    assert study["identifier"][0]["value"] == f"urn:oid:{source.StudyInstanceUID}"
    assert study["series"][0]["instance"][0]["uid"] == source.SOPInstanceUID
    for o in resources["Observation"]:
        assert o["subject"]["identifier"]["value"] == factory.PATIENT["PatientID"]
        assert o["device"]["reference"] == f"urn:uuid:{device['id']}"
        assert o["status"] == "preliminary"
    # The patient is named by identifier only: no name or birth date leaves in the bundle.
    for secret in ("Quintessa", "Marigold", "19710203", "1971-02-03"):
        assert secret not in text


def test_fhir_bundle_without_roi_or_dicom_source():
    built = fhir.bundle(findings.finding(MODEL, PREDICTION))
    resources = _resources(built.model_dump(mode="json"))
    assert "ImagingStudy" not in resources
    observations = _by_code(resources["Observation"])
    assert set(observations) == {"probability-benign", "111047", "decision"}
    components = {c["code"]["coding"][0]["code"] for c in observations["decision"]["component"]}
    assert components == {"111071", "most-probable-class"}
    assert all("subject" not in o for o in resources["Observation"])


def test_the_same_model_version_is_the_same_device():
    one, two = findings.finding(MODEL, PREDICTION), findings.finding(MODEL, PREDICTION)
    other = findings.finding(MODEL.model_copy(update={"version": 8}), PREDICTION)
    assert one.device_uid == two.device_uid != other.device_uid


def test_class_names_without_a_standard_code_get_local_ones():
    assert findings.class_concept("Malignant").scheme == "SCT"
    normal = findings.class_concept("normal thyroid")
    assert (normal.scheme, normal.code) == (findings.LOCAL, "class-normal-thyroid")
    assert findings.probability_concept("benign").scheme == findings.LOCAL
