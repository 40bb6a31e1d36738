"""DICOM as hospitals send it, through all three answers of /v1/predict (json, dicom-sr,
fhir): pydicom's own collection of real-world files, and ultrasound instances that lack
their Type 2 patient and study attributes or carry malformed ones (issue 17, item 2).

Never a 5xx: a file the JSON route scores gets its FHIR bundle, and its SR unless no SR
can reference it (400 dicom_sr_unavailable, said why); every SR reads back with pydicom
and highdicom.
"""

from __future__ import annotations

import io
from pathlib import Path

import dicom_factory as factory
import highdicom as hd
import pydicom
import pytest
from fastapi.testclient import TestClient
from fhir.resources.R4B.bundle import Bundle
from pydicom.data import get_testdata_files

from service.api.app import create_app
from service.api.routes.formats import SOURCE_CHANGES
from service.hospital.dicom_sr import TYPE2

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


@pytest.fixture(scope="module")
def api(served_module):
    with TestClient(create_app(served_module.settings), raise_server_exceptions=False) as client:
        client.headers["Authorization"] = f"Bearer {served_module.predict_key}"
        yield client


def _post(api, data: bytes, query: str = "", path: str = "/v1/predict", headers=None):
    return api.post(
        f"{path}?heatmap=none{query}",
        files={"file": ("x.dcm", data, "application/octet-stream")},
        headers=headers or {},
    )


def _sr(response) -> hd.sr.ComprehensiveSR:
    """The SR of a 200 answer, read back by pydicom and by highdicom."""
    assert response.headers["content-type"] == "application/dicom"
    assert pydicom.dcmread(io.BytesIO(response.content)).Modality == "SR"
    return hd.sr.srread(io.BytesIO(response.content))


def _comments(dataset) -> list[str]:
    """The SR's Comment text items, depth first (the disclaimer is the first)."""
    out = []
    for item in dataset.get("ContentSequence", []):
        if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeMeaning == "Comment":
            out.append(item.TextValue)
        out.extend(_comments(item))
    return out


def _frames(data: bytes) -> int:
    try:
        header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        return int(header.get("NumberOfFrames", 1) or 1)
    except Exception:  # noqa: BLE001 - what pydicom cannot read is the service's to judge
        return 1


def test_every_pydicom_test_file_in_every_format_is_never_a_5xx(api):
    files = sorted(p for p in map(Path, get_testdata_files()) if p.is_file())
    assert len(files) > 70  # pydicom 3 bundles ~190 (DICOMDIR trees, SR, RT, MR, SC, SEG)
    problems, scored, reports = [], 0, 0
    for path in files:
        data = path.read_bytes()
        frames = _frames(data)
        for query in ["", "&frame=2"] if frames > 1 else [""]:
            answers = {f: _post(api, data, f"&format={f}{query}") for f in ("json", "fhir")}
            answers["dicom-sr"] = _post(api, data, f"&format=dicom-sr{query}")
            for kind, r in answers.items():
                if r.status_code >= 500:
                    problems.append(f"{path.name}{query} {kind}: {r.status_code} {r.text[:200]}")
                elif r.status_code >= 400:  # a 4xx says what is wrong, in the JSON error body
                    assert r.json()["error"]["code"], path.name
            if answers["json"].status_code != 200:
                continue
            scored += 1
            fhir, sr = answers["fhir"], answers["dicom-sr"]
            if fhir.status_code != 200:
                problems.append(f"{path.name}{query} fhir: {fhir.status_code} {fhir.text[:200]}")
            else:
                Bundle.model_validate(fhir.json())
            if sr.status_code == 200:
                reports += 1
                _sr(sr)
            elif (sr.status_code, sr.json()["error"]["code"]) != (400, "dicom_sr_unavailable"):
                problems.append(f"{path.name}{query} dicom-sr: {sr.status_code} {sr.text[:200]}")
    assert not problems, "\n".join(problems)
    # Not vacuous: most of the collection's images are scored and reported.
    assert scored >= 60 and reports >= scored - 6, (scored, reports)


