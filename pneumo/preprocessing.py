"""Decoding image bytes into model inputs: the one path shared by training, evaluation and serving.

Every image that reaches a model, whether read from disk by the training pipeline or posted as
base64 to the server, goes through :func:`decode_image`. It yields a ``uint8`` array of shape
``(image_size, image_size, channels)``; scaling and per-image normalisation happen inside the
Keras model (see :mod:`pneumo.models`), so they travel with every saved model.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

from pneumo.errors import PneumoError

# Images above this many pixels are refused before their pixels are decoded: a 2,000 x 2,000
# X-ray has 4 M pixels, a 43 cm detector at 0.1 mm 18.5 M, a decompression bomb billions. The
# pixel budget bounds memory: a 16-bit PNG at the limit peaks at about 6 bytes a pixel (150 MB).
MAX_PIXELS = 25_000_000
# Smaller than this on either side cannot be a chest X-ray worth classifying.
MIN_SIDE = 32

# What decode_image accepts: these Pillow formats, and DICOM (uncompressed; see pneumo.dicom).
PIL_FORMATS = ("JPEG", "PNG")
ACCEPTED_FORMATS = "JPEG, PNG or uncompressed DICOM"

# PIL's own bomb guard raises a DecompressionBombError at twice its limit; align it with ours.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


class ImageError(PneumoError, ValueError):
    """Raised when bytes cannot be turned into a model input; the message names the problem.

    A :class:`~pneumo.errors.PneumoError` (the command line reports it in one line) and, as before,
    a ``ValueError``.
    """


def _is_dicom(data: bytes) -> bool:
    return len(data) >= 132 and data[128:132] == b"DICM"


def _dicom_to_array(data: bytes) -> np.ndarray:
    """Decode a DICOM file into a float array with display intensities (bright = dense).

    Only the first frame of an uncompressed file, sized from its header first: see :mod:`pneumo.dicom`.
    """
    from pneumo.dicom import dicom_to_array

    return dicom_to_array(data, MAX_PIXELS)


def check_dimensions(width: int, height: int) -> None:
    """Refuse sizes outside ``MIN_SIDE`` .. ``MAX_PIXELS`` (from the header, before any pixel is decoded)."""
    if width * height > MAX_PIXELS:
        raise ImageError(
            f"image is {width}x{height} pixels, over the {MAX_PIXELS:,}-pixel limit (refused before decoding)"
        )
    if min(width, height) < MIN_SIDE:
        raise ImageError(f"image is {width}x{height} pixels, smaller than {MIN_SIDE} on a side")


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Stretch any numeric range (12/16-bit, float) to 0..255.

    Works in blocks of rows, so a large 16-bit image costs its uint8 result and one float32 block
    on top of itself, not several float32 copies. Non-finite values are refused.
    """
    if pixels.dtype.kind == "f" and not np.isfinite(pixels).all():
        raise ImageError("image has non-finite pixel values (NaN or infinity)")
    low, high = float(pixels.min()), float(pixels.max())
    if high <= low:
        return np.zeros(pixels.shape, dtype=np.uint8)
    out = np.empty(pixels.shape, dtype=np.uint8)
    scale = np.float32(255.0 / (high - low))
    for start in range(0, len(pixels), _TO_UINT8_ROWS):
        block = pixels[start : start + _TO_UINT8_ROWS].astype(np.float32)
        block -= np.float32(low)
        block *= scale
        np.round(block, out=block)
        out[start : start + _TO_UINT8_ROWS] = block
    return out


# Rows per block of _to_uint8.
_TO_UINT8_ROWS = 256


def _pil_to_mode(image: Image.Image, channels: int) -> Image.Image:
    """Convert any PIL mode (L, LA, P, RGB, RGBA, CMYK, I;16, I, F) to L or RGB."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        image = Image.fromarray(_to_uint8(np.asarray(image)), mode="L")
    elif image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent areas become black, the background of a radiograph.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("L" if channels == 1 else "RGB")


def decode_image(data: bytes, image_size: int, channels: int) -> np.ndarray:
    """Decode JPEG, PNG (8/16-bit, any mode) or DICOM bytes into a resized ``uint8`` array.

    Args:
        data: The file's bytes.
        image_size: Side of the square output in pixels.
        channels: 1 for grayscale, 3 for RGB.

    Returns:
        Array of shape ``(image_size, image_size, channels)`` and dtype ``uint8``.

    Raises:
        ImageError: The bytes are empty, not an image, truncated, too large or too small.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageError(f"expected image bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise ImageError("empty image data")
    if _is_dicom(data):
        image = Image.fromarray(_to_uint8(_dicom_to_array(data)), mode="L")
    else:
        try:
            with warnings.catch_warnings():  # our own pixel limit below decides, silently
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                # Only the formats this project decodes: Pillow would otherwise try ~43, EPS
                # included (handed to Ghostscript where installed).
                image = Image.open(io.BytesIO(data), formats=list(PIL_FORMATS))
        except Image.DecompressionBombError as error:
            raise ImageError(f"image too large: {error}") from error
        except Exception as error:
            raise ImageError(f"not a recognised image (accepted: {ACCEPTED_FORMATS})") from error
        check_dimensions(*image.size)
        if image.format == "JPEG":
            # Let libjpeg decode at a reduced scale: same result after resizing, far less work.
            image.draft(image.mode, (image_size, image_size))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image.load()
            image = ImageOps.exif_transpose(image)
        except Exception as error:
            raise ImageError(f"image data is truncated or corrupt: {error}") from error
    try:
        image = _pil_to_mode(image, channels)
        image = image.resize((image_size, image_size), Image.Resampling.BILINEAR, reducing_gap=3.0)
        array = np.asarray(image, dtype=np.uint8)
    except ImageError:
        raise
    except Exception as error:  # an odd mode or palette: still the caller's bad file, never a crash
        raise ImageError(f"image cannot be converted ({type(error).__name__}; mode {image.mode})") from error
    if array.ndim == 2:
        array = array[:, :, None]
    return array


def decode_file(path: str, image_size: int, channels: int) -> np.ndarray:
    """Read a file and decode it with :func:`decode_image`."""
    with open(path, "rb") as handle:
        return decode_image(handle.read(), image_size, channels)
