"""The nodule-centred input (thyroid_cad.imaging ROI crop) and nodule shape measures."""

import io
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from thyroid_cad import imaging, nodule


def _tissue(h=200, w=300, seed=0) -> np.ndarray:
    """Speckle-like grey tissue with a dark oval 'nodule' centred at (150, 100)."""
    rng = np.random.default_rng(seed)
    grey = rng.integers(60, 200, (h, w)).astype(np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    grey[((xx - 150) / 40) ** 2 + ((yy - 100) / 25) ** 2 < 1] = 30
    return np.repeat(grey[:, :, None], 3, axis=2)


def _in_frame(tissue: np.ndarray, frame_hw, at) -> np.ndarray:
    """The tissue pasted into a black scanner frame with burned-in text and a ruler."""
    frame = np.zeros((*frame_hw, 3), np.uint8)
    top, left = at
    frame[top : top + tissue.shape[0], left : left + tissue.shape[1]] = tissue
    frame[2:8, 3:60:3] = 240  # 'text'
    if left + tissue.shape[1] + 4 < frame.shape[1]:
        frame[top : top + tissue.shape[0] : 9, left + tissue.shape[1] + 4] = 220  # ruler
    return frame


NODULE = (110, 75, 80, 50)  # x, y, w, h of the oval in tissue coordinates


def test_without_roi_it_is_todays_prepare():
    frame = _in_frame(_tissue(), (360, 560), (80, 130))
    square, geometry = imaging.prepare_input(frame, 64)
    ref_square, ref_geometry = imaging.prepare_with_geometry(frame, 64)
    assert np.array_equal(square, ref_square) and geometry == ref_geometry
    assert np.array_equal(imaging.load_prepared(_png(frame), 64), ref_square)


def test_roi_crop_does_not_see_the_scanner():
    """The same nodule in frames of other sizes, aspect ratios, fields of view, positions
    and burned-in marks: the same model input."""
    wide = _tissue(300, 450)  # a wider field of view around the same nodule
    wide[50:250, 75:375] = tissue = _tissue()
    frames = [
        (_in_frame(tissue, (360, 560), (80, 130)), (80, 130)),
        (_in_frame(tissue, (225, 300), (12, 0)), (12, 0)),
        (_in_frame(wide, (600, 500), (250, 20)), (250 + 50, 20 + 75)),
    ]
    x, y, w, h = NODULE
    squares = [
        imaging.prepare_input(frame, 64, (x + left, y + top, w, h), 0.2)[0]
        for frame, (top, left) in frames
    ]
    assert np.array_equal(squares[0], squares[1]) and np.array_equal(squares[0], squares[2])
    # whereas the whole-frame input shows the nodule at another scale and place
    assert not np.array_equal(imaging.prepare(frames[0][0], 64), imaging.prepare(frames[2][0], 64))


def test_roi_square_is_centred_and_sized_by_the_margin():
    frame = _in_frame(_tissue(), (360, 560), (80, 130))
    roi = (NODULE[0] + 130, NODULE[1] + 80, NODULE[2], NODULE[3])
    for margin in (0.0, 0.25, 0.5):
        square, geometry = imaging.prepare_input(frame, 100, roi, margin)
        top, left, bottom, right = geometry.box
        side = round(80 * (1 + 2 * margin))
        assert (bottom - top, right - left) == (side, side)  # fits: no padding
        assert (left + right) / 2 == pytest.approx(roi[0] + roi[2] / 2, abs=1)
        assert (top + bottom) / 2 == pytest.approx(roi[1] + roi[3] / 2, abs=1)
        # across its middle, the oval fills 1 / (1 + 2 margin) of the square
        dark = square[50, :, 0] < 45
        assert dark.sum() == pytest.approx(100 / (1 + 2 * margin), rel=0.1)


def test_roi_square_stays_inside_the_ultrasound_content():
    tissue = _tissue()
    frame = _in_frame(tissue, (360, 560), (80, 130))
    roi = (130 + 250, 80 + 10, 40, 40)  # near the content's top-right corner
    square, geometry = imaging.prepare_input(frame, 64, roi, 0.5)
    top, left, bottom, right = geometry.box
    assert (top, right) == (80, 130 + 300)  # shifted back inside, not into the text/ruler
    assert geometry.placed == (0, 0, 64, 64) and square.min() > 0  # no black padding


def test_roi_square_larger_than_the_content_is_padded_black():
    frame = _in_frame(_tissue(), (360, 560), (80, 130))
    roi = (130 + 90, 80 + 40, 120, 100)  # side 240: wider than the 200 rows of content
    square, geometry = imaging.prepare_input(frame, 64, roi, 0.5)
    top, left, bottom, right = geometry.box
    assert (top, bottom, right - left) == (80, 280, 240)  # every row, nothing outside
    pt, pl, ph, pw = geometry.placed
    assert pl == 0 and pw == 64 and ph == round(200 * 64 / 240)
    assert pt > 0 and square[:pt].max() == 0 and square[pt + ph :].max() == 0


def test_heatmap_maps_back_onto_the_crop_and_masks_round_trip():
    frame = _in_frame(_tissue(), (360, 560), (80, 130))
    roi = (NODULE[0] + 130, NODULE[1] + 80, NODULE[2], NODULE[3])
    _, geometry = imaging.prepare_input(frame, 64, roi, 0.25)
    full = imaging.to_original(np.ones((8, 8), np.float32), geometry)
    top, left, bottom, right = geometry.box
    assert full.shape == (360, 560)
    assert full[top:bottom, left:right].min() > 0.99 and full.sum() == pytest.approx(
        (bottom - top) * (right - left), rel=0.01
    )
    truth = np.zeros((360, 560), np.float32)
    truth[roi[1] : roi[1] + roi[3], roi[0] : roi[0] + roi[2]] = 1
    on_square = imaging.to_square(truth, geometry)
    back = imaging.to_original(on_square, geometry) > 0.5
    assert (back & (truth > 0)).sum() / (back | (truth > 0)).sum() > 0.9


@pytest.mark.parametrize(
    ("roi", "message"),
    [
        ((-1, 0, 10, 10), "not inside"),
        ((0, 0, 600, 10), "not inside"),
        ((550, 350, 20, 20), "not inside"),
        ((10, 10, 0, 5), "positive"),
        ((10, 10, 5, -3), "positive"),
        ((10, 10, 5), "four integers"),
        ((10, 10, 5.5, 3), "four integers"),
        ((True, 10, 5, 3), "four integers"),
        ("10,10,5,3", "four integers"),
        (None, "four integers"),
    ],
)
def test_nonsense_boxes_are_refused(roi, message):
    with pytest.raises(imaging.RoiError, match=message):
        imaging.check_roi(roi, 360, 560)


def test_clip_roi():
    assert imaging.clip_roi((10, 20, 30, 40), 100, 100) == (10, 20, 30, 40)
    assert imaging.clip_roi((-2, 90, 30, 20), 100, 100) == (0, 90, 28, 10)
    assert imaging.clip_roi((100, 0, 5, 5), 100, 100) is None


def test_parse_roi():
    assert imaging.parse_roi(" 1, 2,3 ,4") == (1, 2, 3, 4)
    for text in ("1,2,3", "1,2,3,4,5", "a,b,c,d", "1.5,2,3,4", ""):
        with pytest.raises(imaging.RoiError, match="four integers"):
            imaging.parse_roi(text)


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return buf.getvalue()


def test_load_prepared_with_roi_decodes_then_crops():
    frame = _in_frame(_tissue(), (360, 560), (80, 130))
    roi = (NODULE[0] + 130, NODULE[1] + 80, NODULE[2], NODULE[3])
    got = imaging.load_prepared(_png(frame), 48, roi, 0.3)
    assert np.array_equal(got, imaging.prepare_input(frame, 48, roi, 0.3)[0])


# --------------------------------------------------------------------------- #
# thyroid_cad.nodule
# --------------------------------------------------------------------------- #
def test_proposal_is_the_largest_component_on_the_frame():
    frame = _in_frame(_tissue(), (360, 560), (80, 130))
    _, geometry = imaging.prepare_input(frame, 64)
    prob = np.zeros((64, 64), np.float32)
    prob[20:30, 30:44] = 0.9  # the nodule
    prob[50:52, 5:7] = 0.8  # a speck
    proposal = nodule.propose(prob, geometry)
    # the square covers the 300 x 200 content box from (130, 80): 300 / 64 px per cell
    scale = 300 / 64
    x, y, w, h = proposal.box
    assert x == pytest.approx(130 + 30 * scale, abs=scale)
    assert w == pytest.approx(14 * scale, abs=2 * scale)
    assert proposal.mask.shape == (360, 560) and proposal.score == pytest.approx(0.9, abs=0.01)
    assert nodule.propose(np.zeros((64, 64), np.float32), geometry).box is None
    # within a box drawn around the speck, the speck is the nodule
    speck = nodule.propose(prob, geometry, within=(130 + 10, 80 + 150, 40, 40)).box
    assert speck is not None and speck[2] < 20 and speck[1] >= 80 + 150
    # a box drawn tighter than the nodule (cutting its sides) measures the whole nodule:
    # clipped, a 14 x 10 cell nodule in a box 5 cells wide read as taller than wide
    tight = (round(130 + 34 * scale), round(80 + 18 * scale), round(5 * scale), round(14 * scale))
    drawn = nodule.propose(prob, geometry, within=tight)
    assert drawn.box == proposal.box
    assert nodule.shape(drawn.mask) == nodule.shape(proposal.mask)
    assert nodule.shape(drawn.mask)["taller_than_wide"] is False
    assert nodule.propose(prob, geometry, within=(130, 80, 20, 20)).box is None  # empty box


def test_shape_taller_than_wide_area_and_mm():
    mask = np.zeros((100, 100), bool)
    mask[10:50, 20:40] = True  # 20 wide, 40 deep
    mask[80:82, 80:82] = True  # ignored: not the largest
    s = nodule.shape(mask)
    assert (s["width_px"], s["depth_px"], s["area_px"]) == (20, 40, 800)
    assert s["taller_than_wide_ratio"] == 2.0 and s["taller_than_wide"] is True
    assert s["width_mm"] is None and s["spacing_mm"] is None
    mm = nodule.shape(mask, (0.1, 0.04))  # anisotropic: 2.0 mm wide, 1.6 mm deep
    assert mm["width_mm"] == 2.0 and mm["depth_mm"] == 1.6 and mm["area_mm2"] == 3.2
    assert mm["taller_than_wide"] is False and mm["taller_than_wide_ratio"] == 0.8
    assert nodule.shape(np.zeros((5, 5), bool)) is None


def _region(**kw):
    base = dict(
        RegionSpatialFormat=1,
        PhysicalUnitsXDirection=3,
        PhysicalUnitsYDirection=3,
        PhysicalDeltaX=0.005,
        PhysicalDeltaY=0.005,
        RegionLocationMinX0=0,
        RegionLocationMinY0=0,
        RegionLocationMaxX1=399,
        RegionLocationMaxY1=299,
    )
    return SimpleNamespace(**{**base, **kw})


def test_ultrasound_spacing_from_dicom_regions():
    ds = SimpleNamespace(SequenceOfUltrasoundRegions=[_region()])
    assert nodule.ultrasound_spacing_mm(ds) == (0.05, 0.05)
    assert nodule.ultrasound_spacing_mm(SimpleNamespace()) is None
    not_cm = SimpleNamespace(SequenceOfUltrasoundRegions=[_region(PhysicalUnitsXDirection=4)])
    assert nodule.ultrasound_spacing_mm(not_cm) is None
    doppler = SimpleNamespace(SequenceOfUltrasoundRegions=[_region(RegionSpatialFormat=3)])
    assert nodule.ultrasound_spacing_mm(doppler) is None
    two = SimpleNamespace(
        SequenceOfUltrasoundRegions=[
            _region(RegionLocationMaxX1=199),
            _region(PhysicalDeltaX=0.01, PhysicalDeltaY=0.01, RegionLocationMinX0=200),
        ]
    )
    assert nodule.ultrasound_spacing_mm(two) is None  # disagree, and no point given
    assert nodule.ultrasound_spacing_mm(two, point=(250, 10)) == (0.1, 0.1)


def test_ultrasound_spacing_from_a_real_pydicom_dataset():
    pydicom = pytest.importorskip("pydicom", reason="pydicom is in the serve extra")
    ds = pydicom.Dataset()
    region = pydicom.Dataset()
    region.RegionSpatialFormat = 1
    region.PhysicalUnitsXDirection = 3
    region.PhysicalUnitsYDirection = 3
    region.PhysicalDeltaX = 0.0125
    region.PhysicalDeltaY = 0.01
    ds.SequenceOfUltrasoundRegions = [region]
    assert nodule.ultrasound_spacing_mm(ds) == (0.125, 0.1)
