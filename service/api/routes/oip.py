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

Admission: like /v1, a request takes the pixels of its frames from the decoding budget
(service/inference/admission.py) before they are decoded or converted (each BYTES
element's from its header; a UINT8 tensor's N x S x S) and gives them back when its
answer is built; no room within THYROID_CAD_ADMISSION_TIMEOUT_S is a 503 `busy` with
Retry-After.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import struct
import time
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from service.api.deps import Audited, PredictKey, auth_first, health_scope, pixel_ticket
from service.api.routes.v1 import extra
from service.config import Settings
from service.errors import ApiError
from service.inference import pipeline as inference
from service.inference import safety
from service.inference.admission import Ticket
from service.inference.models import LoadedModel
from service.schemas import SQL_INT_MAX
from thyroid_cad import tirads

OUTPUTS = ("probabilities", "heatmap", "ood_score")
# Models with TI-RADS descriptor heads also have descriptor_<name> outputs (card
# 'descriptors'); every graph output is returned, by name.
DESCRIPTOR_OUTPUT = re.compile(re.escape(tirads.OUTPUT_PREFIX) + "[a-z_]+")
_OUTPUT_NAME = {
    "type": "string",
    "pattern": "^(probabilities|heatmap|ood_score|descriptor_[a-z_]+)$",
    "description": "probabilities, heatmap, ood_score, or descriptor_<name> (models with "
    "descriptor heads).",
}
_TENSOR = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string", "enum": ["image"]},
        "shape": {
            "type": "array",
            "items": {"type": "integer", "minimum": 0},
            "minItems": 1,
            "description": "[N, S, S, 3] for UINT8, [N] for BYTES.",
        },
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
                        "inputs": {
                            "type": "array",
                            "items": _TENSOR,
                            "minItems": 1,
                            "maxItems": 1,
                        },
                        "outputs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {
                                    "name": _OUTPUT_NAME,
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
_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string", "description": "<code>: <message>"}},
}


def oip_errors(*statuses: int) -> dict:
    """OpenAPI entries for /v2 error answers: {"error": "<code>: <message>"}, as OIP says."""
    why = {
        400: "Malformed request or tensor, or a version that is not a positive integer.",
        401: "Missing or unknown API key.",
        403: "The key lacks the scope this route needs (a feedback key on inference).",
        404: "No such model or version.",
        413: "Request, batch or image too large.",
        415: "An encoded image is not a supported format.",
        422: "A parameter fails the schema.",
        503: "No model loaded, the queue is full or too many pixels are being decoded "
        "(busy; both with Retry-After).",
    }
    return {
        s: {"description": why[s], "content": {"application/json": {"schema": _ERROR}}} | extra(s)
        for s in statuses
    }


_OUTPUT = {
    "type": "object",
    "required": ["name", "datatype", "shape"],
    "properties": {
        "name": _OUTPUT_NAME,
        "datatype": {"type": "string", "enum": ["FP32"]},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "data": {"type": "array", "items": {"type": "number"}, "description": "Row-major."},
        "parameters": {
            "type": "object",
            "properties": {"binary_data_size": {"type": "integer", "minimum": 0}},
            "description": "binary_data_size: the output's raw bytes follow the JSON header.",
        },
    },
}
INFER_OK = {
    200: {
        "description": "Output tensors as JSON, or, when an output asked for binary_data, a "
        "JSON header (its length in Inference-Header-Content-Length) followed by the raw "
        "little-endian FP32 bytes of those outputs.",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["model_name", "model_version", "id", "outputs"],
                    "properties": {
                        "model_name": {"type": "string"},
                        "model_version": {"type": "string"},
                        "id": {"type": "string"},
                        "parameters": {"type": "object"},
                        "outputs": {"type": "array", "items": _OUTPUT},
                    },
                }
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
        "headers": {
            "Inference-Header-Content-Length": {
                "description": "Bytes of JSON header before the binary outputs (binary only).",
                "schema": {"type": "integer", "minimum": 0},
            }
        },
    }
}
METADATA_ERRORS = oip_errors(400, 401, 403, 404, 422, 503)
INFER_ERRORS = oip_errors(400, 401, 403, 404, 413, 415, 422, 503)
Version = Annotated[
    str,
    Path(
        description="Registered model version, a positive integer (OIP versions are strings).",
        json_schema_extra={"pattern": "^[1-9][0-9]{0,8}$"},
    ),
]
router = APIRouter(tags=["v2"])
infer_router = APIRouter(tags=["v2"], route_class=auth_first("predict"))


