"""Safe DICOM decoding: uncompressed, deflated and compressed files as PACS store them.

pydicom, left to itself, inflates a Deflated dataset without a bound (255 kB became 800 MB),
decodes every frame of a multi-frame file, and hands an embedded codestream to its decoder
whatever size the codestream itself declares. Here:

- the transfer syntax is read from the file meta group, which is never compressed, before the
  dataset itself is parsed; :data:`ACCEPTED_TRANSFER_SYNTAXES` lists those read;
- a Deflated dataset is inflated with a hard bound (:func:`inflated_limit`), and refused if it
  inflates to more;
- rows x columns is checked against the pixel budget (:data:`pneumo.pixels.MAX_PIXELS` per frame)
  from the header; for a compressed file the first frame's own codestream header (JPEG and
  JPEG-LS SOF marker, JPEG 2000 SIZ marker, RLE segment table) must agree with it, and the
  codestream must be complete, before a byte of it is decoded;
- only the first frame is decoded, by pydicom's pixel handlers with the pylibjpeg plugins
  (libjpeg for JPEG and JPEG-LS, openjpeg for JPEG 2000, rle for RLE), always the same plugin,
  so one file decodes the same on every installation;
- intensities reach 0..255 by the VOI window (or VOI LUT) when the file has one, otherwise by the
  range the stored bit depth allows (after the modality LUT, which may move or flip it), never by
  the image's own minimum and maximum: an 8-bit X-ray stored with BitsStored 8 decodes to
  exactly its own pixels, the ones its JPEG or PNG decodes to. MONOCHROME1 is inverted;
- pydicom's own warnings and log records, which quote header values, are silenced while a file
  is parsed and decoded.

Every failure is an :class:`pneumo.errors.ImageError` whose message never quotes a header
value (a header holds patient data).
"""

from __future__ import annotations

import io
import logging
import math
import struct
import threading
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from pneumo.errors import ImageError
from pneumo.pixels import MIN_SIDE

NATIVE_SYNTAXES = {
    "1.2.840.10008.1.2": "Implicit VR Little Endian",
    "1.2.840.10008.1.2.1": "Explicit VR Little Endian",
    "1.2.840.10008.1.2.2": "Explicit VR Big Endian",
}
DEFLATED_SYNTAX = "1.2.840.10008.1.2.1.99"
# Syntax -> the JPEG start-of-frame markers its codestream may carry (baseline and extended
# files in the wild mix SOF0 and SOF1; lossless is SOF3; JPEG-LS is SOF55).
_JPEG_SOF = {
    "1.2.840.10008.1.2.4.50": (0xC0, 0xC1),
    "1.2.840.10008.1.2.4.51": (0xC0, 0xC1),
    "1.2.840.10008.1.2.4.57": (0xC3,),
    "1.2.840.10008.1.2.4.70": (0xC3,),
    "1.2.840.10008.1.2.4.80": (0xF7,),
    "1.2.840.10008.1.2.4.81": (0xF7,),
}
_J2K = ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91")
_RLE = "1.2.840.10008.1.2.5"
COMPRESSED_SYNTAXES = {
    "1.2.840.10008.1.2.4.50": "JPEG Baseline",
    "1.2.840.10008.1.2.4.51": "JPEG Extended",
    "1.2.840.10008.1.2.4.57": "JPEG Lossless",
    "1.2.840.10008.1.2.4.70": "JPEG Lossless SV1",
    "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless",
    "1.2.840.10008.1.2.4.81": "JPEG-LS Near-Lossless",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 Lossless",
    "1.2.840.10008.1.2.4.91": "JPEG 2000",
    "1.2.840.10008.1.2.5": "RLE Lossless",
}
ACCEPTED_TRANSFER_SYNTAXES = {**NATIVE_SYNTAXES, DEFLATED_SYNTAX: "Deflated Explicit VR Little Endian"}
ACCEPTED_TRANSFER_SYNTAXES.update(COMPRESSED_SYNTAXES)
_ACCEPTED_TEXT = ", ".join(ACCEPTED_TRANSFER_SYNTAXES.values())
# The one pydicom decoding plugin used for every compressed syntax (pylibjpeg and its plugins).
_PLUGIN = "pylibjpeg"
_GRAY = ("MONOCHROME1", "MONOCHROME2")
# Colour interpretations pydicom decodes to RGB (YBR_FULL*, by its colour conversion; YBR_ICT and
# YBR_RCT, by the JPEG 2000 decoder's inverse component transform).
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")
# Bytes a Deflated dataset may inflate to beyond its pixels: the rest of the header.
_HEADER_ALLOWANCE = 4 << 20
# Rows mapped to uint8 at a time: bounds the float64 working copy.
_BLOCK_ROWS = 256
# pydicom's loggers and its plugins'; records from these are dropped while a file is decoded.
_LOGGERS = ("pydicom", "pylibjpeg", "libjpeg", "openjpeg", "rle")


