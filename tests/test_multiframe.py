"""/v1/predict with several frames of one nodule: repeated `file` fields or every frame
of a multi-frame DICOM; an answer per frame (with its heatmap) and for the nodule."""

from __future__ import annotations

import dicom_factory as factory
import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.inference import frames as multi


@pytest.fixture(scope="module")
def api(served_module):
    with TestClient(create_app(served_module.settings), raise_server_exceptions=False) as client:
        client.headers["Authorization"] = f"Bearer {served_module.predict_key}"
        client.admin = {"Authorization": f"Bearer {served_module.admin_key}"}
        yield client


def _pngs(n: int) -> list[bytes]:
    return [factory.png(factory.image(("benign", "malignant")[i % 2], seed=i)) for i in range(n)]


def _post(api, uploads: list[bytes], query: str = ""):
    files = [("file", (f"f{i}.png", d, "application/octet-stream")) for i, d in enumerate(uploads)]
    return api.post(f"/v1/predict{query}", files=files)


def test_one_file_answers_exactly_as_before(api):
    r = _post(api, _pngs(1))
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {
        "request_id", "model", "prediction", "heatmap", "roi", "shape", "ood", "timings",
        "disclaimer",
    }  # fmt: skip
    assert body["heatmap"]["data"]


def test_repeated_files_answer_per_frame_and_for_the_nodule(api):
    uploads = _pngs(3)
    singles = [_post(api, [d], "?heatmap=none").json()["prediction"] for d in uploads]
    r = _post(api, uploads)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [f["file"] for f in body["frames"]] == [0, 1, 2]
    for frame, single in zip(body["frames"], singles, strict=True):
        assert frame["prediction"] == single  # each frame as if sent alone
        assert frame["heatmap"]["data"] and frame["frame"] is None
    nodule = body["nodule"]
    probs = np.array([[s["probabilities"][k] for k in ("benign", "malignant")] for s in singles])
    expected = probs.mean(axis=0)
    got = [nodule["prediction"]["probabilities"][k] for k in ("benign", "malignant")]
    np.testing.assert_allclose(got, expected, atol=2e-6)
    assert nodule["frames"] == 3 and nodule["aggregation"] == multi.AGGREGATION
    assert "not for diagnostic use" in body["disclaimer"] and body["model"]["version"] >= 1
    # one audit record for the call, with the frame count and the nodule's answer
    rows = api.get("/v1/requests?limit=5", headers=api.admin).json()["requests"]
    row = next(x for x in rows if x["request_id"] == body["request_id"])
    assert row["timings"]["frames"] == 3 and row["label"] == nodule["prediction"]["label"]


def test_every_frame_of_a_multiframe_dicom(api):
    images = [factory.image("benign", 1), factory.image("malignant", 2), factory.image("benign", 4)]
    data = factory.to_bytes(factory.ultrasound(images))
    r = api.post(
        "/v1/predict?all_frames=true&heatmap=array",
        files={"file": ("cine.dcm", data, "application/dicom")},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert [f["frame"] for f in body["frames"]] == [1, 2, 3] and body["nodule"]["frames"] == 3
    for f in body["frames"]:
        single = api.post(
            f"/v1/predict?heatmap=none&frame={f['frame']}",
            files={"file": ("cine.dcm", data, "application/dicom")},
        ).json()
        assert f["prediction"] == single["prediction"] and f["heatmap"] is not None


@pytest.mark.parametrize(
    ("query", "n", "status", "code"),
    [
        ("?format=dicom-sr", 2, 400, "multi_frame_format"),
        ("?all_frames=true&frame=1", 1, 400, "frame_conflict"),
        ("", multi.MAX_FRAMES + 1, 400, "too_many_frames"),
    ],
)
def test_bad_multiframe_requests_are_clear_4xx(api, query, n, status, code):
    r = _post(api, _pngs(2)[:1] * n if n > 2 else _pngs(n), query)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
