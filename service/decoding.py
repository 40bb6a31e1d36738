"""Uploads -> RGB pixels, safely: sniffed by magic bytes, size- and pixel-bounded.

PNG, JPEG, BMP, TIFF through Pillow (upright RGB and grey JPEGs through simplejpeg:
the same libjpeg-turbo pixels in about half the time); DICOM through pydicom (first frame, VOI LUT,
MONOCHROME1 inverted). Nothing from a DICOM header leaves this module: the caller
gets pixels and dimensions only, so no patient-identifying tag can reach a log or
the audit store.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
import simplejpeg
from PIL import Image

from service.errors import ApiError
from thyroid_cad import imaging

MIN_SIDE = 16
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"BM", "image/bmp"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
)


@dataclass
class Decoded:
    rgb: np.ndarray  # uint8 H x W x 3
    content_type: str  # what the bytes are, not what the client claimed


def sniff(data: bytes) -> str:
    if len(data) > 132 and data[128:132] == b"DICM":
        return "application/dicom"
    for magic, kind in _MAGIC:
        if data.startswith(magic):
            return kind
    raise ApiError(
        415,
        "unsupported_media_type",
        "not a PNG, JPEG, BMP, TIFF or DICOM file (checked by its first bytes)",
    )


def decode(data: bytes, max_pixels: int) -> Decoded:
    """Decode an upload or raise ApiError (4xx) saying what is wrong with it."""
    if not data:
        raise ApiError(400, "empty_file", "the uploaded file is empty")
    kind = sniff(data)
    rgb = _dicom(data, max_pixels) if kind == "application/dicom" else _pillow(data, max_pixels)
    h, w = rgb.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise ApiError(400, "image_too_small", f"image is {w}x{h}; at least {MIN_SIDE} px a side")
    return Decoded(rgb, kind)


def _too_large(w: int, h: int, max_pixels: int) -> ApiError:
    return ApiError(
        413, "image_too_large", f"image is {w}x{h} = {w * h} pixels; the limit is {max_pixels}"
    )


def _pillow(data: bytes, max_pixels: int) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            w, h = image.size
            if w * h > max_pixels:
                raise _too_large(w, h, max_pixels)
            fast = _fast_jpeg(image, data)
            if fast is not None:
                return fast
            frames = getattr(image, "n_frames", 1)
            if frames > 1:
                image.seek(0)
            image.load()
            return imaging.to_rgb_array(image)
    except ApiError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ApiError(413, "image_too_large", f"decompression bomb refused: {e}") from e
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError) as e:
        raise ApiError(
            400, "corrupt_image", f"the image cannot be decoded ({type(e).__name__})"
        ) from e


def _fast_jpeg(image: Image.Image, data: bytes) -> np.ndarray | None:
    """An upright RGB or grey JPEG decoded by simplejpeg, else None (Pillow decodes it).

    Pillow and simplejpeg both run libjpeg-turbo with the accurate DCT and fancy
    upsampling, so the pixels are identical (tests/test_decoding_speed.py checks it);
    simplejpeg skips Pillow's copies. CMYK and EXIF-rotated files keep Pillow's
    handling, and so does any file libjpeg warns about (strict=True raises on them):
    Pillow accepts a few flipped bits in the scan but refuses a truncated file, and
    that judgement stays Pillow's.
    """
    if image.format != "JPEG" or image.mode not in ("RGB", "L"):
        return None
    if image.getexif().get(imaging.EXIF_ORIENTATION, 1) != 1:
        return None
    try:
        return simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
    except ValueError:
        return None


def _grey_to_rgb(pixels: np.ndarray, ds, photometric: str) -> np.ndarray:
    """Modality/VOI LUT, window to 0-255, MONOCHROME1 inverted, grey -> RGB."""
    from pydicom.pixels import apply_voi_lut

    grey = apply_voi_lut(pixels, ds).astype(np.float64)
    lo, hi = float(grey.min()), float(grey.max())
    grey = (grey - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(grey)
    if photometric == "MONOCHROME1":
        grey = 255.0 - grey
    g = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
    return np.repeat(g[:, :, None], 3, axis=2)


def _dicom(data: bytes, max_pixels: int) -> np.ndarray:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if rows * cols > max_pixels:
            raise _too_large(cols, rows, max_pixels)
        if rows * cols * frames > 4 * max_pixels:  # every frame is decoded: bound them all
            raise ApiError(
                413,
                "image_too_large",
                f"{frames} frames of {cols}x{rows}: too many pixels to decode",
            )
        if "PixelData" not in ds:
            raise ApiError(400, "dicom_without_pixels", "the DICOM file holds no image")
        pixels = ds.pixel_array
        if frames > 1:
            pixels = pixels[0]  # the first frame of a cine loop
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
        if pixels.ndim == 2:
            return _grey_to_rgb(pixels, ds, photometric)
    except ApiError:
        raise
    except (
        InvalidDicomError,
        EOFError,
        ValueError,
        KeyError,
        AttributeError,
        TypeError,
        OSError,
    ) as e:
        raise ApiError(
            400, "corrupt_dicom", f"the DICOM file cannot be read ({type(e).__name__})"
        ) from e
    except (NotImplementedError, RuntimeError) as e:  # compressed syntax without a decoder
        raise ApiError(
            415,
            "unsupported_dicom",
            "DICOM transfer syntax not supported here or pixel data corrupt",
        ) from e
    if pixels.ndim == 3 and pixels.shape[-1] == 3:
        if pixels.dtype != np.uint8:
            pixels = np.clip(pixels, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(pixels)
    raise ApiError(415, "unsupported_dicom", f"DICOM pixel layout {pixels.shape} not supported")
