"""Test image files in every format the decoder must accept or refuse: the one home of image builders.

Every builder returns file bytes. The accepted formats made from a real X-ray (RGBA and 16-bit
PNG, CMYK JPEG, DICOM MONOCHROME1/2 with or without a VOI window, DICOM in every compressed transfer
syntax the decoder reads) carry the same picture as :func:`reference_png`, so a test can require that
they decode, and predict, like it.
:data:`SAMPLES` holds small synthetic images of every PIL mode a user may bring.
"""

from __future__ import annotations

import io
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)

# DICOM SOP class "Digital X-Ray Image Storage - For Presentation".
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"


def gray_pixels(path: Path) -> np.ndarray:
    """The X-ray as 8-bit grayscale at its stored size, stretched to the full 0..255 range.

    The decoder maps 16-bit and DICOM pixel values onto 0..255 by their range; a picture that
    already spans it comes back unchanged, so every variant can be compared with the reference.
    """
    with Image.open(path) as image:
        gray = np.asarray(image.convert("L"), dtype=np.float64)
    return np.round((gray - gray.min()) * 255.0 / (gray.max() - gray.min())).astype(np.uint8)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    """The bytes of ``image`` saved in format ``fmt`` (``PNG``, ``JPEG``, ...)."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def noise(height: int, width: int, channels: int = 0, dtype=np.uint8, high: int = 256, seed: int = 0) -> np.ndarray:
    """Random pixels, ``(height, width)`` or ``(height, width, channels)``, below ``high``."""
    shape = (height, width, channels) if channels else (height, width)
    return np.random.default_rng(seed).integers(0, high, shape).astype(dtype)


def palette_image() -> Image.Image:
    """A four-colour palette (P mode) image."""
    image = Image.fromarray(noise(50, 70, high=4), mode="L").convert("P")
    image.putpalette([0, 0, 0, 90, 90, 90, 180, 180, 180, 255, 255, 255])
    return image


# name -> (PIL image, format, save options); every mode the dataset or a user may bring.
SAMPLES = {
    "L.jpeg": (lambda: Image.fromarray(noise(60, 45), "L"), "JPEG", {}),
    "RGB.jpeg": (lambda: Image.fromarray(noise(40, 90, 3), "RGB"), "JPEG", {}),
    "CMYK.jpeg": (lambda: Image.fromarray(noise(64, 64, 4), "CMYK"), "JPEG", {}),
    "L.png": (lambda: Image.fromarray(noise(33, 200), "L"), "PNG", {}),
    "LA.png": (lambda: Image.fromarray(noise(48, 48, 2), "LA"), "PNG", {}),
    "RGB.png": (lambda: Image.fromarray(noise(128, 96, 3), "RGB"), "PNG", {}),
    "RGBA.png": (lambda: Image.fromarray(noise(70, 50, 4), "RGBA"), "PNG", {}),
    "P.png": (palette_image, "PNG", {}),
    "P-transparent.png": (palette_image, "PNG", {"transparency": 0}),
    "I16.png": (lambda: Image.fromarray(noise(80, 60, dtype=np.uint16, high=4096)), "PNG", {}),
}


def sample_files() -> dict[str, bytes]:
    """The encoded bytes of every :data:`SAMPLES` image."""
    return {name: encode(make(), fmt, **options) for name, (make, fmt, options) in SAMPLES.items()}


def reference_png(gray: np.ndarray) -> bytes:
    """Lossless 8-bit grayscale PNG: the picture every accepted variant below must match."""
    return encode(Image.fromarray(gray, mode="L"), "PNG")


def rgba_png(gray: np.ndarray, transparent_rows: int = 0) -> bytes:
    """RGBA PNG, opaque except for the top ``transparent_rows`` rows."""
    rgba = np.dstack([gray, gray, gray, np.full_like(gray, 255)])
    rgba[:transparent_rows, :, 3] = 0
    return encode(Image.fromarray(rgba, mode="RGBA"), "PNG")


def png16(gray: np.ndarray) -> bytes:
    """16-bit grayscale PNG spanning the full 0..65535 range (each 8-bit level times 257)."""
    return encode(Image.fromarray(gray.astype(np.uint16) * 257), "PNG")


def cmyk_jpeg(gray: np.ndarray) -> bytes:
    """CMYK JPEG (as print and some PACS exports write them)."""
    return encode(Image.fromarray(gray, mode="L").convert("RGB").convert("CMYK"), "JPEG", quality=95)


def dicom(
    gray: np.ndarray,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    window: tuple[float, float] | None = None,
) -> bytes:
    """A DX DICOM file (explicit VR little endian) written with pydicom's Dataset writer.

    The 8-bit picture is scaled to ``bits_stored`` bits; for MONOCHROME1 it is stored inverted
    (low values display white), as CR/DX devices do.

    Args:
        gray: The picture, 8-bit.
        photometric: ``MONOCHROME1`` or ``MONOCHROME2``.
        bits_stored: 8 (stored in 8-bit words) or up to 16 (16-bit words).
        window: Optional ``(center, width)`` VOI window, in stored values.
    """
    top = (1 << bits_stored) - 1
    values = np.round(gray.astype(np.float64) * top / 255.0)
    if photometric == "MONOCHROME1":
        values = top - values
    values = values.astype(np.uint8 if bits_stored <= 8 else np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_FOR_PRESENTATION
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = DX_FOR_PRESENTATION
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.Modality = "DX"
    dataset.PatientID = "TEST"
    dataset.set_pixel_data(values, photometric_interpretation=photometric, bits_stored=bits_stored)
    if window is not None:
        dataset.WindowCenter, dataset.WindowWidth = window
    return save(dataset)


def save(dataset: Dataset) -> bytes:
    """The bytes of a DICOM file written from ``dataset`` (with its file meta group)."""
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


# Compressed syntax -> what `compressed_dicom` hands to pydicom's Dataset.compress (None: another
# encoder, see there). Lossy settings are what a PACS typically stores: JPEG-LS within 2 levels,
# JPEG 2000 at 10:1.
COMPRESS_OPTIONS = {
    RLELossless: {"encoding_plugin": "pydicom"},
    JPEGLSLossless: {"encoding_plugin": "pyjpegls"},
    JPEGLSNearLossless: {"encoding_plugin": "pyjpegls", "jls_error": 2},
    JPEG2000Lossless: {"encoding_plugin": "pylibjpeg"},
    JPEG2000: {"encoding_plugin": "pylibjpeg", "j2k_cr": [10]},
    JPEGBaseline8Bit: None,
    JPEGExtended12Bit: None,
    JPEGLossless: None,
    JPEGLosslessSV1: None,
}


def compressed_dicom(uncompressed: bytes, syntax: str) -> bytes:
    """The same DICOM file (every frame) re-encoded with a compressed or deflated transfer syntax.

    RLE, JPEG-LS and JPEG 2000 use pydicom's encoders (its own RLE, pyjpegls, pylibjpeg-openjpeg);
    JPEG Baseline encapsulates Pillow's JPEG of each 8-bit frame; JPEG Extended and both JPEG
    Lossless syntaxes are written by GDCM, the only maintained Python-installable encoder of
    lossless JPEG (for Extended, of 8-bit data only: GDCM writes 12-bit data with a 16-bit
    precision that no JPEG decoder accepts); Deflated by pydicom's writer.
    """
    dataset = dcmread(io.BytesIO(uncompressed))
    if syntax == DeflatedExplicitVRLittleEndian:
        dataset.file_meta.TransferSyntaxUID = syntax
        return save(dataset)
    options = COMPRESS_OPTIONS[UID(syntax)]
    if options is not None:
        dataset.compress(syntax, **options)
        return save(dataset)
    if syntax == JPEGBaseline8Bit:
        if dataset.BitsStored != 8:
            raise ValueError("JPEG Baseline holds 8-bit pixels only")
        frames = dataset.pixel_array.reshape(-1, dataset.Rows, dataset.Columns, dataset.SamplesPerPixel)
        mode = "L" if dataset.SamplesPerPixel == 1 else "RGB"
        jpegs = [
            encode(Image.fromarray(frame.squeeze(-1) if mode == "L" else frame, mode), "JPEG", quality=95)
            for frame in frames
        ]
        dataset.PixelData = encapsulate(jpegs)
        dataset["PixelData"].VR = "OB"
        dataset.file_meta.TransferSyntaxUID = syntax
        dataset.LossyImageCompression = "01"
        if mode == "RGB":  # Pillow stores colour JPEG as subsampled YCbCr
            dataset.PhotometricInterpretation = "YBR_FULL_422"
        return save(dataset)
    return _gdcm_transcode(uncompressed, syntax)


def jpeg_in_dicom(jpeg: bytes) -> bytes:
    """A JPEG file's bytes, as they are, as the one frame of a JPEG Baseline DICOM (as a PACS stores a JPEG)."""
    with Image.open(io.BytesIO(jpeg)) as image:
        mode, (width, height) = image.mode, image.size
    if mode not in ("L", "RGB"):
        raise ValueError("only grayscale and YCbCr JPEGs fit JPEG Baseline DICOM")
    dataset = dcmread(io.BytesIO(dicom(np.zeros((height, width), np.uint8), bits_stored=8)))
    if mode == "RGB":
        dataset.set_pixel_data(np.zeros((height, width, 3), np.uint8), "RGB", bits_stored=8)
        dataset.PhotometricInterpretation = "YBR_FULL_422"
    dataset.PixelData = encapsulate([jpeg])
    dataset["PixelData"].VR = "OB"
    dataset.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    dataset.LossyImageCompression = "01"
    return save(dataset)