def _model(request: Request, name: str, version: str | None) -> LoadedModel:
    manager = request.app.state.models
    number = None
    if version is not None:
        ok = version.isascii() and version.isdigit() and 1 <= int(version) <= SQL_INT_MAX
        if not ok:
            raise ApiError(
                400,
                "invalid_version",
                f"version must be an integer from 1 to {SQL_INT_MAX}, got {version!r}",
            )
        number = int(version)
    model, _ = manager.get(version=number, name=name)
    return model


def _metadata(model: LoadedModel) -> dict:
    s, k = model.input_size, len(model.card["class_names"])
    outputs = [{"name": "probabilities", "datatype": "FP32", "shape": [-1, k]}]
    if model.has_heatmap:
        h, w = model.card["heatmap_shape"][1:3]
        outputs.append({"name": "heatmap", "datatype": "FP32", "shape": [-1, h, w, k]})
    for d, labels in (model.card.get("descriptors") or {}).items():
        outputs.append(
            {"name": tirads.output_name(d), "datatype": "FP32", "shape": [-1, len(labels)]}
        )
    if safety.OUTPUT_NAME in model.output_names:
        outputs.append({"name": safety.OUTPUT_NAME, "datatype": "FP32", "shape": [-1]})
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
            **({"descriptors": model.card["descriptors"]} if model.card.get("descriptors") else {}),
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


async def _parse(request: Request, max_bytes: int) -> tuple[dict, memoryview]:
    """The request's JSON header, and a view of the binary data after it (empty without
    the binary tensor extension): views, so a waiting request holds its upload once."""
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
            return _check_header(json.loads(body[:n])), memoryview(body)[n:]
        return _check_header(json.loads(body)), memoryview(b"")
    except (ValueError, RecursionError) as e:  # RecursionError: '[[[[...' nested too deep
        raise ApiError(400, "invalid_json", f"request body is not valid JSON: {e}") from e


