"""decode_image and the served model's cell decoder, on images of every mode and on real X-rays in every
accepted and refused form."""

from __future__ import annotations

import base64
import io
import warnings

import numpy as np
import pytest
from PIL import Image, ImageFile

import xray_files as xf
from conftest import require_real_data
from pneumo.errors import ImageError
from pneumo.pixels import MAX_PIXELS
from pneumo.preprocessing import InputSpec, decode_image
from pneumo.serving import decode_base64_image

SIZE = 64


@pytest.fixture(scope="module")
def xray_path():
    return sorted((require_real_data() / "train" / "PNEUMONIA").iterdir())[0]


@pytest.fixture(scope="module")
def gray(xray_path) -> np.ndarray:
    return xf.gray_pixels(xray_path)


@pytest.fixture(scope="module")
def reference(gray) -> np.ndarray:
    return decode_image(xf.reference_png(gray), InputSpec(SIZE, 1)).astype(int)


def test_real_jpeg_gives_uint8_arrays_of_the_requested_shape(xray_path):
    data = xray_path.read_bytes()
    gray = decode_image(data, InputSpec(SIZE, 1))
    rgb = decode_image(data, InputSpec(96, 3))
    assert gray.shape == (SIZE, SIZE, 1) and gray.dtype == np.uint8
    assert rgb.shape == (96, 96, 3) and rgb.dtype == np.uint8
    assert gray.std() > 20  # a radiograph, not a blank
    # The shared JPEGs are gray saved as RGB: the three channels must agree.
    assert np.abs(rgb[..., 0].astype(int) - rgb[..., 2]).max() <= 2


@pytest.mark.parametrize(
    "variant, tolerance",
    [
        (lambda g: xf.rgba_png(g), 0),
        (lambda g: xf.png16(g), 0),
        (lambda g: xf.cmyk_jpeg(g), 8),  # lossy
        (lambda g: xf.dicom(g, "MONOCHROME2", bits_stored=12), 0),
        (lambda g: xf.dicom(g, "MONOCHROME2", bits_stored=16), 0),
        (lambda g: xf.dicom(g, "MONOCHROME2", bits_stored=8), 0),
        (lambda g: xf.dicom(g, "MONOCHROME1", bits_stored=12), 0),
        (lambda g: xf.dicom(g, "MONOCHROME1", bits_stored=8), 0),
    ],
    ids=[
        "rgba-png",
        "16bit-png",
        "cmyk-jpeg",
        "dicom-12bit",
        "dicom-16bit",
        "dicom-8bit",
        "dicom-monochrome1-12bit",
        "dicom-monochrome1-8bit",
    ],
)
def test_accepted_formats_decode_to_the_same_picture(gray, reference, variant, tolerance):
    decoded = decode_image(variant(gray), InputSpec(SIZE, 1)).astype(int)
    assert decoded.shape == reference.shape
    assert np.abs(decoded - reference).max() <= tolerance
    assert np.abs(decoded - reference).mean() <= max(tolerance / 4, 0.0)


def test_monochrome1_is_inverted(gray, reference):
    # Without the inversion, bone would be dark: the result would anti-correlate with the picture.
    decoded = decode_image(xf.dicom(gray, "MONOCHROME1"), InputSpec(SIZE, 1)).astype(float).ravel()
    assert np.corrcoef(decoded, reference.ravel())[0, 1] > 0.999


def test_dicom_voi_window_is_applied(gray):
    center, width = 2048.0, 1024.0
    stored = np.round(gray.astype(np.float64) * 4095 / 255.0)
    # DICOM PS3.3 C.11.2.1.2.1 linear window onto 0..255 (no stretch of its own range afterwards).
    expected = np.round(np.clip((stored - (center - 0.5)) / (width - 1) + 0.5, 0, 1) * 255).astype(np.uint8)
    windowed = decode_image(xf.dicom(gray, window=(center, width)), InputSpec(SIZE, 1)).astype(int)
    unwindowed = decode_image(xf.dicom(gray), InputSpec(SIZE, 1)).astype(int)
    assert np.abs(windowed - decode_image(xf.reference_png(expected), InputSpec(SIZE, 1)).astype(int)).max() <= 2
    assert np.abs(windowed - unwindowed).mean() > 20  # the window really changed the picture


