"""Synthetic thyroid-ultrasound phantom ("demo data").

Everything this module produces is SYNTHETIC: procedurally generated B-mode-like
frames, not patient images, and not for diagnostic use. They exist so that the
quickstart, the tests and the training pipeline have something to run on
without access to a clinical data set.

Image model (all arrays are ``size`` x ``size``, row = depth / axial direction):

* an echogenicity map of neck anatomy in a transverse view: skin line,
  subcutaneous fat, strap muscles, a homogeneous thyroid lobe with a bright
  capsule, optionally the carotid artery (anechoic circle) and the trachea
  (bright arc with an acoustic shadow), small vessels (dark circles);
* a nodule whose features follow the TI-RADS categories that separate benign
  from malignant lesions (see :func:`_sample_nodule`);
* fully developed speckle: the magnitude of a smoothed complex Gaussian field,
  i.e. Rayleigh-distributed, with a point-spread function that is longer along
  the axial direction than laterally, applied multiplicatively;
* depth-dependent attenuation, log compression to a random dynamic range;
* a scanner-like frame: black border around a linear (rectangular) or convex
  (sector) field of view, a burned-in text block in the top-left corner and a
  ruler of tick marks on the right, so crop-to-content preprocessing has
  something to remove.

Everything is drawn from the ``numpy.random.Generator`` passed in, so frames
are deterministic given the generator state, and :func:`generate` is
deterministic given its seed (byte-identical PNGs).
"""

from __future__ import annotations

import csv
import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

__all__ = [
    "ANNOTATIONS",
    "CLASS_NAMES_2",
    "CLASS_NAMES_3",
    "README_FIRST_LINE",
    "Frame",
    "generate",
    "make_image",
    "render_frame",
]

CLASS_NAMES_2 = ("benign", "malignant")
CLASS_NAMES_3 = ("normal", "benign", "malignant")

#: Nodule boxes, outlines and TI-RADS descriptors, in the columns (and the spellings) of
#: thyroid-seed's ddti-annotations.csv.
ANNOTATIONS = "annotations.csv"
DESCRIPTOR_COLUMNS = ("composition", "echogenicity", "margins", "calcifications")
ANNOTATION_COLUMNS = ("image", "case_id", "nodule_box_xywh", "nodule_polygons", *DESCRIPTOR_COLUMNS)

#: First line of ``README.txt``; it is how a previous phantom directory is recognised.
README_FIRST_LINE = "SYNTHETIC THYROID ULTRASOUND PHANTOM - thyroid-cad demo-data"

# Stable per-label seed component, independent of ``classes`` (so e.g. the benign
# images of a 2-class and a 3-class phantom with the same seed are identical).
_LABEL_CODE = {"normal": 0, "benign": 1, "malignant": 2}
_PNG_RE = re.compile(r"^(normal|benign|malignant)_\d{4,}\.png$")


# --------------------------------------------------------------------------- #
# Parameters
# --------------------------------------------------------------------------- #
@dataclass
class _Nodule:
    kind: str  # "iso", "hyper", "cystic" (benign) or "hypo" (malignant)
    cx: float  # centre, fraction of size
    cy: float
    ax: float  # semi-axis along the (rotated) horizontal, fraction of size
    ay: float  # semi-axis along the (rotated) vertical, fraction of size
    angle: float  # radians
    echo: float  # echogenicity relative to parenchyma (= 1.0)
    harmonics: list[tuple[int, float, float]]  # (k, amplitude, phase) margin terms
    spicules: tuple[int, float, float] | None  # (count, amplitude, phase)
    edge: float  # margin blur, fraction of size
    halo: float  # width of a hypoechoic halo, fraction of size (0 = none)
    posterior: float  # >1 enhancement, <1 shadowing, 1 = none
    calcs: list[tuple[float, float, float]]  # (u, v, amplitude), u/v in [-1, 1] nodule coords


@dataclass
class _Case:
    label: str
    convex: bool
    curvature: float  # convex probe: radius of the probe face / half the FOV width
    fov: tuple[float, float, float, float]  # top, bottom, left, right (fractions)
    lobe: tuple[float, float, float, float]  # cx, cy, ax, ay (fractions)
    carotid: tuple[float, float, float] | None  # cx, cy, r
    trachea: tuple[float, float, float] | None  # cx, cy, r
    vessels: list[tuple[float, float, float]]  # cx, cy, r
    nodule: _Nodule | None
    skin: float  # depth of the skin line below the FOV top, fraction
    fat: float  # bottom of subcutaneous fat
    muscle_phase: float
    texture: np.ndarray  # coarse low-frequency echogenicity variation (8x8)
    shading: np.ndarray  # very coarse gain over the whole frame (3x3, nepers): probe contact
    alpha: float  # attenuation over the full FOV depth, nepers
    dyn_range: float  # dB
    gain: float  # dB offset
    text: np.ndarray  # boolean glyph pattern of the burned-in text block
    ruler_ticks: int


