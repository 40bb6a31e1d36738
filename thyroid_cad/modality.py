"""Is this frame a greyscale ultrasound-like image at all? A cheap check before the model.

Three measures over the frame's content (non-black pixels; subsampled to at most ~250k
pixels: ~0.3 ms on a 224 px model input). The service checks the model's input square,
so /v1 and /v2 give the same verdict for the same image:

* colour: the fraction of pixels whose channels differ by more than COLOUR_SPREAD
  levels. B-mode ultrasound is grey; calipers, text and a colour-Doppler box colour a
  small part of the frame, a photograph colours most of it.
* bright: the fraction of near-white pixels. Ultrasound tissue is mid-grey on a black
  background; a document or screenshot is mostly white.
* range: the standard deviation of the grey levels. A blank, flat or saturated frame
  has no content to classify.

What it does not catch: a greyscale image of something else (a radiograph, a CT
slice, a greyscale photograph). The model's own out-of-distribution score
(training/ood.py, output `ood_score`) is there for those. The limits are set far from
ultrasound frames on purpose: this check should almost never refuse a real scan.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Measures are taken over the content: pixels brighter than the background level of
# thyroid_cad.imaging, so the black letterbox of a model input (or a scanner's black
# surround) weighs nothing, and the check reads the same on a frame and its square.
BACKGROUND_LEVEL = 12
COLOUR_SPREAD = 40  # max - min over RGB, in grey levels, for a pixel to count as coloured
MAX_COLOUR_FRACTION = 0.25
BRIGHT_LEVEL = 235
MAX_BRIGHT_FRACTION = 0.5
MIN_GREY_STD = 4.0
_MAX_PIXELS = 250_000


@dataclass(frozen=True)
class Verdict:
    """ultrasound_like False means refuse or flag, for `reason`."""

    ultrasound_like: bool
    reason: str | None
    colour_fraction: float
    bright_fraction: float
    grey_std: float


def check(rgb: np.ndarray) -> Verdict:
    """The verdict on a decoded H x W x 3 uint8 frame (H x W grey is accepted too)."""
    frame = np.asarray(rgb)
    if frame.ndim == 2:
        frame = frame[:, :, None]
    step = max(1, int(np.ceil(np.sqrt(frame.shape[0] * frame.shape[1] / _MAX_PIXELS))))
    # One plane per channel, element-wise (reductions over a 3-wide axis cost ~10x more);
    # a pixel's grey level is its channel sum / 3, compared as sums to stay in integers.
    channels = [frame[::step, ::step, c].astype(np.int16).ravel() for c in range(frame.shape[2])]
    total = sum(channels[1:], channels[0].copy())
    content = total > BACKGROUND_LEVEL * len(channels)
    if not content.any():
        return Verdict(False, "not an ultrasound frame: the image is black", 0.0, 0.0, 0.0)
    channels = [c[content] for c in channels]
    total = total[content]
    spread = np.maximum.reduce(channels) - np.minimum.reduce(channels)
    colour = float(np.mean(spread > COLOUR_SPREAD))
    bright = float(np.mean(total > BRIGHT_LEVEL * len(channels)))
    std = float(total.std()) / len(channels)
    reason = None
    if std < MIN_GREY_STD:
        reason = f"not an ultrasound frame: the image is flat (grey-level std {std:.1f})"
    elif colour > MAX_COLOUR_FRACTION:
        reason = (
            f"not a greyscale ultrasound frame: {colour:.0%} of its pixels are coloured "
            "(a photograph?)"
        )
    elif bright > MAX_BRIGHT_FRACTION:
        reason = (
            f"not an ultrasound frame: {bright:.0%} of its pixels are near white "
            "(a document or screenshot?)"
        )
    return Verdict(reason is None, reason, colour, bright, std)
