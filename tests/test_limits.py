"""Request limits and refusals that never echo the request (issue 9 §1, §2), without a server.

The HTTP behaviour is tested against a real `mlflow models serve` in test_serving.py.
"""

from __future__ import annotations

import base64

import pandas as pd
import pytest

from pneumo import limits
from pneumo.limits import MAX_ROWS, RequestError, check_request, redact, refuse_safely, strip_base64

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


def test_redact_takes_the_data_out_of_mlflow_messages():
    echoed = f"Failed to predict data '   image\n0  {SECRET[:47]}...'. \nError: Model is missing inputs"
    assert redact(echoed) == "Model is missing inputs"
    assert "valid JSON" in redact(f"Ensure that input is a valid JSON formatted string.\nInput: \n{SECRET}")
    assert SECRET[:24] not in redact(f"Incompatible input {SECRET}")


def test_strip_base64_removes_whitespace_only():
    assert strip_base64(" QU\nJD\r\n\t") == b"QUJD"
    assert strip_base64("QUJD\u00e9") == b"QUJD?"  # non-ASCII stays, and strict decoding refuses it