def inflated_limit(max_pixels: int) -> int:
    """Bytes a Deflated dataset may inflate to: one 16-bit frame at the pixel budget, plus its header."""
    return 2 * max_pixels + _HEADER_ALLOWANCE


class _DropWhileDecoding(logging.Filter):
    """Drops pydicom's log records in the thread that is decoding (they quote header values)."""

    active = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(self.active, "on", False)


_FILTER = _DropWhileDecoding()


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence pydicom's warnings and log records (which may hold header values) in this thread."""
    manager = logging.Logger.manager
    names = [name for name in list(manager.loggerDict) if name.split(".")[0] in _LOGGERS]
    for name in {*_LOGGERS, *names}:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    _FILTER.active.on = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        _FILTER.active.on = False


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


def _integer(dataset, keyword: str, default=None) -> int:
    number = _number(dataset, keyword, default)
    if number != int(number):
        raise ImageError(f"DICOM {keyword} is not a whole number")
    return int(number)


def _past_file_meta(tag, vr, length) -> bool:
    return tag.group != 2


def _file_meta(data: bytes):
    """The file meta group and the offset where the dataset starts, read without parsing the dataset.

    The meta group is always explicit VR little endian, whatever the dataset's transfer syntax.
    """
    from pydicom.dataset import FileMetaDataset
    from pydicom.filereader import read_dataset, read_preamble

    try:
        handle = io.BytesIO(data)
        read_preamble(handle, False)
        group_2 = read_dataset(handle, is_implicit_VR=False, is_little_endian=True, stop_when=_past_file_meta)
        meta = FileMetaDataset(group_2)
        syntax = str(meta.TransferSyntaxUID)
    except Exception as error:
        raise ImageError("unreadable DICOM file (file meta information)") from error
    return meta, syntax, handle.tell()


def _syntax_name(syntax: str) -> str:
    """The syntax's registered name, or a neutral phrase: the UID itself is a header value."""
    from pydicom.uid import UID

    uid = UID(syntax)
    return f"'{uid.name}'" if uid.is_transfer_syntax and uid.name != syntax else "of this file"


def _parse(data: bytes, max_pixels: int):
    """The dataset (pixel data included) and its transfer syntax; a Deflated one inflated within its bound."""
    import pydicom
    from pydicom.filereader import read_dataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta, syntax, start = _file_meta(data)
    if syntax not in ACCEPTED_TRANSFER_SYNTAXES:
        raise ImageError(
            f"DICOM transfer syntax {_syntax_name(syntax)} is not accepted; accepted: {_ACCEPTED_TEXT}. "
            "Export the image uncompressed or in one of these"
        )
    if syntax != DEFLATED_SYNTAX:
        try:
            return pydicom.dcmread(io.BytesIO(data)), syntax
        except Exception as error:
            raise ImageError("unreadable DICOM file") from error
    limit = inflated_limit(max_pixels)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)  # DICOM deflates without a zlib header
    try:
        inflated = inflater.decompress(data[start:], limit)
    except zlib.error as error:
        raise ImageError("DICOM deflated dataset is corrupt") from error
    if inflater.unconsumed_tail:
        raise ImageError(f"DICOM deflated dataset inflates to more than {limit:,} bytes (refused)")
    if not inflater.eof:
        raise ImageError("DICOM deflated dataset is truncated")
    try:
        dataset = read_dataset(io.BytesIO(inflated), is_implicit_VR=False, is_little_endian=True)
    except Exception as error:
        raise ImageError("unreadable DICOM file (inflated dataset)") from error
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.file_meta = meta
    return dataset, ExplicitVRLittleEndian