def _gdcm_transcode(uncompressed: bytes, syntax: str) -> bytes:
    import gdcm

    with tempfile.TemporaryDirectory() as folder:
        source, target = Path(folder, "in.dcm"), Path(folder, "out.dcm")
        source.write_bytes(uncompressed)
        reader = gdcm.ImageReader()
        reader.SetFileName(str(source))
        if not reader.Read():
            raise RuntimeError("GDCM cannot read the uncompressed file")
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(syntax)))
        change.SetInput(reader.GetImage())
        if not change.Change():
            raise RuntimeError(f"GDCM cannot encode {syntax}")
        writer = gdcm.ImageWriter()
        writer.SetFileName(str(target))
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        if not writer.Write():
            raise RuntimeError("GDCM cannot write the file")
        return target.read_bytes()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` but whose pixel data is a few bytes.

    Decoding its pixels would fail (or, for a real bomb, exhaust memory); only a decoder that
    checks the size first refuses it with a size message.
    """

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def tiny_png(side: int = 1) -> bytes:
    """A valid ``side`` x ``side`` PNG."""
    return encode(Image.new("L", (side, side), 128), "PNG")


def png(pixels: np.ndarray) -> bytes:
    """A grayscale or RGB array as PNG bytes."""
    return encode(Image.fromarray(pixels), "PNG")


def _text_page() -> np.ndarray:
    page = Image.new("L", (850, 1100), 245)
    draw = ImageDraw.Draw(page)
    for row, top in enumerate(range(60, 1040, 18)):
        draw.text((60, top), "Discharge summary: the patient was seen and examined today"[: 30 + row % 28], fill=25)
    return np.asarray(page)


def _checkerboard(square: int, side: int = 1024) -> np.ndarray:
    rows, columns = np.mgrid[:side, :side]
    return ((rows // square + columns // square) % 2 * 255).astype(np.uint8)


def not_chest_xrays(xrays: list[Path]) -> dict[str, list[bytes]]:
    """Files of each kind that is not a frontal chest X-ray the model was made for, as a client sends them.

    Blank frames, noise, a text page, checkerboards, scikit-learn's sample photographs, and films
    made from ``xrays``: inverted, rotated by 90 and 270 degrees, and upright JPEGs whose EXIF
    orientation tag (6) turns them on their side when decoded.
    """
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(0)
    photos = []
    for pixels in load_sample_images().images:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
        photos.append(buffer.getvalue())
    sideways = []
    for path in xrays:  # a film fed sideways, and an upright JPEG whose EXIF says it is turned
        upright = Image.open(path).convert("L")
        exif = Image.Exif()
        exif[0x0112] = 6
        tagged = io.BytesIO()
        upright.save(tagged, "JPEG", quality=95, exif=exif)
        sideways.append(tagged.getvalue())
    return {
        "blank black": [png(np.zeros((1024, 1200), np.uint8))],
        "blank white": [png(np.full((1024, 1200), 255, np.uint8))],
        "uniform noise": [png(rng.integers(0, 256, (900, 1000), dtype=np.uint8)) for _ in range(3)],
        "gaussian noise": [png(np.clip(rng.normal(128, 40, (800, 800)), 0, 255).astype(np.uint8))],
        "text page": [png(_text_page())],
        "checkerboard": [png(_checkerboard(square)) for square in (8, 32, 128)],
        "photographs (scikit-learn's sample images)": photos,
        "inverted X-rays": [png(255 - gray_pixels(path)) for path in xrays],
        "X-rays rotated by 90 degrees": [png(np.rot90(gray_pixels(path), 1).copy()) for path in xrays],
        "X-rays rotated by 270 degrees": [png(np.rot90(gray_pixels(path), 3).copy()) for path in xrays],
        "upright JPEGs tagged EXIF orientation 6": sideways,
    }
