import io

import numpy as np
import pytest
from PIL import Image

from thyroid_cad import imaging


def _frame(h=300, w=400) -> np.ndarray:
    """A bright 'tissue' block on black with a thin ruler and a text-like block."""
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[60:260, 80:360] = 120 + (np.arange(280) % 50)[None, :, None]
    rgb[10:290:10, 20:22] = 255  # ruler ticks, 2 px wide
    rgb[5:15, 300:390:4] = 255  # burned-in 'text' strokes
    return rgb


def test_content_box_finds_tissue_and_ignores_marks():
    top, left, bottom, right = imaging.content_box(_frame())
    assert (top, left, bottom, right) == (60, 80, 260, 360)


def test_content_box_falls_back_to_whole_frame_when_empty():
    assert imaging.content_box(np.zeros((50, 70, 3), np.uint8)) == (0, 0, 50, 70)


def test_letterbox_keeps_aspect_ratio():
    tall = np.full((200, 100, 3), 200, np.uint8)
    out = imaging.letterbox(tall, 64)
    assert out.shape == (64, 64, 3)
    cols = np.flatnonzero(out.mean(axis=(0, 2)) > 0)
    assert 30 <= len(cols) <= 34  # 100/200 of the width, black padding either side
    assert out[:, 0].max() == 0 and out[:, -1].max() == 0


@pytest.mark.parametrize(
    "mode,fmt",
    [
        ("L", "PNG"),
        ("RGB", "JPEG"),
        ("RGBA", "PNG"),
        ("I;16", "PNG"),
        ("P", "BMP"),
        ("RGB", "TIFF"),
        ("L", "TIFF"),
        ("LA", "PNG"),
    ],
)
def test_decodes_modes_and_formats_to_rgb_uint8(mode, fmt):
    rgb = _frame()
    image = Image.fromarray(rgb)
    if mode == "I;16":
        image = Image.fromarray(rgb[:, :, 0].astype(np.uint16) * 257)
    elif mode != "RGB":
        image = image.convert(mode)
    buf = io.BytesIO()
    image.save(buf, fmt)
    out = imaging.load_prepared(buf.getvalue(), 96)
    assert out.shape == (96, 96, 3) and out.dtype == np.uint8
    assert out.max() > 100  # content survived; 16-bit was windowed, not truncated to black
    assert np.array_equal(out[..., 0], out[..., 1]) or mode in ("RGB", "P")


def test_sixteen_bit_low_range_is_windowed():
    arr = np.zeros((64, 64), np.uint16)
    arr[16:48, 16:48] = 4095  # a 12-bit image stored in 16 bits
    out = imaging.to_rgb_array(Image.fromarray(arr))
    assert out.max() == 255 and out.min() == 0


def test_rgba_transparent_background_becomes_black():
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., :3] = 255  # white but fully transparent
    out = imaging.to_rgb_array(Image.fromarray(rgba, "RGBA"))
    assert out.max() == 0


def test_undecodable_bytes_raise_oserror():
    with pytest.raises(OSError):
        imaging.open_image(b"not an image at all")


def test_prepare_rejects_tiny_size():
    with pytest.raises(ValueError, match="at least 8"):
        imaging.prepare(_frame(), 4)


def test_geometry_maps_the_square_back_onto_the_frame():
    rgb = _frame()
    square, geometry = imaging.prepare_with_geometry(rgb, 64)
    np.testing.assert_array_equal(square, imaging.prepare(rgb, 64))
    ones = np.zeros((64, 64), np.float32)
    pt, pl, ph, pw = geometry.placed
    ones[pt : pt + ph, pl : pl + pw] = 1.0
    back = imaging.to_original(ones, geometry)
    assert back.shape == rgb.shape[:2]
    top, left, bottom, right = geometry.box
    assert back[top:bottom, left:right].min() > 0.99  # content maps onto the content box
    assert back.sum() == pytest.approx((bottom - top) * (right - left), rel=0.01)
