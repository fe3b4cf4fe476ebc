"""Compressed DICOM as PACS store it (issue 17 §1), made from a real X-ray, one file per transfer syntax.

Each file must decode to the uncompressed file's pixels (exactly for the lossless syntaxes, within
the codec's own error for the lossy ones) and score alike under a small Keras model; a codestream
whose own header disagrees with the DICOM header, a frame over the budget and a truncated fragment
are refused before anything is decoded; only frame 1 of a multi-frame file is decoded; intensities
follow the window or the stored bit depth, so one picture decodes alike whatever its container.
"""

from __future__ import annotations

import io
import logging
import struct
import warnings

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.encaps import encapsulate, get_frame
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

import xray_files as xf
from conftest import require_real_data
from pneumo.dicom import dicom_to_uint8, inflated_limit
from pneumo.errors import ImageError
from pneumo.pixels import MAX_PIXELS
from pneumo.preprocessing import InputSpec, decode_image

SIZE = 64

# syntax -> (BitsStored of the file, largest and mean absolute error allowed in 8-bit levels at full
# resolution). Lossless: exact. JPEG at Pillow's quality 95 and JPEG Extended (GDCM's default): a
# few levels. JPEG-LS near-lossless with NEAR=2: at most 2 levels, the codec's own guarantee. JPEG
# 2000 at 10:1: about one level on average, up to 16 at edges. Lossy syntaxes are tried on 8-bit
# files, where their error shows in every 8-bit level; the lossless ones on 12-bit files.
SYNTAXES = {
    RLELossless: (12, 0, 0),
    JPEGLSLossless: (12, 0, 0),
    JPEG2000Lossless: (12, 0, 0),
    JPEGLossless: (12, 0, 0),
    JPEGLosslessSV1: (12, 0, 0),
    DeflatedExplicitVRLittleEndian: (12, 0, 0),
    JPEGBaseline8Bit: (8, 4, 0.5),
    JPEGExtended12Bit: (8, 4, 0.5),
    JPEGLSNearLossless: (8, 2, 1.5),
    JPEG2000: (8, 16, 1.5),
}
# Largest score difference allowed for a lossy syntax (lossless ones must score identically), under
# the sensitised random model below: measured 0.001 (JPEG) to 0.009 (JPEG-LS NEAR=2), while
# another X-ray scores 0.07 apart.
LOSSY_SCORE_TOLERANCE = 0.015


@pytest.fixture(scope="module")
def xray_path():
    return sorted((require_real_data() / "train" / "NORMAL").iterdir())[0]


@pytest.fixture(scope="module")
def gray(xray_path) -> np.ndarray:
    return xf.gray_pixels(xray_path)


@pytest.fixture(scope="module")
def files(gray) -> dict[str, tuple[bytes, bytes]]:
    """syntax -> (the uncompressed file, the same file in that syntax)."""
    uncompressed = {bits: xf.dicom(gray, bits_stored=bits) for bits in (8, 12)}
    return {
        syntax: (uncompressed[bits], xf.compressed_dicom(uncompressed[bits], syntax))
        for syntax, (bits, _, _) in SYNTAXES.items()
    }


def _syntax_of(data: bytes) -> str:
    return str(dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta.TransferSyntaxUID)


@pytest.mark.parametrize("syntax", list(SYNTAXES), ids=[s.name for s in SYNTAXES])
def test_each_syntax_decodes_to_the_uncompressed_pixels(files, gray, syntax):
    uncompressed, compressed = files[syntax]
    assert _syntax_of(compressed) == syntax  # the builder really wrote that syntax
    _, largest, mean = SYNTAXES[syntax]
    reference = dicom_to_uint8(uncompressed, MAX_PIXELS)
    np.testing.assert_array_equal(reference, gray)
    error = np.abs(dicom_to_uint8(compressed, MAX_PIXELS).astype(int) - reference)
    assert error.max() <= largest and error.mean() <= mean, (error.max(), error.mean())
    model_input = np.abs(
        decode_image(compressed, InputSpec(SIZE, 1)).astype(int) - decode_image(uncompressed, InputSpec(SIZE, 1))
    )
    assert model_input.max() <= largest
    if largest:
        assert error.max() > 0  # lossy really was lossy: the comparison above can fail


