"""ROI models in the service: a box from the user or the bundled localiser, /v1 and /v2."""

import base64
import io
import json

import numpy as np
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.api.app import create_app
from thyroid_cad import imaging
from training import phantom


@pytest.fixture(scope="module")
def roi_served(session_home, roi_export, tmp_path_factory):
    from conftest import _isolate, make_served

    with pytest.MonkeyPatch.context() as mp:
        _isolate(mp, session_home)
        served = make_served(roi_export, tmp_path_factory.mktemp("roi-served"), "roi")
        with TestClient(create_app(served.settings)) as client:
            yield served, client


def _frame(label="malignant", seed=5, size=256):
    return phantom.render_frame(label, np.random.default_rng(seed), size)


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return buf.getvalue()


def _auth(key):
    return {"Authorization": f"Bearer {key}"}


def _predict(client, served, data, route="/v1/predict", **params):
    return client.post(
        route,
        params=params,
        files={"file": ("x.png", data, "image/png")},
        headers=_auth(served.predict_key),
    )


def _onnx_probabilities(export, square):
    sess = ort.InferenceSession(str(export / "model.onnx"), providers=["CPUExecutionProvider"])
    return sess.run(["probabilities"], {"image": square[None]})[0][0]


def test_without_a_box_the_localiser_proposes_the_roi(roi_served, roi_export):
    served, client = roi_served
    frame = _frame()
    r = _predict(client, served, _png(frame.image), heatmap="png")
    assert r.status_code == 200, r.text
    body = r.json()
    roi = body["roi"]
    assert roi["source"] == "localiser"
    box = (roi["x"], roi["y"], roi["w"], roi["h"])
    # The box is the bundled localiser's, on the frame. How well a few-epoch localiser
    # finds the phantom's nodule is its own tests' business (held-out Dice in
    # test_roi_training.py); on the per-case-varied phantom it is not reliable enough to
    # assert an overlap here.
    h, w = frame.image.shape[:2]
    assert box[2] > 0 and box[3] > 0 and box[0] + box[2] <= w and box[1] + box[3] <= h
    shape = body["shape"]
    assert shape["area_px"] > 0 and shape["width_px"] > 0 and shape["depth_px"] > 0
    assert shape["taller_than_wide_ratio"] == pytest.approx(
        shape["depth_px"] / shape["width_px"], abs=1e-3
    )
    assert shape["width_mm"] is None  # a PNG carries no calibration
    # the model saw exactly the crop training makes, through the same function
    card = json.loads((roi_export / "model_card.json").read_text())
    square = imaging.prepare_input(frame.image, 64, box, card["roi"]["margin"])[0]
    probs = _onnx_probabilities(roi_export, square)
    got = body["prediction"]["probabilities"]
    assert [got["benign"], got["malignant"]] == pytest.approx(probs.tolist(), abs=1e-5)
    # the heatmap lies on the frame, inside the crop only
    heat = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["heatmap"]["data"]))))
    assert heat.shape == (256, 256)
    _, geometry = imaging.prepare_input(frame.image, 64, box, card["roi"]["margin"])
    top, left, bottom, right = geometry.box
    outside = np.ones_like(heat, bool)
    outside[top:bottom, left:right] = False
    assert heat[outside].max() == 0


def test_a_user_box_is_used_and_echoed_on_every_predict_route(roi_served, roi_export):
    served, client = roi_served
    frame = _frame(seed=6)
    box = (60, 70, 50, 40)
    card = json.loads((roi_export / "model_card.json").read_text())
    square = imaging.prepare_input(frame.image, 64, box, card["roi"]["margin"])[0]
    expected = _onnx_probabilities(roi_export, square)
    for route in (
        "/v1/predict",
        f"/v1/models/{served.name}/predict",
        f"/v1/models/{served.name}/versions/{served.version}/predict",
    ):
        r = _predict(client, served, _png(frame.image), route, roi="60,70,50,40", heatmap="none")
        assert r.status_code == 200, (route, r.text)
        body = r.json()
        assert body["roi"] == {"x": 60, "y": 70, "w": 50, "h": 40, "source": "user"}
        got = body["prediction"]["probabilities"]
        assert [got["benign"], got["malignant"]] == pytest.approx(expected.tolist(), abs=1e-5)
        if body["shape"] is not None:  # the localiser's outline the user's box holds most of,
            shape = body["shape"]  # measured whole (tests/test_roi_imaging.py)
            assert shape["width_px"] > 0 and shape["depth_px"] > 0
            assert shape["taller_than_wide_ratio"] == pytest.approx(
                shape["depth_px"] / shape["width_px"], abs=1e-3
            )