def _is_int(value, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _expect(ok: bool, message: str, code: str = "invalid_request") -> None:
    if not ok:
        raise _bad(message, code)


def _optional(obj: dict, key: str, kind: type) -> bool:
    """True when `key` is absent or holds a `kind` (bool is not an int here; null is not
    an absent key)."""
    if key not in obj:
        return True
    value = obj[key]
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


def _check_header(header) -> dict:
    """Check the request against the schema /openapi.json gives, up front: a malformed
    request is a 400 whatever else is wrong with it, and nothing later trips on types."""
    _expect(isinstance(header, dict), "the request must be a JSON object")
    _expect(_optional(header, "id", str), "'id' must be a string")
    _expect(_optional(header, "parameters", dict), "'parameters' must be an object")
    _expect(
        _optional(header.get("parameters", {}), "binary_data_output", bool),
        "'binary_data_output' must be true or false",
    )
    inputs = header.get("inputs")
    _expect(
        isinstance(inputs, list) and len(inputs) == 1 and isinstance(inputs[0], dict),
        "'inputs' must hold exactly one tensor object, 'image'",
    )
    _expect(_optional(header, "outputs", list), "'outputs' must be a list")
    for o in header.get("outputs", []):
        _expect(isinstance(o, dict) and isinstance(o.get("name"), str), "outputs need a 'name'")
        _expect(
            o["name"] in OUTPUTS or DESCRIPTOR_OUTPUT.fullmatch(o["name"]) is not None,
            f"unknown output {o['name']!r}; this model has {list(OUTPUTS)}",
            "unknown_output",
        )
        _expect(_optional(o, "parameters", dict), "an output's 'parameters' must be an object")
        _expect(
            _optional(o.get("parameters", {}), "binary_data", bool),
            "'binary_data' must be true or false",
        )
    spec = inputs[0]
    _expect(spec.get("name") == "image", "the input tensor must be named 'image'", "invalid_tensor")
    _expect(
        spec.get("datatype") in ("UINT8", "BYTES"),
        "image must be UINT8 [N,S,S,3] or BYTES [N]",
        "invalid_datatype",
    )
    shape = spec.get("shape")
    _expect(
        isinstance(shape, list) and bool(shape) and all(_is_int(d) for d in shape),
        "'shape' must be a non-empty list of non-negative integers",
        "invalid_shape",
    )
    _expect(_optional(spec, "parameters", dict), "'parameters' must be an object")
    size = spec.get("parameters", {}).get("binary_data_size")
    _expect(
        size is None or _is_int(size),
        "'binary_data_size' must be a non-negative integer",
        "invalid_tensor",
    )
    _expect(_optional(spec, "data", list), "'data' must be a list", "invalid_tensor")
    # The schema is met; now what this server can do with it.
    _expect(
        size is not None or "data" in spec,
        "'data' must be a list (or use the binary tensor extension)",
        "invalid_tensor",
    )
    if shape[0] > MAX_BATCH:
        raise ApiError(413, "batch_too_large", f"at most {MAX_BATCH} images per request")
    return header


def _bytes_elements(spec: dict, blob: memoryview, offset: int) -> tuple[list[bytes], int]:
    size = spec.get("parameters", {}).get("binary_data_size")
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
            out.append(bytes(raw[i + 4 : i + 4 + n]))
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


def _ood_parameters(ood: list) -> dict:
    """The OOD verdict per image, as OIP response parameters (scalars)."""
    threshold = next((o.threshold for o in ood if o.threshold is not None), None)
    return {
        "ood": json.dumps([o.model_dump() for o in ood]),
        "in_distribution": ";".join("true" if o.in_distribution else "false" for o in ood),
        **({"ood_threshold": threshold} if threshold is not None else {}),
    }


def _all_read(blob: memoryview, used: int) -> None:
    """400 for binary data beyond what the input tensor declares (binary_data_size), as
    Triton refuses it: trailing bytes are a client bug, not padding."""
    if len(blob) > used:
        raise _bad(
            f"{len(blob) - used} bytes of binary data after the input tensor's "
            f"binary_data_size ({used})",
            "invalid_tensor",
        )


def _check_outputs(header: dict, model: LoadedModel) -> None:
    """400 `unknown_output` for a requested output this model's graph does not have."""
    have = model.output_names
    for o in header.get("outputs", []):
        if o["name"] not in have:
            raise _bad(
                f"unknown output {o['name']!r}; {model.name} v{model.version} has {have}",
                "unknown_output",
            )


def _batch(
    model: LoadedModel, spec: dict, blob: memoryview, limits: Settings, ticket: Ticket
) -> tuple[np.ndarray, dict, list]:
    """The model's input batch from the request's tensor, its audit facts and, for ROI
    models, what each image's classification located. Takes the frames' pixels from
    `ticket` (the request's share of the decoding budget) before decoding them."""
    dtype, shape = spec.get("datatype"), spec.get("shape")
    s = model.input_size
    if dtype == "UINT8":
        if len(shape) != 4 or shape[1:] != [s, s, 3]:
            raise ApiError(400, "invalid_shape", f"UINT8 image must have shape [N, {s}, {s}, 3]")
        size = spec.get("parameters", {}).get("binary_data_size")
        _all_read(blob, size or 0)
        ticket.take(shape[0] * s * s)
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
        files, used = _bytes_elements(spec, blob, 0)
        _all_read(blob, used)
        if len(files) > MAX_BATCH:
            raise ApiError(413, "batch_too_large", f"at most {MAX_BATCH} images per request")
        if not files:
            raise ApiError(400, "invalid_tensor", "BYTES image tensor is empty")
        if shape != [len(files)]:
            raise _bad(
                f"BYTES shape {shape} does not match its {len(files)} elements", "invalid_shape"
            )
        rois = _rois(spec, len(files))
        frames, located = [], []
        for data, roi in zip(files, rois, strict=True):
            if len(data) > limits.max_upload_bytes:
                raise ApiError(
                    413, "file_too_large", f"an image exceeds {limits.max_upload_bytes} bytes"
                )
            prepared = inference.prepare(data, s, limits.max_image_pixels, model, roi, None, ticket)
            frames.append(prepared.square)
            located.append(prepared.located)
        digest = hashlib.sha256()
        for data in files:  # the files' concatenation, without a copy of it
            digest.update(data)
        facts = {"content_type": "tensor/bytes", "input_sha256": digest.hexdigest()}
        return np.stack(frames), facts, located if model.roi else []
    raise ApiError(400, "invalid_datatype", "image must be UINT8 [N,S,S,3] or BYTES [N]")


def _score(model: LoadedModel, batch: np.ndarray) -> tuple:
    """The model's result, when it came, and the safety verdicts: one thread hop, so
    neither the session nor the frame checks run on the event loop."""
    result = model.infer(batch)
    done = time.perf_counter()
    return result, done, safety.of_outputs(model.card, result.outputs, list(batch))


def _encode_outputs(header: dict, tensors: dict[str, np.ndarray]) -> tuple[list[dict], bytes]:
    """Output tensors as OIP JSON, or as binary data where the request asked for it."""
    asked = {o["name"]: o.get("parameters", {}) for o in header.get("outputs", [])}
    all_binary = header.get("parameters", {}).get("binary_data_output", False)
    outputs, blob = [], []
    for name in asked or tensors:  # the requested outputs in the requested order
        values = tensors[name]
        out = {"name": name, "datatype": "FP32", "shape": list(values.shape)}
        if asked.get(name, {}).get("binary_data", all_binary):
            raw = np.ascontiguousarray(values, dtype="<f4").tobytes()
            out["parameters"] = {"binary_data_size": len(raw)}
            blob.append(raw)
        else:
            out["data"] = values.astype(float).ravel().tolist()
        outputs.append(out)
    return outputs, b"".join(blob)


HEALTH = [Depends(health_scope)]  # public unless THYROID_CAD_PUBLIC_HEALTH=false


@router.get("/v2/health/live", dependencies=HEALTH, responses=oip_errors(401, 403))
async def live():
    """OIP liveness (on the event loop: no thread, no I/O)."""
    return {"live": True}


@router.get(
    "/v2/health/ready",
    dependencies=HEALTH,
    responses={
        **oip_errors(401, 403),
        503: {
            "description": "Not ready: the served model is not loaded.",
            "content": {"application/json": {"schema": {"type": "object"}}},
        },
    },
)
async def ready(request: Request):
    """OIP readiness: 200 when the served model is loaded (in memory: no I/O)."""
    ok = request.app.state.models.ready
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)


