"""The result formats of /v1 predict: JSON (default), DICOM SR, FHIR R4 Bundle.

Chosen by `?format=` or, without it, by the first of the three media types the Accept
header lists. The SR and the bundle are built from the same scored image as the JSON
answer (service/hospital/findings.py), so all three carry the same numbers.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import Depends, Header, Query
from fastapi.responses import JSONResponse, Response
from pydicom import Dataset

from service.errors import ApiError
from service.hospital import dicom_sr, fhir, findings
from service.inference.pipeline import Prepared, Scored
from service.schemas import ModelOut

ResultFormat = Literal["json", "dicom-sr", "fhir"]
MEDIA_TYPES: dict[str, str] = {
    "json": "application/json",
    "dicom-sr": "application/dicom",
    "fhir": fhir.FHIR_JSON,
}
_BY_MEDIA = {media: kind for kind, media in MEDIA_TYPES.items()}
# What the SR's copy of the source's patient and study attributes changed (dicom_sr.conform).
SOURCE_CHANGES = "X-Source-Header-Changes"
# OpenAPI: the other bodies a 200 can have.
RESPONSES = {
    200: {
        "description": "JSON (default), a DICOM SR (format=dicom-sr), or a FHIR R4 Bundle.",
        "content": {
            "application/dicom": {"schema": {"type": "string", "format": "binary"}},
            fhir.FHIR_JSON: {"schema": {"type": "object"}},
        },
    }
}


@dataclass(frozen=True)
class Options:
    """How to read the upload (frame) and what to answer with (format)."""

    format: str = "json"
    frame: int | None = None


JSON = Options()  # the default: a JSON answer, the first frame


def negotiate(requested: str | None, accept: str | None) -> str:
    """`format=` wins; else the first supported media type in Accept; else JSON."""
    if requested:
        return requested
    for part in (accept or "").split(","):
        kind = _BY_MEDIA.get(part.split(";")[0].strip().lower())
        if kind:
            return kind
    return "json"


async def options(  # async: pure parsing, no reason for a thread hop
    result_format: Annotated[
        ResultFormat | None,
        Query(
            alias="format",
            description="json (default), dicom-sr (DICOM input only) or fhir; "
            "or send Accept: application/dicom | application/fhir+json.",
        ),
    ] = None,
    frame: Annotated[
        int | None,
        Query(ge=1, description="Multi-frame DICOM: the frame to score, from 1 (default 1)."),
    ] = None,
    accept: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Options:
    return Options(negotiate(result_format, accept), frame)


OptionsDep = Annotated[Options, Depends(options)]


def source_header(kind: str, data: bytes, prepared: Prepared) -> Dataset | None:
    """The DICOM header an SR or a bundle references (never logged, never audited).

    Raises:
        ApiError: 400 when an SR is asked for a non-DICOM image or a DICOM that lacks
            the UIDs an SR must reference; checked before the model runs.
    """
    if kind == "json" or prepared.content_type != "application/dicom":
        if kind == "dicom-sr":
            raise ApiError(400, "dicom_sr_needs_dicom", "format=dicom-sr needs a DICOM upload")
        return None
    import pydicom

    header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    why = dicom_sr.unusable(header) if kind == "dicom-sr" else None
    if why:
        raise ApiError(400, "dicom_sr_unavailable", why)
    return header


def render(
    kind: str,
    source: Dataset | None,
    scored: Scored,
    model: ModelOut,
    request_id: str,
) -> Response:
    """The SR or the bundle of one scored image, as the HTTP answer."""
    found = findings.from_scored(scored, model)
    headers = {"X-Request-ID": request_id}
    if kind == "dicom-sr":
        sr = dicom_sr.build(source, found)
        headers["Content-Disposition"] = f'attachment; filename="{request_id}.dcm"'
        changes = dicom_sr.corrections(source)
        if changes:  # also in the SR's comments; attribute names only, never values
            headers[SOURCE_CHANGES] = "; ".join(changes)
        return Response(dicom_sr.to_bytes(sr), media_type=MEDIA_TYPES[kind], headers=headers)
    bundle = fhir.bundle(found, source, request_id)
    return JSONResponse(
        bundle.model_dump(mode="json"), media_type=MEDIA_TYPES[kind], headers=headers
    )
