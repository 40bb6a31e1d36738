"""/v1: the clinical JSON API (predict with heatmaps, loaded models, the audit trail)."""

from __future__ import annotations

import hashlib
import re
import time
from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, File, Path, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from pydantic import WithJsonSchema
from sqlalchemy.exc import SQLAlchemyError

from service.api.deps import AdminKey, Audited, PredictKey, auth_first, pixel_ticket
from service.api.routes import formats
from service.config import Settings
from service.errors import ApiError
from service.inference import frames as multi
from service.inference import heatmaps, safety
from service.inference import pipeline as inference
from service.inference.models import ModelManager
from service.schemas import (
    DISCLAIMER,
    SQL_INT_MAX,
    ErrorOut,
    FrameOut,
    MultiFramePredictResponse,
    NoduleOut,
    PredictResponse,
    TimingsOut,
)


def errors(*statuses: int) -> dict:
    """OpenAPI entries for the error answers a route can give (all share ErrorOut)."""
    why = {
        400: "Bad input: corrupt image, unknown class, invalid roi, malformed request.",
        401: "Missing or unknown API key.",
        403: "The key lacks the scope this route needs.",
        404: "No such model, alias or version.",
        413: "Upload or image too large.",
        415: "Not a PNG, JPEG, BMP, TIFF or DICOM file, or an undecodable DICOM.",
        422: "A parameter fails the schema; or out_of_distribution: the image is unlike the "
        "training data and THYROID_CAD_OOD_POLICY=refuse (no probabilities).",
        503: "No model loaded, the queue is full or too many pixels are being decoded "
        "(busy; both with Retry-After), or a dependency is down.",
    }
    return {s: {"model": ErrorOut, "description": why[s]} | extra(s) for s in statuses}


def extra(status: int) -> dict:
    """What an error answer carries besides its body: Retry-After on 503 overloaded/busy."""
    if status != 503:
        return {}
    retry = {
        "description": "Seconds to wait (when the queue or the decoding budget is full).",
        "schema": {"type": "integer"},
    }
    return {"headers": {"Retry-After": retry}}


PREDICT_ERRORS = errors(400, 401, 403, 404, 413, 415, 422, 503)
HeatmapMode = Literal["none", "png", "overlay", "array"]
HeatmapQ = Annotated[
    HeatmapMode,
    Query(description="none, png (grey map), overlay (blended), or array (raw)."),
]
ClassQ = Annotated[
    str | None,
    Query(alias="class", min_length=1, description="Heatmap for this class, not the predicted."),
]
Upload = Annotated[
    list[UploadFile],
    File(
        description="PNG, JPEG, BMP, TIFF or DICOM. Repeat the field for several frames of "
        "one nodule: the answer then holds every frame and the nodule."
    ),
]
AllFramesQ = Annotated[
    bool,
    Query(
        description="Multi-frame DICOM: score every frame as frames of one nodule (answer "
        "per frame and for the nodule) instead of the one `frame`."
    ),
]
# One frame answers as PredictResponse (as before multi-frame requests existed); several
# as MultiFramePredictResponse.
PredictAnswer = PredictResponse | MultiFramePredictResponse
RoiQ = Annotated[
    str | None,
    Query(
        description="Nodule box x,y,w,h in the image's pixels, for models trained on ROI "
        "crops (their card has 'roi'); without it their bundled localiser proposes one. "
        "Whole-frame models refuse it.",
        examples=["120,80,200,150"],
    ),
]
# RFC 3339 (what OpenAPI's `date` and `date-time` formats mean): a full date, or a date-time
# with seconds and an offset. The pattern refuses other shapes (422); _when() parses what it
# lets through, so the schema and the server accept the same strings.
RFC_3339 = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}"
    r"([Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2}))?$"
)
TimeQ = Annotated[
    str | None,
    Query(
        pattern=RFC_3339,
        description="RFC 3339 date (midnight UTC) or date-time with its offset.",
        examples=["2026-01-01", "2026-01-01T08:30:00Z"],
    ),
    # The schema of the string alone: an optional query parameter is absent, never null
    # (a null branch made generators send `end=`, which no parser takes for a date).
    WithJsonSchema(
        {
            "type": "string",
            "pattern": RFC_3339,
            "anyOf": [{"format": "date"}, {"format": "date-time"}],
        }
    ),
]

