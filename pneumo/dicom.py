"""Safe DICOM decoding: size checked from the header before anything is inflated or decoded.

pydicom, left to itself, inflates a Deflated dataset without a bound (255 kB became 800 MB),
decodes every frame of a multi-frame file, and decodes an embedded JPEG however large it really
is. Here:

- only uncompressed transfer syntaxes are accepted (:data:`ACCEPTED_TRANSFER_SYNTAXES`); the
  transfer syntax is read from the file meta group, which is never compressed, before the
  dataset itself is parsed. Compressed or deflated files are refused with a message saying so
  (convert them to PNG, or to an uncompressed DICOM);
- rows x columns x samples x bits x frames is checked against the pixel budget
  (:data:`pneumo.pixels.MAX_PIXELS` per frame) and against the pixel data actually present;
- only the first frame is decoded;
- the modality LUT (``RescaleSlope``/``RescaleIntercept``) and the VOI window or LUT must be usable
  numbers (``WindowWidth`` > 0), and the result must be finite.

Every failure is an :class:`pneumo.errors.ImageError` whose message never quotes a header
value (a header holds patient data).
"""

from __future__ import annotations

import io
import math

import numpy as np

from pneumo.errors import ImageError
from pneumo.pixels import check_dimensions

ACCEPTED_TRANSFER_SYNTAXES = {
    "1.2.840.10008.1.2": "Implicit VR Little Endian",
    "1.2.840.10008.1.2.1": "Explicit VR Little Endian",
    "1.2.840.10008.1.2.2": "Explicit VR Big Endian",
}
_ACCEPTED_TEXT = ", ".join(ACCEPTED_TRANSFER_SYNTAXES.values())
_PHOTOMETRIC = {"MONOCHROME1": 1, "MONOCHROME2": 1, "RGB": 3}


def _number(dataset, keyword: str, default=None) -> float:
    """A header value as a finite number (the first of a multi-valued one), or ``default`` when absent."""
    try:
        value = dataset.get(keyword, None)
    except Exception as error:
        raise ImageError(f"DICOM {keyword} cannot be read") from error
    if value is None or value == "":
        if default is None:
            raise ImageError(f"DICOM header lacks {keyword}")
        return default
    try:
        if not isinstance(value, (int, float, str)) and hasattr(value, "__len__"):
            value = value[0]
        number = float(value)
    except Exception as error:
        raise ImageError(f"DICOM {keyword} is not a number") from error
    if not math.isfinite(number):
        raise ImageError(f"DICOM {keyword} is not a finite number")
    return number


def _transfer_syntax(data: bytes) -> str:
    """The transfer syntax UID from the file meta group, read without parsing the dataset."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    try:
        handle = io.BytesIO(data)
        read_preamble(handle, False)
        meta = _read_file_meta_info(handle)
        return str(meta.TransferSyntaxUID)
    except Exception as error:
        raise ImageError("unreadable DICOM file (file meta information)") from error


def dicom_to_array(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode the first frame of an uncompressed DICOM file into display intensities (bright = dense).

    Args:
        data: The file's bytes (``DICM`` at offset 128).
        max_pixels: Pixel budget of one frame.

    Returns:
        A 2-D float32 array.

    Raises:
        ImageError: Refused syntax or photometric interpretation, a frame over the budget, missing
            or truncated pixel data, unusable rescale or window values, non-finite pixels.
    """
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut, pixel_array

    syntax = _transfer_syntax(data)
    if syntax not in ACCEPTED_TRANSFER_SYNTAXES:
        raise ImageError(
            f"DICOM transfer syntax {syntax} is not accepted (only uncompressed: {_ACCEPTED_TEXT}); "
            "convert the image to PNG"
        )
    try:
        dataset = pydicom.dcmread(io.BytesIO(data))
    except Exception as error:
        raise ImageError("unreadable DICOM file") from error
    rows, cols = int(_number(dataset, "Rows")), int(_number(dataset, "Columns"))
    check_dimensions(cols, rows)
    if rows * cols > max_pixels:  # check_dimensions holds the same limit; kept explicit here
        raise ImageError(f"DICOM frame is {cols}x{rows} pixels, over the {max_pixels:,}-pixel limit")
    samples = int(_number(dataset, "SamplesPerPixel", 1))
    bits = int(_number(dataset, "BitsAllocated"))
    frames = int(_number(dataset, "NumberOfFrames", 1))
    photometric = str(dataset.get("PhotometricInterpretation", "")).strip()
    if _PHOTOMETRIC.get(photometric) != samples:
        raise ImageError(
            f"DICOM photometric interpretation must be MONOCHROME1, MONOCHROME2 (1 sample) or RGB (3 samples); "
            f"got {photometric or 'none'} with {samples} sample(s)"
        )
    if bits not in (8, 16, 32) or frames < 1:
        raise ImageError(
            f"DICOM BitsAllocated must be 8, 16 or 32 and NumberOfFrames at least 1 (got {bits}, {frames})"
        )
    frame_bytes = rows * cols * samples * bits // 8
    pixel_data = dataset.get("PixelData", None)
    if pixel_data is None:
        raise ImageError("DICOM file has no pixel data")
    if len(pixel_data) < frame_bytes * frames:
        raise ImageError(
            f"DICOM pixel data is truncated: {len(pixel_data):,} bytes for {frames} frame(s) of {frame_bytes:,}"
        )
    try:
        pixels = pixel_array(dataset, index=0)  # the first frame only
    except Exception as error:
        raise ImageError("DICOM pixel data cannot be decoded") from error
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        if keyword in dataset:
            _number(dataset, keyword)
    try:
        pixels = apply_modality_lut(pixels, dataset)
    except Exception as error:
        raise ImageError("DICOM RescaleSlope/RescaleIntercept or modality LUT cannot be applied") from error
    if "WindowWidth" in dataset and _number(dataset, "WindowWidth") <= 0:
        raise ImageError("DICOM WindowWidth must be positive")
    if "WindowCenter" in dataset:
        _number(dataset, "WindowCenter")
    try:
        pixels = apply_voi_lut(pixels, dataset)  # window centre/width or VOI LUT when present
    except Exception as error:
        raise ImageError("DICOM window or VOI LUT cannot be applied") from error
    pixels = np.asarray(pixels, dtype=np.float32)
    if pixels.ndim == 3:
        pixels = pixels.mean(axis=-1)
    if pixels.ndim != 2 or pixels.shape != (rows, cols):
        raise ImageError(f"DICOM frame decoded to shape {pixels.shape}, not {rows}x{cols}")
    if not np.isfinite(pixels).all():
        raise ImageError("DICOM pixels are not all finite numbers")
    if photometric == "MONOCHROME1":
        pixels = pixels.max() - pixels  # MONOCHROME1 shows low values as white
    return pixels