def test_transparent_areas_become_black(gray):
    # A white image whose left half is fully transparent: black there, exactly white elsewhere.
    rgba = np.full((40, 40, 4), 255, np.uint8)
    rgba[:, :20, 3] = 0
    array = decode_image(xf.encode(Image.fromarray(rgba, "RGBA"), "PNG"), InputSpec(40, 1))[..., 0]
    assert array[:, :18].max() == 0 and array[:, 22:].min() == 255
    # A real X-ray whose top half is transparent: black there, the picture below keeps its detail.
    decoded = decode_image(xf.rgba_png(gray, transparent_rows=gray.shape[0] // 2), InputSpec(SIZE, 1))
    assert decoded[: SIZE // 2 - 1].max() == 0
    assert decoded[SIZE // 2 + 1 :].std() > 20


def test_exif_orientation_is_applied():
    picture = np.zeros((80, 60), np.uint8)
    picture[:40] = 255  # bright top half
    exif = Image.Exif()
    exif[0x0112] = 3  # rotate 180 degrees for display
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="JPEG", exif=exif.tobytes(), quality=95)
    decoded = decode_image(buffer.getvalue(), InputSpec(32, 1))[..., 0].astype(int)
    assert decoded[24:].mean() > 200 and decoded[:8].mean() < 50


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda path: b"", "empty image data"),
        (lambda path: b"this is a text file, not an X-ray\n" * 10, "not a recognised image"),
        (lambda path: bytes(range(256)) * 4, "not a recognised image"),
        (lambda path: b"patient notes, not an image", "not a recognised image"),
        (lambda path: path.read_bytes()[: len(path.read_bytes()) // 3], "truncated or corrupt"),
        (
            lambda path: _truncated(xf.encode(Image.fromarray(xf.noise(300, 300, 3), "RGB"), "JPEG", quality=95)),
            "truncated or corrupt",
        ),
        (lambda path: xf.tiny_png(1), "1x1 pixels, smaller than 32"),
        (lambda path: xf.encode(Image.fromarray(xf.noise(20, 80), "L"), "PNG"), "80x20 pixels, smaller than 32"),
        (lambda path: xf.png_header_only(100_000, 100_000), "image too large"),
        (lambda path: xf.png_header_only(6_000, 6_000), "6000x6000 pixels, over the 25,000,000-pixel limit"),
    ],
    ids=[
        "empty",
        "text",
        "random-bytes",
        "notes",
        "truncated-jpeg",
        "truncated-synthetic-jpeg",
        "1x1",
        "80x20",
        "bomb-100k",
        "bomb-6k",
    ],
)
# PIL warns about the 8k image when reading its header; the decoder's own check then refuses it.
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_bad_bytes_raise_image_error_naming_the_problem(xray_path, make, message):
    with pytest.raises(ImageError, match=message):
        decode_image(make(xray_path), InputSpec(SIZE, 1))


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


@pytest.mark.parametrize("side", [60_000, 100_000])
def test_decompression_bomb_is_refused_before_decoding(side, monkeypatch):
    # The header claims billions of pixels in a file of a few dozen bytes. Refusing from the header
    # is the only way to get a size message (decoding would report corrupt data), and the work is
    # bounded by the header: PIL's pixel decoder (ImageFile.load) is never called.
    data = xf.png_header_only(side, side)
    assert len(data) < 200 and side * side > MAX_PIXELS
    loads = []
    original = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda image: loads.append(image) or original(image))
    decode_image(xf.tiny_png(64), InputSpec(SIZE, 1))
    assert loads, "the probe must see an ordinary decode"
    loads.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no allocation warning either: the pixels are never touched
        with pytest.raises(ImageError, match="too large|over the"):
            decode_image(data, InputSpec(SIZE, 1))
    assert not loads, "the bomb's pixels were decoded"


# --- synthetic images of every mode -------------------------------------------------------------


def test_samples_really_have_their_modes(sample_bytes):
    expected = {
        "L.jpeg": "L",
        "RGB.jpeg": "RGB",
        "CMYK.jpeg": "CMYK",
        "LA.png": "LA",
        "RGBA.png": "RGBA",
        "P.png": "P",
        "I16.png": "I;16",
    }
    for name, mode in expected.items():
        with Image.open(io.BytesIO(sample_bytes[name])) as image:
            assert image.mode == mode, name


@pytest.mark.parametrize("name", sorted(xf.SAMPLES))
@pytest.mark.parametrize("image_size,channels", [(64, 3), (48, 1), (224, 1)])
def test_decode_image_shape_and_dtype_for_every_mode(sample_bytes, name, image_size, channels):
    array = decode_image(sample_bytes[name], InputSpec(image_size, channels))
    assert array.shape == (image_size, image_size, channels)
    assert array.dtype == np.uint8
    assert array.max() > array.min(), "noise must survive decoding"


def test_sixteen_bit_png_is_stretched_to_the_full_8_bit_range():
    # A 12-bit detector image stored in 16 bits: cutting to the low byte would garble it.
    ramp = np.tile(np.linspace(0, 4095, 64).astype(np.uint16), (64, 1))
    array = decode_image(xf.encode(Image.fromarray(ramp), "PNG"), InputSpec(64, 1))[..., 0]
    assert array.min() == 0 and array.max() == 255
    assert np.all(np.diff(array.astype(int), axis=1) >= 0), "intensity order must be kept"


def test_grayscale_and_rgb_decodes_agree_on_a_gray_image():
    gray = xf.noise(64, 64)
    data = xf.encode(Image.fromarray(gray, "L"), "PNG")
    one, three = decode_image(data, InputSpec(64, 1)), decode_image(data, InputSpec(64, 3))
    np.testing.assert_array_equal(one[..., 0], gray)
    np.testing.assert_array_equal(three, np.repeat(one, 3, axis=-1))


# --- the served model's cell decoder ------------------------------------------------------------


def test_dicom_with_huge_dimensions_is_refused_before_its_pixels(gray):
    data = bytearray(xf.dicom(gray[:40, :40]))
    # Patch Rows (0028,0010) to 65535 and Columns (0028,0011) to 65535: 4.3 G pixels claimed.
    for tag in (b"\x28\x00\x10\x00US\x02\x00", b"\x28\x00\x11\x00US\x02\x00"):
        at = data.index(tag) + len(tag)
        data[at : at + 2] = (65535).to_bytes(2, "little")
    with pytest.raises(ImageError, match="frame is over the 25,000,000-pixel limit") as error:
        decode_image(bytes(data), InputSpec(SIZE, 1))
    assert "65535" not in str(error.value)  # no header value in the message


def test_cell_decoder_accepts_wrapped_base64_and_data_urls(xray_path):
    text = base64.b64encode(xray_path.read_bytes()).decode()
    expected = decode_image(xray_path.read_bytes(), InputSpec(SIZE, 1))
    wrapped = "\n".join(text[i : i + 76] for i in range(0, len(text), 76))  # `base64` tool output
    for cell in (text, wrapped, "data:image/jpeg;base64," + text, text.encode()):
        assert np.array_equal(decode_base64_image(cell, InputSpec(SIZE, 1)), expected)


@pytest.mark.parametrize(
    "cell, message",
    [
        ("", "empty string"),
        ("   ", "empty string"),
        ("not base64!!", "not valid base64"),
        ("QUJ", "not valid base64"),  # bad padding
        (None, "missing"),
        (float("nan"), "missing"),
        (17, "must be base64 text"),
    ],
)
def test_cell_decoder_refuses_bad_cells(cell, message):
    with pytest.raises(ImageError, match=message):
        decode_base64_image(cell, InputSpec(SIZE, 1))
