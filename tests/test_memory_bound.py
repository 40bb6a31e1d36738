"""Memory that cannot run away (issue 17, item 1).

A 6000 x 6000 grey PNG is a 35 KB upload; before, one `heatmap=overlay` of it took the
server from 568 MB to 4.5 GB, and eight at once got it killed. Now an image is refused
over THYROID_CAD_MAX_IMAGE_PIXELS (16 Mpx) from its header, at most
THYROID_CAD_DECODE_PIXEL_BUDGET pixels (one maximum-size image) are in flight at once,
freed frames go back to the system (admission.return_big_buffers), and heatmaps are
rendered at most full-HD large.

The bound, against a real `thyroid-cad serve` process (benchmarks/memory.py's burst):
12 concurrent maximum-size uploads in six forms keep the server's peak RSS (VmHWM)
within BOUND_MB of its RSS after warm-up. Why 800 MB: one image in flight at a time
costs up to ~400 MB (measured per form: the content box ~250 MB at 16 Mpx, pydicom's
YBR-to-RGB conversion of a JPEG DICOM ~385 MB), plus the uploads held by the requests
waiting for the budget (here ~60 MB), plus allocator and thread slack; measured ~470 MB
on the CI machine. /v2 inference (BYTES elements, UINT8 tensors) takes from the same
budget and is held to the same bound.

Item 2, a bounded working resolution: a frame at least twice
decoding.working_side(model input) long (2048 px for the test models) is decoded
smaller, a JPEG by libjpeg's DCT scaling (Image.draft), other formats by Image.reduce;
its answer still describes the image as sent (heatmap, boxes, audit dimensions).
"""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import dicom_factory as factory
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.api.app import create_app
from service.inference import decoding, heatmaps
from service.inference import pipeline as inference
from service.inference.admission import PixelBudget
from thyroid_cad import imaging, nodule

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import harness  # noqa: E402
import memory  # noqa: E402

SIDE = 4096  # THYROID_CAD_MAX_IMAGE_PIXELS = SIDE * SIDE by default
PER_FORM = 2  # 12 maximum-size uploads at once
BOUND_MB = 800


@pytest.fixture(scope="module")
def server(served_module, session_home, tmp_path_factory):
    work = tmp_path_factory.mktemp("memory")
    env = {
        # Long enough that every upload is admitted in turn: the budget, not refusals,
        # is what keeps the memory down here (refusals are the test below).
        "THYROID_CAD_ADMISSION_TIMEOUT_S": "600",
        "DATABASE_URL": f"sqlite:///{work / 'requests.db'}",
    }
    srv = harness.service_server(session_home, served_module.settings.model, work, env=env)
    srv.start()
    yield srv
    srv.stop()


def test_concurrent_maximum_size_uploads_keep_the_peak_rss_bounded(server):
    uploads = memory.max_size_uploads(SIDE)
    assert set(uploads) == set(memory.FORMATS)
    small = io.BytesIO()
    Image.fromarray(factory.image()).save(small, "PNG")
    assert memory.post(server.url, server.headers, small.getvalue(), "?heatmap=overlay") == 200
    result = memory.burst(server, uploads, PER_FORM, "?heatmap=overlay")
    print(result)  # noqa: T201 - the measured figure, for the log
    assert result["statuses"] == {form: [200] * PER_FORM for form in memory.FORMATS}
    assert result["above_mb"] < BOUND_MB, result


def test_concurrent_maximum_size_v2_uploads_keep_the_peak_rss_bounded(server, served_module):
    """The same burst as BYTES elements of /v2 inference requests: admitted by the same
    budget, so held to the same bound."""
    uploads = memory.max_size_uploads(SIDE)
    name = served_module.name

    def send(data: bytes) -> int:
        return memory.infer(server.url, server.headers, data, name)

    assert send(factory.png(factory.image())) == 200
    result = memory.burst(server, uploads, PER_FORM, send=send)
    print(result)  # noqa: T201 - the measured figure, for the log
    assert result["statuses"] == {form: [200] * PER_FORM for form in memory.FORMATS}
    assert result["above_mb"] < BOUND_MB, result


def test_over_the_pixel_limit_is_a_413_from_the_header(server):
    big = io.BytesIO()
    Image.new("L", (SIDE + 1, SIDE), 0).save(big, "PNG")  # ~60 KB, 16.8 Mpx
    assert memory.post(server.url, server.headers, big.getvalue(), "?heatmap=overlay") == 413


