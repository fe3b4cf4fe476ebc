"""A synthetic chest-X-ray-like image, the input example logged with every model.

The input example is stored with the model (``input_example.json``, ``serving_input_example.json``)
and travels wherever the model goes, so it must never be a patient's image. This one is drawn from
arithmetic: two dark lung fields in a bright body on a black background, no patient, no noise.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

SIDE = 96


def synthetic_chest(side: int = SIDE, body: float = 0.85, lung: float = 0.28, haze: float = 0.0) -> np.ndarray:
    """A synthetic grayscale "chest" as ``uint8`` pixels: body ellipse, two lung fields, an optional haze.

    Args:
        side: Width and height in pixels.
        body: Half-width of the body ellipse, as a fraction of the half-side.
        lung: Half-width of each lung field, likewise.
        haze: Brightness added to the lower right lung field (0: none), a stand-in for an opacity.
    """
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / (side - 1) * 2 - 1  # -1 .. 1
    inside = ((x / body) ** 2 + (y / 0.95) ** 2) <= 1
    lungs = np.zeros_like(inside)
    for centre in (-0.38, 0.38):
        lungs |= (((x - centre) / lung) ** 2 + ((y + 0.05) / 0.6) ** 2) <= 1
    pixels = np.where(inside, 200.0, 0.0) - np.where(lungs, 140.0, 0.0) + 30.0 * (1 - np.abs(x))
    pixels += haze * np.exp(-(((x + 0.38) / 0.2) ** 2 + ((y - 0.2) / 0.25) ** 2))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def synthetic_chests(count: int, side: int, seed: int) -> np.ndarray:
    """``count`` varied synthetic chests, ``(count, side, side, 1)`` ``uint8``: no patient in them.

    What the augmentation grid shows when patient images are kept out of artifacts.
    """
    rng = np.random.default_rng(seed)
    return np.stack(
        [
            synthetic_chest(side, rng.uniform(0.75, 0.9), rng.uniform(0.22, 0.32), rng.choice([0.0, 90.0]))
            for _ in range(count)
        ]
    )[..., None]


def synthetic_xray_png(side: int = SIDE) -> bytes:
    """PNG bytes of the deterministic synthetic chest (:func:`synthetic_chest` with its defaults)."""
    image = Image.fromarray(synthetic_chest(side), mode="L")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def synthetic_example_base64() -> str:
    """The synthetic image as the served model's ``image`` cell (base64 text)."""
    return base64.b64encode(synthetic_xray_png()).decode("ascii")
