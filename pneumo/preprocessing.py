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

# Images above this many pixels are refused before their pixels are decoded: a 2,000 x 2,000
# X-ray has 4 M pixels, a decompression bomb has billions.
MAX_PIXELS = 50_000_000
# Smaller than this on either side cannot be a chest X-ray worth classifying.
MIN_SIDE = 32

# PIL's own bomb guard raises a DecompressionBombError at twice its limit; align it with ours.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


class ImageError(ValueError):
    """Raised when bytes cannot be turned into a model input; the message names the problem."""


def _is_dicom(data: bytes) -> bool:
    return len(data) >= 132 and data[128:132] == b"DICM"


def _dicom_to_array(data: bytes) -> np.ndarray:
    """Decode a DICOM file into a float array with display intensities (bright = dense)."""
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        dataset = pydicom.dcmread(io.BytesIO(data))
        rows, cols = int(dataset.Rows), int(dataset.Columns)
    except Exception as error:
        raise ImageError(f"unreadable DICOM file: {error}") from error
    check_dimensions(cols, rows)
    try:
        pixels = dataset.pixel_array
    except Exception as error:
        raise ImageError(f"DICOM pixel data cannot be decoded: {error}") from error
    if pixels.ndim == 3 and getattr(dataset, "SamplesPerPixel", 1) == 1:
        pixels = pixels[0]  # multi-frame: the first frame
    pixels = apply_modality_lut(pixels, dataset)
    pixels = apply_voi_lut(pixels, dataset)  # window centre/width or VOI LUT when present
    pixels = np.asarray(pixels, dtype=np.float32)
    if pixels.ndim == 3:
        pixels = pixels.mean(axis=-1)
    if getattr(dataset, "PhotometricInterpretation", "") == "MONOCHROME1":
        pixels = pixels.max() - pixels  # MONOCHROME1 shows low values as white
    return pixels


def check_dimensions(width: int, height: int) -> None:
    """Refuse sizes outside ``MIN_SIDE`` .. ``MAX_PIXELS`` (from the header, before any pixel is decoded)."""
    if width * height > MAX_PIXELS:
        raise ImageError(
            f"image is {width}x{height} pixels, over the {MAX_PIXELS:,}-pixel limit (refused before decoding)"
        )
    if min(width, height) < MIN_SIDE:
        raise ImageError(f"image is {width}x{height} pixels, smaller than {MIN_SIDE} on a side")


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Stretch any numeric range (12/16-bit, float) to 0..255."""
    pixels = pixels.astype(np.float32)
    low, high = float(pixels.min()), float(pixels.max())
    if high <= low:
        return np.zeros(pixels.shape, dtype=np.uint8)
    return np.round((pixels - low) * (255.0 / (high - low))).astype(np.uint8)


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
                image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as error:
            raise ImageError(f"image too large: {error}") from error
        except Exception as error:
            raise ImageError("not a recognised image (JPEG, PNG or DICOM expected)") from error
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
    image = _pil_to_mode(image, channels)
    image = image.resize((image_size, image_size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return array


def decode_file(path: str, image_size: int, channels: int) -> np.ndarray:
    """Read a file and decode it with :func:`decode_image`."""
    with open(path, "rb") as handle:
        return decode_image(handle.read(), image_size, channels)
