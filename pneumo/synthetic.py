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


def synthetic_xray_png(side: int = SIDE) -> bytes:
    """PNG bytes of a deterministic, synthetic grayscale "chest": body ellipse, two lung fields."""
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / (side - 1) * 2 - 1  # -1 .. 1
    body = ((x / 0.85) ** 2 + (y / 0.95) ** 2) <= 1
    lungs = np.zeros_like(body)
    for centre in (-0.38, 0.38):
        lungs |= (((x - centre) / 0.28) ** 2 + ((y + 0.05) / 0.6) ** 2) <= 1
    pixels = np.where(body, 200.0, 0.0) - np.where(lungs, 140.0, 0.0) + 30.0 * (1 - np.abs(x))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="L")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def synthetic_example_base64() -> str:
    """The synthetic image as the served model's ``image`` cell (base64 text)."""
    return base64.b64encode(synthetic_xray_png()).decode("ascii")
