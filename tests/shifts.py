"""Frames unlike the phantom's ultrasound, for the OOD and modality checks (no files)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

SIZE = 256


def colour_photo(rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """Smooth colour blobs filling the frame, like a photograph of a scene."""
    coarse = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
    noise = rng.normal(0, 12, (size, size, 3))
    return np.clip(np.asarray(img, np.float64) + noise, 0, 255).astype(np.uint8)


def document(rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """A white page with lines of black 'text'."""
    page = Image.new("RGB", (size, size), (250, 250, 245))
    draw = ImageDraw.Draw(page)
    for y in range(12, size - 12, 14):
        x = 10
        while x < size - 30:
            w = int(rng.integers(8, 30))
            draw.rectangle([x, y, x + w, y + 7], fill=(20, 20, 20))
            x += w + 6
    return np.asarray(page)


def radiograph(rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """A chest-radiograph-like grey frame: bright body, dark lungs, rib bands, no sector."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    body = 170 - 60 * ((xx - 0.5) ** 2 + (yy - 0.55) ** 2)
    lungs = np.exp(-(((xx - 0.3) / 0.14) ** 2 + ((yy - 0.5) / 0.25) ** 2))
    lungs += np.exp(-(((xx - 0.7) / 0.14) ** 2 + ((yy - 0.5) / 0.25) ** 2))
    ribs = 18 * np.sin(yy * 2 * np.pi * 9 + rng.uniform(0, 6)) * (lungs > 0.2)
    grey = body - 90 * lungs + ribs + rng.normal(0, 4, (size, size))
    grey = np.clip(grey, 0, 255).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


def inverted(frame: np.ndarray) -> np.ndarray:
    return 255 - frame


def flat(rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    return np.full((size, size, 3), int(rng.integers(90, 200)), np.uint8)
