"""Decoding image bytes into model inputs: the one path shared by training, evaluation and serving.

Every image that reaches a model, whether read from disk by the training pipeline or posted as
base64 to the server, goes through :func:`decode_image` with the model's :class:`InputSpec`. It
yields a ``uint8`` array of shape ``(image_size, image_size, channels)``: cropped, resized and
equalised as the spec says. The spec is saved with every model (``model_config.json``), and
scaling and per-image normalisation are layers inside the Keras model (see :mod:`pneumo.models`),
so a served model prepares its input exactly as it was trained.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageOps

from pneumo.dicom import dicom_to_uint8
from pneumo.errors import ImageError
from pneumo.pixels import MAX_PIXELS, check_dimensions

# What decode_image accepts: these Pillow formats, and DICOM (uncompressed, deflated or
# compressed with the transfer syntaxes in pneumo.dicom.ACCEPTED_TRANSFER_SYNTAXES).
PIL_FORMATS = ("JPEG", "PNG")
ACCEPTED_FORMATS = "JPEG, PNG or DICOM"


def _is_dicom(data: bytes) -> bool:
    """A DICOM Part 10 file: the ``DICM`` prefix after the 128-byte preamble."""
    return len(data) >= 132 and data[128:132] == b"DICM"


def _dicom_to_image(data: bytes) -> Image.Image:
    """The first frame of a DICOM file as an L (grayscale) or RGB image, display intensities 0..255.

    Mapped to 8 bits by the file's VOI window or its stored bit depth, not by the image's own
    range, so it matches the JPEG or PNG of the same picture: see :mod:`pneumo.dicom`.
    """
    pixels = dicom_to_uint8(data, MAX_PIXELS)
    return Image.fromarray(pixels, mode="L" if pixels.ndim == 2 else "RGB")


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


Equalizer = Literal["none", "hist", "clahe"]
EQUALIZERS: tuple[str, ...] = ("none", "hist", "clahe")


@dataclass(frozen=True)
class InputSpec:
    """How file bytes become a model input; stored with every model and used wherever it predicts.

    Attributes:
        image_size: Side of the square model input in pixels.
        channels: 1 for grayscale, 3 for RGB.
        crop: Fraction of each side cut away before resizing (burned-in markers, collimator edges).
        equalize: Intensity equalisation after resizing: ``none``, ``hist`` (global histogram) or
            ``clahe`` (contrast-limited adaptive histogram equalisation, see :func:`clahe`).
    """

    image_size: int
    channels: int
    crop: float = 0.0
    equalize: Equalizer = "none"

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if not 0.0 <= self.crop < 0.5:
            raise ValueError(f"crop must be in [0, 0.5), got {self.crop}")
        if self.equalize not in EQUALIZERS:
            raise ValueError(f"equalize must be one of {EQUALIZERS}, got {self.equalize!r}")

    @classmethod
    def from_model_config(cls, config: dict[str, Any]) -> InputSpec:
        """The spec a logged model was trained with (models from before crop/equalize get neither)."""
        return cls(
            int(config["image_size"]),
            int(config["channels"]),
            float(config.get("crop", 0.0)),
            config.get("equalize", "none"),
        )


def clahe(image: np.ndarray, grid: int = 8, clip_limit: float = 2.0) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of a 2-D ``uint8`` image.

    Each of ``grid x grid`` tiles gets its own equalising look-up table, with histogram bins
    clipped at ``clip_limit`` times the mean bin count (the excess spread over all bins, as in
    OpenCV), and every pixel blends the tables of its four nearest tiles bilinearly. This evens
    out exposure and detector response between sites without amplifying noise in flat areas.

    Args:
        image: 2-D ``uint8`` array, each side at least ``grid`` pixels.
        grid: Tiles per side.
        clip_limit: Histogram clip as a multiple of the mean bin count.

    Returns:
        The equalised image, same shape, ``uint8``.
    """
    height, width = image.shape
    tile_h, tile_w = -(-height // grid), -(-width // grid)
    padded = np.pad(image, ((0, tile_h * grid - height), (0, tile_w * grid - width)), mode="reflect")
    tiles = padded.reshape(grid, tile_h, grid, tile_w).transpose(0, 2, 1, 3).reshape(grid * grid, -1)
    offsets = (np.arange(grid * grid) * 256)[:, None]
    hist = np.bincount((tiles.astype(np.int64) + offsets).ravel(), minlength=256 * grid * grid)
    hist = hist.reshape(grid, grid, 256).astype(np.float64)
    area = tile_h * tile_w
    limit = max(1.0, clip_limit * area / 256.0)
    excess = np.clip(hist - limit, 0, None).sum(axis=-1, keepdims=True)
    lut = np.cumsum(np.minimum(hist, limit) + excess / 256.0, axis=-1) * (255.0 / area)

    def neighbours(size: int, tile: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        position = np.clip((np.arange(size) + 0.5) / tile - 0.5, 0, grid - 1)
        low = np.floor(position).astype(int)
        return low, np.minimum(low + 1, grid - 1), position - low

    y0, y1, wy = neighbours(height, tile_h)
    x0, x1, wx = neighbours(width, tile_w)
    values = image.astype(np.int64)
    top = lut[y0[:, None], x0[None, :], values] * (1 - wx) + lut[y0[:, None], x1[None, :], values] * wx
    bottom = lut[y1[:, None], x0[None, :], values] * (1 - wx) + lut[y1[:, None], x1[None, :], values] * wx
    return np.clip(np.round(top * (1 - wy[:, None]) + bottom * wy[:, None]), 0, 255).astype(np.uint8)


def equalize(array: np.ndarray, method: str) -> np.ndarray:
    """Apply the named intensity equalisation to each channel of a ``uint8`` HxWxC image."""
    if method == "none":
        return array
    planes = np.moveaxis(array, -1, 0)
    if method == "hist":
        return np.stack([np.asarray(ImageOps.equalize(Image.fromarray(p))) for p in planes], axis=-1)
    return np.stack([clahe(p) for p in planes], axis=-1)


def decode_image(data: bytes, spec: InputSpec) -> np.ndarray:
    """Decode JPEG, PNG (8/16-bit, any mode) or DICOM bytes into a resized ``uint8`` array.

    Args:
        data: The file's bytes.
        spec: Output size, channels, crop and equalisation.

    Returns:
        Array of shape ``(spec.image_size, spec.image_size, spec.channels)`` and dtype ``uint8``.

    Raises:
        ImageError: The bytes are empty, not an image, truncated, too large or too small.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageError(f"expected image bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise ImageError("empty image data")
    if _is_dicom(data):
        image = _dicom_to_image(data)
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
            image.draft(image.mode, (spec.image_size, spec.image_size))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image.load()
            image = ImageOps.exif_transpose(image)
        except Exception as error:
            raise ImageError(f"image data is truncated or corrupt: {error}") from error
    try:
        image = _pil_to_mode(image, spec.channels)
        if spec.crop > 0:
            width, height = image.size
            box = (spec.crop * width, spec.crop * height, (1 - spec.crop) * width, (1 - spec.crop) * height)
            image = image.crop(tuple(round(v) for v in box))
        image = image.resize((spec.image_size, spec.image_size), Image.Resampling.BILINEAR, reducing_gap=3.0)
        array = np.asarray(image, dtype=np.uint8)
    except ImageError:
        raise
    except Exception as error:  # an odd mode or palette: still the caller's bad file, never a crash
        raise ImageError(f"image cannot be converted ({type(error).__name__}; mode {image.mode})") from error
    if array.ndim == 2:
        array = array[:, :, None]
    return equalize(array, spec.equalize)


def decode_file(path: str, spec: InputSpec) -> np.ndarray:
    """Read a file and decode it with :func:`decode_image`."""
    with open(path, "rb") as handle:
        return decode_image(handle.read(), spec)
