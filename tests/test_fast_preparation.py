"""The fast preparation path gives the same pixels as the straightforward one.

imaging.content_box uses an integer foreground test and a separable opening built from
shifted views; service.inference.decoding hands upright RGB and grey JPEGs to simplejpeg. Both
are only worth having if training (Pillow, imaging) and serving still see identical
frames: these tests compare against scipy's binary_opening and Pillow's decoder.
"""

import io
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from service.errors import ApiError
from service.inference import decoding
from thyroid_cad import imaging

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
# content_box as first written (float mean, scipy opening), kept as prepare.py's baseline
from prepare import old_content_box as _reference_box  # noqa: E402


@pytest.mark.parametrize("size", [3, 5, 7, 9])
def test_opening_equals_scipy_binary_opening(size):
    rng = np.random.default_rng(size)
    for shape in [(1, 1), (3, 40), (40, 3), (17, 23), (64, 96)]:
        for density in (0.3, 0.7, 0.95):
            mask = rng.random(shape) < density
            expected = ndimage.binary_opening(mask, structure=np.ones((size, size)))
            np.testing.assert_array_equal(imaging._opening(mask, size), expected)


def test_content_box_matches_the_reference_on_noisy_frames():
    rng = np.random.default_rng(0)
    for i in range(40):
        h, w = rng.integers(40, 200, 2)
        rgb = rng.integers(0, 30, (h, w, 3), dtype=np.uint8)  # dark, around the threshold
        t, left = rng.integers(0, h // 2), rng.integers(0, w // 2)
        rgb[t : t + rng.integers(5, h), left : left + rng.integers(5, w)] += 90
        rgb[rng.random((h, w)) < 0.05] = 255  # speckle and marks
        if i % 5 == 0:
            rgb[:, :, 1] = 0  # colour frames: the mean over channels, not one channel
        assert imaging.content_box(rgb) == _reference_box(rgb), i


def test_foreground_is_mean_above_background_exactly():
    # sums 36 and 37 straddle mean 12: the integer test must keep 12.0 as background
    rgb = np.array([[[12, 12, 12], [12, 12, 13], [36, 0, 0], [0, 0, 37]]], np.uint8)
    np.testing.assert_array_equal(imaging._foreground(rgb), [[False, True, False, True]])
    np.testing.assert_array_equal(imaging._foreground(rgb.astype(np.float32)), rgb.mean(2) > 12)


def _jpeg(image: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", **kwargs)
    return buf.getvalue()


def _pillow_rgb(data: bytes) -> np.ndarray:
    return imaging.to_rgb_array(imaging.open_image(data))


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, (45, 61, 3), dtype=np.uint8)
    return Image.fromarray(base).resize((305, 227), Image.Resampling.BICUBIC)


@pytest.mark.parametrize(
    "mode,kwargs",
    [
        ("RGB", {"quality": 90}),
        ("RGB", {"quality": 75, "subsampling": 0}),
        ("RGB", {"quality": 75, "subsampling": 2}),
        ("RGB", {"quality": 85, "progressive": True}),
        ("L", {"quality": 85}),
        ("CMYK", {"quality": 90}),
    ],
)
def test_service_decodes_jpegs_as_pillow_does(photo, mode, kwargs):
    data = _jpeg(photo.convert(mode), **kwargs)
    got = decoding.decode(data, 10**8)
    assert got.content_type == "image/jpeg"
    assert got.rgb.dtype == np.uint8 and got.rgb.shape == (227, 305, 3)
    np.testing.assert_array_equal(got.rgb, _pillow_rgb(data))
    fast = decoding._fast_jpeg(Image.open(io.BytesIO(data)), data)
    assert (fast is not None) == (mode in ("RGB", "L"))  # CMYK stays with Pillow


def test_exif_rotated_jpeg_is_turned_upright_on_both_paths(photo):
    exif = Image.Exif()
    exif[imaging.EXIF_ORIENTATION] = 6  # rotated 90 degrees clockwise by the camera
    data = _jpeg(photo, exif=exif.tobytes(), quality=90)
    assert decoding._fast_jpeg(Image.open(io.BytesIO(data)), data) is None
    got = decoding.decode(data, 10**8).rgb
    assert got.shape == (305, 227, 3)  # width and height swapped
    np.testing.assert_array_equal(got, _pillow_rgb(data))
    stored = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    np.testing.assert_array_equal(got, np.rot90(stored, k=-1))


def test_damaged_jpegs_are_judged_by_pillow(photo):
    data = _jpeg(photo, quality=90)
    truncated = data[: len(data) // 2]
    assert decoding._fast_jpeg(Image.open(io.BytesIO(truncated)), truncated) is None
    with pytest.raises(ApiError) as e:  # refused, not grey-filled
        decoding.decode(truncated, 10**8)
    assert e.value.status == 400 and e.value.code == "corrupt_image"
    flipped = bytearray(data)
    for i in (len(data) // 2, len(data) // 2 + 300):  # bytes inside the entropy-coded scan
        flipped[i] ^= 0x55 if flipped[i] ^ 0x55 != 0xFF else 0x11
    flipped = bytes(flipped)
    try:
        expected = _pillow_rgb(flipped)
    except OSError:
        pytest.skip("these flips made Pillow refuse the file; nothing to compare")
    np.testing.assert_array_equal(decoding.decode(flipped, 10**8).rgb, expected)