@dataclass
class Frame:
    """A rendered frame plus the ground truth used to draw it.

    ``nodule_mask`` is a boolean ``size x size`` array (all False for ``normal``);
    ``fov_mask`` marks the imaged field of view; ``features`` is a small dict of
    the TI-RADS-like features that were drawn (``kind``, ``taller_than_wide``,
    ``echogenic_foci``, ``posterior``, ``spiculated``); ``outline`` is the nodule's
    margin as a closed polygon of ``[x, y]`` pixel points (empty for ``normal``), as a
    radiologist's outline in DDTI's annotations.
    """

    image: np.ndarray
    nodule_mask: np.ndarray
    fov_mask: np.ndarray
    features: dict = field(default_factory=dict)
    outline: list = field(default_factory=list)


def _check_label(label: str) -> None:
    if label not in _LABEL_CODE:
        raise ValueError(f"unknown label {label!r}; expected one of {CLASS_NAMES_3}")


def _check_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 32:
        raise ValueError(f"size must be an integer >= 32, got {size!r}")


def _sample_nodule(label: str, rng: np.random.Generator, lobe: tuple) -> _Nodule:
    """Draw nodule parameters.

    benign: oval, wider than tall, smooth well-defined margin, iso- (with a thin
    hypoechoic halo), hyperechoic or cystic (anechoic with posterior
    enhancement); no echogenic foci.
    malignant: markedly hypoechoic, taller than wide, lobulated / irregular and
    often spiculated margin, punctate echogenic foci, sometimes posterior
    shadowing.
    """
    lcx, lcy, lax, lay = lobe
    angle = float(rng.uniform(-0.35, 0.35))
    if label == "benign":
        kind = str(rng.choice(["iso", "hyper", "cystic"], p=[0.35, 0.4, 0.25]))
        ax = float(rng.uniform(0.085, 0.16))
        ay = ax * float(rng.uniform(0.55, 0.85))
        echo = {
            "iso": float(rng.uniform(0.9, 1.15)),
            "hyper": float(rng.uniform(1.7, 2.6)),
            "cystic": float(rng.uniform(0.01, 0.04)),
        }[kind]
        harmonics = [
            (k, float(rng.uniform(0.0, 0.03)), float(rng.uniform(0, 2 * np.pi))) for k in (2, 3)
        ]
        spicules = None
        edge = float(rng.uniform(0.002, 0.004))
        halo = float(rng.uniform(0.006, 0.012)) if kind == "iso" else 0.0
        posterior = float(rng.uniform(1.5, 2.0)) if kind == "cystic" else 1.0
        calcs: list[tuple[float, float, float]] = []
    else:
        kind = "hypo"
        ay = float(rng.uniform(0.085, 0.15))
        ax = ay * float(rng.uniform(0.55, 0.85))
        echo = float(rng.uniform(0.08, 0.25))
        harmonics = [
            (int(k), float(rng.uniform(0.04, 0.12)), float(rng.uniform(0, 2 * np.pi)))
            for k in rng.choice(np.arange(2, 8), size=3, replace=False)
        ]
        spicules = None
        if rng.random() < 0.6:
            spicules = (
                int(rng.integers(9, 18)),
                float(rng.uniform(0.15, 0.35)),
                float(rng.uniform(0, 2 * np.pi)),
            )
        edge = float(rng.uniform(0.004, 0.008))
        halo = 0.0
        posterior = float(rng.uniform(0.35, 0.65)) if rng.random() < 0.45 else 1.0
        # punctate echogenic foci, roughly one per (0.03 * size)^2 of nodule area
        n_calcs = 0
        if rng.random() < 0.85:
            n_calcs = int(np.clip(rng.poisson(np.pi * ax * ay / 0.03**2 * 0.5), 2, 8))
        calcs = []
        while len(calcs) < n_calcs:
            u, v = rng.uniform(-0.7, 0.7, size=2)
            if u * u + v * v <= 0.5:
                calcs.append((float(u), float(v), float(rng.uniform(4.0, 9.0))))
    # keep the nodule mostly inside the lobe
    ext_x = max(ax, ay) * 1.1
    ext_y = max(ax, ay) * 1.1
    cx = lcx + float(rng.uniform(-1, 1)) * max(lax - ext_x, 0.0) * 0.7
    cy = lcy + float(rng.uniform(-1, 1)) * max(lay - ext_y, 0.0) * 0.6
    return _Nodule(
        kind, cx, cy, ax, ay, angle, echo, harmonics, spicules, edge, halo, posterior, calcs
    )