# Predict routes check the key before the upload is parsed (see deps.auth_first).
predict = APIRouter(
    tags=["v1"],
    route_class=auth_first("predict"),
    responses={**PREDICT_ERRORS, **formats.RESPONSES},
)
router = APIRouter(tags=["v1"])


def read_upload(file: UploadFile, limit: int) -> bytes:
    data = file.file.read(limit + 1)
    if len(data) > limit:
        raise ApiError(413, "file_too_large", f"upload exceeds {limit} bytes")
    return data


def class_names(model, class_name: str | None) -> list[str]:
    """The model's class names; a `class=` it does not have is a 400 (one frame or several)."""
    names = model.card["class_names"]
    if class_name is not None and class_name not in names:
        raise ApiError(400, "unknown_class", f"class must be one of {names}")
    return names


def predict_upload(
    request: Request,
    file: UploadFile | list[UploadFile],
    key,
    route: str,
    heatmap: str,
    class_name: str | None,
    alias: str | None = None,
    version: int | None = None,
    name: str | None = None,
    options: formats.Options = formats.JSON,
    roi: str | None = None,
    all_frames: bool = False,
) -> Response:
    files = file if isinstance(file, list) else [file]
    if len(files) > 1 or all_frames:
        where = {"alias": alias, "version": version, "name": name}
        return predict_frames(
            request, files, key, route, heatmap, class_name, where, options, roi, all_frames
        )
    file = files[0]
    with Audited(request, route, key) as audited, pixel_ticket(request) as ticket:
        settings: Settings = request.app.state.settings
        model, via = request.app.state.models.get(alias=alias, version=version, name=name)
        audited.record.update(model_name=model.name, model_version=model.version)
        t0 = time.perf_counter()
        data = read_upload(file, settings.max_upload_bytes)
        audited.record["input_sha256"] = hashlib.sha256(data).hexdigest()
        names = class_names(model, class_name)  # before any decoding work
        box = inference.parse_roi(roi)
        read_s = time.perf_counter() - t0
        prepared = inference.prepare(
            data,
            model.input_size,
            settings.max_image_pixels,
            model,
            box,
            options.frame,
            ticket,
        )
        audited.record.update(
            content_type=prepared.content_type,
            image_height=prepared.size[0],
            image_width=prepared.size[1],
        )
        source = formats.source_header(options.format, data, prepared)
        scored = inference.score(model, prepared)
        located = prepared.located.roi if prepared.located else None
        audited.record.update(safety.record([scored.ood]), **safety.roi_record(located))
        safety.enforce(settings.ood_policy, [scored.ood])  # refused: audited, no probabilities
        prediction = scored.prediction
        index = names.index(class_name or prediction.label)
        mode = heatmap if options.format == "json" else "none"  # SR and FHIR carry none
        rendered = heatmaps.render_heatmap(
            model,
            scored.heatmap,
            index,
            mode,
            prepared.rgb,
            prepared.geometry,
            settings.max_heatmap_pixels,
        )
        timings = TimingsOut(
            decode_ms=(read_s + prepared.decode_s) * 1e3,
            preprocess_ms=prepared.prepare_s * 1e3,
            queue_ms=scored.queue_s * 1e3,
            inference_ms=scored.inference_s * 1e3,
            batch_size=scored.batch_size,
            total_ms=(time.perf_counter() - audited.start) * 1e3,
        )
        body = PredictResponse(
            request_id=audited.record["request_id"],
            model=inference.describe_model(model, via),
            prediction=prediction,
            heatmap=rendered,
            roi=prepared.located.roi if prepared.located else None,
            shape=prepared.located.shape if prepared.located else None,
            ood=scored.ood,
            timings=timings,
            disclaimer=DISCLAIMER,
        )
        audited.record.update(
            label=prediction.label,
            probabilities=prediction.probabilities,
            timings={k: round(v, 3) for k, v in timings.model_dump().items()},
        )
        if options.format != "json":
            answer = formats.render(
                options.format, source, scored, body.model, audited.record["request_id"]
            )
        else:
            answer = JSONResponse(
                body.model_dump(by_alias=True),
                headers={"X-Request-ID": audited.record["request_id"]},
            )
        audited.finish(200)
        return answer


