"""A corpus of hostile, broken and odd uploads to POST /v1/predict.

Every bad input must get a 4xx with the JSON body {"error": {"code", "message"}}, a stable
code, no traceback, and (when the request reached the predict handler) an audit row with
its status and error code; after the whole corpus the service must still answer a good
request. Odd but valid inputs (16-bit, CMYK, alpha, multi-frame, DICOM) must work.

Every file is made here, in memory: no binary fixtures.
"""

from __future__ import annotations

import functools
import hashlib
import io
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.api.app import create_app
from training import phantom

PATIENT_NAME = "Doe^Jane^Quintessa"
PATIENT_ID = "PID-8675309-Q"


# -- the service, once for the module -------------------------------------------------
@pytest.fixture(scope="module")
def service(served_module):
    """One app for the whole corpus (so "it still serves afterwards" means something);
    conftest's make_served: champion from the tiny export, SQLite audit, two keys."""
    settings, name, version = served_module.settings, served_module.name, served_module.version
    predict_key, admin_key = served_module.predict_key, served_module.admin_key
    tmp = served_module.db_path.parent
    # raise_server_exceptions=False: a crash must show up as the 500 a client would
    # see, so the assertions below say which input caused it.
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield SimpleNamespace(
            client=client,
            settings=settings,
            name=name,
            version=version,
            predict_key=predict_key,
            admin_key=admin_key,
            db_path=tmp / "requests.db",
            spool=tmp / "spool",
        )


def _auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _newest_audit_rows(service, n: int = 1) -> tuple[list[dict], int]:
    r = service.client.get(f"/v1/requests?limit={n}", headers=_auth(service.admin_key))
    assert r.status_code == 200, r.text
    body = r.json()
    return body["requests"], body["total"]


# -- file makers ------------------------------------------------------------------------
def _frame(label: str = "malignant", seed: int = 0, size: int = 128) -> np.ndarray:
    return phantom.make_image(label, np.random.default_rng(seed), size)


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


@functools.cache
def _png() -> bytes:
    return _encode(Image.fromarray(_frame()), "PNG")


@functools.cache
def _jpeg() -> bytes:
    return _encode(Image.fromarray(_frame()), "JPEG", quality=90)


