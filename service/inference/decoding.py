"""Uploads -> RGB pixels, safely: sniffed by magic bytes, size- and pixel-bounded.

PNG, JPEG, BMP, TIFF through Pillow (upright RGB and grey JPEGs through simplejpeg:
the same libjpeg-turbo pixels in about half the time), at a bounded working resolution
when the caller gives one (working_side: a huge JPEG is decoded at 1/2, 1/4 or 1/8
scale by libjpeg, other formats are shrunk by Image.reduce after loading); DICOM
through pydicom, always at full resolution (see _dicom: one frame, compressed transfer
syntaxes, VOI LUT, MONOCHROME1 inverted, YBR and palette colour to RGB, cropped to the
ultrasound image region). Nothing from a
DICOM header leaves this module: the caller gets pixels, dimensions, the frame number,
the crop offset and the ultrasound pixel spacing (for sizes in mm) only, so no
patient-identifying tag can reach a log or the audit store.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
import simplejpeg
from PIL import Image, ImageOps

from service.errors import ApiError
from thyroid_cad import imaging, nodule

MIN_SIDE = 16
# The working resolution (issue 17, item 2): a frame is decoded with at least this many
# pixels on its long side, and at least WORKING_FACTOR times its model's input side.
# Content cropping, ROI boxes and the localiser work on the decoded frame, so the bound
# is kept well above the model's input; ultrasound frames (<= 2048 px) are never reduced.
WORKING_SIDE = 2048
WORKING_FACTOR = 4
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
    # DICOM: the 1-based frame decoded (None for single-frame images) and where `rgb`
    # starts in that frame (row, column): non-zero when cropped to the ultrasound region.
    frame: int | None = None
    origin: tuple[int, int] = (0, 0)
    spacing_mm: tuple[float, float] | None = None  # DICOM ultrasound calibration (x, y)
    # (height, width) of the image as sent (upright) when `rgb` was decoded smaller, at
    # the working resolution; None when `rgb` is the image at full resolution.
    full_size: tuple[int, int] | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the image as sent: what a client's coordinates refer to."""
        return self.full_size or self.rgb.shape[:2]


def working_side(input_size: int) -> int:
    """The long side (px) below which a frame for a model of `input_size` is not reduced
    when decoded: max(WORKING_SIDE, WORKING_FACTOR x input_size)."""
    return max(WORKING_SIDE, WORKING_FACTOR * input_size)


