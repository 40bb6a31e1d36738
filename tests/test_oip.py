"""The Open Inference Protocol routes (/v2) through a real HTTP server and a standard client.

The app runs under uvicorn in a background thread on a free localhost port, and is spoken
to by `tritonclient.http` (the official Triton/KServe v2 client, binary tensor extension
and all) and by plain httpx for the JSON-only forms. Results are checked against a direct
onnxruntime run of the served ONNX file and against `/v1/predict` on the same files.
"""

from __future__ import annotations

import base64
import io
import json
from types import SimpleNamespace

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton
from PIL import Image
from tritonclient.utils import InferenceServerException

from service.api.app import create_app
from thyroid_cad import imaging
from training import phantom


def _frame(label: str, seed: int, size: int = 160) -> np.ndarray:
    return phantom.make_image(label, np.random.default_rng(seed), size)


def _png(label: str = "malignant", seed: int = 0, size: int = 160) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_frame(label, seed, size)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(served_module, run_server):
    """The service under uvicorn on 127.0.0.1:<free port>, for the whole module
    (conftest's make_served: champion from the tiny export, SQLite audit, two keys)."""
    card = json.loads((served_module.export / "model_card.json").read_text())
    with run_server(create_app(served_module.settings)) as base:
        assert httpx.get(f"{base}/healthz").json() == {"status": "ok"}
        yield SimpleNamespace(
            url=base.removeprefix("http://"),
            base=base,
            name=served_module.name,
            version=served_module.version,
            predict_key=served_module.predict_key,
            admin_key=served_module.admin_key,
            export=served_module.export,
            card=card,
            size=int(card["input_size"]),
            classes=card["class_names"],
        )


@pytest.fixture(scope="module")
def client(server):
    c = triton.InferenceServerClient(url=server.url, network_timeout=120.0)
    yield c
    c.close()


@pytest.fixture(scope="module")
def onnx_session(server):
    return ort.InferenceSession(
        str(server.export / "model.onnx"), providers=["CPUExecutionProvider"]
    )


def _auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _infer(server, headers: dict | None = None, **request) -> httpx.Response:
    """POST /v2/models/{name}/infer with httpx (the predict key unless headers say)."""
    url = f"{server.base}/v2/models/{server.name}/infer"
    headers = _auth(server.predict_key) if headers is None else headers
    return httpx.post(url, headers=headers, timeout=60, **request)


def _frames(server, n: int = 3) -> np.ndarray:
    labels = ["benign", "malignant"]
    return np.stack(
        [imaging.prepare(_frame(labels[i % 2], seed=10 + i), server.size) for i in range(n)]
    )


def _uint8_input(batch: np.ndarray, binary: bool) -> triton.InferInput:
    tensor = triton.InferInput("image", list(batch.shape), "UINT8")
    tensor.set_data_from_numpy(batch, binary_data=binary)
    return tensor


def _uint8_json(batch: np.ndarray, nested: bool = False) -> dict:
    """The UINT8 input tensor in JSON: its values flat (row-major) or nested."""
    data = batch.tolist() if nested else batch.ravel().tolist()
    return {"name": "image", "datatype": "UINT8", "shape": list(batch.shape), "data": data}


def _bytes_input(files: list[bytes]) -> triton.InferInput:
    tensor = triton.InferInput("image", [len(files)], "BYTES")
    tensor.set_data_from_numpy(np.array(files, dtype=np.object_), binary_data=True)
    return tensor


# -- health and metadata -------------------------------------------------------------
def test_server_live_ready_and_metadata(client, server):
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "thyroid-cad" and meta["version"] == "1"
    assert "binary_tensor_data" in meta["extensions"]


def test_model_ready(client, server):
    assert client.is_model_ready(server.name)
    assert client.is_model_ready(server.name, model_version=str(server.version))
    assert not client.is_model_ready("no-such-model")
    assert not client.is_model_ready(server.name, model_version="999")


def test_model_metadata_describes_the_tensors(client, server):
    s, k = server.size, len(server.classes)
    h, w = server.card["heatmap_shape"][1:3]
    for version in ("", str(server.version)):
        meta = client.get_model_metadata(server.name, model_version=version)
        assert meta["name"] == server.name and meta["versions"] == [str(server.version)]
        assert meta["platform"] == "onnxruntime_onnx"
        assert meta["inputs"] == [{"name": "image", "datatype": "UINT8", "shape": [-1, s, s, 3]}]
        assert meta["outputs"] == [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, k]},
            {"name": "heatmap", "datatype": "FP32", "shape": [-1, h, w, k]},
            {"name": "ood_score", "datatype": "FP32", "shape": [-1]},
        ]
        assert meta["parameters"]["class_names"] == server.classes
        assert "BYTES" in meta["parameters"]["alternative_input"]