def test_no_room_in_the_budget_is_a_503_with_retry_after(served_module):
    settings = served_module.settings.model_copy(update={"admission_timeout_s": 0.05})
    data = factory.png(factory.image())
    with TestClient(create_app(settings)) as api:
        budget: PixelBudget = api.app.state.pixel_budget
        with budget.admit(budget.capacity):  # another request is decoding a huge image
            r = api.post(
                "/v1/predict",
                files={"file": ("x.png", data, "image/png")},
                headers={"Authorization": f"Bearer {served_module.predict_key}"},
            )
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "busy"
        assert int(r.headers["retry-after"]) >= 1
        assert budget.in_use == 0
        r = api.post(
            "/v1/predict",
            files={"file": ("x.png", data, "image/png")},
            headers={"Authorization": f"Bearer {served_module.predict_key}"},
        )
        assert r.status_code == 200, r.text


def _v2_bytes(files: list[bytes]) -> dict:
    """An OIP request of encoded files as BYTES elements (base64 in JSON)."""
    data = [base64.b64encode(f).decode() for f in files]
    return {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(files)], "data": data}]}


def _v2_uint8(frames: np.ndarray) -> dict:
    data = frames.ravel().tolist()
    return {
        "inputs": [
            {"name": "image", "datatype": "UINT8", "shape": list(frames.shape), "data": data}
        ]
    }


def _max_size_png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (SIDE, SIDE), 90).save(buf, "PNG")  # a few KB, SIDE * SIDE pixels
    return buf.getvalue()


def test_v2_with_no_room_in_the_budget_is_a_503_before_anything_is_decoded(
    served_module, monkeypatch
):
    settings = served_module.settings.model_copy(update={"admission_timeout_s": 0.05})
    decoded = []
    real_decode = decoding.decode
    monkeypatch.setattr(
        decoding, "decode", lambda *a, **k: decoded.append(a) or real_decode(*a, **k)
    )
    url = f"/v2/models/{served_module.name}/infer"
    auth = {"Authorization": f"Bearer {served_module.predict_key}"}
    with TestClient(create_app(settings)) as api:
        budget: PixelBudget = api.app.state.pixel_budget
        size = api.app.state.models.get()[0].input_size
        with budget.admit(budget.capacity):  # another request is decoding a huge image
            for body in (
                _v2_bytes([_max_size_png()]),
                _v2_uint8(np.zeros((2, size, size, 3), np.uint8)),
            ):
                r = api.post(url, json=body, headers=auth)
                assert r.status_code == 503, r.text
                assert r.json()["error"].startswith("busy: ")  # the OIP error shape
                assert int(r.headers["retry-after"]) >= 1
            assert budget.in_use == budget.capacity
        assert decoded == []  # refused from the header, nothing decoded
        assert budget.in_use == 0


def test_v2_gives_the_budget_back_when_its_answer_is_built(served_module):
    url = f"/v2/models/{served_module.name}/infer"
    auth = {"Authorization": f"Bearer {served_module.predict_key}"}
    with TestClient(create_app(served_module.settings)) as api:
        budget: PixelBudget = api.app.state.pixel_budget
        size = api.app.state.models.get()[0].input_size
        # Each of these would find no room if an earlier one had kept its pixels: a
        # maximum-size image takes the whole budget.
        for body, status in (
            (_v2_bytes([_max_size_png()]), 200),
            (_v2_bytes([_max_size_png()[:100]]), 400),  # refused while decoding
            (_v2_uint8(np.zeros((2, size, size, 3), np.uint8)), 200),
            (_v2_bytes([_max_size_png(), factory.png(factory.image())]), 200),
            (_v2_bytes([_max_size_png()]), 200),
        ):
            r = api.post(url, json=body, headers=auth)
            assert r.status_code == status, r.text
            assert budget.in_use == 0
        r = api.post(
            "/v1/predict?heatmap=none",
            files={"file": ("x.png", _max_size_png(), "image/png")},
            headers=auth,
        )
        assert r.status_code == 200, r.text


def test_heatmaps_of_big_images_are_rendered_at_a_bounded_size(served_module):
    settings = served_module.settings.model_copy(update={"max_heatmap_pixels": 64 * 48})
    png = factory.png(factory.image(size=160))
    with TestClient(create_app(settings)) as api:
        auth = {"Authorization": f"Bearer {served_module.predict_key}"}
        one = api.post("/v1/predict?heatmap=overlay", files={"file": ("x.png", png)}, headers=auth)
        # several frames of one nodule: each frame's heatmap under the same bound
        two = api.post(
            "/v1/predict?heatmap=overlay",
            files=[("file", ("a.png", png)), ("file", ("b.png", png))],
            headers=auth,
        )
    assert one.status_code == 200, one.text
    assert two.status_code == 200, two.text
    frames = [f["heatmap"] for f in two.json()["frames"]]
    for heatmap in [one.json()["heatmap"], *frames]:
        assert heatmap["width"] * heatmap["height"] <= 64 * 48
        assert abs(heatmap["width"] - heatmap["height"]) <= 1  # the square's aspect ratio kept
        shown = Image.open(io.BytesIO(base64.b64decode(heatmap["data"])))
        assert shown.size == (heatmap["width"], heatmap["height"])