def _factor(width: int, height: int, long_side: int | None) -> int:
    """The integer reduction of a width x height image that keeps its long side at least
    `long_side` and its short side at least MIN_SIDE; 1 (none) when `long_side` is None."""
    if long_side is None:
        return 1
    return max(1, min(max(width, height) // long_side, min(width, height) // MIN_SIDE))


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


# Deflated Explicit VR Little Endian: pydicom inflates the whole dataset before reading a
# single attribute, so a 20 MB upload could inflate to 20 GB. It is inflated here first,
# counting and discarding, and refused past what the largest accepted image can need.
DEFLATED = b"1.2.840.10008.1.2.1.99"
_CHUNK = 1 << 20


def _deflated_body(data: bytes) -> bytes | None:
    """The deflated part of a Deflated Explicit VR Little Endian file, else None."""
    if len(data) < 144 or data[136:138] != b"UL":
        return None
    (meta_length,) = struct.unpack("<I", data[140:144])  # (0002,0000) group length
    end = 144 + meta_length
    return data[end:] if DEFLATED in data[144:end] else None


def _check_inflated_size(data: bytes, max_pixels: int) -> None:
    """413 when a deflated DICOM inflates beyond the frames decode() could accept
    (4 x max_pixels, 3 samples of 2 bytes) plus 1 MiB of attributes."""
    body = _deflated_body(data)
    if body is None:
        return
    limit = 4 * max_pixels * 3 * 2 + _CHUNK
    inflater, total = zlib.decompressobj(-zlib.MAX_WBITS), 0
    try:
        while body and total <= limit:
            total += len(inflater.decompress(body, _CHUNK))
            body = inflater.unconsumed_tail
        if total <= limit:
            total += len(inflater.flush())
    except zlib.error:
        return  # not valid deflate: pydicom says so (400 corrupt_dicom)
    if total > limit:
        raise ApiError(
            413,
            "image_too_large",
            f"the deflated DICOM inflates beyond {limit} bytes, more than any accepted "
            "image needs (a decompression bomb)",
        )


def pixels(data: bytes) -> int:
    """Width x height of the image (one frame) from its header alone, nothing decoded:
    what admission control counts. 0 when the header cannot be read (decode() then says
    what is wrong with the file)."""
    try:
        if sniff(data) == "application/dicom":
            if _deflated_body(data) is not None:
                return 0  # inflated only under decode()'s bound, not here
            import pydicom

            ds = pydicom.dcmread(
                io.BytesIO(data), stop_before_pixels=True, specific_tags=["Rows", "Columns"]
            )
            return int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0)
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            return width * height
    except Exception:  # noqa: BLE001 - any unreadable header: decode() reports it
        return 0


def decode(
    data: bytes, max_pixels: int, frame: int | None = None, long_side: int | None = None
) -> Decoded:
    """Decode an upload or raise ApiError (4xx) saying what is wrong with it.

    `frame` (1-based) picks a frame of a multi-frame DICOM; default the first.
    `long_side` (working_side()): a PNG, JPEG, BMP or TIFF at least twice as long is
    decoded at a reduced resolution no smaller than it (`full_size` then says the size
    as sent); None, and DICOM always: full resolution. max_pixels applies to the size as
    sent, from the header.
    """
    if not data:
        raise ApiError(400, "empty_file", "the uploaded file is empty")
    kind = sniff(data)
    if kind == "application/dicom":
        _check_inflated_size(data, max_pixels)
        decoded = _dicom(data, max_pixels, frame)
    else:
        if frame not in (None, 1):
            raise _no_such_frame(frame, 1)
        rgb, size = _pillow(data, max_pixels, long_side)
        decoded = Decoded(rgb, kind, full_size=None if rgb.shape[:2] == size else size)
    h, w = decoded.size
    if min(h, w) < MIN_SIDE:
        raise ApiError(400, "image_too_small", f"image is {w}x{h}; at least {MIN_SIDE} px a side")
    return decoded


def _too_large(w: int, h: int, max_pixels: int) -> ApiError:
    return ApiError(
        413, "image_too_large", f"image is {w}x{h} = {w * h} pixels; the limit is {max_pixels}"
    )


def _pillow(
    data: bytes, max_pixels: int, long_side: int | None = None
) -> tuple[np.ndarray, tuple[int, int]]:
    """The RGB pixels (at the working resolution when `long_side` asks for a reduction)
    and the (height, width) of the image as sent, upright."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            w, h = image.size
            if w * h > max_pixels:
                raise _too_large(w, h, max_pixels)
            factor = _factor(w, h, long_side)
            # A JPEG is scaled by 1/2, 1/4 or 1/8 while it is decoded (libjpeg's DCT
            # scaling, Image.draft), so a huge one is never in memory at full size; what
            # is left of the factor, and other formats, by Image.reduce after loading.
            scale = next(s for s in (8, 4, 2, 1) if s <= factor)
            fast = _fast_jpeg(image, data, scale)
            if fast is not None and factor == scale:
                return fast, (h, w)  # upright: the fast path takes no EXIF rotation
            if fast is not None:
                image = Image.fromarray(fast)  # over 16 times the working side
            else:
                if scale > 1:
                    image.draft("RGB", (w // scale, h // scale))  # a no-op but for JPEG
                frames = getattr(image, "n_frames", 1)
                if frames > 1:
                    image.seek(0)
                image.load()
                if factor == 1:
                    rgb = imaging.to_rgb_array(image)
                    return rgb, rgb.shape[:2]
            # Upright as sent: a TIFF is turned on load (its size at open is already
            # upright), others by to_rgb_array after this.
            turned = image.getexif().get(imaging.EXIF_ORIENTATION, 1) in _TURNED
            image = _reduce(image, _factor(*image.size, long_side))
            return imaging.to_rgb_array(image), (w, h) if turned else (h, w)
    except ApiError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ApiError(413, "image_too_large", f"decompression bomb refused: {e}") from e
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError) as e:
        raise ApiError(
            400, "corrupt_image", f"the image cannot be decoded ({type(e).__name__})"
        ) from e


# EXIF orientations that turn the image by 90 degrees (width and height swap).
_TURNED = frozenset({5, 6, 7, 8})
# The modes Image.reduce averages; others (palette, 1-bit, 16-bit grey) go to RGB first.
_REDUCIBLE = frozenset({"L", "LA", "RGB", "RGBA", "I", "F", "CMYK"})


def _reduce(image: Image.Image, factor: int) -> Image.Image:
    """`image` shrunk `factor` times (each pixel the mean of a factor x factor block, as
    Image.reduce makes it); as is for 1. Turned upright first: a TIFF's orientation tag
    does not survive the copy."""
    if factor == 1:
        return image
    if image.getexif().get(imaging.EXIF_ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode not in _REDUCIBLE:
        image = Image.fromarray(imaging.to_rgb_array(image))
    return image.reduce(factor)


def _fast_jpeg(image: Image.Image, data: bytes, scale: int = 1) -> np.ndarray | None:
    """An upright RGB or grey JPEG decoded by simplejpeg, else None (Pillow decodes it).
    `scale` (1, 2, 4 or 8): decoded at 1/scale by libjpeg, as Image.draft would.

    Pillow and simplejpeg both run libjpeg-turbo with the accurate DCT and fancy
    upsampling, so the pixels are identical, at full and at reduced scale
    (tests/test_fast_preparation.py checks it); simplejpeg skips Pillow's copies.
    CMYK and EXIF-rotated files keep Pillow's handling, and so does any file libjpeg
    warns about (strict=True raises on them): Pillow accepts a few flipped bits in the
    scan but refuses a truncated file, and that judgement stays Pillow's.
    """
    if image.format != "JPEG" or image.mode not in ("RGB", "L"):
        return None
    if image.getexif().get(imaging.EXIF_ORIENTATION, 1) != 1:
        return None
    try:
        # At least Image.draft's size at 1/scale: libjpeg's scaling by exactly 1/scale.
        w, h = -(-image.width // scale), -(-image.height // scale)
        least = {"min_width": w, "min_height": h} if scale > 1 else {}
        return simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True, **least)
    except ValueError:
        return None


# -- DICOM ------------------------------------------------------------------------------
# RegionSpatialFormat 1 (2D) and RegionDataType 1 (tissue) of SequenceOfUltrasoundRegions:
# the B-mode image area (PS3.3 C.8.5.5.1.1-2); rulers, text and the scanner's frame lie
# outside it.
_US_2D, _US_TISSUE = 1, 1


def _no_such_frame(frame: int, frames: int) -> ApiError:
    return ApiError(
        400,
        "frame_out_of_range",
        f"frame {frame} requested; the image has {frames} frame(s), numbered from 1",
    )


def _grey_to_rgb(pixels: np.ndarray, ds, photometric: str) -> np.ndarray:
    """Modality/VOI LUT, window to 0-255, MONOCHROME1 inverted, grey -> RGB."""
    from pydicom.pixels import apply_voi_lut

    # float32 and in place: half the memory of float64 copies, exact for 16-bit samples.
    grey = np.asarray(apply_voi_lut(pixels, ds), dtype=np.float32)
    lo, hi = float(grey.min()), float(grey.max())
    if hi > lo:
        grey -= lo
        grey *= 255.0 / (hi - lo)
    else:
        grey[...] = 0
    if photometric == "MONOCHROME1":
        np.subtract(255.0, grey, out=grey)
    g = np.clip(np.rint(grey, out=grey), 0, 255, out=grey).astype(np.uint8)
    return np.repeat(g[:, :, None], 3, axis=2)


def _colour_to_rgb(pixels: np.ndarray) -> np.ndarray:
    """RGB samples (YBR already converted by pydicom, palette already applied) -> uint8."""
    if pixels.dtype != np.uint8:
        if pixels.max(initial=0) > 255:  # 16-bit samples or palette entries
            pixels = np.rint(pixels.astype(np.float64) * (255.0 / 65535.0))
        pixels = np.clip(pixels, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(pixels)


def ultrasound_region(ds, rows: int, cols: int) -> tuple[int, int, int, int] | None:
    """(top, left, bottom, right) of the largest 2D tissue region, clipped to the frame.

    None when the dataset declares no usable one (absent, malformed, or under MIN_SIDE
    once clipped): the whole frame is used then.
    """
    best: tuple[int, tuple[int, int, int, int]] | None = None
    for region in ds.get("SequenceOfUltrasoundRegions") or []:
        try:
            if int(region.RegionSpatialFormat) != _US_2D:
                continue
            if int(region.RegionDataType) != _US_TISSUE:
                continue
            x0, y0 = int(region.RegionLocationMinX0), int(region.RegionLocationMinY0)
            x1, y1 = int(region.RegionLocationMaxX1), int(region.RegionLocationMaxY1)
        except (AttributeError, TypeError, ValueError):
            continue
        top, left = max(0, min(y0, y1)), max(0, min(x0, x1))
        bottom, right = min(rows, max(y0, y1) + 1), min(cols, max(x0, x1) + 1)  # inclusive
        if bottom - top < MIN_SIDE or right - left < MIN_SIDE:
            continue
        area = (bottom - top) * (right - left)
        if best is None or area > best[0]:
            best = (area, (top, left, bottom, right))
    return None if best is None else best[1]


def _supported_syntaxes() -> str:
    """Names of the transfer syntaxes the installed decoders handle (for error messages)."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID, AllTransferSyntaxes

    names = []
    for uid in AllTransferSyntaxes:
        try:
            if get_decoder(UID(uid)).is_available:
                names.append(UID(uid).name)
        except (NotImplementedError, ValueError):
            continue
    return "; ".join(names)


def _dicom(data: bytes, max_pixels: int, frame: int | None) -> Decoded:
    """One frame of a DICOM file as RGB, cropped to its ultrasound image region.

    Frame policy: `frame` (1-based), default the first; only that frame is decoded.
    Pixel data in any transfer syntax the installed decoders handle (native, RLE,
    JPEG baseline/extended and JPEG 2000 through Pillow, JPEG-LS through pyjpegls);
    others are a 415 that names the syntax. Overlays (60xx) are never burned in, and
    the crop to the tissue region of SequenceOfUltrasoundRegions leaves the scanner's
    burned-in annotation outside the image as far as the region excludes it.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_color_lut, pixel_array

    syntax = "unknown"
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        syntax = ds.file_meta.get("TransferSyntaxUID", "unknown")
        syntax = getattr(syntax, "name", None) or str(syntax)
        rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if rows * cols > max_pixels:
            raise _too_large(cols, rows, max_pixels)
        # One frame is decoded, but a header claiming this much is a bomb, not a cine loop.
        if rows * cols * frames > 4 * max_pixels:
            raise ApiError(
                413,
                "image_too_large",
                f"{frames} frames of {cols}x{rows}: too many pixels to decode",
            )
        if "PixelData" not in ds:
            raise ApiError(400, "dicom_without_pixels", "the DICOM file holds no image")
        number = 1 if frame is None else frame
        if not 1 <= number <= frames:
            raise _no_such_frame(number, frames)
        pixels = pixel_array(ds, index=number - 1)
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
        spacing = nodule.ultrasound_spacing_mm(ds)
        if pixels.ndim == 2 and photometric == "PALETTE COLOR":
            pixels = apply_color_lut(pixels, ds)
        if pixels.ndim == 2:
            rgb = _grey_to_rgb(pixels, ds, photometric)
        elif pixels.ndim == 3 and pixels.shape[-1] == 3:
            rgb = _colour_to_rgb(pixels)
        else:
            raise ApiError(
                415, "unsupported_dicom", f"DICOM pixel layout {pixels.shape} not supported"
            )
        region = ultrasound_region(ds, rgb.shape[0], rgb.shape[1])
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
    except (NotImplementedError, RuntimeError) as e:  # no decoder, or the decoder failed
        raise ApiError(
            415,
            "unsupported_dicom",
            f"DICOM pixel data in {syntax} cannot be decoded here (no decoder installed, "
            f"or the pixel data is corrupt); decodable here: {_supported_syntaxes()}",
        ) from e
    if region is not None:
        top, left, bottom, right = region
        rgb = np.ascontiguousarray(rgb[top:bottom, left:right])
    origin = (0, 0) if region is None else (region[0], region[1])
    return Decoded(rgb, "application/dicom", number if frames > 1 else None, origin, spacing)
