"""Image decoding and preprocessing shared by training and serving.

This is the one module both sides run, so a frame is prepared the same way when a
model is trained and when it is served. Only numpy, Pillow and scipy: no TensorFlow.
Intensity normalization is not done here; it lives inside the model graph, which
takes raw 0-255 pixels.

Two ways to make a model's square input, both through `prepare_input`: the whole
frame (crop to the ultrasound content, letterbox), or a nodule-centred square around
a region of interest (ROI) with a context margin, for models trained on ROI crops.
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from scipy import ndimage

# Bumped whenever prepare() changes output for the same input; recorded with every
# run and model card so a served model is fed exactly what it was trained on.
PREPROCESSING_VERSION = "1"

Box = tuple[int, int, int, int]  # x, y, width, height in the frame's own pixels

# Context kept around an ROI on each side, as a fraction of the box's longer side.
ROI_MARGIN = 0.3
# Bumped whenever the ROI crop changes output for the same frame, box and margin.
ROI_PREPROCESSING_VERSION = "1"

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})

# Pixels darker than this (0-255 grey) count as background when looking for content.
_BACKGROUND_LEVEL = 12
# Opening radius that detaches thin rulers, calipers and burned-in text from tissue.
_OPENING_SIZE = 7
# A content box smaller than this fraction of the frame means cropping failed.
_MIN_CONTENT_FRACTION = 0.1
EXIF_ORIENTATION = 0x0112  # EXIF tag: how the camera held the frame (1 = upright)


def open_image(source: str | Path | bytes) -> Image.Image:
    """Open an image from a path or encoded bytes and load its pixels.

    Raises:
        OSError: the data cannot be decoded as an image (PIL.UnidentifiedImageError
            is a subclass).
    """
    fp = io.BytesIO(source) if isinstance(source, bytes) else source
    image = Image.open(fp)
    image.load()
    return image


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """Convert any PIL mode (grey, 16-bit, float, palette, RGBA, CMYK) to uint8 HxWx3."""
    # exif_transpose copies even an upright image: only call it when the tag asks.
    if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # Deep grey images (16-bit exports, 12-bit DICOM): window to their own range.
        arr = np.asarray(image, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image)


def content_box(rgb: np.ndarray) -> tuple[int, int, int, int]:
    """Bounding box (top, left, bottom, right) of the ultrasound content in a frame.

    The scanner's frame, rulers and burned-in text are thin or sparse bright marks
    on a dark background; the image content is one large connected bright region.
    A morphological opening detaches the thin marks, and the largest connected
    component gives the box. Falls back to the whole frame when nothing sensible
    is found.
    """
    h, w = rgb.shape[:2]
    mask = _opening(_foreground(rgb), _OPENING_SIZE)
    labels, n = ndimage.label(mask)
    if n == 0:
        return 0, 0, h, w
    sizes = np.bincount(labels.ravel())[1:]
    biggest = int(np.argmax(sizes)) + 1
    component = labels == biggest
    rows = np.flatnonzero(component.any(axis=1))
    cols = np.flatnonzero(component.any(axis=0))
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    if (bottom - top) * (right - left) < _MIN_CONTENT_FRACTION * h * w:
        return 0, 0, h, w
    return int(top), int(left), int(bottom), int(right)


def _foreground(rgb: np.ndarray) -> np.ndarray:
    """Pixels whose mean over the channels exceeds the background level."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3:
        return rgb.mean(axis=2) > _BACKGROUND_LEVEL
    # mean > L  <=>  sum > channels * L, exactly, in integers (no float copy of the frame)
    total = rgb[:, :, 0].astype(np.uint16)
    for c in range(1, rgb.shape[2]):
        total += rgb[:, :, c]
    return total > rgb.shape[2] * _BACKGROUND_LEVEL


