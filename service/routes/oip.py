"""The Open Inference Protocol (KServe v2 / Triton HTTP) over the same models.

Inputs: `image` as UINT8 [N, S, S, 3] (frames already prepared by
thyroid_cad.imaging.prepare, as the model card says), or as BYTES [N] holding encoded
image files (PNG, JPEG, BMP, TIFF, DICOM) that the server decodes and prepares.
In JSON, BYTES elements are base64 strings; with the binary tensor extension
(`Inference-Header-Content-Length`), raw bytes, each prefixed by its 4-byte
little-endian length, as Triton clients send them. Outputs: `probabilities` FP32
[N, K] and `heatmap` FP32 [N, h, w, K] (when the model has one), as JSON, or as raw
little-endian bytes after the JSON header when an output asks for `binary_data` (or the
request for `binary_data_output`), as Triton answers. Frames go through the model's
batcher like /v1's, so /v1 and /v2 requests share batches.

Models trained on ROI crops: a BYTES input may carry the parameter `roi`, the nodule box
`x,y,w,h` in the image's pixels (`;` between the images of a batch; an empty entry lets
the bundled localiser propose it, as does no `roi` at all). The response's parameters
say what was classified: `roi` (same format), `roi_source` (`user`, `localiser` or
`none` per image) and `shape` (JSON list, per image, of the nodule's shape or null).
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import time

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from service import inference
from service.config import Settings
from service.deps import Audited, PredictKey, auth_first, health_scope
from service.errors import ApiError
from service.models import LoadedModel

OUTPUTS = ("probabilities", "heatmap")
_TENSOR = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string", "enum": ["image"]},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "datatype": {"type": "string", "enum": ["UINT8", "BYTES"]},
        "parameters": {
            "type": "object",
            "properties": {
                "binary_data_size": {"type": "integer", "minimum": 0},
                "roi": {
                    "type": "string",
                    "description": "BYTES only, ROI models: nodule box x,y,w,h in the image's "
                    "pixels, ';' between images; empty or absent: the localiser's.",
                },
            },
        },
        "data": {"type": "array", "description": "Row-major values; BYTES as base64."},
    },
}
INFER_BODY = {
    "requestBody": {
        "required": True,
        "description": "An OIP inference request (JSON, or JSON + binary tensor data with "
        "the Inference-Header-Content-Length header).",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "parameters": {
                            "type": "object",
                            "properties": {"binary_data_output": {"type": "boolean"}},
                        },
                        "inputs": {"type": "array", "items": _TENSOR, "minItems": 1, "maxItems": 1},
                        "outputs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {
                                    "name": {"type": "string", "enum": list(OUTPUTS)},
                                    "parameters": {
                                        "type": "object",
                                        "properties": {"binary_data": {"type": "boolean"}},
                                    },
                                },
                            },
                        },
                    },
                }
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
_ERROR = {"type": "object", "properties": {"error": {"type": "string"}}}
OIP_ERRORS = {
    s: {"description": d, "content": {"application/json": {"schema": _ERROR}}}
    for s, d in {
        400: "Malformed request or tensor.",
        401: "Missing or unknown API key.",
        404: "No such model or version.",
        413: "Request, batch or image too large.",
        415: "An encoded image is not a supported format.",
        503: "No model loaded, or the queue is full (Retry-After).",
    }.items()
}
router = APIRouter(tags=["v2"])
infer_router = APIRouter(tags=["v2"], route_class=auth_first("predict"))


def _model(request: Request, name: str, version: str | None) -> LoadedModel:
    manager = request.app.state.models
    if version is not None and not (version.isascii() and version.isdigit()):
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
            **(
                {
                    "roi_margin": float(model.roi["margin"]),
                    "roi_localiser": model.localiser is not None,
                    "roi_input": "UINT8 frames: thyroid_cad.imaging.prepare_input with the "
                    "nodule box and roi_margin; BYTES: parameter roi=x,y,w,h (or the localiser)",
                }
                if model.roi
                else {}
            ),
        },
    }


MAX_BATCH = 64


def _bad(message: str, code: str = "invalid_request") -> ApiError:
    return ApiError(400, code, message)


async def _parse(request: Request, max_bytes: int) -> tuple[dict, bytes]:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise ApiError(413, "request_too_large", f"request body exceeds {max_bytes} bytes")
    body = await request.body()
    if len(body) > max_bytes:
        raise ApiError(413, "request_too_large", f"request body exceeds {max_bytes} bytes")
    header_len = request.headers.get("inference-header-content-length")
    try:
        if header_len is not None:
            n = int(header_len)
            if not 0 < n <= len(body):
                raise ValueError("Inference-Header-Content-Length is out of range")
            return _check_header(json.loads(body[:n])), body[n:]
        return _check_header(json.loads(body)), b""
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, "invalid_json", f"request body is not valid JSON: {e}") from e


def _is_int(value, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _check_header(header) -> dict:
    """Check the request's JSON structure up front, so nothing later trips on types."""
    if not isinstance(header, dict):
        raise _bad("the request must be a JSON object")
    inputs, outputs = header.get("inputs"), header.get("outputs", [])
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise _bad("'inputs' must hold exactly one tensor object, 'image'")
    if not isinstance(outputs, list) or not all(
        isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs
    ):
        raise _bad("'outputs' must be a list of objects with a 'name'")
    unknown = sorted({o["name"] for o in outputs} - set(OUTPUTS))
    if unknown:
        raise _bad(f"unknown output(s) {unknown}; this model has {list(OUTPUTS)}", "unknown_output")
    for o in outputs:
        if not isinstance(o.get("parameters") or {}, dict):
            raise _bad("an output's 'parameters' must be an object")
    spec = inputs[0]
    params = spec.get("parameters") or {}
    if not isinstance(params, dict):
        raise _bad("'parameters' must be an object")
    size = params.get("binary_data_size")
    if size is not None and not _is_int(size):
        raise _bad("'binary_data_size' must be a non-negative integer", "invalid_tensor")
    shape = spec.get("shape")
    if not isinstance(shape, list) or not shape or not all(_is_int(d) for d in shape):
        raise _bad("'shape' must be a list of non-negative integers", "invalid_shape")
    if shape[0] > MAX_BATCH:
        raise ApiError(413, "batch_too_large", f"at most {MAX_BATCH} images per request")
    if size is None and not isinstance(spec.get("data"), list):
        raise _bad("'data' must be a list (or use the binary tensor extension)", "invalid_tensor")
    return header