def _scaled(grey: np.ndarray) -> np.ndarray:
    """What the service makes of a monochrome frame: its own range stretched to 0-255."""
    g = grey.astype(np.float64)
    lo, hi = g.min(), g.max()
    return np.clip(np.rint((g - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


@functools.cache
def _png_bomb(side: int) -> bytes:
    """A real, valid 1-bit PNG of side x side black pixels: ~110 kB for 30000 x 30000
    (900 Mpx, a 900 MB RGB array if anyone decoded it)."""
    row = bytes(1 + (side + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    rows_per_block = 1000
    block = row * rows_per_block
    idat = b"".join(z.compress(block) for _ in range(side // rows_per_block))
    idat += z.compress(row * (side % rows_per_block)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def _png_bad_ihdr_crc() -> bytes:
    data = bytearray(_png())
    assert data[12:16] == b"IHDR"
    data[29:33] = bytes(4)  # the IHDR CRC (8 signature + 4 length + 4 type + 13 data)
    return bytes(data)


def _jpeg_scan_start(data: bytes) -> int:
    sos = data.index(b"\xff\xda")
    (length,) = struct.unpack(">H", data[sos + 2 : sos + 4])
    return sos + 2 + length


def _jpeg_scrambled_entropy() -> bytes:
    """Every 7th byte of the entropy-coded scan replaced by noise (headers intact)."""
    data = bytearray(_jpeg())
    rng = np.random.default_rng(3)
    for i in range(_jpeg_scan_start(data) + 20, len(data) - 2, 7):
        b = int(rng.integers(0, 255))
        data[i] = b if b != 0xFF else 0  # no accidental markers
    return bytes(data)


def _jpeg_bit_flips() -> bytes:
    """Three single-byte flips inside the scan: a realistic transmission error."""
    data = bytearray(_jpeg())
    start = _jpeg_scan_start(data)
    for i in (start + 100, start + 400, start + 700):
        data[i] ^= 0x55 if data[i] ^ 0x55 != 0xFF else 0x11
    return bytes(data)


def _jpeg_claiming(width: int, height: int) -> bytes:
    data = bytearray(_jpeg())
    sof = data.index(b"\xff\xc0")  # baseline SOF0: length(2) precision(1) height(2) width(2)
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("scan.png", _png())
    return buf.getvalue()


def _dicom(
    grey: np.ndarray | None = None,
    *,
    pixels: bytes | None | str = "frame",
    transfer_syntax: str | None = None,
    **elements,
) -> bytes:
    """An ultrasound-like DICOM file: uint16, 12 bits stored, MONOCHROME2, with a patient."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    grey = _frame(size=96)[..., 0] if grey is None else grey
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.6.1"  # US Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax or ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = (
        meta.MediaStorageSOPClassUID,
        meta.MediaStorageSOPInstanceUID,
    )
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = "19700101"
    ds.InstitutionName = "St Quintessa Hospital"
    ds.Modality = "US"
    ds.Rows, ds.Columns = grey.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if pixels == "frame":
        pixels = (grey.astype(np.uint16) * 16).tobytes()  # 0..4080: 12 bits
    if pixels is not None:
        ds.PixelData = pixels
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _dicom_bogus_jpeg2000() -> bytes:
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    codestream = b"\xff\x4f\xff\x51" + b"not a codestream" * 20  # SOC, SIZ, then junk
    return _dicom(pixels=encapsulate([codestream]), transfer_syntax=JPEG2000Lossless)


def _dicom_garbage_after_preamble() -> bytes:
    return bytes(128) + b"DICM" + np.random.default_rng(1).bytes(2000)


# -- the corpus --------------------------------------------------------------------------
@dataclass(frozen=True)
class Bad:
    status: int
    code: str
    request: Callable[[], dict]  # TestClient.request keyword arguments (method, url, ...)
    # False where the request is refused before the predict handler runs (FastAPI's
    # validation, routing, multipart parsing): no audit row is written for those today.
    audited: bool = True


def upload(data_or_maker, filename="x.png", content_type="image/png", query="") -> Callable:
    def request() -> dict:
        data = data_or_maker() if callable(data_or_maker) else data_or_maker
        return {
            "method": "POST",
            "url": f"/v1/predict{query}",
            "files": {"file": (filename, data, content_type)},
        }

    return request


def raw(**kwargs) -> Callable:
    return lambda: {"method": "POST", "url": "/v1/predict", **kwargs}


SVG = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="64" height="64">'
SVG += b'<circle cx="32" cy="32" r="20"/></svg>'
HTML = b"<!DOCTYPE html><html><body><img src=x onerror=alert(1)></body></html>"
BAD = {
    # nothing there
    "empty-file": Bad(400, "empty_file", upload(b"", "scan", "application/octet-stream")),
    "zero-length-png": Bad(400, "empty_file", upload(b"", "x.png", "image/png")),
    # not an image at all: refused by its first bytes, whatever its name and type say
    "random-bytes": Bad(
        415, "unsupported_media_type", upload(np.random.default_rng(0).bytes(4096))
    ),
    "text-renamed-png": Bad(
        415, "unsupported_media_type", upload(b"patient notes\nnodule 12 mm\n" * 20)
    ),
    "html": Bad(415, "unsupported_media_type", upload(HTML, "x.html", "text/html")),
    "pdf-header": Bad(
        415, "unsupported_media_type", upload(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\n")
    ),
    "zip-of-a-png": Bad(415, "unsupported_media_type", upload(_zip, "x.zip", "application/zip")),
    # unsupported image formats
    "gif": Bad(
        415,
        "unsupported_media_type",
        upload(lambda: _encode(Image.fromarray(_frame()), "GIF"), "x.gif", "image/gif"),
    ),
    "webp": Bad(
        415,
        "unsupported_media_type",
        upload(lambda: _encode(Image.fromarray(_frame()), "WEBP"), "x.webp", "image/webp"),
    ),
    "svg": Bad(415, "unsupported_media_type", upload(SVG, "x.svg", "image/svg+xml")),
    # broken images of a supported format
    "png-signature-only": Bad(400, "corrupt_image", upload(b"\x89PNG\r\n\x1a\n")),
    "png-cut-in-half": Bad(400, "corrupt_image", upload(lambda: _png()[: len(_png()) // 2])),
    "png-bad-ihdr-crc": Bad(400, "corrupt_image", upload(_png_bad_ihdr_crc)),
    "jpeg-cut-in-half": Bad(
        400, "corrupt_image", upload(lambda: _jpeg()[: len(_jpeg()) // 2], "x.jpg", "image/jpeg")
    ),
    # Heavy damage to the entropy-coded data: libjpeg gives up ("broken data stream"),
    # Pillow raises OSError, the service says corrupt_image. (Light damage decodes to a
    # slightly wrong picture and is accepted: see ODD["jpeg-bit-flips"].)
    "jpeg-scrambled-entropy-data": Bad(
        400, "corrupt_image", upload(_jpeg_scrambled_entropy, "x.jpg", "image/jpeg")
    ),
    "bmp-cut-short": Bad(
        400,
        "corrupt_image",
        upload(lambda: _encode(Image.fromarray(_frame()), "BMP")[:40], "x.bmp", "image/bmp"),
    ),
    "tiff-header-only": Bad(
        400, "corrupt_image", upload(b"II*\x00" + b"\xff" * 20, "x.tif", "image/tiff")
    ),
    # sizes
    "png-1x1": Bad(
        400,
        "image_too_small",
        upload(lambda: _encode(Image.new("RGB", (1, 1), (90, 90, 90)), "PNG")),
    ),
    # 10 px wide: under the 16 px minimum side, whatever the other side is.
    "sliver-10x10000": Bad(
        400,
        "image_too_small",
        upload(lambda: _encode(Image.new("L", (10, 10000), 128), "PNG")),
    ),
    # 900 Mpx in 110 kB: refused from the header, before any pixel is decoded.
    "png-bomb-30000x30000": Bad(413, "image_too_large", upload(lambda: _png_bomb(30000))),
    # 64 Mpx: under Pillow's own bomb limit, over THYROID_CAD_MAX_IMAGE_PIXELS (16 M).
    "png-8000x8000-over-pixel-limit": Bad(413, "image_too_large", upload(lambda: _png_bomb(8000))),
    "jpeg-header-claims-60000x60000": Bad(
        413, "image_too_large", upload(lambda: _jpeg_claiming(60000, 60000), "x.jpg", "image/jpeg")
    ),
    # DICOM
    "dicom-without-pixel-data": Bad(
        400,
        "dicom_without_pixels",
        upload(lambda: _dicom(pixels=None), "x.dcm", "application/dicom"),
    ),
    # pydicom parses the noise leniently into a dataset with no Pixel Data element.
    "dicom-garbage-after-preamble": Bad(
        400,
        "dicom_without_pixels",
        upload(_dicom_garbage_after_preamble, "x.dcm", "application/dicom"),
    ),
    "dicom-jpeg2000-bogus-pixels": Bad(
        415, "unsupported_dicom", upload(_dicom_bogus_jpeg2000, "x.dcm", "application/dicom")
    ),
    "dicom-header-claims-60000x60000": Bad(
        413,
        "image_too_large",
        upload(lambda: _dicom(Rows=60000, Columns=60000), "x.dcm", "application/dicom"),
    ),
    "dicom-two-frames-declared-one-present": Bad(
        400, "corrupt_dicom", upload(lambda: _dicom(NumberOfFrames=2), "x.dcm", "application/dicom")
    ),
    "dicom-window-width-0": Bad(
        400,
        "corrupt_dicom",
        upload(lambda: _dicom(WindowCenter=40, WindowWidth=0), "x.dcm", "application/dicom"),
    ),
    "dicom-cine-bomb-frames": Bad(
        413,
        "image_too_large",
        upload(
            lambda: _dicom(Rows=4000, Columns=4000, NumberOfFrames=20), "x.dcm", "application/dicom"
        ),
    ),
    # the request itself is wrong
    "missing-file-field": Bad(422, "invalid_request", raw(), audited=False),
    "wrong-field-name": Bad(
        422,
        "invalid_request",
        raw(files={"image": ("x.png", b"\x89PNG", "image/png")}),
        audited=False,
    ),
    "file-sent-as-text-field": Bad(
        422, "invalid_request", raw(data={"file": "iVBORw0KGgo="}), audited=False
    ),
    "raw-png-body-not-multipart": Bad(
        422,
        "invalid_request",
        raw(content=b"\x89PNG\r\n\x1a\n", headers={"content-type": "image/png"}),
        audited=False,
    ),
    "multipart-without-boundary": Bad(
        400,
        "http_error",
        raw(content=b"--x\r\n", headers={"content-type": "multipart/form-data"}),
        audited=False,
    ),
    "heatmap-bogus": Bad(
        422, "invalid_request", upload(_png, query="?heatmap=bogus"), audited=False
    ),
    "class-zebra": Bad(400, "unknown_class", upload(_png, query="?class=zebra")),
    "class-empty": Bad(422, "invalid_request", upload(_png, query="?class="), audited=False),
    "alias-empty": Bad(422, "invalid_request", upload(_png, query="?alias="), audited=False),
    # the pinned-version route: a version is a positive SQL INTEGER (fuzzer: -1 was a 500)
    **{
        f"version-{name}": Bad(
            422,
            "invalid_request",
            lambda v=version: {
                "method": "POST",
                "url": f"/v1/models/any-model/versions/{v}/predict",
                "files": {"file": ("x.png", _png(), "image/png")},
            },
            audited=False,
        )
        for name, version in {
            "minus-1": -1,
            "zero": 0,
            "over-sql-integer": 2**31,
            "huge": 10**20,
            "not-a-number": "latest",
        }.items()
    },
    "unknown-alias": Bad(404, "alias_not_found", upload(_png, query="?alias=no-such-alias")),
    "get-instead-of-post": Bad(
        405,
        "method_not_allowed",
        lambda: {"method": "GET", "url": "/v1/predict"},
        audited=False,
    ),
}


def _send(service, case: Bad):
    request = case.request()
    headers = {**_auth(service.predict_key), **request.pop("headers", {})}
    response = service.client.request(headers=headers, **request)
    files = request.get("files") or {}
    data = files["file"][1] if "file" in files else None
    return response, data


def _assert_clean_error(response, case: Bad) -> None:
    assert response.status_code != 500, response.text
    assert response.status_code == case.status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == case.code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"].strip()
    for leak in ("Traceback", 'File "', "site-packages"):
        assert leak not in response.text, response.text


def _assert_audited(row: dict, case: Bad, data: bytes | None, service) -> None:
    assert row["route"] == "/v1/predict"
    assert (row["status_code"], row["error_code"]) == (case.status, case.code)
    assert row["api_key_id"] and row["label"] is None and row["probabilities"] is None
    if case.code not in ("alias_not_found",):  # the model is resolved before the upload is read
        assert row["model_name"] == service.name and row["model_version"] == service.version
        assert row["input_sha256"] == hashlib.sha256(data).hexdigest()


def test_the_corpus_is_big_enough():
    assert len(BAD) >= 24 and len({c.code for c in BAD.values()}) >= 12


@pytest.mark.parametrize("case", list(BAD.values()), ids=list(BAD))
def test_bad_input_is_a_clean_4xx_and_audited(service, case):
    _, before = _newest_audit_rows(service)
    response, data = _send(service, case)
    _assert_clean_error(response, case)
    rows, after = _newest_audit_rows(service)
    if case.audited:
        assert after == before + 1
        _assert_audited(rows[0], case, data, service)


NEEDS_NO_KEY = {"get-instead-of-post"}  # refused by routing, before any route runs


@pytest.mark.parametrize(
    "case",
    [c for n, c in BAD.items() if n not in NEEDS_NO_KEY],
    ids=[n for n in BAD if n not in NEEDS_NO_KEY],
)
def test_without_a_key_every_bad_request_is_401_before_its_body_is_read(service, case):
    """The key is checked first (deps.auth_first): a client without one learns nothing
    about its upload, and nothing is parsed, decoded or audited for it."""
    _, before = _newest_audit_rows(service)
    request = case.request()
    headers = request.pop("headers", {})
    for auth, code in (({}, "missing_api_key"), (_auth("tcad_nope_nope"), "invalid_api_key")):
        response = service.client.request(headers={**headers, **auth}, **request)
        _assert_clean_error(response, Bad(401, code, case.request))
    assert _newest_audit_rows(service)[1] == before


def test_a_malformed_multipart_body_without_a_key_is_401(service):
    """The fuzzer's case: the body is unparsable and the key is missing; the key wins."""
    response = service.client.post(
        "/v1/predict",
        content=b"--x\r\nContent-Disposition: form-data; name=file\r\n\r\nabc",
        headers={"content-type": "multipart/form-data"},
    )
    _assert_clean_error(response, Bad(401, "missing_api_key", raw()))


@pytest.mark.parametrize(
    ("query", "status", "code"),
    [
        ("start=0.5", 422, "invalid_request"),
        ("end=yesterday", 422, "invalid_request"),
        ("start=2026-02-30", 400, "invalid_datetime"),
        ("end=0000-00-00", 400, "invalid_datetime"),  # the fuzzer's: RFC 3339 form, no day
        ("start=2026-01-01T10:00", 422, "invalid_request"),  # RFC 3339 needs seconds, offset
        ("start=2026-01-01 10:00:00Z", 422, "invalid_request"),
        ("model_version=0", 422, "invalid_request"),
        ("model_version=99999999999999999999", 422, "invalid_request"),
        ("offset=-1", 422, "invalid_request"),
        ("offset=2147483648", 422, "invalid_request"),
        ("limit=0", 422, "invalid_request"),
        ("limit=501", 422, "invalid_request"),
        ("label=", 422, "invalid_request"),
    ],
)
def test_bad_audit_queries_are_4xx_not_a_database_outage(service, query, status, code):
    response = service.client.get(f"/v1/requests?{query}", headers=_auth(service.admin_key))
    _assert_clean_error(response, Bad(status, code, raw()))


@pytest.mark.parametrize(
    "query",
    ["start=2026-01-01", "start=2026-01-01T00:00:00Z", "end=2999-01-01T00:00:00.5%2B02:00",
     "start=0001-01-01T00:00:00-01:00", "end=2026-01-01t00:00:00.123456789z",
     # Beyond year 1..9999 once in UTC: the first / last instant, not an error.
     "start=2026-01-01T00:00:00%2B23:59&end=0001-01-01T00:00:00%2B23:59",
     "end=9999-12-31T23:59:59-23:59"],
)  # fmt: skip
def test_good_audit_queries_are_answered(service, query):
    response = service.client.get(f"/v1/requests?{query}", headers=_auth(service.admin_key))
    assert response.status_code == 200, response.text
    assert set(response.json()) == {"total", "limit", "offset", "requests"}


def test_the_server_keeps_serving_after_the_whole_corpus(service):
    """Replay the corpus back to back on the same app, then ask for a real prediction."""
    _, before = _newest_audit_rows(service)
    expected = []
    for case in BAD.values():
        response, data = _send(service, case)
        _assert_clean_error(response, case)
        if case.audited:
            expected.append((case.status, case.code))
    good = service.client.post(
        "/v1/predict",
        files={"file": ("x.png", _png(), "image/png")},
        headers=_auth(service.predict_key),
    )
    assert good.status_code == 200, good.text
    assert good.json()["model"]["version"] == service.version
    assert service.client.get("/readyz").status_code == 200
    rows, after = _newest_audit_rows(service, n=len(expected) + 1)
    assert after == before + len(expected) + 1
    assert [(r["status_code"], r["error_code"]) for r in reversed(rows)] == expected + [(200, None)]
    metrics = service.client.get("/metrics").text
    for code in {code for _, code in expected}:
        assert f'thyroid_cad_request_errors_total{{code="{code}",route="/v1/predict"}}' in metrics
    assert 'route="/v1/predict",status="200"}' in metrics


# -- odd but valid ----------------------------------------------------------------------
def _probabilities(service, data: bytes) -> dict:
    r = service.client.post(
        "/v1/predict?heatmap=none",
        files={"file": ("x.png", data, "image/png")},
        headers=_auth(service.predict_key),
    )
    assert r.status_code == 200, r.text
    return r.json()["prediction"]["probabilities"]


def _multi_frame_tiff() -> bytes:
    first, second = Image.fromarray(_frame("malignant")), Image.fromarray(_frame("benign", 9))
    return _encode(first, "TIFF", save_all=True, append_images=[second, second])


@dataclass(frozen=True)
class Odd:
    make: Callable[[], bytes]
    content_type: str  # what the service should sniff
    size: tuple[int, int]  # (width, height) it should report
    same_as: Callable[[], bytes] | None = None  # a plain PNG that must score the same


ODD = {
    "png-16-bit-grey": Odd(
        lambda: _encode(Image.fromarray(_frame()[..., 0].astype(np.uint16) * 257), "PNG"),
        "image/png",
        (128, 128),
        # deep grey is windowed to its own range: the same as the stretched 8-bit frame
        same_as=lambda: _encode(Image.fromarray(_scaled(_frame()[..., 0])), "PNG"),
    ),
    "png-8-bit-grey": Odd(
        lambda: _encode(Image.fromarray(_frame()[..., 0]), "PNG"), "image/png", (128, 128), _png
    ),
    "jpeg-cmyk": Odd(
        lambda: _encode(Image.fromarray(_frame()).convert("CMYK"), "JPEG", quality=95),
        "image/jpeg",
        (128, 128),
    ),
    "png-rgba": Odd(
        lambda: _encode(Image.fromarray(_frame()).convert("RGBA"), "PNG"),
        "image/png",
        (128, 128),
        same_as=_png,  # fully opaque: compositing on black changes nothing
    ),
    "png-palette-with-transparency": Odd(
        lambda: _encode(
            Image.fromarray(_frame()).convert("P", palette=Image.Palette.ADAPTIVE),
            "PNG",
            transparency=0,
        ),
        "image/png",
        (128, 128),
    ),
    "bmp": Odd(lambda: _encode(Image.fromarray(_frame()), "BMP"), "image/bmp", (128, 128), _png),
    # The first frame is used; the second and third (a different image) are ignored.
    "tiff-three-frames": Odd(_multi_frame_tiff, "image/tiff", (128, 128), same_as=_png),
    # 16 px is the minimum side, so this sliver is accepted (letterboxed; nonsense, but
    # harmless): the limits are on the shorter side and on the pixel count only.
    "sliver-16x10000": Odd(
        lambda: _encode(Image.new("L", (16, 10000), 128), "PNG"), "image/png", (16, 10000)
    ),
    # A few flipped bytes in the scan: libjpeg resynchronises at the next restart point
    # or block and fills in what it could not read, with only a warning. The file is a
    # valid JPEG whose pixels are partly wrong; a decoder cannot tell that from a real
    # image, so the service (like any viewer) accepts it. That is why the audit keeps
    # the input's SHA-256: a disputed result can be traced to the exact bytes.
    "jpeg-bit-flips": Odd(_jpeg_bit_flips, "image/jpeg", (128, 128)),
    # The client's name and content type are ignored: the bytes say what it is.
    "png-named-scan-bin": Odd(_png, "image/png", (128, 128)),
}


@pytest.mark.parametrize("case", list(ODD.values()), ids=list(ODD))
def test_odd_but_valid_input_is_accepted(service, case):
    data = case.make()
    r = service.client.post(
        "/v1/predict",
        files={"file": ("scan.bin", data, "application/octet-stream")},
        headers=_auth(service.predict_key),
    )
    assert r.status_code == 200, r.text
    body = r.json()
    probs = body["prediction"]["probabilities"]
    assert sum(probs.values()) == pytest.approx(1, abs=1e-4)
    assert (body["heatmap"]["width"], body["heatmap"]["height"]) == case.size
    rows, _ = _newest_audit_rows(service)
    assert rows[0]["request_id"] == body["request_id"] and rows[0]["status_code"] == 200
    assert rows[0]["content_type"] == case.content_type
    assert (rows[0]["image_width"], rows[0]["image_height"]) == case.size
    if case.same_as is not None:
        expected = _probabilities(service, case.same_as())
        assert probs == pytest.approx(expected, abs=1e-6)


def test_upload_over_the_byte_limit_is_413(service):
    settings = service.settings.model_copy(update={"max_upload_bytes": 100_000})
    noise = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    big = _encode(Image.fromarray(noise), "PNG")  # a valid image, ~197 kB
    assert len(big) > 100_000 and len(_png()) < 100_000
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        r = client.post(
            "/v1/predict",
            files={"file": ("x.png", big, "image/png")},
            headers=_auth(service.predict_key),
        )
        _assert_clean_error(r, Bad(413, "file_too_large", raw()))
        assert "100000" in r.json()["error"]["message"]
        row = client.get("/v1/requests?limit=1", headers=_auth(service.admin_key)).json()
        row = row["requests"][0]
        assert (row["status_code"], row["error_code"]) == (413, "file_too_large")
        assert row["input_sha256"] is None  # refused before it was read to the end
        ok = client.post(
            "/v1/predict",
            files={"file": ("x.png", _png(), "image/png")},
            headers=_auth(service.predict_key),
        )
        assert ok.status_code == 200, ok.text


# -- DICOM -----------------------------------------------------------------------------
def test_dicom_is_decoded_and_no_header_data_is_kept(service, caplog):
    caplog.set_level("DEBUG")
    grey = _frame(size=96)[..., 0]
    data = _dicom(grey)
    r = service.client.post(
        "/v1/predict?heatmap=overlay",
        files={"file": (f"{PATIENT_NAME}.dcm", data, "application/dicom")},
        headers=_auth(service.predict_key),
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["heatmap"]["width"], body["heatmap"]["height"]) == (96, 96)
    # The 12-bit frame is stretched to 8 bits: the same as a PNG of the stretched frame.
    png = _encode(Image.fromarray(_scaled(grey)), "PNG")
    assert body["prediction"]["probabilities"] == pytest.approx(
        _probabilities(service, png), abs=1e-6
    )
    rows = service.client.get("/v1/requests?limit=500", headers=_auth(service.admin_key))
    row = next(x for x in rows.json()["requests"] if x["request_id"] == body["request_id"])
    assert row["content_type"] == "application/dicom" and row["status_code"] == 200
    assert (row["image_width"], row["image_height"]) == (96, 96)
    assert row["input_sha256"] == hashlib.sha256(data).hexdigest()

    # the database with its WAL and journal files, and anything spooled
    files = [*service.db_path.parent.glob(service.db_path.name + "*"), *service.spool.rglob("*")]
    stored = b"".join(p.read_bytes() for p in files if p.is_file())
    assert body["request_id"].encode() in stored  # the search does see this request's row
    # (long, distinctive strings: a short one could turn up by chance in base64 data)
    for secret in (PATIENT_NAME, "Quintessa", PATIENT_ID):
        assert secret not in r.text
        assert secret not in rows.text
        assert secret.encode() not in stored
        assert secret not in caplog.text


def test_dicom_monochrome1_is_inverted(service):
    grey = _frame(size=96)[..., 0]
    data = _dicom(grey, PhotometricInterpretation="MONOCHROME1")
    r = service.client.post(
        "/v1/predict?heatmap=none",
        files={"file": ("x.dcm", data, "application/dicom")},
        headers=_auth(service.predict_key),
    )
    assert r.status_code == 200, r.text
    inverted = _encode(Image.fromarray(255 - _scaled(grey)), "PNG")
    assert r.json()["prediction"]["probabilities"] == pytest.approx(
        _probabilities(service, inverted), abs=1e-6
    )


def test_dicom_cine_loop_uses_the_first_frame(service):
    first, second = _frame("malignant", 0, 96)[..., 0], _frame("benign", 9, 96)[..., 0]
    loop = (np.stack([first, second, second]).astype(np.uint16) * 16).tobytes()
    data = _dicom(first, pixels=loop, NumberOfFrames=3)
    r = service.client.post(
        "/v1/predict?heatmap=none",
        files={"file": ("x.dcm", data, "application/dicom")},
        headers=_auth(service.predict_key),
    )
    assert r.status_code == 200, r.text
    png = _encode(Image.fromarray(_scaled(first)), "PNG")
    assert r.json()["prediction"]["probabilities"] == pytest.approx(
        _probabilities(service, png), abs=1e-6
    )


def test_dicom_with_a_voi_window_is_accepted(service):
    data = _dicom(WindowCenter=2000, WindowWidth=4000)
    r = service.client.post(
        "/v1/predict?heatmap=none",
        files={"file": ("x.dcm", data, "application/dicom")},
        headers=_auth(service.predict_key),
    )
    assert r.status_code == 200, r.text
    assert "Quintessa" not in r.text