def _opening(mask: np.ndarray, size: int) -> np.ndarray:
    """Binary opening by a size x size square, outside the frame counted as background.

    Equal to ndimage.binary_opening(mask, np.ones((size, size))), but the square is
    separable and a run of `size` pixels is the AND (erosion) or OR (dilation) of
    shifted views built by doubling: a few whole-array operations instead of size**2.
    """
    eroded = _run(_run(mask, size, 0, np.logical_and), size, 1, np.logical_and)
    return _run(_run(eroded, size, 0, np.logical_or), size, 1, np.logical_or)


def _run(mask: np.ndarray, size: int, axis: int, op) -> np.ndarray:
    """op over a centred window of `size` (odd) pixels along `axis`; outside is False."""
    r = size // 2
    m = np.moveaxis(mask, axis, 0)
    pad = np.zeros((r, *m.shape[1:]), dtype=bool)
    acc, width = np.concatenate([pad, m, pad]), 1  # acc[i] covers width pixels from i
    while width < size:
        step = min(width, size - width)
        acc, width = op(acc[:-step], acc[step:]), width + step
    return np.moveaxis(acc, 0, axis)


def crop_to_content(rgb: np.ndarray) -> np.ndarray:
    """Crop a frame to its ultrasound content (see content_box)."""
    top, left, bottom, right = content_box(rgb)
    return rgb[top:bottom, left:right]


def letterbox(rgb: np.ndarray, size: int) -> np.ndarray:
    """Resize to size x size keeping the aspect ratio, padding with black.

    Aspect is kept on purpose: "taller than wide" is a TI-RADS malignancy feature,
    and stretching frames of different shapes would distort it.
    """
    top, left, new_h, new_w = _placement(*rgb.shape[:2], size)
    resized = Image.fromarray(rgb).resize(
        (new_w, new_h), Image.Resampling.BILINEAR, reducing_gap=2.0
    )
    out = np.zeros((size, size, 3), dtype=np.uint8)
    out[top : top + new_h, left : left + new_w] = np.asarray(resized)
    return out