# -- inference -----------------------------------------------------------------------
@pytest.mark.parametrize("binary", [True, False], ids=["binary-extension", "json"])
def test_infer_uint8_matches_onnxruntime(client, server, onnx_session, binary):
    batch = _frames(server, n=3)
    result = client.infer(
        server.name,
        [_uint8_input(batch, binary)],
        outputs=[
            triton.InferRequestedOutput("probabilities", binary_data=binary),
            triton.InferRequestedOutput("heatmap", binary_data=binary),
        ],
        headers=_auth(server.predict_key),
    )
    probs, heat = result.as_numpy("probabilities"), result.as_numpy("heatmap")
    want_probs, want_heat = onnx_session.run(["probabilities", "heatmap"], {"image": batch})
    k = len(server.classes)
    h, w = server.card["heatmap_shape"][1:3]
    assert probs.shape == (3, k) and heat.shape == (3, h, w, k)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(probs, want_probs, atol=1e-5, rtol=0)
    np.testing.assert_allclose(heat, want_heat, atol=1e-5, rtol=0)
    response = result.get_response()
    assert response["model_name"] == server.name
    assert response["model_version"] == str(server.version)
    assert response["parameters"]["class_names"] == server.classes


def test_infer_default_outputs_and_a_requested_subset(client, server):
    batch = _frames(server, n=1)
    everything = client.infer(
        server.name, [_uint8_input(batch, True)], headers=_auth(server.predict_key)
    )
    assert {o["name"] for o in everything.get_response()["outputs"]} == {
        "probabilities",
        "heatmap",
        "ood_score",
    }
    only = client.infer(
        server.name,
        [_uint8_input(batch, True)],
        outputs=[triton.InferRequestedOutput("probabilities")],
        request_id="my-request-7",
        headers=_auth(server.predict_key),
    )
    response = only.get_response()
    assert [o["name"] for o in response["outputs"]] == ["probabilities"]
    assert only.as_numpy("heatmap") is None
    assert response["id"] == "my-request-7"  # the client's id is echoed


def test_infer_bytes_png_files_match_v1_predict(client, server):
    files = [_png("benign", seed=3), _png("malignant", seed=4)]
    result = client.infer(server.name, [_bytes_input(files)], headers=_auth(server.predict_key))
    probs = result.as_numpy("probabilities")
    assert probs.shape == (2, len(server.classes))
    for i, data in enumerate(files):
        r = httpx.post(
            f"{server.base}/v1/predict?heatmap=none",
            files={"file": ("x.png", data, "image/png")},
            headers=_auth(server.predict_key),
        )
        assert r.status_code == 200, r.text
        v1 = r.json()["prediction"]["probabilities"]
        np.testing.assert_allclose(probs[i], [v1[c] for c in server.classes], atol=1e-5)


def test_versioned_infer_route(client, server, onnx_session):
    batch = _frames(server, n=2)
    result = client.infer(
        server.name,
        [_uint8_input(batch, True)],
        model_version=str(server.version),
        headers=_auth(server.predict_key),
    )
    assert result.get_response()["model_version"] == str(server.version)
    (want,) = onnx_session.run(["probabilities"], {"image": batch})
    np.testing.assert_allclose(result.as_numpy("probabilities"), want, atol=1e-5, rtol=0)