def test_each_syntax_scores_like_the_uncompressed_file(files, gray):
    import keras

    from pneumo.config import CNNConfig
    from pneumo.model_io import predict_probabilities
    from pneumo.models import build_aug_cnn

    keras.utils.set_random_seed(0)
    model = build_aug_cnn(SIZE, 1, CNNConfig(width=4))
    # Random weights score every X-ray about 0.5 +- 0.002: too flat to tell pictures apart. Scale
    # the logit 100-fold around this X-ray's, so that scores spread like a trained model's.
    reference = decode_image(xf.dicom(gray), InputSpec(SIZE, 1))
    score = predict_probabilities(model, reference[None])[0]
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)][-1]
    kernel, bias = dense.get_weights()
    dense.set_weights([kernel * 100, (bias - np.log(score / (1 - score))) * 100])
    other = xf.gray_pixels(sorted((require_real_data() / "train" / "PNEUMONIA").iterdir())[0])
    syntaxes = list(SYNTAXES)
    batch = np.stack(
        [reference, decode_image(xf.dicom(other), InputSpec(SIZE, 1))]
        + [decode_image(files[s][0], InputSpec(SIZE, 1)) for s in syntaxes]
        + [decode_image(files[s][1], InputSpec(SIZE, 1)) for s in syntaxes]
    )
    scores = predict_probabilities(model, batch)
    assert abs(scores[1] - scores[0]) > 2 * LOSSY_SCORE_TOLERANCE  # the tolerance tells X-rays apart
    before, after = scores[2 : 2 + len(syntaxes)], scores[2 + len(syntaxes) :]
    for syntax, uncompressed, compressed in zip(syntaxes, before, after):
        tolerance = LOSSY_SCORE_TOLERANCE if SYNTAXES[syntax][1] else 0.0
        assert abs(compressed - uncompressed) <= tolerance, (syntax.name, uncompressed, compressed)


def test_an_8bit_jpeg_and_its_pixels_as_uncompressed_dicom_decode_identically(xray_path):
    jpeg = xray_path.read_bytes()
    with Image.open(io.BytesIO(jpeg)) as image:
        pixels = np.asarray(image.convert("L"))
    dicom = xf.dicom(pixels, bits_stored=8)
    np.testing.assert_array_equal(dicom_to_uint8(dicom, MAX_PIXELS), pixels)  # no stretch of its own range
    # At the X-ray's own size the JPEG decodes at full scale (no reduced-size DCT draft): same input.
    spec = InputSpec(max(pixels.shape), 1)
    np.testing.assert_array_equal(decode_image(dicom, spec), decode_image(jpeg, spec))


def test_the_window_maps_to_0_255_without_a_stretch(gray):
    center, width = 1500.0, 2000.0
    stored = np.round(gray.astype(np.float64) * 4095 / 255.0)
    # DICOM PS3.3 C.11.2.1.2.1 linear window onto 0..255: values left of it are black, right white.
    expected = np.round(np.clip((stored - (center - 0.5)) / (width - 1) + 0.5, 0, 1) * 255).astype(np.uint8)
    assert expected.min() == 0 and 0 < (expected == 255).mean() < 0.5
    np.testing.assert_array_equal(dicom_to_uint8(xf.dicom(gray, window=(center, width)), MAX_PIXELS), expected)


def _with(data: bytes, **header) -> bytes:
    dataset = dcmread(io.BytesIO(data))
    for keyword, value in header.items():
        setattr(dataset, keyword, value)
    return xf.save(dataset)


def test_signed_pixels_rescale_and_monochrome1_map_by_the_header_range(gray, files):
    stored = np.round(gray.astype(np.float64) * 4095 / 255.0)
    signed = xf.dicom(gray)
    dataset = dcmread(io.BytesIO(signed))
    dataset.set_pixel_data((stored - 2048).astype(np.int16), "MONOCHROME2", bits_stored=12)
    assert dataset.PixelRepresentation == 1
    np.testing.assert_array_equal(dicom_to_uint8(xf.save(dataset), MAX_PIXELS), gray)
    # A positive rescale moves the range with the values: the same picture.
    moved = _with(xf.dicom(gray), RescaleSlope=2, RescaleIntercept=-1000)
    np.testing.assert_array_equal(dicom_to_uint8(moved, MAX_PIXELS), gray)
    # A negative slope makes high stored values the low output values: the picture reverses.
    flipped = _with(xf.dicom(gray), RescaleSlope=-1, RescaleIntercept=4095)
    np.testing.assert_array_equal(dicom_to_uint8(flipped, MAX_PIXELS), 255 - gray)
    # MONOCHROME1, compressed: inverted back to the picture.
    rle = xf.compressed_dicom(xf.dicom(gray, "MONOCHROME1"), RLELossless)
    np.testing.assert_array_equal(dicom_to_uint8(rle, MAX_PIXELS), gray)