@router.get("/v2", dependencies=HEALTH, responses=oip_errors(401, 403))
def server_metadata():
    """OIP server metadata."""
    return {
        "name": "thyroid-cad",
        "version": "1",
        "extensions": ["binary_tensor_data", "model_configuration", "statistics"],
    }


@router.get("/v2/models/stats", dependencies=HEALTH, responses=oip_errors(401, 403))
def all_stats(request: Request):
    """Triton's statistics extension: every version that has served (declared before
    /v2/models/{name}, which would take `stats` for a model name)."""
    manager = request.app.state.models
    stats = request.app.state.stats
    return stats.triton(manager.name, stats.versions())


@router.get("/v2/models/{name}", dependencies=HEALTH, responses=METADATA_ERRORS)
def model_metadata(request: Request, name: str):
    """OIP model metadata of the served version: tensors, datatypes, shapes."""
    return _metadata(_model(request, name, None))


@router.get("/v2/models/{name}/versions/{version}", dependencies=HEALTH, responses=METADATA_ERRORS)
def version_metadata(request: Request, name: str, version: Version):
    """OIP model metadata of one version."""
    return _metadata(_model(request, name, version))


def _ready(request: Request, name: str, version: str | None):
    try:
        _model(request, name, version)
    except ApiError as e:
        return JSONResponse({"name": name, "ready": False, "error": e.message}, e.status)
    return {"name": name, "ready": True}


@router.get("/v2/models/{name}/ready", dependencies=HEALTH, responses=METADATA_ERRORS)
def model_ready(request: Request, name: str):
    """OIP model readiness (the served version)."""
    return _ready(request, name, None)


@router.get(
    "/v2/models/{name}/versions/{version}/ready", dependencies=HEALTH, responses=METADATA_ERRORS
)
def version_ready(request: Request, name: str, version: Version):
    """OIP readiness of one version (loaded on first use)."""
    return _ready(request, name, version)


INFER_DOC = {"openapi_extra": INFER_BODY, "responses": {**INFER_OK, **INFER_ERRORS}}


@infer_router.post("/v2/models/{name}/infer", **INFER_DOC)
async def infer(request: Request, key: PredictKey, name: str):
    """OIP inference with the served version: probabilities and heatmap tensors."""
    return await _infer(request, key, name, None)


@infer_router.post("/v2/models/{name}/versions/{version}/infer", **INFER_DOC)
async def infer_version(request: Request, key: PredictKey, name: str, version: Version):
    """OIP inference with one version."""
    return await _infer(request, key, name, version)


