"""Request limits and refusals that never echo the request (issues 9 and 18), without a server.

The HTTP behaviour is tested against a real `mlflow models serve` in test_serving.py.
"""

from __future__ import annotations

import base64
import inspect
import io
import json
import logging
import warnings

import mlflow
import pandas as pd
import pytest
from mlflow.types import ParamSchema, ParamSpec
from PIL import Image

import xray_files as xf
from pneumo import limits
from pneumo.errors import ImageError
from pneumo.limits import MAX_COLUMNS, MAX_ROWS, RequestError, check_request, read_request, refuse_safely, strip_base64

SECRET = base64.b64encode(b"patient image bytes " * 10).decode()


def test_a_request_error_keeps_its_message_when_the_server_rewrites_it():
    error = RequestError("row 0: not a recognised image")
    error.message = f"Failed to predict data '{SECRET}'. \nError: {error.message}"  # what MLflow 3.17 does
    assert error.message == "row 0: not a recognised image"
    assert SECRET not in error.serialize_as_json() and error.get_http_status_code() == 400


class _Model:
    @refuse_safely
    def predict(self, context, model_input, params=None):
        raise ValueError(f"could not broadcast {SECRET}")  # a library error quoting data


def test_an_unexpected_error_becomes_a_500_naming_only_its_type(caplog):
    with pytest.raises(RequestError) as caught:
        _Model().predict(None, pd.DataFrame({"image": [SECRET]}))
    assert caught.value.message == "internal error while predicting (ValueError); nothing was predicted"
    assert caught.value.get_http_status_code() == 500 and caught.value.__cause__ is None
    assert SECRET not in caplog.text


@pytest.mark.parametrize(
    "frame, message",
    [
        (pd.DataFrame({"img": [SECRET]}), "missing column 'image'"),
        (pd.DataFrame({"image": ["QUJD"] * (MAX_ROWS + 1)}), f"over the limit of {MAX_ROWS} images"),
        ("not a frame", "expected a table"),
    ],
)
def test_check_request_refuses_by_name(frame, message):
    with pytest.raises(RequestError, match=message):
        check_request(frame)


def test_cell_and_request_size_limits(monkeypatch):
    monkeypatch.setattr(limits, "MAX_CELL_CHARS", 10)
    with pytest.raises(RequestError, match="row 1: 11 characters of base64, over the limit of 10 per image"):
        check_request(pd.DataFrame({"image": ["QUJD", "Q" * 11]}))
    monkeypatch.setattr(limits, "MAX_CELL_CHARS", 100)
    monkeypatch.setattr(limits, "MAX_REQUEST_CHARS", 15)
    with pytest.raises(RequestError, match="16 characters of base64 in all, over the limit of 15 per request"):
        check_request(pd.DataFrame({"image": ["Q" * 8, "Q" * 8]}))


def test_strip_base64_removes_whitespace_only():
    assert strip_base64(" QU\nJD\r\n\t") == b"QUJD"
    assert strip_base64("QUJD\u00e9") == b"QUJD?"  # non-ASCII stays, and strict decoding refuses it


# --- reading the raw request (issue 18 §2, §3) ---

PARAMS = ParamSchema([ParamSpec("tta", "boolean", False)])
PHI = "PatientName=DOE^JANE PatientID=MRN4471"


def refusal(data, mime="application/json") -> str:
    with pytest.raises(RequestError) as caught:
        read_request(data, mime, PARAMS)
    assert "MRN4471" not in caught.value.message and "DOE" not in caught.value.message
    return caught.value.message


@pytest.mark.parametrize(
    "body",
    [
        b'{"dataframe_records": [' + b"{}, " * 2_000_000 + b"{}]}",
        b'{"dataframe_split": {"columns": ["image"], "data": [' + b'[""], ' * 1_000_000 + b'[""]]}}',
        b'{"inputs": {"image": [' + b'"", ' * 1_000_000 + b'""]}}',
    ],
)
def test_rows_are_counted_before_the_json_is_parsed(body):
    message = refusal(body)
    assert message.startswith("refused before parsing") and f"the limit of {MAX_ROWS} images per request" in message