def predict_frames(
    request: Request,
    files: list[UploadFile],
    key,
    route: str,
    heatmap: str,
    class_name: str | None,
    where: dict,
    options: formats.Options,
    roi: str | None,
    all_frames: bool,
) -> Response:
    """Several frames of one nodule (repeated `file` fields, or every frame of a
    multi-frame DICOM with all_frames): each scored as a single image would be, with its
    heatmap, and the nodule from all of them (frames.AGGREGATION). One audit record for
    the call, with the frame count in its timings; JSON answers only. The frames share one
    ticket of the pixel budget, so a call of many frames at most runs alone."""
    with Audited(request, route, key) as audited, pixel_ticket(request) as ticket:
        settings: Settings = request.app.state.settings
        model, via = request.app.state.models.get(**where)
        audited.record.update(model_name=model.name, model_version=model.version)
        if options.format != "json":
            raise ApiError(400, "multi_frame_format", "several frames are answered in JSON only")
        if options.frame is not None and all_frames:
            raise ApiError(400, "frame_conflict", "give either frame or all_frames, not both")
        multi.check_count(len(files))
        names = class_names(model, class_name)
        box = inference.parse_roi(roi)
        uploads = [read_upload(f, settings.max_upload_bytes) for f in files]
        jobs = [
            (i, frame)
            for i, data in enumerate(uploads)
            for frame in (range(1, multi.dicom_frames(data) + 1) if all_frames else [options.frame])
        ]
        multi.check_count(len(jobs))
        digests = "".join(hashlib.sha256(d).hexdigest() for d in uploads)
        audited.record["input_sha256"] = hashlib.sha256(digests.encode()).hexdigest()
        scored = []
        for i, frame in jobs:
            prepared = inference.prepare(
                uploads[i], model.input_size, settings.max_image_pixels, model, box, frame, ticket
            )
            scored.append((i, inference.score(model, prepared)))
        first = scored[0][1].prepared
        audited.record.update(
            content_type=first.content_type,
            image_height=first.size[0],
            image_width=first.size[1],
        )
        oods = [s.ood for _, s in scored]
        audited.record.update(safety.record(oods))
        safety.enforce(settings.ood_policy, oods)
        out = []
        for i, s in scored:
            index = names.index(class_name or s.prediction.label)
            located = s.prepared.located
            out.append(
                FrameOut(
                    file=i,
                    frame=s.prepared.frame,
                    prediction=s.prediction,
                    heatmap=heatmaps.render_heatmap(
                        model,
                        s.heatmap,
                        index,
                        heatmap,
                        s.prepared.rgb,
                        s.prepared.geometry,
                        settings.max_heatmap_pixels,
                    ),
                    roi=located.roi if located else None,
                    shape=located.shape if located else None,
                    ood=s.ood,
                )
            )
        combined = multi.nodule_probabilities([s.probabilities for _, s in scored])
        nodule = NoduleOut(
            prediction=inference.decide(model.card, combined),
            frames=len(scored),
            aggregation=multi.AGGREGATION,
            in_distribution=all(o is None or o.in_distribution for o in oods),
        )
        timings = TimingsOut(
            decode_ms=sum(s.prepared.decode_s for _, s in scored) * 1e3,
            preprocess_ms=sum(s.prepared.prepare_s for _, s in scored) * 1e3,
            queue_ms=sum(s.queue_s for _, s in scored) * 1e3,
            inference_ms=sum(s.inference_s for _, s in scored) * 1e3,
            batch_size=max(s.batch_size for _, s in scored),
            total_ms=(time.perf_counter() - audited.start) * 1e3,
        )
        body = MultiFramePredictResponse(
            request_id=audited.record["request_id"],
            model=inference.describe_model(model, via),
            frames=out,
            nodule=nodule,
            timings=timings,
            disclaimer=DISCLAIMER,
        )
        audited.record.update(
            label=nodule.prediction.label,
            probabilities=nodule.prediction.probabilities,
            timings={
                **{k: round(v, 3) for k, v in timings.model_dump().items()},
                "frames": len(scored),
            },
        )
        answer = JSONResponse(
            body.model_dump(by_alias=True),
            headers={"X-Request-ID": audited.record["request_id"]},
        )
        audited.finish(200)
        return answer