# --- hostile files ------------------------------------------------------------------------------


@pytest.fixture
def decoder_calls(monkeypatch) -> list:
    """Records every call of pydicom's pixel decoding (pneumo.dicom imports it when decoding)."""
    import pydicom.pixels

    calls = []
    original = pydicom.pixels.pixel_array
    monkeypatch.setattr(pydicom.pixels, "pixel_array", lambda *a, **k: calls.append(k) or original(*a, **k))
    return calls


def _reframed(data: bytes, frames: list[bytes], **header) -> bytes:
    """``data`` with its encapsulated pixel data replaced by ``frames`` (one fragment each)."""
    dataset = dcmread(io.BytesIO(data))
    dataset.PixelData = encapsulate(frames)
    for keyword, value in header.items():
        setattr(dataset, keyword, value)
    return xf.save(dataset)


def _frame(data: bytes) -> bytes:
    return get_frame(dcmread(io.BytesIO(data)).PixelData, 0, number_of_frames=1)


def _jp2(codestream: bytes, rows: int, cols: int) -> bytes:
    """A JP2 file around a J2K codestream: signature, file type, header (ihdr, colr) and codestream boxes."""

    def box(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", 8 + len(payload)) + kind + payload

    ihdr = box(b"ihdr", struct.pack(">IIHBBBB", rows, cols, 1, 11, 7, 0, 0))
    colr = box(b"colr", struct.pack(">BBBI", 1, 0, 0, 17))  # greyscale
    return (
        box(b"jP  ", b"\r\n\x87\n")
        + box(b"ftyp", b"jp2 " + struct.pack(">I", 0) + b"jp2 ")
        + box(b"jp2h", ihdr + colr)
        + box(b"jp2c", codestream)
    )


def test_a_jp2_wrapped_codestream_is_read_through_its_boxes(files, gray):
    uncompressed, compressed = files[JPEG2000Lossless]
    jp2 = _reframed(compressed, [_jp2(_frame(compressed), *gray.shape)])
    np.testing.assert_array_equal(dicom_to_uint8(jp2, MAX_PIXELS), dicom_to_uint8(uncompressed, MAX_PIXELS))


@pytest.mark.parametrize("syntax", [JPEGBaseline8Bit, JPEGLosslessSV1, JPEGLSLossless, JPEG2000Lossless, "jp2"])
def test_a_codestream_larger_than_its_header_is_refused_before_decoding(files, gray, decoder_calls, syntax):
    # The header says 40 x 40 pixels; the codestream holds the whole X-ray.
    compressed = files[JPEG2000Lossless if syntax == "jp2" else syntax][1]
    frame = _jp2(_frame(compressed), *gray.shape) if syntax == "jp2" else _frame(compressed)
    hostile = _reframed(compressed, [frame], Rows=40, Columns=40)
    with pytest.raises(ImageError, match="codestream dimensions differ from the header"):
        dicom_to_uint8(hostile, MAX_PIXELS)
    assert not decoder_calls


def test_an_embedded_jpeg_of_4000x4000_in_a_small_header_is_refused_undecoded(files, decoder_calls):
    big = xf.encode(Image.new("L", (4000, 4000)), "JPEG")
    with pytest.raises(ImageError, match="codestream dimensions differ"):
        decode_image(_reframed(files[JPEGBaseline8Bit][1], [big]), InputSpec(SIZE, 1))
    assert not decoder_calls


def test_an_rle_segment_count_that_disagrees_with_the_header_is_refused(files, decoder_calls):
    _, rle = files[RLELossless]  # 16-bit words: two segments
    frame = _frame(rle)
    one_segment = struct.pack("<16I", 1, 64, *([0] * 14)) + frame[64:]
    with pytest.raises(ImageError, match="segment count"):
        dicom_to_uint8(_reframed(rle, [one_segment]), MAX_PIXELS)
    assert not decoder_calls


def test_a_compressed_frame_over_the_budget_is_refused_from_the_header(files, decoder_calls):
    compressed = files[JPEG2000Lossless][1]
    with pytest.raises(ImageError, match="over the 1,000-pixel limit") as caught:
        dicom_to_uint8(compressed, 1000)
    huge = _with(compressed, Rows=65535, Columns=65535)
    with pytest.raises(ImageError, match="over the 25,000,000-pixel limit"):
        decode_image(huge, InputSpec(SIZE, 1))
    assert not decoder_calls and "224" not in str(caught.value)


@pytest.mark.parametrize("syntax", [JPEGBaseline8Bit, JPEGLSLossless, JPEGLosslessSV1, JPEG2000Lossless, RLELossless])
def test_truncated_fragments_are_refused(files, decoder_calls, syntax):
    compressed = files[syntax][1]
    half = _frame(compressed)[: len(_frame(compressed)) // 2]
    with pytest.raises(ImageError, match="truncated"):
        dicom_to_uint8(_reframed(compressed, [half]), MAX_PIXELS)
    # A file cut inside its pixel data: the fragment's item claims more bytes than there are.
    with pytest.raises(ImageError, match="truncated|unreadable"):
        dicom_to_uint8(compressed[: len(compressed) - 1000], MAX_PIXELS)
    # JPEG codestreams end with a marker, checked before decoding; an RLE segment has no end of its
    # own, so a short one is found by the decoder, which refuses it.
    assert not decoder_calls or syntax == RLELossless


@pytest.mark.parametrize("syntax", [JPEGBaseline8Bit, JPEGLSLossless, JPEG2000Lossless, RLELossless])
def test_only_frame_1_of_a_compressed_multi_frame_file_is_decoded(files, decoder_calls, syntax):
    uncompressed, compressed = files[syntax]
    # Frames 2 and 3 are garbage: decoding them would fail.
    multi = _reframed(compressed, [_frame(compressed), b"\xff\xd8 garbage", b"more garbage"], NumberOfFrames=3)
    np.testing.assert_array_equal(dicom_to_uint8(multi, MAX_PIXELS), dicom_to_uint8(compressed, MAX_PIXELS))
    assert decoder_calls and all(call.get("index") == 0 for call in decoder_calls)


def test_a_deflated_dataset_is_inflated_within_its_bound_and_refused_beyond(files):
    _, deflated = files[DeflatedExplicitVRLittleEndian]
    assert dicom_to_uint8(deflated, MAX_PIXELS).shape == (224, 224)
    bound = inflated_limit(100)  # 100 pixels' worth and the header allowance
    zeros = dcmread(io.BytesIO(deflated))
    zeros.PixelData = bytes(bound + 1)  # inflates past the bound: refused without inflating it all
    with pytest.raises(ImageError, match="inflates to more than"):
        dicom_to_uint8(xf.save(zeros), 100)
    with pytest.raises(ImageError, match="deflated dataset is truncated|corrupt"):
        dicom_to_uint8(deflated[: len(deflated) // 2], MAX_PIXELS)


def _bad_number_of_frames(data: bytes) -> bytes:
    """``data`` with NumberOfFrames (0028,0008), an IS, made ``9x``: pydicom warns and logs that value."""
    data = bytearray(_with(data, NumberOfFrames=77))
    tag = b"\x28\x00\x08\x00IS\x02\x00"
    at = data.index(tag) + len(tag)
    data[at : at + 2] = b"9x"
    return bytes(data)


def test_messages_logs_and_warnings_quote_no_header_value(files, caplog):
    _, compressed = files[JPEG2000Lossless]
    hostile = [
        _bad_number_of_frames(compressed),
        _with(compressed, Rows=4321),
        _with(compressed, PhotometricInterpretation="PALETTE COLOR"),
        _with(compressed, BitsStored=29),
        _with(compressed, WindowCenter=4321, WindowWidth=-4321),
    ]
    meta = dcmread(io.BytesIO(compressed))
    meta.file_meta.TransferSyntaxUID = "1.2.840.4321.99"
    hostile.append(xf.save(meta))
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        messages = []
        for data in hostile:
            with pytest.raises(ImageError) as error:
                dicom_to_uint8(data, MAX_PIXELS)
            messages.append(str(error.value))
    assert b"9x" in hostile[0]  # the bad NumberOfFrames really is in the file
    for text in messages + [r.getMessage() for r in caplog.records] + [str(w.message) for w in caught]:
        for value in ("9x", "4321", "PALETTE", "29"):
            assert value not in text, text
    assert "NumberOfFrames" in messages[0] and "dimensions differ" in messages[1]
    assert "transfer syntax of this file is not accepted" in messages[-1]