def test_a_budget_under_the_image_limit_is_refused_at_start():
    from service.config import Settings, SettingsError, get_settings

    with pytest.raises(ValueError, match="could never be decoded"):
        Settings(max_image_pixels=1000, decode_pixel_budget=999)
    get_settings.cache_clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("THYROID_CAD_DECODE_PIXEL_BUDGET", "10")
        with pytest.raises(SettingsError, match="THYROID_CAD_DECODE_PIXEL_BUDGET=10"):
            get_settings()
    get_settings.cache_clear()


def _deflated(ds) -> bytes:
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    return factory.to_bytes(ds)


def test_a_deflated_dicom_bomb_is_refused_before_it_is_inflated(served_module):
    """pydicom inflates a deflated dataset whole: 600 KB of deflate became 400 MB."""
    import zlib

    from service.inference import decoding

    good = _deflated(factory.ultrasound(factory.image()))
    body = decoding._deflated_body(good)
    assert body is not None
    squeeze = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = b"".join(squeeze.compress(bytes(1 << 20)) for _ in range(400)) + squeeze.flush()
    bomb = good[: len(good) - len(body)] + zeros  # the same header, 400 MiB when inflated
    assert len(bomb) < 1 << 20
    with TestClient(create_app(served_module.settings)) as api:
        auth = {"Authorization": f"Bearer {served_module.predict_key}"}
        for data, status in ((good, 200), (bomb, 413)):
            r = api.post(
                "/v1/predict?heatmap=none",
                files={"file": ("x.dcm", data, "application/dicom")},
                headers=auth,
            )
            assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == "image_too_large"
    assert "decompression bomb" in r.json()["error"]["message"]


# -- item 2: decoding to a bounded working resolution ------------------------------------
HUGE = 6000


@pytest.fixture(scope="module")
def huge_jpeg() -> bytes:
    return memory._encode(memory._content(HUGE), "JPEG")