def test_csv_lines_are_counted_outside_quoted_fields():
    assert "refused before parsing" in refusal(b"image\n" + b"QUJD\n" * (MAX_ROWS + 2), "text/csv")
    wrapped = '"' + "QUJD\n" * 500 + '"'  # line-wrapped base64 in one quoted field is one row
    assert read_request(f"id,image\nx,{wrapped}\n", "text/csv", PARAMS)["dataframe_split"]["data"] == [[wrapped[1:-1]]]


def test_a_body_over_the_byte_limit_is_refused_unread(monkeypatch):
    monkeypatch.setattr(limits, "MAX_BODY_BYTES", 100)
    assert refusal(b"{" + b" " * 100 + b"}") == "the request body is 102 bytes, over the limit of 100"


def test_a_raw_jpeg_sent_as_csv_is_refused_without_quoting_it():
    jpeg = xf.encode(Image.new("L", (64, 64)), "JPEG", comment=PHI.encode())
    assert PHI.encode() in jpeg
    assert refusal(jpeg, "text/csv") == "the CSV body is not UTF-8 text (send base64 text, one image per row)"


@pytest.mark.parametrize(
    "params, message",
    [
        ({"tta": PHI}, "params.tta must be true or false, got str"),
        ({"tta": 1}, "params.tta must be true or false, got int"),
        ({"MRN4471": True, "DOE": 1}, "2 unknown parameter(s) in params (not named here); this model accepts: tta"),
        ([PHI], "params must be a JSON object, got list"),
    ],
)
def test_params_are_refused_without_naming_or_quoting_them(params, message):
    assert refusal(json.dumps({"dataframe_split": {"columns": ["image"], "data": [["QUJD"]]}, "params": params})) == (
        message
    )


EXTRA = {"image": "QUJD", "MRN4471": PHI}
ONLY_IMAGE = {"dataframe_split": {"columns": ["image"], "data": [["QUJD"], [None]]}}


@pytest.mark.parametrize(
    "body",
    [
        {"dataframe_split": {"columns": ["MRN4471", "image"], "index": [7, 8], "data": [[PHI, "QUJD"], [PHI, None]]}},
        {"dataframe_records": [EXTRA, {"MRN4471": PHI}]},
        {"instances": [EXTRA, {"MRN4471": PHI}]},
        {"inputs": {"image": ["QUJD", None], "MRN4471": [PHI, PHI]}},
    ],
)
def test_mlflow_gets_the_image_column_only_in_every_format(body):
    assert read_request(json.dumps(body), "application/json", PARAMS) == ONLY_IMAGE


def test_csv_reaches_mlflow_as_the_image_column_only_and_parquet_is_refused():
    frame = pd.DataFrame({"MRN4471": [PHI, PHI], "image": ["QUJD", None]})
    assert read_request(frame.to_csv(index=False), "text/csv", PARAMS) == ONLY_IMAGE
    assert refusal(frame.to_parquet(), "application/vnd.apache.parquet").startswith("content type not accepted")


@pytest.mark.parametrize(
    "body, message",
    [
        ({"dataframe_records": [{"image": {"MRN4471": PHI}}]}, "row 0: 'image' must be base64 text, got dict"),
        ({"dataframe_split": {"columns": ["image"], "data": [["QUJD", PHI]]}}, "row 0 of dataframe_split is not"),
        ({"dataframe_records": [PHI]}, "record 0 is not a JSON object"),
        ({"MRN4471": [PHI]}, "exactly one of dataframe_split, dataframe_records, inputs or instances (it holds 0)"),
        ({"dataframe_records": [{"MRN4471": PHI}]}, "missing column 'image'"),
        ({"inputs": {f"c{i}": [1] for i in range(MAX_COLUMNS + 1)}}, f"over the limit of {MAX_COLUMNS} columns"),
        ({"instances": [{"image": "QUJD"}] * (MAX_ROWS + 1)}, f"over the limit of {MAX_ROWS} images per request"),
    ],
)
def test_malformed_requests_are_refused_by_name(body, message):
    assert message in refusal(json.dumps(body))


def test_a_body_that_is_not_json_is_refused_without_quoting_it():
    assert refusal(f'{{"dataframe_split": "{PHI}').startswith("the request body is not valid JSON")
    assert refusal("[" * 5000).startswith("refused before parsing")
    assert "content type not accepted" in refusal(PHI.encode(), "text/plain")


# --- the pixel and time budgets of one request ---