def test_json_bytes_as_base64_strings_with_httpx(server):
    files = [_png("malignant", seed=5), _png("benign", seed=6)]
    body = {
        "id": "b64",
        "inputs": [
            {
                "name": "image",
                "datatype": "BYTES",
                "shape": [2],
                "data": [base64.b64encode(f).decode() for f in files],
            }
        ],
        "outputs": [{"name": "probabilities"}],
    }
    r = _infer(server, json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["id"] == "b64" and [o["name"] for o in out["outputs"]] == ["probabilities"]
    (probs,) = out["outputs"]
    assert probs["datatype"] == "FP32" and probs["shape"] == [2, len(server.classes)]
    got = np.asarray(probs["data"]).reshape(probs["shape"])
    for i, data in enumerate(files):
        v1 = httpx.post(
            f"{server.base}/v1/predict?heatmap=none",
            files={"file": ("x.png", data, "image/png")},
            headers=_auth(server.predict_key),
        ).json()["prediction"]["probabilities"]
        np.testing.assert_allclose(got[i], [v1[c] for c in server.classes], atol=1e-5)

    bad = {**body, "inputs": [{**body["inputs"][0], "data": ["not base64!"]}]}
    r = _infer(server, json=bad)
    assert r.status_code == 400 and r.json()["error"].startswith("invalid_tensor:")


def test_json_uint8_nested_data_with_httpx(server, onnx_session):
    batch = _frames(server, n=1)
    body = {"inputs": [_uint8_json(batch, nested=True)]}
    r = _infer(server, json=body)
    assert r.status_code == 200, r.text
    outputs = {o["name"]: o for o in r.json()["outputs"]}
    got = np.asarray(outputs["probabilities"]["data"]).reshape(outputs["probabilities"]["shape"])
    (want,) = onnx_session.run(["probabilities"], {"image": batch})
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_infer_requests_are_audited(client, server):
    batch = _frames(server, n=1)
    client.infer(server.name, [_uint8_input(batch, True)], headers=_auth(server.predict_key))
    rows = httpx.get(f"{server.base}/v1/requests?limit=1", headers=_auth(server.admin_key)).json()[
        "requests"
    ]
    (row,) = rows
    assert row["route"] == "/v2/models/{name}/infer" and row["status_code"] == 200
    assert row["content_type"] == "tensor/uint8" and row["model_version"] == server.version
    assert (row["image_width"], row["image_height"]) == (server.size, server.size)
    assert row["label"] in server.classes and len(row["input_sha256"]) == 64


# -- errors --------------------------------------------------------------------------
def _error(excinfo) -> tuple[str, str]:
    """(HTTP status, message) of a tritonclient InferenceServerException."""
    return str(excinfo.value.status()), str(excinfo.value.message())


def test_unknown_model_is_404(client, server):
    batch = _frames(server, n=1)
    with pytest.raises(InferenceServerException) as e:
        client.infer(
            "no-such-model", [_uint8_input(batch, True)], headers=_auth(server.predict_key)
        )
    status, message = _error(e)
    assert status == "404" and "model_not_found" in message
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("no-such-model")
    assert _error(e)[0] == "404"
    with pytest.raises(InferenceServerException) as e:
        client.infer(
            server.name,
            [_uint8_input(batch, True)],
            model_version="999",
            headers=_auth(server.predict_key),
        )
    status, message = _error(e)
    assert status == "404" and "version_not_found" in message


@pytest.mark.parametrize(
    "shape",
    [[1, 32, 32, 3], [1, 64, 64, 1], [64, 64, 3], [1, 64, 64, 3, 1]],
    ids=["small-frame", "grey", "no-batch-axis", "five-axes"],
)
def test_wrong_shape_is_400(client, server, shape):
    shape = [server.size if d == 64 else d for d in shape]
    batch = np.zeros(shape, dtype=np.uint8)
    with pytest.raises(InferenceServerException) as e:
        client.infer(server.name, [_uint8_input(batch, True)], headers=_auth(server.predict_key))
    status, message = _error(e)
    assert status == "400" and "invalid_shape" in message


def test_too_few_values_for_the_shape_is_400(server):
    s = server.size
    body = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [2, s, s, 3],
                        "data": [0] * (s * s * 3)}]}  # fmt: skip
    r = _infer(server, json=body)
    assert r.status_code == 400 and r.json()["error"].startswith("invalid_shape:")


@pytest.mark.parametrize("datatype", ["FP32", "INT32"])
def test_wrong_datatype_is_400(client, server, datatype):
    s = server.size
    batch = np.zeros((1, s, s, 3), dtype=np.float32 if datatype == "FP32" else np.int32)
    tensor = triton.InferInput("image", list(batch.shape), datatype)
    tensor.set_data_from_numpy(batch, binary_data=True)
    with pytest.raises(InferenceServerException) as e:
        client.infer(server.name, [tensor], headers=_auth(server.predict_key))
    status, message = _error(e)
    assert status == "400" and "invalid_datatype" in message


