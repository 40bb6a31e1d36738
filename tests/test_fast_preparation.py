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
from service.inference import decoding, pipeline
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


# -- the working resolution (issue 17, item 2) -------------------------------------------
def _encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


@pytest.fixture(scope="module")
def frames() -> dict[str, Image.Image]:
    """Frames up to an ultrasound capture's size (2048 px), and one just short of twice
    the working side, the longest that is never reduced."""
    rng = np.random.default_rng(2)
    base = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    return {
        "640x480": base.resize((640, 480), Image.Resampling.BICUBIC),
        "2048x1536": base.resize((2048, 1536), Image.Resampling.BICUBIC),
        "4095x300": base.resize((4095, 300), Image.Resampling.BICUBIC),
    }


@pytest.mark.parametrize("size", ["640x480", "2048x1536", "4095x300"])
@pytest.mark.parametrize(
    "mode,fmt,kwargs",
    [
        ("RGB", "PNG", {}),
        ("L", "PNG", {}),
        ("RGB", "JPEG", {"quality": 90}),
        ("L", "JPEG", {"quality": 90}),
        ("CMYK", "JPEG", {"quality": 90}),
        ("RGB", "BMP", {}),
        ("RGB", "TIFF", {}),
    ],
)
def test_frames_under_the_working_resolution_decode_as_before(frames, size, mode, fmt, kwargs):
    """Bit-identical to the full-resolution decode (and Pillow's), and prepared into the
    same model input with the same geometry."""
    data = _encoded(frames[size].convert(mode), fmt, **kwargs)
    side = decoding.working_side(64)
    got = decoding.decode(data, 10**8, long_side=side)
    assert got.full_size is None and got.size == got.rgb.shape[:2]
    expected = _pillow_rgb(data)
    np.testing.assert_array_equal(got.rgb, expected)
    np.testing.assert_array_equal(got.rgb, decoding.decode(data, 10**8).rgb)
    prepared = pipeline.prepare(data, 64, 10**8)
    square, geometry = imaging.prepare_input(expected, 64)
    np.testing.assert_array_equal(prepared.square, square)
    assert prepared.geometry == geometry


@pytest.mark.parametrize(
    "mode,kwargs,exif",
    [
        ("RGB", {"quality": 90}, False),
        ("RGB", {"quality": 75, "subsampling": 2, "progressive": True}, False),
        ("L", {"quality": 85}, False),
        ("CMYK", {"quality": 90}, False),  # Pillow's path
        ("RGB", {"quality": 90}, True),  # EXIF-rotated: Pillow's path
    ],
)
def test_a_huge_jpeg_is_decoded_at_libjpegs_reduced_scale_on_both_paths(mode, kwargs, exif):
    rng = np.random.default_rng(3)
    base = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    big = base.resize((9001, 1500), Image.Resampling.BICUBIC).convert(mode)  # 13.5 Mpx
    if exif:
        tags = Image.Exif()
        tags[imaging.EXIF_ORIENTATION] = 6
        kwargs = {**kwargs, "exif": tags.tobytes()}
    data = _encoded(big, "JPEG", **kwargs)
    got = decoding.decode(data, 10**8, long_side=2048)  # 9001 // 2048: 4, libjpeg's 1/4
    reference = Image.open(io.BytesIO(data))
    reference.draft("RGB", (9001 // 4, 1500 // 4))
    reference.load()
    expected = imaging.to_rgb_array(reference)
    assert expected.shape[:2] == ((2251, 375) if exif else (375, 2251))
    assert got.full_size == ((9001, 1500) if exif else (1500, 9001))
    np.testing.assert_array_equal(got.rgb, expected)


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "I;16"])
def test_other_formats_are_reduced_after_loading(mode):
    """Over twice the working side: shrunk by an integer factor (block means) to no less
    than it; the size as sent is kept for the answer."""
    rng = np.random.default_rng(4)
    base = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    big = base.resize((6200, 2000), Image.Resampling.BICUBIC)
    if mode == "I;16":
        big = Image.fromarray(np.asarray(big.convert("L")).astype(np.uint16) * 257)
    else:
        big = big.convert(mode)
    data = _encoded(big, "PNG", compress_level=1)
    got = decoding.decode(data, 10**8, long_side=2048)
    assert got.rgb.shape == (667, 2067, 3)  # 6200 // 2048 = 3, rounded up
    assert got.full_size == (2000, 6200) and got.size == (2000, 6200)
    if mode in ("L", "RGB"):
        full = decoding.decode(data, 10**8).rgb
        np.testing.assert_array_equal(got.rgb, np.asarray(Image.fromarray(full).reduce(3)))