def test_a_huge_jpeg_is_decoded_by_libjpeg_at_a_reduced_scale(huge_jpeg):
    side = decoding.working_side(64)
    assert side == decoding.WORKING_SIDE == 2048
    got = decoding.decode(huge_jpeg, HUGE * HUGE, long_side=side)
    assert got.rgb.shape == (HUGE // 2, HUGE // 2, 3)  # 1/4 would be under 2048 px
    assert got.size == got.full_size == (HUGE, HUGE)
    # libjpeg's 1/2 scale (Image.draft), not the full frame decoded and then reduced
    image = Image.open(io.BytesIO(huge_jpeg))
    image.draft("RGB", (HUGE // 2, HUGE // 2))
    np.testing.assert_array_equal(got.rgb, np.asarray(image.convert("RGB")))
    assert decoding.decode(huge_jpeg, HUGE * HUGE).rgb.shape == (HUGE, HUGE, 3)  # no bound


_PEAK = """
import os
import sys
sys.path.insert(0, sys.argv[3])
import memory
from service.inference import decoding

data = open(sys.argv[1], "rb").read()
side = None if sys.argv[2] == "full" else int(sys.argv[2])
small = memory._encode(memory._content(64), "JPEG")
decoding.decode(small, 10**8, long_side=16)  # the decoders loaded: not what is measured
pid = os.getpid()
if not memory.reset_peak(pid):
    print(-1)
    raise SystemExit
before = memory.status_kb(pid, "VmRSS")
decoded = decoding.decode(data, 10**8, long_side=side)
print((memory.status_kb(pid, "VmHWM") - before) * 1024)
"""


def _decode_peak(path: Path, side: str) -> int:
    """Peak RSS (bytes) of decoding the file at `path`, in a fresh process."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", _PEAK, str(path), side, str(BENCH)],
        env={**os.environ, "PYTHONPATH": str(root)},
        cwd=root,
        check=True,
        capture_output=True,
        text=True,
    )
    return int(out.stdout.split()[-1])


def test_decoding_a_huge_jpeg_peaks_well_below_its_full_frame(huge_jpeg, tmp_path):
    path = tmp_path / "huge.jpg"
    path.write_bytes(huge_jpeg)
    reduced = _decode_peak(path, str(decoding.working_side(64)))
    if reduced < 0:
        pytest.skip("this kernel refuses to reset the peak RSS (/proc/self/clear_refs)")
    full = _decode_peak(path, "full")
    frame = HUGE * HUGE * 3  # the decoded RGB frame alone
    print({"reduced_mb": reduced / 2**20, "full_mb": full / 2**20})  # noqa: T201
    assert full > 0.9 * frame  # the measure sees the full decode
    assert reduced < frame / 3  # 1/2 scale: a quarter of the pixels (~26 MB)


def test_a_huge_jpeg_predicts_with_a_heatmap_of_the_image_as_sent(
    served_module, huge_jpeg, monkeypatch
):
    """Decoded at 3000 x 3000, scored, and answered about the 6000 x 6000 image sent: the
    heatmap is the image's, at most THYROID_CAD_MAX_HEATMAP_PIXELS large (1440 x 1440
    here), and the audit record has the image's size."""
    limit = HUGE * HUGE
    settings = served_module.settings.model_copy(
        update={"max_image_pixels": limit, "decode_pixel_budget": limit}
    )
    shapes = []
    real_decode = decoding.decode

    def spy(*args, **kwargs):
        got = real_decode(*args, **kwargs)
        shapes.append(got.rgb.shape)
        return got

    monkeypatch.setattr(decoding, "decode", spy)
    auth = {"Authorization": f"Bearer {served_module.predict_key}"}
    with TestClient(create_app(settings)) as api:
        for mode in ("overlay", "png"):
            r = api.post(
                f"/v1/predict?heatmap={mode}",
                files={"file": ("x.jpg", huge_jpeg, "image/jpeg")},
                headers=auth,
            )
            assert r.status_code == 200, r.text
            heatmap = r.json()["heatmap"]
            side = int(HUGE * (settings.max_heatmap_pixels / limit) ** 0.5)
            assert (heatmap["width"], heatmap["height"]) == (side, side) == (1440, 1440)
            shown = Image.open(io.BytesIO(base64.b64decode(heatmap["data"])))
            assert shown.size == (side, side)
        request_id = r.json()["request_id"]
        admin = {"Authorization": f"Bearer {served_module.admin_key}"}
        rows = api.get("/v1/requests?limit=1", headers=admin).json()["requests"]
        assert rows[0]["request_id"] == request_id
        assert (rows[0]["image_width"], rows[0]["image_height"]) == (HUGE, HUGE)
        r = api.post(
            f"/v2/models/{served_module.name}/infer", json=_v2_bytes([huge_jpeg]), headers=auth
        )
        assert r.status_code == 200, r.text
    assert shapes == [(HUGE // 2, HUGE // 2, 3)] * 3


def test_a_reduced_frame_maps_boxes_and_maps_back_onto_the_image_as_sent():
    """A ROI model's box (the user's, in the pixels sent) is moved onto the reduced frame
    for the crop and the localiser, and the localiser's box and shape come back in the
    pixels sent; the geometry is the image's."""
    height, width = 4400, 5000  # reduced by 2: 2200 x 2500
    rgb = np.zeros((height, width, 3), np.uint8)
    rgb[400:4000, 500:4600] = 120
    rgb[2000:2400, 1000:1800] = 200
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG", compress_level=1)
    seen = {}

    def localise(frame, within=None):
        seen["frame"], seen["within"] = frame.shape, within
        mask = np.zeros(frame.shape[:2], bool)
        mask[1000:1200, 500:900] = True  # 200 x 400 on the reduced frame
        return nodule.Proposal(nodule.box_of(mask), mask, 0.9)

    model = SimpleNamespace(
        name="fake", version=1, roi={"margin": 0.3}, localiser=object(), localise=localise
    )
    for roi in ((1000, 2000, 800, 400), None):
        prepared = inference.prepare(buf.getvalue(), 64, 10**8, model, roi)
        assert prepared.rgb.shape == (height // 2, width // 2, 3)
        assert prepared.size == (height, width)
        assert (prepared.geometry.height, prepared.geometry.width) == (height, width)
        located = prepared.located
        if roi is not None:
            assert seen["within"] == (500, 1000, 400, 200)
            assert located.roi.source == "user" and located.roi.box == roi
        else:
            assert seen["within"] is None
            assert located.roi.source == "localiser" and located.roi.box == (1000, 2000, 800, 400)
        assert (located.shape.width_px, located.shape.depth_px) == (800, 400)
        assert located.shape.area_px == 800 * 400
        square, geometry = imaging.prepare_input(prepared.rgb, 64, (500, 1000, 400, 200), 0.3)
        np.testing.assert_array_equal(prepared.square, square)
        assert imaging.rescale(geometry, height, width) == prepared.geometry
    shown = heatmaps.bounded(prepared.geometry, 1920 * 1080)
    assert shown.width / shown.height == pytest.approx(width / height, rel=0.01)