async def _infer(request: Request, key, name: str, version: str | None):
    async with Audited(request, "/v2/models/{name}/infer", key) as audited:
        with pixel_ticket(request) as ticket:  # held until the answer is built
            # The served alias is in memory; a pinned version not loaded yet is loaded on
            # first use: file and session work, off the loop.
            if version is None:
                model = _model(request, name, None)
            else:
                model = await run_in_threadpool(_model, request, name, version)
            audited.record.update(model_name=model.name, model_version=model.version)
            limits: Settings = request.app.state.settings
            header, blob = await _parse(request, 4 * limits.max_upload_bytes)
            _check_outputs(header, model)  # before any decoding work
            t0 = time.perf_counter()
            batch, facts, located = await run_in_threadpool(
                _batch, model, header["inputs"][0], blob, limits, ticket
            )
            if len(batch) == 0:
                raise _bad("the batch is empty", "invalid_shape")
            audited.record.update(
                facts, image_height=int(batch.shape[1]), image_width=int(batch.shape[2])
            )
            t1 = time.perf_counter()
            result, t2, ood = await run_in_threadpool(_score, model, batch)
            audited.record.update(safety.record(ood))
            if len(located) == 1 and located[0] is not None:
                audited.record.update(safety.roi_record(located[0].roi))
            safety.enforce(limits.ood_policy, ood)  # refused: audited, no probabilities
            probs = result.probabilities
            # Every graph output by name (descriptor heads, ood_score), probabilities first.
            tensors = {n: result.outputs[n] for n in OUTPUTS if n in result.outputs}
            tensors |= result.outputs
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
                    **_ood_parameters(ood),
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


_TRITON_TYPE = {"UINT8": "TYPE_UINT8", "FP32": "TYPE_FP32"}


def _config(model: LoadedModel) -> dict:
    """The model in Triton's model-configuration JSON: with max_batch_size > 0 the dims
    leave out the batch dimension; dynamic_batching carries the batcher's policy."""
    meta = _metadata(model)

    def tensors(entries: list[dict]) -> list[dict]:
        return [
            {"name": t["name"], "data_type": _TRITON_TYPE[t["datatype"]], "dims": t["shape"][1:]}
            | ({"reshape": {"shape": []}} if len(t["shape"]) == 1 else {})
            for t in entries
        ]

    policy = model.batcher.policy if model.batcher is not None else None
    config = {
        "name": model.name,
        "platform": "onnxruntime_onnx",
        "backend": "onnxruntime",
        "version_policy": {"specific": {"versions": [model.version]}},
        "max_batch_size": MAX_BATCH,  # frames one request may carry
        "input": tensors(meta["inputs"]),
        "output": tensors(meta["outputs"]),
        "instance_group": [
            {
                "name": f"{model.name}_0",
                "kind": "KIND_CPU" if model.providers[0] == "CPUExecutionProvider" else "KIND_GPU",
                "count": 1,
            }
        ],
        "parameters": {
            "class_names": {"string_value": json.dumps(model.card["class_names"])},
            "onnx_sha256": {"string_value": model.card["sha256"]},
        },
    }
    if policy is not None:
        config["dynamic_batching"] = {
            "preferred_batch_size": [policy.max_batch_size],
            "max_queue_delay_microseconds": int(round(policy.max_queue_delay_s * 1e6)),
            "default_queue_policy": {"max_queue_size": policy.max_queue_size},
        }
    return config


@router.get("/v2/models/{name}/config", dependencies=HEALTH, responses=METADATA_ERRORS)
def model_config(request: Request, name: str):
    """Triton's model-configuration extension for the served version."""
    return _config(_model(request, name, None))


@router.get(
    "/v2/models/{name}/versions/{version}/config", dependencies=HEALTH, responses=METADATA_ERRORS
)
def version_config(request: Request, name: str, version: Version):
    """Triton's model-configuration extension for one version."""
    return _config(_model(request, name, version))


def _stats(request: Request, name: str, version: str | None) -> dict:
    model = _model(request, name, version)  # 404 for another name or an unknown version
    stats = request.app.state.stats
    versions = [model.version] if version is not None else stats.versions() or [model.version]
    return stats.triton(model.name, versions)


@router.get("/v2/models/{name}/stats", dependencies=HEALTH, responses=METADATA_ERRORS)
def model_stats(request: Request, name: str):
    """Triton's statistics extension: counts and cumulative times of every version that
    has served (the served one when none has yet)."""
    return _stats(request, name, None)


@router.get(
    "/v2/models/{name}/versions/{version}/stats", dependencies=HEALTH, responses=METADATA_ERRORS
)
def version_stats(request: Request, name: str, version: Version):
    """Triton's statistics extension for one version."""
    return _stats(request, name, version)
