"""The Open Inference Protocol (KServe v2 / Triton HTTP) over the same models.

Inputs: `image` as UINT8 [N, S, S, 3] (frames already prepared by
thyroid_cad.imaging.prepare, as the model card says), or as BYTES [N] holding encoded
image files (PNG, JPEG, BMP, TIFF, DICOM) that the server decodes and prepares.
In JSON, BYTES elements are base64 strings; with the binary tensor extension
(`Inference-Header-Content-Length`), raw bytes, each prefixed by its 4-byte
little-endian length, as Triton clients send them. Outputs: `probabilities` FP32
[N, K] and `heatmap` FP32 [N, h, w, K] (when the model has one), returned as JSON.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import time

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse

from service import decoding
from service.config import Settings
from service.deps import Audited, PredictKey, health_scope
from service.errors import ApiError
from service.models import LoadedModel
from thyroid_cad import imaging


def _model(request: Request, name: str, version: str | None) -> LoadedModel:
    manager = request.app.state.models
    if version is not None and not version.isdigit():
        raise ApiError(400, "invalid_version", f"version must be a number, got {version!r}")
    model, _ = manager.get(version=int(version) if version else None, name=name)
    return model


def _metadata(model: LoadedModel) -> dict:
    s, k = model.input_size, len(model.card["class_names"])
    outputs = [{"name": "probabilities", "datatype": "FP32", "shape": [-1, k]}]
    if model.has_heatmap:
        h, w = model.card["heatmap_shape"][1:3]
        outputs.append({"name": "heatmap", "datatype": "FP32", "shape": [-1, h, w, k]})
    return {
        "name": model.name,
        "versions": [str(model.version)],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "image", "datatype": "UINT8", "shape": [-1, s, s, 3]}],
        "outputs": outputs,
        "parameters": {
            "class_names": model.card["class_names"],
            "alternative_input": "BYTES [-1]: encoded image files",
            "disclaimer": model.card.get("disclaimer"),
        },
    }


async def _parse(request: Request) -> tuple[dict, bytes]:
    body = await request.body()
    header_len = request.headers.get("inference-header-content-length")
    try:
        if header_len is not None:
            n = int(header_len)
            return json.loads(body[:n]), body[n:]
        return json.loads(body), b""
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, "invalid_json", f"request body is not valid JSON: {e}") from e


def _bytes_elements(spec: dict, blob: bytes, offset: int) -> tuple[list[bytes], int]:
    size = (spec.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        raw, out = blob[offset : offset + size], []
        i = 0
        while i < len(raw):
            (n,) = struct.unpack_from("<I", raw, i)
            out.append(raw[i + 4 : i + 4 + n])
            i += 4 + n
        return out, offset + size
    try:
        return [base64.b64decode(d, validate=True) for d in spec.get("data", [])], offset
    except (ValueError, TypeError) as e:
        raise ApiError(400, "invalid_tensor", "BYTES data must be base64 strings in JSON") from e


def _batch(
    model: LoadedModel, spec: dict, blob: bytes, limits: Settings
) -> tuple[np.ndarray, dict]:
    dtype, shape = spec.get("datatype"), spec.get("shape")
    s = model.input_size
    if spec.get("name") != "image":
        raise ApiError(400, "invalid_tensor", "the input tensor must be named 'image'")
    if dtype == "UINT8":
        if list(shape or [])[1:] != [s, s, 3] or len(shape) != 4:
            raise ApiError(400, "invalid_shape", f"UINT8 image must have shape [N, {s}, {s}, 3]")
        size = (spec.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            values = np.frombuffer(blob[:size], dtype=np.uint8)
        else:
            values = np.asarray(spec.get("data", []))
            if values.size and (values.min() < 0 or values.max() > 255):
                raise ApiError(400, "invalid_tensor", "UINT8 data must lie in 0..255")
        if values.size != int(np.prod(shape)):
            raise ApiError(400, "invalid_shape", f"{values.size} values do not fill {shape}")
        batch = values.astype(np.uint8).reshape(shape)
        return batch, {
            "content_type": "tensor/uint8",
            "input_sha256": hashlib.sha256(batch.tobytes()).hexdigest(),
        }
    if dtype == "BYTES":
        files, _ = _bytes_elements(spec, blob, 0)
        if not files:
            raise ApiError(400, "invalid_tensor", "BYTES image tensor is empty")
        frames = []
        for data in files:
            if len(data) > limits.max_upload_bytes:
                raise ApiError(
                    413, "file_too_large", f"an image exceeds {limits.max_upload_bytes} bytes"
                )
            frames.append(imaging.prepare(decoding.decode(data, limits.max_image_pixels).rgb, s))
        digest = hashlib.sha256(b"".join(files)).hexdigest()
        return np.stack(frames), {"content_type": "tensor/bytes", "input_sha256": digest}
    raise ApiError(400, "invalid_datatype", "image must be UINT8 [N,S,S,3] or BYTES [N]")


def add_routes(app: FastAPI, settings: Settings) -> None:
    health = [Depends(health_scope)]

    @app.get("/v2/health/live", tags=["v2"], dependencies=health)
    def live():
        """OIP liveness."""
        return {"live": True}

    @app.get("/v2/health/ready", tags=["v2"], dependencies=health)
    def ready(request: Request):
        """OIP readiness: 200 when the served model is loaded."""
        ok = request.app.state.models.ready
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/v2", tags=["v2"], dependencies=health)
    def server_metadata():
        """OIP server metadata."""
        return {"name": "thyroid-cad", "version": "1", "extensions": ["binary_tensor_data"]}

    @app.get("/v2/models/{name}", tags=["v2"], dependencies=health)
    @app.get("/v2/models/{name}/versions/{version}", tags=["v2"], dependencies=health)
    def model_metadata(request: Request, name: str, version: str | None = None):
        """OIP model metadata: tensors, datatypes, shapes."""
        return _metadata(_model(request, name, version))

    @app.get("/v2/models/{name}/ready", tags=["v2"], dependencies=health)
    @app.get("/v2/models/{name}/versions/{version}/ready", tags=["v2"], dependencies=health)
    def model_ready(request: Request, name: str, version: str | None = None):
        """OIP model readiness."""
        try:
            _model(request, name, version)
        except ApiError as e:
            return JSONResponse(
                {"name": name, "ready": False, "error": e.message},
                status_code=e.status if e.status != 503 else 503,
            )
        return {"name": name, "ready": True}

    @app.post("/v2/models/{name}/infer", tags=["v2"])
    @app.post("/v2/models/{name}/versions/{version}/infer", tags=["v2"])
    async def infer(request: Request, key: PredictKey, name: str, version: str | None = None):
        """OIP inference: probabilities and heatmap tensors."""
        audited = Audited(request, "/v2/models/{name}/infer", key)
        try:
            model = _model(request, name, version)
            audited.record.update(model_name=model.name, model_version=model.version)
            header, blob = await _parse(request)
            inputs = header.get("inputs") or []
            if len(inputs) != 1:
                raise ApiError(400, "invalid_request", "exactly one input tensor, 'image'")
            t0 = time.perf_counter()
            batch, facts = _batch(model, inputs[0], blob, request.app.state.settings)
            audited.record.update(
                facts, image_height=int(batch.shape[1]), image_width=int(batch.shape[2])
            )
            t1 = time.perf_counter()
            probs, maps = model.run(batch)
            t2 = time.perf_counter()
            request.app.state.metrics.inference.labels(str(model.version)).observe(t2 - t1)
            request.app.state.metrics.batch.observe(len(batch))
            wanted = {o.get("name") for o in header.get("outputs") or []} or {
                "probabilities",
                "heatmap",
            }
            outputs = [
                {
                    "name": "probabilities",
                    "datatype": "FP32",
                    "shape": list(probs.shape),
                    "data": probs.astype(float).ravel().tolist(),
                }
            ]
            if maps is not None and "heatmap" in wanted:
                outputs.append(
                    {
                        "name": "heatmap",
                        "datatype": "FP32",
                        "shape": list(maps.shape),
                        "data": maps.astype(float).ravel().tolist(),
                    }
                )
            outputs = [o for o in outputs if o["name"] in wanted]
            names = model.card["class_names"]
            if len(batch) == 1:
                audited.record.update(
                    label=names[int(np.argmax(probs[0]))],
                    probabilities={n: float(p) for n, p in zip(names, probs[0], strict=True)},
                )
            audited.record["timings"] = {
                "decode_ms": (t1 - t0) * 1e3,
                "inference_ms": (t2 - t1) * 1e3,
                "total_ms": (time.perf_counter() - audited.start) * 1e3,
            }
            audited.finish(200)
            return {
                "model_name": model.name,
                "model_version": str(model.version),
                "id": header.get("id") or audited.record["request_id"],
                "parameters": {"disclaimer": model.card.get("disclaimer"), "class_names": names},
                "outputs": outputs,
            }
        except ApiError as e:
            audited.finish(e.status, e.code)
            raise