@pytest.mark.parametrize(
    ("roi", "message"),
    [
        ("1,2,3", "four integers"),
        ("a,b,c,d", "four integers"),
        ("1.5,2,30,30", "four integers"),
        ("10,10,0,20", "positive"),
        ("-5,10,20,20", "not inside"),
        ("200,200,100,100", "not inside"),
    ],
)
def test_nonsense_boxes_are_a_clear_400(roi_served, roi, message):
    served, client = roi_served
    r = _predict(client, served, _png(_frame().image), roi=roi)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_roi" and message in error["message"]


def test_dicom_calibration_gives_sizes_in_mm(roi_served):
    from test_bad_input import _dicom

    served, client = roi_served
    grey = _frame(seed=7).image[..., 0]
    region = _us_region(0.01)  # 0.1 mm per pixel
    data = _dicom(grey, SequenceOfUltrasoundRegions=[region])
    r = client.post(
        "/v1/predict",
        files={"file": ("x.dcm", data, "application/dicom")},
        headers=_auth(served.predict_key),
        params={"heatmap": "none"},
    )
    assert r.status_code == 200, r.text
    shape = r.json()["shape"]
    assert shape is not None and shape["spacing_mm"] == [0.1, 0.1]
    assert shape["width_mm"] == pytest.approx(shape["width_px"] * 0.1, abs=0.01)
    assert shape["area_mm2"] == pytest.approx(shape["area_px"] * 0.01, abs=0.01)


def _us_region(delta_cm: float):
    from pydicom.dataset import Dataset

    region = Dataset()
    region.RegionSpatialFormat = 1
    region.PhysicalUnitsXDirection = 3
    region.PhysicalUnitsYDirection = 3
    region.PhysicalDeltaX = delta_cm
    region.PhysicalDeltaY = delta_cm
    return region


def test_oip_roi_input_parameter(roi_served):
    served, client = roi_served
    images = [_png(_frame(seed=s).image) for s in (5, 6)]

    def infer(roi=None, datatype="BYTES", data=None, shape=None):
        spec = {
            "name": "image",
            "datatype": datatype,
            "shape": shape or [len(images)],
            "data": data or [base64.b64encode(i).decode() for i in images],
        }
        if roi is not None:
            spec["parameters"] = {"roi": roi}
        return client.post(
            f"/v2/models/{served.name}/infer",
            json={"inputs": [spec]},
            headers=_auth(served.predict_key),
        )

    r = infer("60,70,50,40;")
    assert r.status_code == 200, r.text
    params = r.json()["parameters"]
    boxes, sources = params["roi"].split(";"), params["roi_source"].split(";")
    assert boxes[0] == "60,70,50,40" and sources == ["user", "localiser"]
    assert len(boxes[1].split(",")) == 4 and len(json.loads(params["shape"])) == 2
    # the same numbers as /v1 for the same image and box
    probs = r.json()["outputs"][0]["data"][:2]
    v1 = _predict(client, served, images[0], roi="60,70,50,40", heatmap="none").json()
    assert probs == pytest.approx(list(v1["prediction"]["probabilities"].values()), abs=1e-5)
    for roi, message in [
        ("1,2,3;", "four integers"),
        ("60,70,50,40", "1 boxes for 2"),
        (7, "string"),
    ]:
        r = infer(roi)
        assert r.status_code == 400, r.text
        assert r.json()["error"].startswith("invalid_roi: ") and message in r.json()["error"]
    r = infer("1,1,10,10", "UINT8", np.zeros(64 * 64 * 3, int).tolist(), [1, 64, 64, 3])
    assert r.status_code == 400 and "already prepared" in r.text
    meta = client.get(f"/v2/models/{served.name}").json()["parameters"]
    assert meta["roi_margin"] == 0.4 and meta["roi_localiser"] is True


def test_whole_frame_models_are_unchanged_and_refuse_a_box(served):
    with TestClient(create_app(served.settings)) as client:
        png = _png(_frame().image)
        r = _predict(client, served, png)
        assert r.status_code == 200 and r.json()["roi"] is None and r.json()["shape"] is None
        r = _predict(client, served, png, roi="10,10,50,50")
        assert r.status_code == 400 and r.json()["error"]["code"] == "roi_not_supported"


def test_a_model_whose_localiser_is_missing_is_refused(session_home, roi_export, tmp_path):
    from registry import store
    from service.inference.models import Runtime, load

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in ("model.onnx", "model_card.json", "localiser_card.json"):
        (broken / f).write_bytes((roi_export / f).read_bytes())
    card = json.loads((broken / "model_card.json").read_text())
    resolved = store.Resolved("x", 1, None, broken / "model.onnx", card, cached=False)
    with pytest.raises(ValueError, match="localiser.onnx is missing or altered"):
        load(resolved, Runtime(providers=("CPUExecutionProvider",)))