def test_the_accept_header_and_the_pinned_version_route_too(api, served_module):
    """ExplVR_BigEnd.dcm (no PatientID, sex, birth date; a malformed StudyTime) gave 500."""
    (path,) = get_testdata_files("ExplVR_BigEnd.dcm")
    data = Path(path).read_bytes()
    pinned = f"/v1/models/{served_module.name}/versions/{served_module.version}/predict"
    for r in (
        _post(api, data, headers={"Accept": "application/dicom"}),
        _post(api, data, path=pinned, query="&format=dicom-sr"),
    ):
        assert r.status_code == 200, r.text
        sr = _sr(r)
        assert sr.PatientID == "" and sr.PatientSex == "" and sr.PatientBirthDate == ""
        assert "PatientID absent: written empty" in r.headers[SOURCE_CHANGES]


def test_absent_type2_attributes_are_written_empty_and_said(api):
    ds = factory.ultrasound(factory.image())
    for keyword in (*TYPE2, "Modality"):
        delattr(ds, keyword)
    r = _post(api, factory.to_bytes(ds), "&format=dicom-sr")
    assert r.status_code == 200, r.text
    sr = _sr(r)
    changes = r.headers[SOURCE_CHANGES].split("; ")
    assert changes == [f"{k} absent: written empty" for k in TYPE2]
    for keyword in TYPE2:
        assert keyword in sr and sr[keyword].value in ("", None), keyword
    assert [f"Source header: {c}" for c in changes] == _comments(sr)[1:]
    assert sr.StudyInstanceUID == ds.StudyInstanceUID
    fhir = _post(api, factory.to_bytes(ds), "&format=fhir")
    assert fhir.status_code == 200, fhir.text
    assert "subject" not in fhir.json()["entry"][0]["resource"]  # no PatientID, no subject


def test_malformed_values_are_dropped_as_the_standard_permits(api):
    ds = factory.ultrasound(
        factory.image(),
        PatientSex="X",
        PatientBirthDate="19711345",
        StudyDate="2026-01-05",
        StudyTime="9h30",
    )
    r = _post(api, factory.to_bytes(ds), "&format=dicom-sr")
    assert r.status_code == 200, r.text
    sr = _sr(r)
    assert r.headers[SOURCE_CHANGES] == (
        "PatientBirthDate malformed: written empty; PatientSex not M, F or O: written empty; "
        "StudyDate malformed: written empty; StudyTime malformed: written empty"
    )
    assert sr.PatientSex == "" and sr.PatientBirthDate == "" and sr.StudyDate == ""
    assert sr.PatientID == ds.PatientID and sr.PatientName == ds.PatientName  # the rest kept
    assert "19711345" not in r.headers[SOURCE_CHANGES]  # names, never values
    assert _post(api, factory.to_bytes(ds), "&format=fhir").status_code == 200


def test_a_well_formed_source_changes_nothing(api):
    r = _post(api, factory.to_bytes(factory.ultrasound(factory.image())), "&format=dicom-sr")
    assert r.status_code == 200, r.text
    assert SOURCE_CHANGES.lower() not in r.headers
    assert len(_comments(_sr(r))) == 1  # the disclaimer only


def test_multi_frame_inputs_follow_the_frame_policy(api):
    frames = [factory.image("benign", 1), factory.image("malignant", 2)]
    cine = factory.ultrasound(frames)  # Ultrasound Multi-frame: frames can be referenced
    capture = factory.ultrasound(frames)  # a 2-frame Secondary Capture: they cannot
    capture.SOPClassUID = capture.file_meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    for ds, referenced in ((cine, [2]), (capture, None)):
        r = _post(api, factory.to_bytes(ds), "&format=dicom-sr&frame=2")
        assert r.status_code == 200, r.text
        (group,) = _sr(r).content.get_image_measurement_groups()
        (image,) = group.source_images
        ref = image.ReferencedSOPSequence[0]
        assert ref.get("ReferencedFrameNumber") == (None if referenced is None else 2)
        said = "frame 2 of the source image was scored" in " ".join(_comments(_sr(r)))
        assert said == (referenced is None)


def test_a_segmentation_gets_a_precise_400_for_an_sr_and_a_bundle(api):
    (path,) = get_testdata_files("liver_1frame.dcm")
    data = Path(path).read_bytes()
    r = _post(api, data, "&format=dicom-sr")
    assert (r.status_code, r.json()["error"]["code"]) == (400, "dicom_sr_unavailable")
    assert "SEG" in r.json()["error"]["message"]
    assert _post(api, data, "&format=fhir").status_code == 200