def _first_frame(dataset, frames: int) -> bytes:
    """The first frame's codestream from encapsulated pixel data (its fragments joined)."""
    from pydicom.encaps import get_frame

    offsets = None
    if "ExtendedOffsetTable" in dataset and "ExtendedOffsetTableLengths" in dataset:
        offsets = (dataset.ExtendedOffsetTable, dataset.ExtendedOffsetTableLengths)
    try:
        return get_frame(dataset.PixelData, 0, extended_offsets=offsets, number_of_frames=frames)
    except Exception as error:
        raise ImageError("DICOM compressed pixel data is truncated or malformed (no complete first frame)") from error


def _jpeg_header(stream: bytes, markers: tuple[int, ...]) -> tuple[int, int, int, int]:
    """Precision, height, width and components from a JPEG or JPEG-LS codestream's SOF segment."""
    if stream[:2] != b"\xff\xd8":
        raise ImageError("DICOM JPEG codestream does not start with a JPEG start-of-image marker")
    at = 2
    while at + 4 <= len(stream):
        if stream[at] != 0xFF:
            raise ImageError("DICOM JPEG codestream is malformed (no marker where one must be)")
        marker = stream[at + 1]
        if marker == 0xFF:  # fill byte before a marker
            at += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            at += 2
            continue
        (length,) = struct.unpack(">H", stream[at + 2 : at + 4])
        if marker in markers:
            if length < 8 or at + 2 + length > len(stream):
                break
            precision, height, width, components = struct.unpack(">BHHB", stream[at + 4 : at + 10])
            return precision, height, width, components
        if marker in (0xDA, 0xD9, 0xF7) or (0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)):
            raise ImageError("DICOM JPEG codestream is not of the kind its transfer syntax declares")
        at += 2 + length
    raise ImageError("DICOM JPEG codestream is truncated or has no frame header")


def _j2k_header(stream: bytes) -> tuple[int, int, int, int]:
    """Precision (largest of the components), height, width and components from a J2K SIZ marker.

    A JP2 file (boxes around the codestream) is unwrapped to its ``jp2c`` box first.
    """
    if stream[4:8] == b"jP  ":
        at = 0
        while at + 8 <= len(stream):
            size, kind = struct.unpack(">I4s", stream[at : at + 8])
            header = 8
            if size == 1:
                if at + 16 > len(stream):
                    break
                (size,) = struct.unpack(">Q", stream[at + 8 : at + 16])
                header = 16
            elif size == 0:
                size = len(stream) - at
            if size < header:
                break
            if kind == b"jp2c":
                stream = stream[at + header : at + size]
                break
            at += size
        else:
            raise ImageError("DICOM JPEG 2000 file has no codestream box")
    if stream[:4] != b"\xff\x4f\xff\x51" or len(stream) < 42:
        raise ImageError("DICOM JPEG 2000 codestream does not start with SOC and SIZ markers, or is truncated")
    x_size, y_size, x_offset, y_offset = struct.unpack(">IIII", stream[8:24])
    (components,) = struct.unpack(">H", stream[40:42])
    if components < 1 or len(stream) < 42 + 3 * components:
        raise ImageError("DICOM JPEG 2000 SIZ marker is truncated")
    precision = max((stream[42 + 3 * c] & 0x7F) + 1 for c in range(components))
    return precision, y_size - y_offset, x_size - x_offset, components


def _check_codestream(syntax: str, stream: bytes, rows: int, cols: int, samples: int, bits: int) -> None:
    """Refuse a first frame whose own header disagrees with the DICOM header, or that is incomplete."""
    if syntax == _RLE:
        if len(stream) < 64:
            raise ImageError("DICOM RLE frame is truncated (no complete RLE header)")
        count, *offsets = struct.unpack("<16I", stream[:64])
        if count != samples * bits // 8:
            raise ImageError("DICOM RLE frame's segment count does not match SamplesPerPixel and BitsAllocated")
        offsets = offsets[:count] + [len(stream)]
        if offsets[0] != 64 or any(b <= a for a, b in zip(offsets, offsets[1:])):
            raise ImageError("DICOM RLE frame's segment offsets are invalid or beyond the frame (truncated)")
        return
    if syntax in _J2K:
        precision, height, width, components = _j2k_header(stream)
        end = b"\xff\xd9"  # EOC
    else:
        precision, height, width, components = _jpeg_header(stream, _JPEG_SOF[syntax])
        end = b"\xff\xd9"  # EOI
    if (height, width) != (rows, cols):
        raise ImageError("DICOM codestream dimensions differ from the header's Rows and Columns (refused undecoded)")
    if components != samples:
        raise ImageError("DICOM codestream component count differs from the header's SamplesPerPixel")
    if precision > bits:
        raise ImageError("DICOM codestream precision exceeds the header's BitsAllocated")
    if not stream.rstrip(b"\x00").endswith(end):  # fragments are padded to an even length
        raise ImageError("DICOM codestream is truncated (no end marker)")


