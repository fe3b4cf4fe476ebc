"""What one served request may cost, and how the server refuses one without echoing it.

Patient images are protected health information: no answer, log line or artifact may carry the
bytes a client sent. MLflow 3.17's scoring server rewrites the message of any
:class:`~mlflow.exceptions.MlflowException` raised in ``predict`` to
``Failed to predict data '<the whole request>'. Error: <message>`` (``e.message = ...`` in
``mlflow.pyfunc.scoring_server.invocations``), and answers any other exception with a 400 that
carries a Python traceback. So every refusal here is a :class:`RequestError`: an
``MlflowException`` (HTTP 400, or 500 for our own faults) whose message is fixed when it is made
and cannot be rewritten afterwards. :func:`refuse_safely` wraps the pyfunc's ``predict``: it checks
the request against the limits below before any decoding and turns every other exception into a
``RequestError`` that names only its type.

Limits (all refused with HTTP 400 and a message naming the limit):

- :data:`MAX_ROWS` images per request;
- :data:`MAX_CELL_CHARS` characters of base64 per image, :data:`MAX_REQUEST_CHARS` in all;
- the decoder's pixel budget :data:`pneumo.pixels.MAX_PIXELS` per image, read from the
  header before any pixel is decoded.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
import threading
from typing import Any

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE, ErrorCode

log = logging.getLogger(__name__)

IMAGE_COLUMN = "image"  # the same as pneumo.model_io.IMAGE_COLUMN (not imported: no TensorFlow here)
# Images per request: a client with more sends several requests.
MAX_ROWS = 64
# Base64 text per image (24 MiB of file) and per request. A 3,000 x 3,000 16-bit DICOM is 18 MB.
MAX_CELL_CHARS = 32 * 1024 * 1024
MAX_REQUEST_CHARS = 64 * 1024 * 1024
# Whitespace allowed inside base64 (line-wrapped output of `base64`, MIME).
_BASE64_WHITESPACE = b" \t\r\n\v\f"


class RequestError(MlflowException):
    """A refusal the scoring server answers with its own message and nothing else.

    The message is set once, when the error is made; later assignments (MLflow's scoring server
    prefixes it with the request's data) are ignored, so the answer never echoes the request.
    """

    def __init__(self, message: str, error_code: int = INVALID_PARAMETER_VALUE):
        super().__init__(message, error_code=error_code)

    @property
    def message(self) -> str:
        return self._fixed_message

    @message.setter
    def message(self, value: str) -> None:
        if not hasattr(self, "_fixed_message"):  # MlflowException.__init__ sets it once
            self._fixed_message = value


def check_request(model_input: Any) -> None:
    """Refuse a request that is not a frame with an ``image`` column, or exceeds a limit.

    Raises:
        RequestError: What is wrong and the limit, never the data.
    """
    if not isinstance(model_input, pd.DataFrame):
        raise RequestError(f"expected a table with an '{IMAGE_COLUMN}' column, got {type(model_input).__name__}")
    if IMAGE_COLUMN not in model_input.columns:
        # The signature declares 'image' optional, so MLflow drops misnamed columns silently
        # instead of refusing them with a message that echoes the data; the refusal is ours.
        raise RequestError(
            f"missing column '{IMAGE_COLUMN}': send one base64-encoded JPEG, PNG or DICOM file per row "
            f"in a column named '{IMAGE_COLUMN}' (other columns are ignored)"
        )
    if len(model_input) > MAX_ROWS:
        raise RequestError(f"{len(model_input)} rows, over the limit of {MAX_ROWS} images per request")
    total = 0
    for row, value in enumerate(model_input[IMAGE_COLUMN]):
        size = len(value) if isinstance(value, (str, bytes)) else 0
        if size > MAX_CELL_CHARS:
            raise RequestError(
                f"row {row}: {size:,} characters of base64, over the limit of {MAX_CELL_CHARS:,} per image"
            )
        total += size
    if total > MAX_REQUEST_CHARS:
        raise RequestError(
            f"{total:,} characters of base64 in all, over the limit of {MAX_REQUEST_CHARS:,} per request"
        )


def strip_base64(value: str | bytes) -> bytes:
    """The base64 text of a cell without whitespace, as ASCII bytes, at most one copy of the cell.

    Non-ASCII text is kept as replacement bytes, so strict base64 decoding refuses it.
    """
    data = value.encode("ascii", errors="replace") if isinstance(value, str) else bytes(value)
    return data.translate(None, _BASE64_WHITESPACE)


def _env_int(name: str, default: int) -> int:
    try:
        return max(int(os.environ.get(name, default)), 0)
    except ValueError:
        log.warning("ignoring %s=%r (not an integer)", name, os.environ.get(name))
        return default


# Predictions one server process runs at once (0 = no bound); more requests wait their turn. On
# a small CPU, threads that all run TensorFlow at once fight over the cores (see README, Benchmarks).
CONCURRENCY = _env_int("PNEUMO_SERVE_CONCURRENCY", 1)
_slots = threading.BoundedSemaphore(CONCURRENCY) if CONCURRENCY else None


def bound_threads() -> None:
    """Set TensorFlow's thread pools for serving, before TensorFlow runs anything in this process.

    ``PNEUMO_SERVE_THREADS`` (default: every core) intra-op threads and
    ``PNEUMO_SERVE_INTER_THREADS`` (default 1) inter-op threads; 0 leaves TensorFlow's default.
    Too late once TensorFlow has run an op (a warning says so; nothing else changes).
    """
    intra = _env_int("PNEUMO_SERVE_THREADS", os.cpu_count() or 1)
    inter = _env_int("PNEUMO_SERVE_INTER_THREADS", 1)
    imported_before = "tensorflow" in sys.modules  # a training or evaluation process: expected to fail
    import tensorflow as tf

    try:
        if intra:
            tf.config.threading.set_intra_op_parallelism_threads(intra)
        if inter:
            tf.config.threading.set_inter_op_parallelism_threads(inter)
    except RuntimeError as error:  # TensorFlow already initialised (e.g. in a training process)
        (log.debug if imported_before else log.warning)("TensorFlow threads not bound: %s", error)


def refuse_safely(predict):
    """Decorate a pyfunc ``predict``: check the limits first, never let the request leak out.

    A :class:`RequestError` passes unchanged. Any other exception, ours or a library's, becomes a
    500 ``RequestError`` naming its type only (its message might quote pixel values or bytes),
    and the server log gets the same line, without traceback or data.
    """

    @functools.wraps(predict)
    def wrapper(self, context, model_input, params: dict[str, Any] | None = None):
        check_request(model_input)
        try:
            if _slots is None:
                return predict(self, context, model_input, params)
            with _slots:
                return predict(self, context, model_input, params)
        except RequestError:
            raise
        except Exception as error:  # noqa: BLE001  (anything else would carry the data or a traceback)
            kind = type(error).__name__
            log.error("prediction failed with %s (request not logged)", kind)
            raise RequestError(
                f"internal error while predicting ({kind}); nothing was predicted", error_code=INTERNAL_ERROR
            ) from None

    return wrapper


# Any run this long of base64 (or URL-safe base64) characters in a message is taken for data.
_DATA_RUN = re.compile(r"[A-Za-z0-9+/=_-]{20,}")
_MAX_MESSAGE = 600


def redact(message: str) -> str:
    """A message of MLflow's own with the request's data taken out, for :func:`guard_scoring_server`."""
    if "valid JSON" in message:
        return (
            "the request body is not valid JSON: send UTF-8 JSON with one of dataframe_split, "
            "dataframe_records, inputs or instances"
        )
    if "Failed to predict data" in message and "\nError: " in message:
        message = message.rsplit("\nError: ", 1)[1]
    message = message.split("\nInput:", 1)[0]
    message = _DATA_RUN.sub("<data>", message)
    return message if len(message) <= _MAX_MESSAGE else message[:_MAX_MESSAGE] + " ..."


def guard_scoring_server() -> None:
    """Make MLflow's scoring server, in this process, answer every error without the request's data.

    ``mlflow.pyfunc.scoring_server.invocations`` (MLflow 3.17) parses the body and calls
    ``predict``; some of its own refusals quote the request (a body that is not JSON is echoed
    whole) and an unexpected exception is answered with a traceback. The pyfunc calls this from
    ``load_context``; the server looks ``invocations`` up at every request, so wrapping it here
    covers every request. A :class:`RequestError` passes unchanged; any other ``MlflowException``
    keeps its status with :func:`redact`'s message and no stack trace; any other exception
    becomes a 400 naming its type. Harmless outside a server (nothing else calls it).
    """
    from mlflow.pyfunc import scoring_server

    original = scoring_server.invocations
    if getattr(original, "_pneumo_guarded", False):
        return

    @functools.wraps(original)
    def invocations(*args, **kwargs):
        try:
            return original(*args, **kwargs)
        except RequestError:
            raise
        except MlflowException as error:
            raise RequestError(redact(error.message), error_code=ErrorCode.Value(error.error_code)) from None
        except Exception as error:  # noqa: BLE001  (answered without a traceback)
            log.error("request failed with %s (request not logged)", type(error).__name__)
            raise RequestError(f"the request could not be read ({type(error).__name__})") from None

    invocations._pneumo_guarded = True
    scoring_server.invocations = invocations