def _bytes_elements(spec: dict, blob: bytes, offset: int) -> tuple[list[bytes], int]:
    size = (spec.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        raw, out = blob[offset : offset + size], []
        if len(raw) != size:
            raise _bad("binary data is shorter than 'binary_data_size'", "invalid_tensor")
        i = 0
        while i < len(raw):
            if i + 4 > len(raw):
                raise _bad("truncated BYTES element length", "invalid_tensor")
            (n,) = struct.unpack_from("<I", raw, i)
            if i + 4 + n > len(raw):
                raise _bad("truncated BYTES element", "invalid_tensor")
            out.append(raw[i + 4 : i + 4 + n])
            i += 4 + n
        return out, offset + size
    try:
        return [base64.b64decode(d, validate=True) for d in spec.get("data", [])], offset
    except (ValueError, TypeError) as e:
        raise ApiError(400, "invalid_tensor", "BYTES data must be base64 strings in JSON") from e


def _rois(spec: dict, n: int) -> list:
    """The `roi` input parameter: one box (or None) per encoded image."""
    text = (spec.get("parameters") or {}).get("roi")
    if text is None:
        return [None] * n
    if not isinstance(text, str):
        raise _bad("'roi' must be a string x,y,w,h (';' between images)", "invalid_roi")
    parts = text.split(";")
    if len(parts) != n:
        raise _bad(f"'roi' gives {len(parts)} boxes for {n} images", "invalid_roi")
    return [inference.parse_roi(p) if p.strip() else None for p in parts]


def _roi_parameters(located: list) -> dict:
    """What a ROI model classified, as OIP response parameters (strings)."""
    boxes = [",".join(map(str, x.roi.box)) if x.roi.box else "" for x in located]
    shapes = [x.shape.model_dump() if x.shape else None for x in located]
    return {
        "roi": ";".join(boxes),
        "roi_source": ";".join(x.roi.source for x in located),
        "shape": json.dumps(shapes),
    }


def _batch(
    model: LoadedModel, spec: dict, blob: bytes, limits: Settings
) -> tuple[np.ndarray, dict, list]:
    dtype, shape = spec.get("datatype"), spec.get("shape")
    s = model.input_size
    if spec.get("name") != "image":
        raise ApiError(400, "invalid_tensor", "the input tensor must be named 'image'")
    if dtype == "UINT8":
        if len(shape) != 4 or shape[1:] != [s, s, 3]:
            raise ApiError(400, "invalid_shape", f"UINT8 image must have shape [N, {s}, {s}, 3]")
        size = (spec.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            values = np.frombuffer(blob[:size], dtype=np.uint8)
        else:
            try:
                values = np.asarray(spec["data"])
            except ValueError as e:  # ragged nesting
                raise _bad("UINT8 data must be a regular array", "invalid_tensor") from e
            if values.size and values.dtype.kind not in "iu":
                raise _bad("UINT8 data must be integers", "invalid_tensor")
            if values.size and (values.min() < 0 or values.max() > 255):
                raise ApiError(400, "invalid_tensor", "UINT8 data must lie in 0..255")
        if values.size != int(np.prod(shape)):
            raise ApiError(400, "invalid_shape", f"{values.size} values do not fill {shape}")
        if (spec.get("parameters") or {}).get("roi") is not None:
            raise _bad(
                "'roi' applies to BYTES images; UINT8 frames are already prepared", "invalid_roi"
            )
        batch = values.astype(np.uint8).reshape(shape)
        return (
            batch,
            {
                "content_type": "tensor/uint8",
                "input_sha256": hashlib.sha256(batch.tobytes()).hexdigest(),
            },
            [],
        )
    if dtype == "BYTES":
        files, _ = _bytes_elements(spec, blob, 0)
        if len(files) > MAX_BATCH:
            raise ApiError(413, "batch_too_large", f"at most {MAX_BATCH} images per request")
        if not files:
            raise ApiError(400, "invalid_tensor", "BYTES image tensor is empty")
        rois = _rois(spec, len(files))
        frames, located = [], []
        for data, roi in zip(files, rois, strict=True):
            if len(data) > limits.max_upload_bytes:
                raise ApiError(
                    413, "file_too_large", f"an image exceeds {limits.max_upload_bytes} bytes"
                )
            prepared = inference.prepare(data, s, limits.max_image_pixels, model, roi)
            frames.append(prepared.square)
            located.append(prepared.located)
        digest = hashlib.sha256(b"".join(files)).hexdigest()
        facts = {"content_type": "tensor/bytes", "input_sha256": digest}
        return np.stack(frames), facts, located if model.roi else []
    raise ApiError(400, "invalid_datatype", "image must be UINT8 [N,S,S,3] or BYTES [N]")


def _encode_outputs(header: dict, tensors: dict[str, np.ndarray]) -> tuple[list[dict], bytes]:
    """Output tensors as OIP JSON, or as binary data where the request asked for it."""
    asked = {o["name"]: o.get("parameters") or {} for o in header.get("outputs") or []}
    all_binary = bool((header.get("parameters") or {}).get("binary_data_output"))
    outputs, blob = [], []
    for name, values in tensors.items():
        if asked and name not in asked:
            continue
        out = {"name": name, "datatype": "FP32", "shape": list(values.shape)}
        if asked.get(name, {}).get("binary_data", all_binary):
            raw = np.ascontiguousarray(values, dtype="<f4").tobytes()
            out["parameters"] = {"binary_data_size": len(raw)}
            blob.append(raw)
        else:
            out["data"] = values.astype(float).ravel().tolist()
        outputs.append(out)
    return outputs, b"".join(blob)


@router.get("/v2/health/live", dependencies=[Depends(health_scope)])
def live():
    """OIP liveness."""
    return {"live": True}


@router.get("/v2/health/ready", dependencies=[Depends(health_scope)])
def ready(request: Request):
    """OIP readiness: 200 when the served model is loaded."""
    ok = request.app.state.models.ready
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)


@router.get("/v2", dependencies=[Depends(health_scope)])
def server_metadata():
    """OIP server metadata."""
    return {"name": "thyroid-cad", "version": "1", "extensions": ["binary_tensor_data"]}


@router.get("/v2/models/{name}", dependencies=[Depends(health_scope)], responses=OIP_ERRORS)
@router.get(
    "/v2/models/{name}/versions/{version}",
    dependencies=[Depends(health_scope)],
    responses=OIP_ERRORS,
)
def model_metadata(request: Request, name: str, version: str | None = None):
    """OIP model metadata: tensors, datatypes, shapes."""
    return _metadata(_model(request, name, version))


@router.get("/v2/models/{name}/ready", dependencies=[Depends(health_scope)], responses=OIP_ERRORS)
@router.get(
    "/v2/models/{name}/versions/{version}/ready",
    dependencies=[Depends(health_scope)],
    responses=OIP_ERRORS,
)
def model_ready(request: Request, name: str, version: str | None = None):
    """OIP model readiness."""
    try:
        _model(request, name, version)
    except ApiError as e:
        return JSONResponse({"name": name, "ready": False, "error": e.message}, e.status)
    return {"name": name, "ready": True}


@infer_router.post("/v2/models/{name}/infer", openapi_extra=INFER_BODY, responses=OIP_ERRORS)
@infer_router.post(
    "/v2/models/{name}/versions/{version}/infer", openapi_extra=INFER_BODY, responses=OIP_ERRORS
)
async def infer(request: Request, key: PredictKey, name: str, version: str | None = None):
    """OIP inference: probabilities and heatmap tensors."""
    with Audited(request, "/v2/models/{name}/infer", key) as audited:
        model = _model(request, name, version)
        audited.record.update(model_name=model.name, model_version=model.version)
        limits: Settings = request.app.state.settings
        header, blob = await _parse(request, 4 * limits.max_upload_bytes)
        t0 = time.perf_counter()
        batch, facts, located = await run_in_threadpool(
            _batch, model, header["inputs"][0], blob, limits
        )
        if len(batch) == 0:
            raise _bad("the batch is empty", "invalid_shape")
        audited.record.update(
            facts, image_height=int(batch.shape[1]), image_width=int(batch.shape[2])
        )
        t1 = time.perf_counter()
        result = await run_in_threadpool(model.infer, batch)
        t2 = time.perf_counter()
        probs, maps = result.probabilities, result.heatmap
        tensors = {"probabilities": probs} | ({"heatmap": maps} if maps is not None else {})
        outputs, binary = _encode_outputs(header, tensors)
        names = model.card["class_names"]
        if len(batch) == 1:
            audited.record.update(
                label=names[int(np.argmax(probs[0]))],
                probabilities={n: float(p) for n, p in zip(names, probs[0], strict=True)},
            )
        audited.record["timings"] = {
            "decode_ms": (t1 - t0) * 1e3,
            "queue_ms": result.queue_s * 1e3,
            "inference_ms": (t2 - t1 - result.queue_s) * 1e3,
            "batch_size": result.batch_size,
            "total_ms": (time.perf_counter() - audited.start) * 1e3,
        }
        audited.finish(200)
        body = {
            "model_name": model.name,
            "model_version": str(model.version),
            "id": header.get("id") or audited.record["request_id"],
            "parameters": {
                "disclaimer": model.card.get("disclaimer"),
                "class_names": names,
                **(_roi_parameters(located) if located else {}),
            },
            "outputs": outputs,
        }
        if not binary:
            return body
        head = json.dumps(body).encode()
        return Response(
            head + binary,
            media_type="application/octet-stream",
            headers={"Inference-Header-Content-Length": str(len(head))},
        )
