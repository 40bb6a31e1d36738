"""/v1/predict with ultrasound DICOM: frames, colour, compressed transfer syntaxes, the
image region, and the DICOM SR / FHIR answers (same numbers as the JSON one).

Every file is made here from the phantom (tests/dicom_factory.py).
"""

from __future__ import annotations

import io
import json

import dicom_factory as factory
import highdicom as hd
import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from fhir.resources.R4B.bundle import Bundle
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit, JPEGLosslessSV1, JPEGLSLossless, RLELossless

from service.api.app import create_app


@pytest.fixture(scope="module")
def api(served_module):
    with TestClient(create_app(served_module.settings), raise_server_exceptions=False) as client:
        client.headers["Authorization"] = f"Bearer {served_module.predict_key}"
        yield client


def _post(api, data: bytes, query: str = "", headers: dict | None = None, name="x.dcm"):
    return api.post(
        f"/v1/predict{query}",
        files={"file": (name, data, "application/octet-stream")},
        headers=headers or {},
    )


def _probabilities(api, data: bytes, query: str = "?heatmap=none") -> dict:
    r = _post(api, data, query)
    assert r.status_code == 200, r.text
    return r.json()["prediction"]["probabilities"]


@pytest.fixture(scope="module")
def screen():
    """(image, the scanner screen around it, the image's region)."""
    image = factory.image("malignant", seed=3)
    full, region = factory.on_screen(image)
    return image, full, region


EXACT = {  # lossless: the service must see exactly the image
    "rgb": {},
    "monochrome2": {"photometric": "MONOCHROME2"},
    "rle": {"syntax": RLELossless},
    "jpeg-ls": {"syntax": JPEGLSLossless},
}


@pytest.mark.parametrize("variant", list(EXACT), ids=list(EXACT))
def test_lossless_variants_score_as_the_image_region(api, screen, variant):
    image, full, region = screen
    options = EXACT[variant]
    expected = np.repeat(image[..., :1], 3, 2) if variant == "monochrome2" else image
    data = factory.to_bytes(factory.ultrasound(full, region=region, **options))
    r = _post(api, data, "?heatmap=png")
    assert r.status_code == 200, r.text
    body = r.json()
    # cropped to the region: the heatmap covers the image, not the scanner's screen
    assert (body["heatmap"]["width"], body["heatmap"]["height"]) == image.shape[1::-1]
    assert body["prediction"]["probabilities"] == _probabilities(api, factory.png(expected))


def test_ybr_full_scores_as_the_rgb_image(api, screen):
    image, full, region = screen
    data = factory.to_bytes(factory.ultrasound(full, region=region, photometric="YBR_FULL"))
    # YBR <-> RGB rounds by one grey level at most
    assert _probabilities(api, data) == pytest.approx(
        _probabilities(api, factory.png(image)), abs=0.02
    )


def test_jpeg_baseline_ybr_422_is_decoded(api, screen):
    image, full, region = screen
    data = factory.to_bytes(factory.ultrasound(full, region=region, syntax=JPEGBaseline8Bit))
    x0, y0, x1, y1 = region
    decoded = factory.jpeg_decoded(full)[y0 : y1 + 1, x0 : x1 + 1]
    assert _probabilities(api, data) == _probabilities(api, factory.png(decoded))


def test_without_a_region_the_whole_screen_is_used(api, screen):
    image, full, _ = screen
    data = factory.to_bytes(factory.ultrasound(full))
    r = _post(api, data, "?heatmap=png")
    assert r.status_code == 200, r.text
    assert (r.json()["heatmap"]["width"], r.json()["heatmap"]["height"]) == full.shape[1::-1]
    assert r.json()["prediction"]["probabilities"] == _probabilities(api, factory.png(full))


def test_frame_picks_a_frame_of_a_cine_loop(api):
    frames = [factory.image("benign", 1), factory.image("malignant", 2), factory.image("benign", 4)]
    data = factory.to_bytes(factory.ultrasound(frames, syntax=JPEGBaseline8Bit))
    decoded = [factory.jpeg_decoded(f) for f in frames]
    assert _probabilities(api, data) == _probabilities(api, factory.png(decoded[0]))
    for number in (2, 3):
        assert _probabilities(api, data, f"?heatmap=none&frame={number}") == _probabilities(
            api, factory.png(decoded[number - 1])
        )


@pytest.mark.parametrize(
    ("query", "status", "code"),
    [("?frame=4", 400, "frame_out_of_range"), ("?frame=0", 422, "invalid_request")],
)
def test_a_frame_that_is_not_there_is_a_4xx(api, query, status, code):
    data = factory.to_bytes(factory.ultrasound([factory.image()] * 3))
    r = _post(api, data, query)
    assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text


def test_frame_on_a_single_frame_image(api):
    png = factory.png(factory.image())
    assert _post(api, png, "?frame=1", name="x.png").status_code == 200
    r = _post(api, png, "?frame=2", name="x.png")
    assert (r.status_code, r.json()["error"]["code"]) == (400, "frame_out_of_range")