def test_wrong_input_name_is_400(client, server):
    s = server.size
    tensor = triton.InferInput("pixels", [1, s, s, 3], "UINT8")
    tensor.set_data_from_numpy(np.zeros((1, s, s, 3), dtype=np.uint8))
    with pytest.raises(InferenceServerException) as e:
        client.infer(server.name, [tensor], headers=_auth(server.predict_key))
    status, message = _error(e)
    assert status == "400" and "invalid_tensor" in message


def test_bytes_tensor_with_a_bad_file_is_4xx(client, server):
    with pytest.raises(InferenceServerException) as e:
        client.infer(
            server.name, [_bytes_input([b"GIF89a" + bytes(64)])], headers=_auth(server.predict_key)
        )
    status, message = _error(e)
    assert status == "415" and "unsupported_media_type" in message
    with pytest.raises(InferenceServerException) as e:
        client.infer(
            server.name,
            [_bytes_input([_png(), _png()[:200]])],  # one good file, one cut short
            headers=_auth(server.predict_key),
        )
    status, message = _error(e)
    assert status == "400" and "corrupt_image" in message


def test_infer_needs_a_predict_key(client, server):
    batch = _frames(server, n=1)
    with pytest.raises(InferenceServerException) as e:
        client.infer(server.name, [_uint8_input(batch, True)])
    status, message = _error(e)
    assert status == "401" and "missing_api_key" in message
    with pytest.raises(InferenceServerException) as e:
        client.infer(server.name, [_uint8_input(batch, True)], headers=_auth("tcad_nope_nope"))
    status, message = _error(e)
    assert status == "401" and "invalid_api_key" in message
    # health and metadata are public by default (THYROID_CAD_PUBLIC_HEALTH)
    assert client.is_model_ready(server.name)