def _sample_case(label: str, rng: np.random.Generator) -> _Case:
    _check_label(label)
    convex = bool(rng.random() < 0.25)
    top = float(rng.uniform(0.08, 0.12))
    bottom = float(rng.uniform(0.93, 0.97))
    left = float(rng.uniform(0.06, 0.12))
    right = float(rng.uniform(0.84, 0.88))
    depth = bottom - top

    skin = float(rng.uniform(0.015, 0.03))
    fat = skin + float(rng.uniform(0.02, 0.1))
    lax = float(rng.uniform(0.2, 0.34))
    lay = float(rng.uniform(0.14, 0.24))
    lcx = float(rng.uniform(0.35, 0.65))
    lcy = top + fat * depth + 0.1 + lay + float(rng.uniform(0.0, 0.1))

    nodule = None
    if label != "normal":
        nodule = _sample_nodule(label, rng, (lcx, lcy, lax, lay))
        # a big nodule expands the lobe around it
        need_y = max(nodule.ax, nodule.ay) * 1.25
        lay = max(lay, need_y + abs(nodule.cy - lcy))
        lax = max(lax, max(nodule.ax, nodule.ay) * 1.25 + abs(nodule.cx - lcx))

    side = 1.0 if rng.random() < 0.5 else -1.0  # carotid lateral, trachea medial
    carotid = None
    if rng.random() < 0.7:
        r = float(rng.uniform(0.05, 0.1))
        carotid = (lcx + side * (lax + r * 0.3), lcy + lay * float(rng.uniform(0.0, 0.8)), r)
    trachea = None
    if rng.random() < 0.35:
        r = float(rng.uniform(0.09, 0.13))
        trachea = (lcx - side * (lax + r * 0.6), lcy + r * 0.2, r)

    n_vessels = int(rng.integers(1, 5)) if label == "normal" else int(rng.integers(0, 3))
    vessels: list[tuple[float, float, float]] = []
    for _ in range(20):
        if len(vessels) >= n_vessels:
            break
        t = rng.uniform(0, 2 * np.pi)
        s = np.sqrt(rng.uniform(0, 0.7))
        vx = lcx + lax * s * np.cos(t)
        vy = lcy + lay * s * np.sin(t)
        vr = float(rng.uniform(0.008, 0.016))
        if nodule is not None:
            d = np.hypot(vx - nodule.cx, vy - nodule.cy)
            if d < max(nodule.ax, nodule.ay) * 1.4 + vr:
                continue
        vessels.append((float(vx), float(vy), vr))

    text_rows = int(rng.integers(2, 4))
    n_chars = int(rng.integers(8, 15))
    glyphs = rng.random((text_rows, n_chars, 5, 3)) < 0.55
    glyphs[:, rng.random(n_chars) < 0.15] = False  # spaces
    # lay out as (rows*6) x (chars*4) pixels with one blank row/column between glyphs
    text = np.zeros((text_rows, 6, n_chars, 4), dtype=bool)
    text[:, :5, :, :3] = glyphs.transpose(0, 2, 1, 3)
    text = text.reshape(text_rows * 6, n_chars * 4)

    return _Case(
        label=label,
        convex=convex,
        curvature=float(rng.uniform(1.1, 2.0)),
        fov=(top, bottom, left, right),
        lobe=(lcx, lcy, lax, lay),
        carotid=carotid,
        trachea=trachea,
        vessels=vessels,
        nodule=nodule,
        skin=skin,
        fat=fat,
        muscle_phase=float(rng.uniform(0, 2 * np.pi)),
        texture=rng.normal(0.0, float(rng.uniform(1.0, 3.0)), size=(8, 8)),
        # mostly lateral (uneven probe contact), so depth still darkens the frame
        shading=rng.normal(0.0, 1.0, size=(1, 3)) + rng.normal(0.0, 0.3, size=(3, 3)),
        alpha=float(rng.uniform(0.6, 2.0)),
        dyn_range=float(rng.uniform(55.0, 65.0)),
        gain=float(rng.uniform(-3.0, 3.0)),
        text=text,
        ruler_ticks=int(rng.integers(4, 7)),
    )


# --------------------------------------------------------------------------- #
# Rendering
# --------------------------------------------------------------------------- #
@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