def test_header_pixels_reads_sizes_without_decoding():
    gray = xf.noise(300, 200)
    assert limits.header_pixels(xf.png16(gray)) == 60_000
    assert limits.header_pixels(xf.encode(Image.fromarray(gray), "JPEG")) == 60_000
    assert limits.header_pixels(xf.dicom(gray)) == 60_000
    assert limits.header_pixels(deflated_dicom(gray)) == 60_000
    assert limits.header_pixels(xf.png_header_only(5000, 5000)) == 25_000_000  # no pixel data at all
    # Over the per-image budget, or no image: the decoder refuses those from the header, at no cost.
    assert limits.header_pixels(xf.png_header_only(100_000, 100_000)) == 0
    assert limits.header_pixels(b"\0" * 128 + b"DICM" + b"\xff" * 64) == 0
    assert limits.header_pixels(b"not an image") == 0


def deflated_dicom(gray) -> bytes:
    import pydicom
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    dataset = pydicom.dcmread(io.BytesIO(xf.dicom(gray)))
    dataset.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_the_request_pixel_budget_sums_the_headers():
    limits.check_request_pixels([xf.png_header_only(5000, 5000)] * 8 + [None])  # 200 M: at the limit
    with pytest.raises(RequestError, match=r"hold 225,000,000 pixels in all, over the limit of 200,000,000 per req"):
        limits.check_request_pixels([xf.png_header_only(5000, 5000)] * 9)


def test_the_decode_time_budget():
    limits.check_decode_time(limits.DECODE_SECONDS)
    with pytest.raises(RequestError, match=f"decoding took over {limits.DECODE_SECONDS:g} s, the limit per request"):
        limits.check_decode_time(limits.DECODE_SECONDS + 0.1)


def test_prediction_slots_are_read_when_made_not_at_import(monkeypatch):
    monkeypatch.setenv("PNEUMO_SERVE_CONCURRENCY", "2")
    slots = limits.PredictionSlots.from_environment()
    assert slots.concurrency == 2
    with slots, slots:
        assert not slots._semaphore.acquire(blocking=False)  # both held: a third waits
    assert slots._semaphore.acquire(blocking=False)
    monkeypatch.setenv("PNEUMO_SERVE_CONCURRENCY", "0")
    unbounded = limits.PredictionSlots.from_environment()
    with unbounded, unbounded, unbounded:
        assert unbounded.concurrency == 0
    assert not hasattr(limits, "CONCURRENCY") and not hasattr(limits, "_slots")


def test_pydicom_messages_quoting_a_header_are_withheld(caplog, capfd):
    import pydicom

    from pneumo.preprocessing import InputSpec, decode_image

    dataset = pydicom.dcmread(io.BytesIO(xf.dicom(xf.noise(64, 64))))
    dataset.NumberOfFrames = "1234567"
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    bad_frames = buffer.getvalue().replace(b"1234567 ", b"MRN4471 ")
    logger = logging.getLogger("pydicom")
    with warnings.catch_warnings():
        limits.withhold_decoder_messages()
        try:
            with pytest.raises(ImageError, match="NumberOfFrames"):
                decode_image(bad_frames, InputSpec(32, 1))
            # Whatever pydicom itself still logs (pneumo.dicom already drops its records) is withheld.
            logger.warning("Invalid value for VR IS: 'MRN4471'")
        finally:
            logger.removeFilter(limits._WITHHOLD)
    assert "withheld" in caplog.text
    assert "MRN4471" not in caplog.text and "MRN4471" not in "".join(capfd.readouterr())


# --- the one hook into MLflow's internals ---


def test_the_scoring_server_hook_matches_this_mlflow_version():
    """Fails on any MLflow upgrade: review guard_scoring_server against the new scoring server, then update."""
    from mlflow.pyfunc import scoring_server

    assert mlflow.__version__ == "3.17.2"
    original = inspect.unwrap(scoring_server.invocations)
    assert list(inspect.signature(original).parameters) == ["data", "content_type", "model", "input_schema"]
    # The server looks invocations up by name at each request (so the replacement is used) ...
    assert "asyncio.to_thread(invocations, data, content_type, model, input_schema)" in inspect.getsource(
        scoring_server.init
    )
    # ... and a parsed request passes through its JSON reader unchanged.
    request = {"dataframe_split": {"columns": ["image"], "data": [["QUJD"]]}}
    assert scoring_server._decode_json_input(request) is request
    assert scoring_server.CONTENT_TYPE_JSON == "application/json"