def test_invalid_json_body_is_400(server):
    r = _infer(
        server,
        content=b"{not json",
        headers={**_auth(server.predict_key), "content-type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"].startswith("invalid_json:")
    r = _infer(server, json={"inputs": []})
    assert r.status_code == 400 and r.json()["error"].startswith("invalid_request:")


# -- outputs: requested subset, unknown names, binary data ------------------------------
def test_unknown_requested_output_is_400(client, server):
    batch = _frames(server, n=1)
    with pytest.raises(InferenceServerException) as e:
        client.infer(
            server.name,
            [_uint8_input(batch, True)],
            outputs=[triton.InferRequestedOutput("logits", binary_data=True)],
            headers=_auth(server.predict_key),
        )
    status, message = _error(e)
    assert status == "400" and "unknown_output" in message and "logits" in message


def test_an_output_name_this_model_lacks_is_400(server):
    """`descriptor_x` has the form of a descriptor head's output, but this model has none:
    400 as for any unknown output, not 200 with no outputs (issue 17)."""
    body = {"inputs": [_uint8_json(_frames(server, n=1))], "outputs": [{"name": "descriptor_x"}]}
    r = _infer(server, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"].startswith("unknown_output:") and "descriptor_x" in r.text


def test_outputs_come_back_in_the_requested_order(client, server):
    batch = _frames(server, n=1)
    asked = ["ood_score", "heatmap", "probabilities"]
    result = client.infer(
        server.name,
        [_uint8_input(batch, True)],
        outputs=[triton.InferRequestedOutput(n, binary_data=True) for n in asked],
        headers=_auth(server.predict_key),
    )
    assert [o["name"] for o in result.get_response()["outputs"]] == asked
    assert result.as_numpy("probabilities").shape == (1, len(server.classes))


@pytest.mark.parametrize("datatype", ["UINT8", "BYTES"])
def test_bytes_after_the_binary_input_tensor_are_400(server, datatype):
    if datatype == "UINT8":
        raw = _frames(server, n=1).tobytes()
        shape = [1, server.size, server.size, 3]
    else:
        png = _png()
        raw = len(png).to_bytes(4, "little") + png
        shape = [1]
    tensor = {"name": "image", "datatype": datatype, "shape": shape,
              "parameters": {"binary_data_size": len(raw)}}  # fmt: skip
    head = json.dumps({"inputs": [tensor]}).encode()
    headers = {**_auth(server.predict_key), "Inference-Header-Content-Length": str(len(head))}
    ok = _infer(server, headers=headers, content=head + raw)
    assert ok.status_code == 200, ok.text
    r = _infer(server, headers=headers, content=head + raw + b"\0junk")
    assert r.status_code == 400 and r.json()["error"].startswith("invalid_tensor:"), r.text
    assert "5 bytes" in r.json()["error"]


def test_tritonclient_reads_the_model_configuration(client, server):
    s, k = server.size, len(server.classes)
    h, w = server.card["heatmap_shape"][1:3]
    for version in ("", str(server.version)):
        config = client.get_model_config(server.name, model_version=version)
        assert config["name"] == server.name and config["platform"] == "onnxruntime_onnx"
        assert config["max_batch_size"] == 64
        assert config["input"] == [{"name": "image", "data_type": "TYPE_UINT8", "dims": [s, s, 3]}]
        assert [(o["name"], o["data_type"], o["dims"]) for o in config["output"]] == [
            ("probabilities", "TYPE_FP32", [k]),
            ("heatmap", "TYPE_FP32", [h, w, k]),
            ("ood_score", "TYPE_FP32", []),
        ]
        batching = config["dynamic_batching"]  # the service's batcher, as configured
        assert batching["preferred_batch_size"] == [1]
        assert batching["default_queue_policy"] == {"max_queue_size": 64}
        assert config["instance_group"][0]["kind"] == "KIND_CPU"
    with pytest.raises(InferenceServerException) as e:
        client.get_model_config("no-such-model")
    assert _error(e)[0] == "404"


def test_tritonclient_reads_the_inference_statistics(client, server):
    def stats() -> dict:
        (one,) = client.get_inference_statistics(server.name, str(server.version))["model_stats"]
        return one

    before = stats()
    batch = _frames(server, n=2)
    client.infer(server.name, [_uint8_input(batch, True)], headers=_auth(server.predict_key))
    after = stats()
    assert after["name"] == server.name and after["version"] == str(server.version)
    assert after["inference_count"] - before["inference_count"] == 2  # frames
    assert after["execution_count"] > before["execution_count"]  # onnxruntime calls
    assert after["last_inference"] >= before["last_inference"] > 0
    done, was = after["inference_stats"], before["inference_stats"]
    for stage in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        assert done[stage]["count"] == was[stage]["count"] + 1, stage
        assert done[stage]["ns"] >= was[stage]["ns"], stage
    assert done["compute_infer"]["ns"] > was["compute_infer"]["ns"]
    assert done["fail"] == was["fail"]
    assert 2 in {b["batch_size"] for b in after["batch_stats"]}  # one call for the request
    everything = client.get_inference_statistics()["model_stats"]
    assert [m["version"] for m in everything] == [str(server.version)]
    with pytest.raises(InferenceServerException) as e:
        client.get_inference_statistics("no-such-model")
    assert _error(e)[0] == "404"


def _split_binary(response: httpx.Response) -> tuple[dict, bytes]:
    """(JSON header, raw bytes after it) of a binary tensor extension response."""
    n = int(response.headers["Inference-Header-Content-Length"])
    return json.loads(response.content[:n]), response.content[n:]


def test_binary_outputs_are_raw_little_endian_bytes_after_the_json_header(
    client, server, onnx_session
):
    """Triton's binary tensor extension, read by hand: each binary output says its byte
    count in parameters.binary_data_size; the bytes follow the header in output order."""
    batch = _frames(server, n=2)
    body = {
        "inputs": [_uint8_json(batch)],
        "outputs": [
            {"name": "heatmap", "parameters": {"binary_data": True}},
            {"name": "probabilities", "parameters": {"binary_data": False}},
        ],
    }
    r = _infer(server, json=body)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    header, raw = _split_binary(r)
    outputs = {o["name"]: o for o in header["outputs"]}
    want_probs, want_heat = onnx_session.run(["probabilities", "heatmap"], {"image": batch})
    heat = outputs["heatmap"]
    assert "data" not in heat and heat["parameters"]["binary_data_size"] == len(raw)
    got = np.frombuffer(raw, dtype="<f4").reshape(heat["shape"])
    np.testing.assert_allclose(got, want_heat, atol=1e-5, rtol=0)
    probs = outputs["probabilities"]  # asked for as JSON: stays JSON in the header
    np.testing.assert_allclose(
        np.reshape(probs["data"], probs["shape"]), want_probs, atol=1e-5, rtol=0
    )

    # binary_data_output on the request: every output binary, in order, back to back
    body = {"inputs": body["inputs"], "parameters": {"binary_data_output": True}}
    r = _infer(server, json=body)
    header, raw = _split_binary(r)
    sizes = [o["parameters"]["binary_data_size"] for o in header["outputs"]]
    assert [o["name"] for o in header["outputs"]] == ["probabilities", "heatmap", "ood_score"]
    assert sum(sizes) == len(raw)
    got_probs = np.frombuffer(raw[: sizes[0]], dtype="<f4").reshape(want_probs.shape)
    np.testing.assert_allclose(got_probs, want_probs, atol=1e-5, rtol=0)


def test_tritonclient_binary_outputs_match_its_json_outputs(client, server):
    batch = _frames(server, n=2)
    results = {
        binary: client.infer(
            server.name,
            [_uint8_input(batch, True)],
            outputs=[
                triton.InferRequestedOutput("probabilities", binary_data=binary),
                triton.InferRequestedOutput("heatmap", binary_data=binary),
            ],
            headers=_auth(server.predict_key),
        )
        for binary in (True, False)
    }
    for name in ("probabilities", "heatmap"):
        binary_out = results[True].get_output(name)
        assert "binary_data_size" in binary_out["parameters"] and "data" not in binary_out
        assert "data" in results[False].get_output(name)
        np.testing.assert_array_equal(
            results[True].as_numpy(name), results[False].as_numpy(name).astype(np.float32)
        )


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"id": 7}, "invalid_request"),
        ({"parameters": None}, "invalid_request"),
        ({"parameters": {"binary_data_output": "yes"}}, "invalid_request"),
        (
            {"outputs": [{"name": "probabilities", "parameters": {"binary_data": 1}}]},
            "invalid_request",
        ),
        ({"outputs": [{"name": "logits"}]}, "unknown_output"),
        (
            {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [], "data": []}]},
            "invalid_shape",
        ),
        (
            {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": ["AAAA"]}]},
            "invalid_shape",
        ),
        (
            {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": None}]},
            "invalid_tensor",
        ),
        (
            {"inputs": [{"name": "pixels", "datatype": "BYTES", "shape": [999], "data": []}]},
            "invalid_tensor",
        ),  # malformed first: 400, not 413 for the size
        (
            {"inputs": [{"name": "image", "datatype": "FP16", "shape": [999], "data": []}]},
            "invalid_datatype",
        ),
    ],
    ids=[
        "id-not-a-string",
        "parameters-null",
        "binary-data-output-not-bool",
        "binary-data-not-bool",
        "unknown-output",
        "bytes-empty-shape",
        "bytes-shape-not-its-length",
        "data-null",
        "bad-name-before-size",
        "bad-datatype-before-size",
    ],
)
def test_a_request_the_schema_refuses_is_400(server, change, code):
    png = base64.b64encode(_png()).decode()
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [png]}]}
    r = _infer(server, json={**body, **change})
    assert r.status_code == 400, r.text
    assert r.json()["error"].startswith(f"{code}:"), r.text
    ok = _infer(server, json=body)
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("version", ["0", "-1", "1.0", "null", "99999999999999999999"])
def test_a_version_that_is_not_a_positive_integer_is_400(client, server, version):
    r = httpx.get(f"{server.base}/v2/models/{server.name}/versions/{version}")
    assert r.status_code == 400 and r.json()["error"].startswith("invalid_version:"), r.text
    assert "SQLite" not in r.text
    assert not client.is_model_ready(server.name, model_version=version)


def test_unversioned_routes_take_no_version_query(server):
    """`?version=` is not a parameter of /v2/models/{name}: ignored, not half-honoured."""
    r = httpx.get(f"{server.base}/v2/models/{server.name}?version=banana")
    assert r.status_code == 200 and r.json()["versions"] == [str(server.version)]
    doc = httpx.get(f"{server.base}/openapi.json").json()
    for path in ("/v2/models/{name}", "/v2/models/{name}/ready", "/v2/models/{name}/infer"):
        for op in doc["paths"][path].values():
            assert [p["name"] for p in op.get("parameters", [])] == ["name"], path


@pytest.mark.parametrize(
    "body",
    [b"[" * 100_000, b'{"inputs": ' + b"[" * 100_000, b"\xff\xfe{}"],
    ids=["nested-too-deep", "header-nested-too-deep", "not-utf8"],
)
def test_json_no_parser_can_read_is_400(server, body):
    r = _infer(
        server,
        content=body,
        headers={**_auth(server.predict_key), "content-type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"].startswith("invalid_json:"), r.text