@predict.post("/v1/predict", response_model=PredictAnswer)
def predict_default(
    request: Request,
    key: PredictKey,
    file: Upload,
    options: formats.OptionsDep,
    heatmap: HeatmapQ = "png",
    class_name: ClassQ = None,
    alias: Annotated[str | None, Query(min_length=1, description="e.g. challenger")] = None,
    roi: RoiQ = None,
    all_frames: AllFramesQ = False,
):
    """Classify one ultrasound image (or several frames of one nodule) with the champion
    (or ?alias=) model."""
    return predict_upload(
        request,
        file,
        key,
        "/v1/predict",
        heatmap,
        class_name,
        alias=alias,
        options=options,
        roi=roi,
        all_frames=all_frames,
    )


@predict.post("/v1/models/{name}/predict", response_model=PredictAnswer)
def predict_alias(
    request: Request,
    name: str,
    key: PredictKey,
    file: Upload,
    options: formats.OptionsDep,
    heatmap: HeatmapQ = "png",
    class_name: ClassQ = None,
    alias: Annotated[str, Query(min_length=1, description="Registry alias.")] = "champion",
    roi: RoiQ = None,
    all_frames: AllFramesQ = False,
):
    """Classify with the version an alias of this model points at."""
    route = "/v1/models/{name}/predict"
    return predict_upload(
        request,
        file,
        key,
        route,
        heatmap,
        class_name,
        alias=alias,
        name=name,
        options=options,
        roi=roi,
        all_frames=all_frames,
    )


@predict.post("/v1/models/{name}/versions/{version}/predict", response_model=PredictAnswer)
def predict_version(
    request: Request,
    name: str,
    version: Annotated[
        int, Path(ge=1, le=SQL_INT_MAX, description="Registered model version (1, 2, ...).")
    ],
    key: PredictKey,
    file: Upload,
    options: formats.OptionsDep,
    heatmap: HeatmapQ = "png",
    class_name: ClassQ = None,
    roi: RoiQ = None,
    all_frames: AllFramesQ = False,
):
    """Classify with one pinned model version."""
    route = "/v1/models/{name}/versions/{version}/predict"
    return predict_upload(
        request,
        file,
        key,
        route,
        heatmap,
        class_name,
        version=version,
        name=name,
        options=options,
        roi=roi,
        all_frames=all_frames,
    )


@router.get("/v1/models", responses=errors(401, 403))
def models(request: Request, key: PredictKey):
    """Loaded model versions with their cards, provider and status."""
    manager: ModelManager = request.app.state.models
    return {
        "name": manager.name,
        "default_alias": manager.default_alias,
        "registry_reachable": manager.registry_reachable,
        "errors": manager.errors,
        "not_set": {alias: "not set" for alias in sorted(manager.not_set)},
        "models": manager.loaded(),
    }


def _when(value: str | None, name: str) -> datetime | None:
    """The query's RFC 3339 date (midnight UTC) or date-time in UTC; 400 if it names no
    day (2026-02-30). A valid time beyond the years 1..9999 once in UTC (0001-01-01T00:00:00
    +01:00) is the first or last instant there is: as a bound it excludes nothing."""
    if value is None:
        return None
    try:
        when = datetime.fromisoformat(re.sub(r"Z$", "+00:00", value.upper()))
    except ValueError as e:
        raise ApiError(400, "invalid_datetime", f"{name}: {e}") from e
    if when.tzinfo is None:
        return when.replace(tzinfo=UTC)
    try:
        return when.astimezone(UTC)
    except OverflowError:
        offset = when.utcoffset()
        return (datetime.min if offset and offset.total_seconds() > 0 else datetime.max).replace(
            tzinfo=UTC
        )


@router.get("/v1/requests", responses=errors(400, 401, 403, 422, 503))
def requests(
    request: Request,
    key: AdminKey,
    start: TimeQ = None,
    end: TimeQ = None,
    model_version: Annotated[int | None, Query(ge=1, le=SQL_INT_MAX)] = None,
    label: Annotated[str | None, Query(min_length=1)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=SQL_INT_MAX)] = 0,
):
    """The request audit trail, newest first (admin keys only)."""
    since, until = _when(start, "start"), _when(end, "end")
    try:
        rows, total = request.app.state.audit.query(
            since, until, model_version, label, limit, offset
        )
    except SQLAlchemyError as e:  # the database, not the query, is the problem
        raise ApiError(503, "audit_unavailable", "the audit database is unreachable") from e
    return {"total": total, "limit": limit, "offset": offset, "requests": rows}