def _window(s: int, cx: float, cy: float, half: float):
    """Slices of the ``s x s`` image covering a square of half-width ``half`` around (cx, cy),
    and the local pixel coordinates (xx, yy) relative to (cx, cy)."""
    y0, y1 = max(int(np.floor(cy - half)), 0), min(int(np.ceil(cy + half)) + 1, s)
    x0, x1 = max(int(np.floor(cx - half)), 0), min(int(np.ceil(cx + half)) + 1, s)
    y1, x1 = max(y1, y0), max(x1, x0)
    yy = np.arange(y0, y1, dtype=np.float32)[:, None] - np.float32(cy)
    xx = np.arange(x0, x1, dtype=np.float32)[None, :] - np.float32(cx)
    return (slice(y0, y1), slice(x0, x1)), xx, yy


def _disc(s: int, cx: float, cy: float, r: float, edge: float = 1.0) -> np.ndarray:
    """Soft disc membership in [0, 1] (pixels), as a full ``s x s`` float32 array."""
    out = np.zeros((s, s), dtype=np.float32)
    win, xx, yy = _window(s, cx, cy, r + edge + 2)
    out[win] = np.clip((r - np.hypot(xx, yy)) / max(edge, 0.5) + 0.5, 0.0, 1.0)
    return out


def _blend(base: np.ndarray, memb: np.ndarray, value) -> np.ndarray:
    return base + memb * (value - base)


def _nodule_maps(nod: _Nodule, s: int, dx: float, dy: float):
    """Soft nodule membership, soft halo ring (both full size) and the nodule frame."""
    cx, cy = nod.cx * s + dx, nod.cy * s + dy
    ax, ay = nod.ax * s, nod.ay * s
    c, sn = float(np.cos(nod.angle)), float(np.sin(nod.angle))
    spic_amp = nod.spicules[1] if nod.spicules is not None else 0.0
    reach = 1.0 + sum(abs(a) for _, a, _ in nod.harmonics) + spic_amp
    halo_px = nod.halo * s
    win, xx, yy = _window(s, cx, cy, max(ax, ay) * reach + halo_px + 3)
    u = xx * c + yy * sn
    v = -xx * sn + yy * c
    un, vn = u / ax, v / ay
    rho = np.hypot(un, vn)
    theta = np.arctan2(vn, un)
    bound = np.ones_like(rho)
    for k, amp, ph in nod.harmonics:
        bound += np.float32(amp) * np.cos(k * theta + np.float32(ph))
    if nod.spicules is not None:
        n, amp, ph = nod.spicules
        bound += np.float32(amp) * np.maximum(np.cos(n * theta + np.float32(ph)), 0.0) ** 6
    scale = min(ax, ay)
    edge_px = max(nod.edge * s, 0.5)
    memb = np.zeros((s, s), dtype=np.float32)
    memb[win] = np.clip((bound - rho) * (scale / edge_px) + 0.5, 0.0, 1.0)
    halo = np.zeros((s, s), dtype=np.float32)
    if halo_px > 0:
        outer = np.clip((bound - rho) * scale + halo_px + 0.5, 0.0, 1.0)
        halo[win] = outer
        halo -= memb
    return memb, halo, (cx, cy, ax, ay, c, sn)


def _outline(nod: _Nodule, s: int, dx: float, dy: float, points: int = 96) -> list:
    """The nodule's margin (where _nodule_maps' membership crosses 0.5) as integer
    [x, y] points, clipped to the frame."""
    cx, cy = nod.cx * s + dx, nod.cy * s + dy
    ax, ay = nod.ax * s, nod.ay * s
    c, sn = float(np.cos(nod.angle)), float(np.sin(nod.angle))
    theta = np.linspace(0.0, 2 * np.pi, points, endpoint=False)
    bound = np.ones_like(theta)
    for k, amp, ph in nod.harmonics:
        bound += amp * np.cos(k * theta + ph)
    if nod.spicules is not None:
        n, amp, ph = nod.spicules
        bound += amp * np.maximum(np.cos(n * theta + ph), 0.0) ** 6
    # theta is the angle in the nodule's normalised (u / ax, v / ay) coordinates
    u, v = bound * np.cos(theta) * ax, bound * np.sin(theta) * ay
    x = np.clip(np.rint(cx + u * c - v * sn), 0, s - 1)
    y = np.clip(np.rint(cy + u * sn + v * c), 0, s - 1)
    return [[int(a), int(b)] for a, b in zip(x, y, strict=True)]


