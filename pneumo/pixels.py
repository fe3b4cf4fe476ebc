"""The pixel budget every decoder checks from a header before it decodes a single pixel.

Kept apart from the decoders (:mod:`pneumo.preprocessing` for JPEG and PNG, :mod:`pneumo.dicom`)
so that both import it without importing each other.
"""

from __future__ import annotations

from pneumo.errors import ImageError

# Images above this many pixels are refused before their pixels are decoded: a 2,000 x 2,000
# X-ray has 4 M pixels, a 43 cm detector at 0.1 mm 18.5 M, a decompression bomb billions. The
# pixel budget bounds memory: a 16-bit PNG at the limit peaks at about 6 bytes a pixel (150 MB).
MAX_PIXELS = 25_000_000
# Smaller than this on either side cannot be a chest X-ray worth classifying.
MIN_SIDE = 32


def check_dimensions(width: int, height: int) -> None:
    """Refuse sizes outside ``MIN_SIDE`` .. ``MAX_PIXELS`` (from the header, before any pixel is decoded).

    Raises:
        ImageError: Naming the size and the limit it breaks.
    """
    if width * height > MAX_PIXELS:
        raise ImageError(
            f"image is {width}x{height} pixels, over the {MAX_PIXELS:,}-pixel limit (refused before decoding)"
        )
    if min(width, height) < MIN_SIDE:
        raise ImageError(f"image is {width}x{height} pixels, smaller than {MIN_SIDE} on a side")