def test_an_undecodable_transfer_syntax_is_a_415_that_names_it(api):
    """JPEG Lossless needs a decoder this service does not install (docs/integration.md)."""
    ds = factory.ultrasound(factory.image(), photometric="MONOCHROME2")
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xc3" + bytes(64) + b"\xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    r = _post(api, factory.to_bytes(ds))
    assert r.status_code == 415, r.text
    message = r.json()["error"]["message"]
    assert r.json()["error"]["code"] == "unsupported_dicom"
    assert "JPEG Lossless" in message and "JPEG Baseline" in message and "RLE" in message


# -- the DICOM SR and FHIR answers --------------------------------------------------------
def _json(api, data: bytes) -> dict:
    r = _post(api, data, "?heatmap=none")
    assert r.status_code == 200, r.text
    return r.json()


def test_format_dicom_sr_matches_the_json_answer(api, screen, served_module):
    image, full, region = screen
    source = factory.ultrasound([full, full], region=region)
    data = factory.to_bytes(source)
    expected = _json(api, data)
    r = _post(api, data, "?format=dicom-sr")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/dicom"
    assert r.headers["x-request-id"]
    assert pydicom.dcmread(io.BytesIO(r.content)).Modality == "SR"
    sr = hd.sr.srread(io.BytesIO(r.content))
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert sr.PatientID == source.PatientID
    (group,) = sr.content.get_image_measurement_groups()  # no ROI from this model
    (image_ref,) = group.source_images
    assert image_ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    measured = {m.name.meaning: m.value for m in group.get_measurements()}
    probabilities = expected["prediction"]["probabilities"]
    assert measured["Probability of cancer"] == probabilities["malignant"]
    assert measured["Probability of benign"] == probabilities["benign"]
    assert measured["CAD Operating Point"] == expected["prediction"]["threshold"]
    decision = next(
        q.value for q in group.get_qualitative_evaluations() if q.name.value == "decision"
    )
    assert decision.meaning.lower() == expected["prediction"]["decision"]
    assert sr.DeviceSerialNumber == expected["model"]["onnx_sha256"]
    assert sr.SoftwareVersions == f"model version {served_module.version}"


def test_accept_header_chooses_fhir_and_the_numbers_match(api, screen, served_module):
    _, full, region = screen
    data = factory.to_bytes(factory.ultrasound(full, region=region))
    expected = _json(api, data)
    r = _post(api, data, headers={"Accept": "application/fhir+json"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/fhir+json")
    bundle = Bundle.model_validate(r.json())
    resources = {e.resource.get_resource_type(): e.resource for e in bundle.entry}
    assert set(resources) >= {"DiagnosticReport", "Observation", "Device", "ImagingStudy"}
    observations = [
        e.resource for e in bundle.entry if e.resource.get_resource_type() == "Observation"
    ]
    values = {o.code.coding[0].code: o for o in observations}
    probabilities = expected["prediction"]["probabilities"]
    assert float(values["111047"].valueQuantity.value) == probabilities["malignant"]
    assert float(values["probability-benign"].valueQuantity.value) == probabilities["benign"]
    device = json.loads(resources["Device"].model_dump_json())
    versions = {v["type"]["text"]: v["value"] for v in device["version"]}
    assert versions["model version"] == str(served_module.version)
    assert versions["ONNX sha256"] == expected["model"]["onnx_sha256"]


def test_fhir_for_a_png_has_no_patient(api):
    r = _post(api, factory.png(factory.image()), "?format=fhir", name="x.png")
    assert r.status_code == 200, r.text
    kinds = {e["resource"]["resourceType"] for e in r.json()["entry"]}
    assert "ImagingStudy" not in kinds and "DiagnosticReport" in kinds


def test_dicom_sr_needs_a_dicom_that_it_can_reference(api):
    r = _post(api, factory.png(factory.image()), "?format=dicom-sr", name="x.png")
    assert (r.status_code, r.json()["error"]["code"]) == (400, "dicom_sr_needs_dicom")
    ds = factory.ultrasound(factory.image())
    del ds.StudyInstanceUID
    r = _post(api, factory.to_bytes(ds), headers={"Accept": "application/dicom"})
    assert (r.status_code, r.json()["error"]["code"]) == (400, "dicom_sr_unavailable")
    assert "StudyInstanceUID" in r.json()["error"]["message"]


def test_unknown_format_is_a_422(api):
    r = _post(api, factory.png(factory.image()), "?format=hl7v2", name="x.png")
    assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_request")


def test_structured_answers_keep_patient_data_out_of_the_audit_and_logs(api, served_module, caplog):
    caplog.set_level("DEBUG")
    data = factory.to_bytes(factory.ultrasound(factory.image()))
    answers = [
        _post(api, data, "?format=dicom-sr"),
        _post(api, data, "?format=fhir"),
        _post(api, data, "?format=dicom-sr&frame=7"),  # an error after the header was read
    ]
    assert [a.status_code for a in answers] == [200, 200, 400]
    assert b"Quintessa" in answers[0].content  # the SR carries the patient, as it must
    db = served_module.db_path
    files = [*db.parent.glob(db.name + "*"), *served_module.spool.rglob("*")]
    stored = b"".join(p.read_bytes() for p in files if p.is_file())
    assert answers[0].headers["x-request-id"].encode() in stored
    for secret in factory.SECRETS:
        assert secret.encode() not in stored, secret
        assert secret not in caplog.text, secret