def _posterior(inside: np.ndarray, factor: float, s: int) -> np.ndarray | float:
    """Multiplicative map that enhances (>1) / shadows (<1) the region below ``inside``."""
    if factor == 1.0 or not inside.any():
        return 1.0
    has = inside.any(axis=0)
    bottom = (inside.shape[0] - 1 - np.argmax(inside[::-1], axis=0)).astype(np.float32)
    lateral = ndimage.gaussian_filter1d(has.astype(np.float32), max(s * 0.01, 0.5))
    lateral = np.clip(lateral, 0.0, 1.0)
    yy, _ = _grid(s)
    below = yy - bottom[None, :]
    ramp = np.clip(below / max(s * 0.02, 1.0), 0.0, 1.0) * np.exp(-np.maximum(below, 0) / s)
    return 1.0 + np.float32(factor - 1.0) * ramp * lateral[None, :]


def _upsample(coarse: np.ndarray, s: int) -> np.ndarray:
    """Bilinear upsampling of a small square array to ``s x s`` (separable, no BLAS)."""
    n = coarse.shape[0]
    pos = np.linspace(0.0, n - 1.0, s)
    i0 = np.minimum(pos.astype(np.int64), n - 2)
    f = (pos - i0)[:, None]
    rows = coarse[i0] * (1.0 - f) + coarse[i0 + 1] * f  # (s, n)
    out = rows[:, i0] * (1.0 - f.T) + rows[:, i0 + 1] * f.T  # (s, s)
    return out.astype(np.float32)