def _window(dataset):
    """The VOI window as ``(center, width, function)``, or None when the file has none."""
    if "WindowWidth" not in dataset and "WindowCenter" not in dataset:
        return None
    width = _number(dataset, "WindowWidth")
    center = _number(dataset, "WindowCenter")
    function = str(dataset.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        raise ImageError("DICOM VOILUTFunction must be LINEAR, LINEAR_EXACT or SIGMOID")
    if width <= 0:
        raise ImageError("DICOM WindowWidth must be positive")
    if function == "LINEAR" and width < 1:
        raise ImageError("DICOM WindowWidth must be at least 1 for a LINEAR window")
    return center, width, function


def _lut_bits(dataset, keyword: str) -> int:
    """Bits per entry of the first LUT in a modality or VOI LUT sequence (its output range)."""
    try:
        bits = int(dataset[keyword][0].LUTDescriptor[2])
    except Exception as error:
        raise ImageError(f"DICOM {keyword} has no usable LUT descriptor") from error
    if not 1 <= bits <= 16:
        raise ImageError(f"DICOM {keyword} LUT descriptor declares an impossible bit depth")
    return bits


def _gray_to_uint8(pixels: np.ndarray, dataset, bits_stored: int, signed: bool) -> np.ndarray:
    """Stored values -> modality LUT -> VOI window or LUT -> 0..255, as a display would (PS3.3 C.11).

    The output range is fixed by the header, never taken from the image: without a window, the
    range the stored bits allow (``0 .. 2**BitsStored - 1``, or its signed counterpart), moved
    and possibly flipped by ``RescaleSlope``/``RescaleIntercept`` (a negative slope really
    reverses what is bright), or ``0 .. 2**n - 1`` after an n-bit modality or VOI LUT.
    """
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    low, high = (-(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1) if signed else (0, (1 << bits_stored) - 1)
    slope = intercept = None
    if "ModalityLUTSequence" in dataset:
        bits = _lut_bits(dataset, "ModalityLUTSequence")
        try:
            pixels = apply_modality_lut(pixels, dataset)
        except Exception as error:
            raise ImageError("DICOM modality LUT cannot be applied") from error
        low, high = 0, (1 << bits) - 1
    elif "RescaleSlope" in dataset or "RescaleIntercept" in dataset:
        slope, intercept = _number(dataset, "RescaleSlope", 1.0), _number(dataset, "RescaleIntercept", 0.0)
        if slope == 0:
            raise ImageError("DICOM RescaleSlope must not be zero")
        low, high = sorted((low * slope + intercept, high * slope + intercept))
        if not math.isfinite(high - low):
            raise ImageError("DICOM pixels are not all finite numbers after RescaleSlope/RescaleIntercept")
    window = _window(dataset)
    if window is None and "VOILUTSequence" in dataset:
        bits = _lut_bits(dataset, "VOILUTSequence")
        try:
            pixels = apply_voi_lut(pixels, dataset, prefer_lut=True)
        except Exception as error:
            raise ImageError("DICOM VOI LUT cannot be applied") from error
        low, high = 0, (1 << bits) - 1

    def to_unit(block: np.ndarray) -> np.ndarray:
        if slope is not None:
            block = block * slope + intercept
        if not np.isfinite(block).all():
            raise ImageError("DICOM pixels are not all finite numbers")
        if window is None:
            return (block - low) / (high - low)
        center, width, function = window
        if function == "LINEAR":  # PS3.3 C.11.2.1.2.1
            return (block - (center - 0.5)) / (width - 1) + 0.5
        if function == "LINEAR_EXACT":  # C.11.2.1.3.2
            return (block - center) / width + 0.5
        return 1.0 / (1.0 + np.exp(-4.0 * (block - center) / width))  # SIGMOID, C.11.2.1.3.1

    return _map_blocks(pixels, to_unit)


def _map_blocks(pixels: np.ndarray, to_unit) -> np.ndarray:
    """``round(255 * clip(to_unit(pixels), 0, 1))`` as ``uint8``, a block of rows at a time.

    Only one float64 block exists at a time, so a frame at the pixel budget costs its uint8
    result on top of itself, not several float copies.
    """
    out = np.empty(pixels.shape, dtype=np.uint8)
    for start in range(0, len(pixels), _BLOCK_ROWS):
        unit = to_unit(pixels[start : start + _BLOCK_ROWS].astype(np.float64))
        out[start : start + _BLOCK_ROWS] = np.round(np.clip(unit, 0.0, 1.0) * 255.0)
    return out


def dicom_to_uint8(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode the first frame of a DICOM file into display intensities (bright = dense), 0..255.

    Args:
        data: The file's bytes (``DICM`` at offset 128).
        max_pixels: Pixel budget of one frame.

    Returns:
        A ``uint8`` array, ``(rows, columns)`` for grayscale or ``(rows, columns, 3)`` for colour.

    Raises:
        ImageError: Refused syntax or photometric interpretation, a frame over the budget, a
            codestream that disagrees with the header or is truncated, missing or truncated pixel
            data, unusable rescale or window values, non-finite pixels.
    """
    with _quiet():
        return _decode(data, max_pixels)


def _decode(data: bytes, max_pixels: int) -> np.ndarray:
    from pydicom.pixels import pixel_array

    dataset, syntax = _parse(data, max_pixels)
    if not dataset:  # what pydicom returns when an element runs past the end of the file
        raise ImageError("unreadable DICOM file (empty or truncated dataset)")
    rows, cols = _integer(dataset, "Rows"), _integer(dataset, "Columns")
    if rows * cols > max_pixels:
        raise ImageError(f"DICOM frame is over the {max_pixels:,}-pixel limit (refused before decoding)")
    if min(rows, cols) < MIN_SIDE:
        raise ImageError(f"DICOM frame is smaller than {MIN_SIDE} pixels on a side")
    samples = _integer(dataset, "SamplesPerPixel", 1)
    bits = _integer(dataset, "BitsAllocated")
    bits_stored = _integer(dataset, "BitsStored", bits)
    signed = _integer(dataset, "PixelRepresentation", 0)
    frames = _integer(dataset, "NumberOfFrames", 1)
    photometric = str(dataset.get("PhotometricInterpretation", "")).strip()
    if not ((photometric in _GRAY and samples == 1) or (photometric in _COLOUR and samples == 3)):
        raise ImageError(
            "DICOM photometric interpretation must be MONOCHROME1 or MONOCHROME2 with 1 sample, "
            f"or one of {', '.join(_COLOUR)} with 3 samples"
        )
    if bits not in (8, 16, 32) or not 1 <= bits_stored <= bits or signed not in (0, 1) or frames < 1:
        raise ImageError(
            "DICOM BitsAllocated must be 8, 16 or 32, BitsStored between 1 and BitsAllocated, "
            "PixelRepresentation 0 or 1 and NumberOfFrames at least 1"
        )
    pixel_data = dataset.get("PixelData", None)
    if pixel_data is None:
        raise ImageError("DICOM file has no pixel data")
    options = {}
    if syntax in COMPRESSED_SYNTAXES:
        _check_codestream(syntax, _first_frame(dataset, frames), rows, cols, samples, bits)
        options["decoding_plugin"] = _PLUGIN
    elif len(pixel_data) < rows * cols * samples * (bits // 8) * frames:
        raise ImageError("DICOM pixel data is truncated (shorter than its frames need)")
    try:
        pixels = pixel_array(dataset, index=0, **options)  # the first frame only
    except Exception as error:
        raise ImageError("DICOM pixel data cannot be decoded (corrupt or truncated)") from error
    if pixels.shape[:2] != (rows, cols) or pixels.ndim != (2 if samples == 1 else 3):
        raise ImageError("DICOM frame decoded to a shape other than its header's")
    if samples == 3:  # the modality and VOI transforms are for grayscale only (PS3.3 C.11)
        if pixels.dtype == np.uint8 and bits_stored == 8:
            return pixels
        return _map_blocks(pixels, lambda block: block / ((1 << bits_stored) - 1))
    out = _gray_to_uint8(pixels, dataset, bits_stored, bool(signed))
    if photometric == "MONOCHROME1":  # low values display white
        np.subtract(255, out, out=out)
    return out