def _placement(h: int, w: int, size: int) -> tuple[int, int, int, int]:
    """(top, left, height, width) of an h x w image letterboxed into size x size."""
    scale = size / max(h, w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    return (size - new_h) // 2, (size - new_w) // 2, new_h, new_w


def prepare(rgb: np.ndarray, size: int) -> np.ndarray:
    """The model's input: crop to content, then letterbox to size x size, uint8."""
    return prepare_with_geometry(rgb, size)[0]


@dataclass(frozen=True)
class Geometry:
    """Where the model's square input came from in the original frame."""

    height: int  # original frame
    width: int
    box: tuple[int, int, int, int]  # content box (top, left, bottom, right) in the frame
    placed: tuple[int, int, int, int]  # content (top, left, height, width) in the square
    size: int


def prepare_with_geometry(rgb: np.ndarray, size: int) -> tuple[np.ndarray, Geometry]:
    """prepare(), plus what it takes to map a map on the square back onto the frame."""
    if size < 8:
        raise ValueError(f"image size must be at least 8 pixels, got {size}")
    box = content_box(rgb)
    top, left, bottom, right = box
    square = letterbox(rgb[top:bottom, left:right], size)
    placed = _placement(bottom - top, right - left, size)
    return square, Geometry(rgb.shape[0], rgb.shape[1], box, placed, size)


def _span(lo: int, hi: int, full: int, new: int) -> tuple[int, int]:
    """[lo, hi) of a side `full` long -> the same part of that side resized to `new`:
    at least one pixel, inside [0, new)."""
    start = min(new - 1, round(lo * new / full))
    return start, max(start + 1, min(new, round(hi * new / full)))


def rescale(geometry: Geometry, height: int, width: int) -> Geometry:
    """`geometry` over the same frame resized to height x width (a frame decoded at a
    reduced resolution back onto the image as sent, or a heatmap shown smaller)."""
    if (height, width) == (geometry.height, geometry.width):
        return geometry
    top, left, bottom, right = geometry.box
    top, bottom = _span(top, bottom, geometry.height, height)
    left, right = _span(left, right, geometry.width, width)
    return dataclasses.replace(geometry, height=height, width=width, box=(top, left, bottom, right))


def scale_box(box: Box, shape: tuple[int, int], new: tuple[int, int]) -> Box:
    """A box (x, y, w, h) over a frame of `shape` (height, width) -> the same part of the
    frame resized to `new` (height, width): at least a pixel a side, inside it."""
    x, y, w, h = box
    x0, x1 = _span(x, x + w, shape[1], new[1])
    y0, y1 = _span(y, y + h, shape[0], new[0])
    return x0, y0, x1 - x0, y1 - y0


def to_original(square_map: np.ndarray, geometry: Geometry) -> np.ndarray:
    """A float map over the model's square input -> the same map over the original frame.

    Padding is cut away, the content part is resized to the content box, and the area
    outside the box (the scanner's frame) is zero.
    """
    pt, pl, ph, pw = geometry.placed
    top, left, bottom, right = geometry.box
    content = Image.fromarray(square_map[pt : pt + ph, pl : pl + pw].astype(np.float32), mode="F")
    resized = np.asarray(content.resize((right - left, bottom - top), Image.Resampling.BILINEAR))
    out = np.zeros((geometry.height, geometry.width), dtype=np.float32)
    out[top:bottom, left:right] = resized
    return out


def load_prepared(
    source: str | Path | bytes, size: int, roi: Box | None = None, margin: float = ROI_MARGIN
) -> np.ndarray:
    """Decode, convert to RGB and prepare one image for a model of input size `size`."""
    return prepare_input(to_rgb_array(open_image(source)), size, roi, margin)[0]


# --------------------------------------------------------------------------- #
# Nodule-centred input (region of interest)
# --------------------------------------------------------------------------- #
class RoiError(ValueError):
    """An ROI box that cannot be used on this frame; the message says why."""


def parse_roi(text: str) -> Box:
    """'x,y,w,h' (four integers, the frame's pixels) -> a box; RoiError otherwise."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 4:
        raise RoiError(f"roi must be four integers x,y,w,h; got {text!r}")
    try:
        x, y, w, h = (int(p) for p in parts)
    except ValueError:
        raise RoiError(f"roi must be four integers x,y,w,h; got {text!r}") from None
    return x, y, w, h


def check_roi(roi, height: int, width: int) -> Box:
    """A box of four integers with positive size, inside a height x width frame.

    Raises:
        RoiError: not four integers, zero or negative size, or not inside the frame.
    """
    try:
        values = [v for v in roi]
    except TypeError:
        raise RoiError(f"roi must be four integers x,y,w,h; got {roi!r}") from None
    ok = len(values) == 4 and all(
        isinstance(v, int | np.integer) and not isinstance(v, bool) for v in values
    )
    if not ok:
        raise RoiError(f"roi must be four integers x,y,w,h; got {roi!r}")
    x, y, w, h = (int(v) for v in values)
    if w < 1 or h < 1:
        raise RoiError(f"roi must have a positive width and height; got w={w}, h={h}")
    if x < 0 or y < 0 or x + w > width or y + h > height:
        raise RoiError(f"roi x={x}, y={y}, w={w}, h={h} is not inside the {width}x{height} image")
    return x, y, w, h


def clip_roi(roi: Box, height: int, width: int) -> Box | None:
    """The part of a box inside a height x width frame (None if nothing is): annotation
    outlines may touch or cross the frame's edge by a pixel."""
    x, y, w, h = roi
    x0, y0, x1, y1 = max(0, x), max(0, y), min(width, x + w), min(height, y + h)
    return (x0, y0, x1 - x0, y1 - y0) if x1 > x0 and y1 > y0 else None


def roi_square(roi: Box, margin: float, region: tuple[int, int, int, int]) -> tuple[int, int, int]:
    """(top, left, side) of the square crop around `roi` within `region` (t, l, b, r).

    The side is max(w, h) * (1 + 2 * margin). The square is centred on the box, then
    shifted to stay inside the region where it fits; where it is larger than the
    region it covers all of it, centred on the box as far as that allows. The part
    of the square outside the region is black.
    """
    if margin < 0:
        raise RoiError(f"roi margin must be >= 0, got {margin}")
    x, y, w, h = roi
    side = max(1, round(max(w, h) * (1 + 2 * margin)))

    def start(centre: float, lo: int, hi: int) -> int:
        free = (hi - lo) - side  # negative when the square is larger than the region
        return int(np.clip(round(centre - side / 2), lo + min(0, free), lo + max(0, free)))

    top, left, bottom, right = region
    return start(y + h / 2, top, bottom), start(x + w / 2, left, right), side


def _paste(rgb: np.ndarray, box: tuple, placed: tuple, size: int) -> np.ndarray:
    """rgb[box] (t, l, b, r) resized into placed (t, l, h, w) of a black size x size."""
    top, left, bottom, right = box
    pt, pl, ph, pw = placed
    resized = Image.fromarray(np.ascontiguousarray(rgb[top:bottom, left:right])).resize(
        (pw, ph), Image.Resampling.BILINEAR, reducing_gap=2.0
    )
    out = np.zeros((size, size, 3), dtype=np.uint8)
    out[pt : pt + ph, pl : pl + pw] = np.asarray(resized)
    return out


def prepare_roi(
    rgb: np.ndarray, size: int, roi: Box, margin: float = ROI_MARGIN
) -> tuple[np.ndarray, Geometry]:
    """The square around an ROI with context, resized to size x size, and its geometry.

    Only the ultrasound content (content_box, widened to hold the ROI) can reach the
    square: the scanner's frame, rulers and burned-in text beside the image area, the
    frame's size and aspect ratio all stay outside.
    """
    if size < 8:
        raise ValueError(f"image size must be at least 8 pixels, got {size}")
    height, width = rgb.shape[:2]
    x, y, w, h = check_roi(roi, height, width)
    top, left, bottom, right = content_box(rgb)
    region = (min(top, y), min(left, x), max(bottom, y + h), max(right, x + w))
    s_top, s_left, side = roi_square((x, y, w, h), margin, region)
    # The part of the frame the square shows, and where it lands in the square.
    vt, vl = max(s_top, region[0]), max(s_left, region[1])
    vb, vr = min(s_top + side, region[2]), min(s_left + side, region[3])
    scale = size / side
    pt, pl = round((vt - s_top) * scale), round((vl - s_left) * scale)
    ph = max(1, min(size - pt, round((vb - vt) * scale)))
    pw = max(1, min(size - pl, round((vr - vl) * scale)))
    box = (vt, vl, vb, vr)
    placed = (pt, pl, ph, pw)
    return _paste(rgb, box, placed, size), Geometry(height, width, box, placed, size)


def prepare_input(
    rgb: np.ndarray, size: int, roi: Box | None = None, margin: float = ROI_MARGIN
) -> tuple[np.ndarray, Geometry]:
    """THE model input, as training, export parity and serving all make it.

    Without an ROI: prepare_with_geometry (crop to content, letterbox). With one: the
    nodule-centred square of prepare_roi. Either way the geometry maps a map over the
    square back onto the frame (to_original).
    """
    if roi is None:
        return prepare_with_geometry(rgb, size)
    return prepare_roi(rgb, size, roi, margin)


def to_square(frame_map: np.ndarray, geometry: Geometry) -> np.ndarray:
    """A float map over the frame -> the same map over the model's square (to_original's
    inverse): what a per-pixel target such as a nodule mask becomes."""
    top, left, bottom, right = geometry.box
    pt, pl, ph, pw = geometry.placed
    part = Image.fromarray(frame_map[top:bottom, left:right].astype(np.float32), mode="F")
    out = np.zeros((geometry.size, geometry.size), dtype=np.float32)
    out[pt : pt + ph, pl : pl + pw] = np.asarray(part.resize((pw, ph), Image.Resampling.BILINEAR))
    return out