def _render(case: _Case, rng: np.random.Generator, s: int, shift: tuple[float, float]) -> Frame:
    yy, xx = _grid(s)
    dx, dy = shift
    top, bottom, left, right = case.fov
    t_px, b_px, l_px, r_px = top * s, bottom * s, left * s, right * s

    # ---- field of view and depth coordinate (0 at the probe face, 1 at the bottom) --
    if case.convex:
        cxp = (l_px + r_px) / 2
        half = (r_px - l_px) / 2
        radius0 = half * case.curvature  # radius of curvature of the probe face
        apex_y = t_px - radius0 * np.cos(np.arcsin(min(half * 0.55 / radius0, 0.99)))
        rr = np.hypot(xx - cxp, yy - apex_y)
        ang = np.arctan2(xx - cxp, yy - apex_y)
        r1 = b_px - apex_y
        half_ang = np.arcsin(min(half / r1, 0.99))
        fov = (rr >= radius0) & (rr <= r1) & (np.abs(ang) <= half_ang)
        depth = np.clip((rr - radius0) / (r1 - radius0), 0.0, 1.0)
    else:
        fov = (yy >= t_px) & (yy <= b_px) & (xx >= l_px) & (xx <= r_px)
        depth = np.clip((yy - t_px) / (b_px - t_px), 0.0, 1.0)

    # ---- echogenicity map (parenchyma = 1.0) ---------------------------------
    lcx, lcy, lax, lay = case.lobe
    lcx_p, lcy_p, lax_p, lay_p = lcx * s + dx, lcy * s + dy, lax * s, lay * s
    echo = 0.55 * np.exp(0.12 * _upsample(case.texture, s))  # deep soft tissue
    dd = (yy - t_px - dy) / s  # depth below the probe face, fraction of size
    curve = ((xx - lcx_p) / s) ** 2 * 0.25
    muscle_bottom = lcy - lay - top + 0.01
    striation = 0.35 * (1.0 + 0.25 * np.sin(dd * (s * 0.35) + case.muscle_phase))
    echo = np.where(dd < muscle_bottom + curve * 0.5, striation, echo)  # strap muscles
    echo = np.where(dd < case.fat + curve, np.float32(0.5), echo)  # subcutaneous fat
    echo = np.where(dd < case.skin, np.float32(1.8), echo)  # skin line

    lrho = np.hypot((xx - lcx_p) / lax_p, (yy - lcy_p) / lay_p)
    cap_w = max(s * 0.006, 0.6) / min(lax_p, lay_p)
    lobe_m = np.clip((1.0 - lrho) / cap_w + 0.5, 0.0, 1.0)
    echo = _blend(echo, lobe_m, 1.0) + 0.5 * np.exp(-(((lrho - 1.0) / cap_w) ** 2))

    for cx, cy, r in case.vessels:
        echo = _blend(echo, _disc(s, cx * s + dx, cy * s + dy, r * s, 0.8), 0.04)

    post: np.ndarray | float = 1.0
    if case.carotid is not None:
        cx, cy, r = case.carotid
        cxp_, cyp_, rp = cx * s + dx, cy * s + dy, r * s
        lumen = _disc(s, cxp_, cyp_, rp)
        echo = _blend(echo, _disc(s, cxp_, cyp_, rp * 1.12), 1.6)  # bright wall
        echo = _blend(echo, lumen, 0.02)
        post = post * _posterior(lumen > 0.5, 1.5, s)
    if case.trachea is not None:
        cx, cy, r = case.trachea
        cxp_, cyp_, rp = cx * s + dx, cy * s + dy, r * s
        # bright cartilage arc, then an acoustic shadow with faint reverberation lines
        arc_y = cyp_ - np.sqrt(np.maximum(rp * rp - (xx - cxp_) ** 2, 0.0))
        inside = np.abs(xx - cxp_) < rp
        below = yy - arc_y
        arc = inside * np.exp(-((below / max(s * 0.008, 0.7)) ** 2))
        period = max(s * 0.07, 3.0)
        lines = np.cos(below * (2 * np.pi / period)) > 0.9
        reverb = 0.06 + 0.3 * np.exp(-below / (s * 0.15)) * lines
        echo = np.where(inside & (below > 0), reverb, echo)
        echo = _blend(echo, arc, 2.5)

    # ---- nodule --------------------------------------------------------------
    nodule_mask = np.zeros((s, s), dtype=bool)
    features: dict = {"kind": "none"}
    outline: list = []
    nod = case.nodule
    if nod is not None:
        outline = _outline(nod, s, dx, dy)
        memb, halo, (ncx, ncy, nax, nay, c, sn) = _nodule_maps(nod, s, dx, dy)
        if nod.halo > 0:
            echo = _blend(echo, halo, 0.3)
        echo = _blend(echo, memb, nod.echo)
        nodule_mask = memb >= 0.5
        if nod.calcs:  # punctate echogenic foci
            calc = np.zeros((s, s), dtype=np.float32)
            for u, v, amp in nod.calcs:
                ix = int(round(ncx + u * nax * c - v * nay * sn))
                iy = int(round(ncy + u * nax * sn + v * nay * c))
                if 0 <= iy < s and 0 <= ix < s:
                    calc[iy, ix] += amp
            # each focus is a Gaussian of sigma 0.9 px at size 256 with peak ``amp``; at
            # small sizes the blur is clamped to 0.5 px but the energy is preserved
            sig_phys = 0.9 * s / 256.0
            sig = max(sig_phys, 0.5)
            calc = ndimage.gaussian_filter(calc, sig) * np.float32(2 * np.pi * sig_phys**2)
            echo = echo + calc
        post = post * _posterior(nodule_mask, nod.posterior, s)
        w = int(nodule_mask.any(axis=0).sum())
        h = int(nodule_mask.any(axis=1).sum())
        features = {
            "kind": nod.kind,
            "taller_than_wide": h > w,
            "echogenic_foci": len(nod.calcs),
            "posterior": (
                "enhancement" if nod.posterior > 1 else "shadowing" if nod.posterior < 1 else "none"
            ),
            "spiculated": nod.spicules is not None,
        }

    echo = ndimage.gaussian_filter(echo * post, max(s / 256.0 * 0.6, 0.3))

    # ---- speckle ------------------------------------------------------------------
    # Each look is the envelope of a complex Gaussian scatterer field filtered by a
    # PSF that is longer axially than laterally, i.e. Rayleigh speckle; two looks are
    # compounded incoherently (as scanners do), which softens the dark crevices.
    psf = (max(2.0 * s / 256.0, 0.5), max(1.2 * s / 256.0, 0.4))  # axial, lateral
    noise = rng.standard_normal((4, s, s), dtype=np.float32)
    power = np.zeros((s, s), dtype=np.float32)
    for k in range(4):
        power += ndimage.gaussian_filter(noise[k], psf) ** 2
    env = np.sqrt(power / (np.mean(power) + np.float32(1e-12)))

    # ---- attenuation, log compression, display ----------------------------------
    inten = echo * env * np.exp(_upsample(case.shading, s) - case.alpha * depth)
    db = 20.0 * np.log10(inten + np.float32(1e-6)) + np.float32(case.gain)
    # mean parenchyma sits about 62 % up the dynamic range
    img = np.clip((db / case.dyn_range + 0.62) * 255.0, 0.0, 255.0)
    img = np.where(fov, img, 0.0).astype(np.uint8)

    _burn_in(img, case, s)
    return Frame(
        image=np.repeat(img[:, :, None], 3, axis=2),
        nodule_mask=nodule_mask & fov,
        fov_mask=fov,
        features=features,
        outline=outline,
    )


def _burn_in(img: np.ndarray, case: _Case, s: int) -> None:
    """Draw the text block (top-left) and the depth ruler (right) into ``img``."""
    top, bottom, left, right = case.fov
    # text block: fits into the black band above the field of view
    avail_h = max(int(top * s) - 2, 1)
    px = max(1, min(s // 128, avail_h // case.text.shape[0]))
    block = np.kron(case.text, np.ones((px, px), dtype=bool))
    y0, x0 = 1, max(1, s // 64)
    h = min(block.shape[0], avail_h)
    w = min(block.shape[1], s // 2)
    img[y0 : y0 + h, x0 : x0 + w][block[:h, :w]] = 235

    # ruler: tick marks along the right edge of the field of view
    gap = max(2, s // 64)
    x_start = int(right * s) + gap
    major_len, minor_len = max(2, s // 40), max(1, s // 80)
    t_px, b_px = int(top * s), int(bottom * s)
    n_major = case.ruler_ticks
    step = (b_px - t_px) / (n_major * 5)
    thick = max(1, s // 256)
    for i in range(n_major * 5 + 1):
        y = int(round(t_px + i * step))
        length = major_len if i % 5 == 0 else minor_len
        y1 = min(y + thick, s)
        img[y:y1, x_start : min(x_start + length, s)] = 220 if i % 5 == 0 else 170


# --------------------------------------------------------------------------- #
# Public API
# --------------------------------------------------------------------------- #
def render_frame(label: str, rng: np.random.Generator, size: int = 256) -> Frame:
    """Like :func:`make_image` but also returns the nodule mask and drawn features.

    Consumes ``rng`` exactly like :func:`make_image`, so both give the same image
    for the same generator state.
    """
    _check_label(label)
    _check_size(size)
    case = _sample_case(label, rng)
    return _render(case, rng, int(size), (0.0, 0.0))


def make_image(label: str, rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """One synthetic B-mode frame, uint8 HxWx3 (grey replicated to 3 channels).

    ``label`` is ``"normal"`` (no nodule), ``"benign"`` or ``"malignant"``.
    SYNTHETIC phantom, not a patient image.
    """
    return render_frame(label, rng, size).image


def _is_previous_phantom(out: Path) -> bool:
    """True if every file under ``out`` belongs to a phantom written by :func:`generate`."""
    readme = out / "README.txt"
    try:
        with readme.open(encoding="utf-8") as fh:
            first = fh.readline().strip()
    except (OSError, UnicodeDecodeError):
        return False
    if first != README_FIRST_LINE:
        return False
    for p in out.rglob("*"):
        rel = p.relative_to(out).parts
        if p.is_symlink():  # could lead outside ``out``; never delete through it
            return False
        if p.is_dir():
            if len(rel) == 1 and rel[0] in _LABEL_CODE:
                continue
            return False
        if len(rel) == 1 and rel[0] in ("README.txt", "manifest.csv", ANNOTATIONS):
            continue
        if (
            len(rel) == 2
            and rel[0] in _LABEL_CODE
            and _PNG_RE.match(rel[1])
            and rel[1].startswith(rel[0] + "_")
        ):
            continue
        return False
    return True


def _clear_previous_phantom(out: Path) -> None:
    for name in ("README.txt", "manifest.csv", ANNOTATIONS):
        (out / name).unlink(missing_ok=True)
    for label in _LABEL_CODE:
        d = out / label
        if d.is_dir():
            for p in d.iterdir():
                p.unlink()
            d.rmdir()


def _readme(
    classes: int, per_class: int, seed: int, size: int, counts: dict | None, n_cases: int | None
) -> str:
    if counts is None:
        summary = "Images: (generation incomplete)\n"
    else:
        names = ", ".join(f"{k}={v}" for k, v in counts.items())
        summary = (
            f"Images: {names} ({n_cases} cases; images of one case share a case_id and label).\n"
        )
    return (
        f"{README_FIRST_LINE}\n"
        "\n"
        "This is SYNTHETIC phantom data, procedurally generated by a computer program.\n"
        "These are not patient images and contain no patient data.\n"
        "Not for diagnostic use. Not for clinical use.\n"
        "They only loosely resemble thyroid ultrasound; a model trained on them says\n"
        "nothing about its performance on real scans.\n"
        "\n"
        f"Generated by thyroid-cad demo-data (training/phantom.py) with seed={seed}, "
        f"classes={classes}, size={size}, per_class={per_class}.\n"
        f"{summary}"
        "\n"
        "Layout: <class>/<class>_NNNN.png and manifest.csv (columns image,case_id; image is\n"
        "relative to this directory). Split by case_id to avoid leakage between splits.\n"
        f"{ANNOTATIONS}: the drawn nodule's box and outline per image, in the format of\n"
        "DDTI's annotations (image,case_id,nodule_box_xywh,nodule_polygons; empty for normal),\n"
        "and the drawn nodule's TI-RADS descriptors in DDTI's words (composition,\n"
        "echogenicity,margins,calcifications).\n"
    )


def _descriptors(nod: _Nodule | None) -> tuple[str, str, str, str]:
    """The drawn nodule's composition, echogenicity, margins and calcifications as DDTI
    writes them (empty for no nodule; a cyst's echogenicity is left empty, as DDTI often
    leaves it, so the masked descriptor loss has something to skip)."""
    if nod is None:
        return "", "", "", ""
    echo = {"iso": "isoechogenicity", "hyper": "hyperechogenicity", "cystic": ""}
    margins = "well defined" if nod.kind != "hypo" else "microlobulated"
    return (
        "cystic" if nod.kind == "cystic" else "solid",
        echo.get(nod.kind, "marked hypoechogenicity"),
        "spiculated" if nod.spicules is not None else margins,
        "microcalcifications" if nod.calcs else "non",
    )


def _box_and_polygons(outline: list) -> tuple[str, str]:
    """DDTI's nodule_box_xywh and nodule_polygons cells for one outline (empty: none)."""
    if not outline:
        return "", ""
    xs, ys = [p[0] for p in outline], [p[1] for p in outline]
    box = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
    return json.dumps(box), json.dumps([outline])


def generate(out: Path, per_class: int, classes: int = 2, seed: int = 0, size: int = 256) -> dict:
    """Write `out/<class>/<class>_<i:04d>.png` images plus `out/manifest.csv` (columns image,case_id), `out/annotations.csv` (nodule boxes and outlines) and `out/README.txt`; returns {class_name: count}.

    Each case (``phantom-<class>-<n>``) holds 1-3 images of the same nodule with a
    different speckle realisation and a small shift. ``out`` is created if needed;
    a non-empty ``out`` is only accepted (and replaced) if it holds nothing but a
    previous phantom, otherwise ``ValueError`` is raised.
    """  # noqa: E501
    if (
        isinstance(classes, bool)
        or not isinstance(classes, (int, np.integer))
        or classes not in (2, 3)
    ):
        raise ValueError(f"classes must be 2 or 3, got {classes!r}")
    if isinstance(per_class, bool) or not isinstance(per_class, (int, np.integer)) or per_class < 1:
        raise ValueError(f"per_class must be an integer >= 1, got {per_class!r}")
    _check_size(size)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output path {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not _is_previous_phantom(out):
            raise ValueError(
                f"output directory {out} is not empty and is not a previous thyroid-cad "
                "phantom; refusing to mix synthetic images into it (choose an empty or new "
                "directory)"
            )
        _clear_previous_phantom(out)
    out.mkdir(parents=True, exist_ok=True)
    # README first, so an interrupted run is still recognised as a phantom and replaced
    (out / "README.txt").write_text(
        _readme(classes, per_class, seed, size, None, None), encoding="utf-8"
    )

    names = CLASS_NAMES_2 if classes == 2 else CLASS_NAMES_3
    size, per_class, seed = int(size), int(per_class), int(seed)
    counts: dict[str, int] = {}
    rows: list[tuple[str, str]] = []
    outlines: list[tuple[str, str, str, str]] = []
    n_cases = 0
    for name in names:
        cdir = out / name
        cdir.mkdir(exist_ok=True)
        i = 0
        case_no = 0
        while i < per_class:
            rng = np.random.default_rng([seed, _LABEL_CODE[name], case_no])
            case = _sample_case(name, rng)
            n_img = min(int(rng.integers(1, 4)), per_class - i)
            case_id = f"phantom-{name}-{case_no:04d}"
            for j in range(n_img):
                shift = (
                    (0.0, 0.0)
                    if j == 0
                    else tuple(float(v) for v in rng.uniform(-0.02, 0.02, size=2) * size)
                )
                frame = _render(case, rng, size, shift)
                fname = f"{name}_{i:04d}.png"
                Image.fromarray(frame.image).save(cdir / fname, format="PNG", compress_level=3)
                rows.append((f"{name}/{fname}", case_id))
                outlines.append(
                    (
                        f"{name}/{fname}",
                        case_id,
                        *_box_and_polygons(frame.outline),
                        *_descriptors(case.nodule),
                    )
                )
                i += 1
            case_no += 1
            n_cases += 1
        counts[name] = i

    with (out / "manifest.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(("image", "case_id"))
        writer.writerows(rows)
    with (out / ANNOTATIONS).open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(ANNOTATION_COLUMNS)
        writer.writerows(outlines)
    (out / "README.txt").write_text(
        _readme(classes, per_class, seed, size, counts, n_cases), encoding="utf-8"
    )
    return counts
