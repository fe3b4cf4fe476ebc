"""What one served request may cost, and how the server refuses one without echoing it.

Patient images are protected health information: no answer, log line or artifact may carry the
bytes a client sent, nor the names and keys that came with them. MLflow 3.17's scoring server
rewrites the message of any :class:`~mlflow.exceptions.MlflowException` raised in ``predict`` to
``Failed to predict data '<the whole request>'. Error: <message>`` (``e.message = ...`` in
``mlflow.pyfunc.scoring_server.invocations``), quotes a body that is not UTF-8 or not JSON, and logs
extra column names and unknown parameter names ("Found extra inputs ...", "Unrecognized params
..."). So every refusal here is a :class:`RequestError`: an ``MlflowException`` (HTTP 400, or 500
for our own faults) whose message is fixed when it is made and cannot be rewritten afterwards.

Two guards, both installed by the served pyfunc:

- :func:`guard_scoring_server` wraps the server's request handler (the one hook into MLflow's
  internals, pinned to MLflow 3.17.2 by ``tests/test_limits.py``). :func:`read_request` checks the
  raw body before anything parses it (its size; the rows its brackets, commas or newlines imply),
  parses it once, refuses unknown parameters and ill-typed values without naming or quoting
  them, and hands MLflow a rebuilt request holding the ``image`` column only, so MLflow has no
  client-chosen name to log and no data to quote. Any refusal MLflow still makes is answered
  with a fixed message.
- :func:`refuse_safely` wraps the pyfunc's ``predict``: it checks the parsed frame against the
  limits and turns every other exception into a ``RequestError`` that names only its type.

Limits (all refused with HTTP 400 and a message naming the limit):

- :data:`MAX_BODY_BYTES` per request body, :data:`MAX_ROWS` images and :data:`MAX_COLUMNS`
  columns per request (rows are counted from the raw body before it is parsed);
- :data:`MAX_CELL_CHARS` characters of base64 per image, :data:`MAX_REQUEST_CHARS` in all;
- the decoder's pixel budget :data:`pneumo.pixels.MAX_PIXELS` per image and
  :data:`MAX_REQUEST_PIXELS` per request, both read from the headers before any pixel is decoded;
- :data:`DECODE_SECONDS` of decoding per request.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import sys
import threading
import warnings
import zlib
from typing import Any

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import BAD_REQUEST, INTERNAL_ERROR, INVALID_PARAMETER_VALUE, ErrorCode

from pneumo.pixels import MAX_PIXELS

log = logging.getLogger(__name__)

IMAGE_COLUMN = "image"  # the same as pneumo.model_io.IMAGE_COLUMN (not imported: no TensorFlow here)
# Images per request: a client with more sends several requests.
MAX_ROWS = 64
# Columns (or keys per record) per request; all but 'image' are dropped unread.
MAX_COLUMNS = 32
# Base64 text per image (24 MiB of file) and per request. A 3,000 x 3,000 16-bit DICOM is 18 MB.
MAX_CELL_CHARS = 32 * 1024 * 1024
MAX_REQUEST_CHARS = 64 * 1024 * 1024
# The whole body: the base64 and room for the JSON or CSV around it.
MAX_BODY_BYTES = MAX_REQUEST_CHARS + 1024 * 1024
# Pixels decoded per request, summed over the rows' headers: 8 images at the per-image budget,
# or 50 of 2,000 x 2,000. 64 rows of 25-Mpx 16-bit PNG (1.6 G pixels) took 24 s to decode.
MAX_REQUEST_PIXELS = 200_000_000
# Decoding time per request; checked between rows, a backstop to the pixel budget on a loaded host.
DECODE_SECONDS = 30.0
# Whitespace allowed inside base64 (line-wrapped output of `base64`, MIME).
_BASE64_WHITESPACE = b" \t\r\n\v\f"
# JSON brackets and commas a request within the limits can need: per row one bracket and a comma
# per column, plus one for a data: URL in each cell and one for an index entry; and some slack.
_MAX_JSON_SEPARATORS = MAX_ROWS * (2 * MAX_COLUMNS + 4) + 256
# Quote characters a CSV request within the limits can need (every field quoted, quotes doubled).
_MAX_CSV_QUOTES = 4 * (MAX_ROWS + 1) * MAX_COLUMNS
_FORMATS = ("dataframe_split", "dataframe_records", "inputs", "instances")
_FORMATS_TEXT = "dataframe_split, dataframe_records, inputs or instances"
_CSV, _JSON = "text/csv", "application/json"
_DICOM_DEFLATED = "1.2.840.10008.1.2.1.99"
_DICOM_IMPLICIT = "1.2.840.10008.1.2"
_DICOM_BIG_ENDIAN = "1.2.840.10008.1.2.2"
# Inflated bytes read from a Deflated DICOM to reach Rows and Columns (group 0028 comes early).
_DICOM_HEADER_BYTES = 1024 * 1024


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


def _too_many_rows(rows: int) -> RequestError:
    return RequestError(f"{rows:,} rows, over the limit of {MAX_ROWS} images per request")


def _missing_column() -> RequestError:
    return RequestError(
        f"missing column '{IMAGE_COLUMN}': send one base64-encoded JPEG, PNG or DICOM file per row "
        f"in a column named '{IMAGE_COLUMN}' (other columns are ignored)"
    )


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
        raise _missing_column()
    if len(model_input) > MAX_ROWS:
        raise _too_many_rows(len(model_input))
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


def header_pixels(data: bytes) -> int:
    """Pixels a JPEG, PNG or DICOM file's header says its (first) frame holds, read without decoding any.

    Returns 0 for a file whose header cannot be read or whose size is over the per-image budget
    :data:`~pneumo.pixels.MAX_PIXELS`: the decoder refuses it from its header with its own
    message, without decoding it, so it costs nothing to decode.
    """
    if len(data) >= 132 and data[128:132] == b"DICM":
        width, height = _dicom_size(data)
    else:
        from PIL import Image

        try:
            # Image.open reads the header only; over Pillow's own bomb limit it raises (counted as 0).
            # Its DecompressionBombWarning (sizes only) is left alone: catch_warnings is not thread-safe.
            with Image.open(io.BytesIO(data), formats=["JPEG", "PNG"]) as image:
                width, height = image.size
        except Exception:  # noqa: BLE001  (not an image: the decoder says so, by row)
            return 0
    pixels = width * height
    return pixels if pixels <= MAX_PIXELS else 0


def _dicom_size(data: bytes) -> tuple[int, int]:
    """Columns and Rows from a DICOM header, without reading pixel data or inflating more than the header."""
    from pydicom.filereader import read_dataset, read_preamble

    try:
        handle = io.BytesIO(data)
        read_preamble(handle, False)
        meta = read_dataset(handle, False, True, stop_when=lambda tag, vr, length: tag.group != 2)
        syntax = str(meta.get("TransferSyntaxUID", ""))
        rest = data[handle.tell() :]
        if syntax == _DICOM_DEFLATED:
            rest = zlib.decompressobj(-zlib.MAX_WBITS).decompress(rest, _DICOM_HEADER_BYTES)
        header = read_dataset(
            io.BytesIO(rest),
            syntax == _DICOM_IMPLICIT,
            syntax != _DICOM_BIG_ENDIAN,
            stop_when=lambda tag, vr, length: tag > 0x00280011,  # (0028,0011) Columns
        )
        return int(header.Columns), int(header.Rows)
    except Exception:  # noqa: BLE001  (unreadable: the decoder refuses it by row)
        return 0, 0


def check_request_pixels(payloads: list[bytes | None]) -> None:
    """Refuse a request whose images' headers add up to more than :data:`MAX_REQUEST_PIXELS`.

    Raises:
        RequestError: The total and the limit; nothing has been decoded.
    """
    total = sum(header_pixels(data) for data in payloads if data)
    if total > MAX_REQUEST_PIXELS:
        raise RequestError(
            f"the request's images hold {total:,} pixels in all, over the limit of {MAX_REQUEST_PIXELS:,} "
            "per request (refused before decoding); send fewer or smaller images per request"
        )


def check_decode_time(elapsed: float) -> None:
    """Refuse a request that has spent more than :data:`DECODE_SECONDS` decoding.

    Raises:
        RequestError: The limit; nothing was predicted.
    """
    if elapsed > DECODE_SECONDS:
        raise RequestError(
            f"decoding took over {DECODE_SECONDS:g} s, the limit per request; nothing was predicted: "
            "send fewer or smaller images per request"
        )


def _env_int(name: str, default: int) -> int:
    try:
        return max(int(os.environ.get(name, default)), 0)
    except ValueError:
        log.warning("ignoring %s=%r (not an integer)", name, os.environ.get(name))
        return default


class PredictionSlots:
    """How many forward passes one loaded model runs at once; more wait their turn.

    On a small CPU, threads that all run TensorFlow at once fight over the cores (see README,
    Benchmarks). Only the forward pass holds a slot: requests decode their images outside it, so
    one heavy request's decoding never holds up another's prediction.
    """

    def __init__(self, concurrency: int):
        self.concurrency = concurrency
        self._semaphore = threading.BoundedSemaphore(concurrency) if concurrency else None

    @classmethod
    def from_environment(cls) -> PredictionSlots:
        """``PNEUMO_SERVE_CONCURRENCY`` slots (default 1; 0 = no bound), read when the model loads."""
        return cls(_env_int("PNEUMO_SERVE_CONCURRENCY", 1))

    def __enter__(self) -> PredictionSlots:
        if self._semaphore is not None:
            self._semaphore.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        if self._semaphore is not None:
            self._semaphore.release()


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


def _not_json() -> RequestError:
    return RequestError(
        f"the request body is not valid JSON: send UTF-8 JSON with one of {_FORMATS_TEXT}", error_code=BAD_REQUEST
    )


def _count_rows_in_json(body: bytes) -> None:
    """Refuse, before parsing, a JSON body with more brackets and commas than rows within the limits need.

    Base64 holds neither, so a request within the limits has a few per row; 30 MB of empty rows
    (``[{}, {}, ...]``) has ten million, and parsing them cost seconds and a gigabyte.
    """
    separators = body.count(b"{") + body.count(b"[") + body.count(b",")
    if separators > _MAX_JSON_SEPARATORS:
        raise RequestError(
            f"refused before parsing: the body holds {separators:,} JSON brackets and commas, more than "
            f"{MAX_ROWS} rows of up to {MAX_COLUMNS} columns need (the limit of {MAX_ROWS} images per request)"
        )


def _count_rows_in_csv(body: bytes) -> None:
    """Refuse, before parsing, a CSV body with more lines (outside quoted fields) than :data:`MAX_ROWS` rows."""
    quotes = body.count(b'"')
    if quotes > _MAX_CSV_QUOTES:
        raise RequestError(
            f"refused before parsing: the CSV body holds {quotes:,} quote characters, more than "
            f"{MAX_ROWS} rows of up to {MAX_COLUMNS} columns need (the limit of {MAX_ROWS} images per request)"
        )
    # Quote parity tells inside from outside (a doubled quote inside a field toggles twice).
    lines = sum(part.count(b"\n") for part in body.split(b'"')[::2])
    if lines > MAX_ROWS + 2:  # the header line, and a blank last line
        raise RequestError(
            f"refused before parsing: the CSV body has {lines:,} lines, over the limit of {MAX_ROWS} images "
            "per request (one header line and one line per image)"
        )


def _cell(row: int, value: Any) -> Any:
    """A cell as sent, unless it is a nested object or list, which no decoder reads and MLflow would quote."""
    if isinstance(value, (dict, list)):
        raise RequestError(f"row {row}: '{IMAGE_COLUMN}' must be base64 text, got {type(value).__name__}")
    return value


def _records_cells(records: list) -> list:
    if len(records) > MAX_ROWS:
        raise _too_many_rows(len(records))
    for number, record in enumerate(records):
        if not isinstance(record, dict):
            raise RequestError(f"record {number} is not a JSON object (send one object per image)")
        if len(record) > MAX_COLUMNS:
            raise RequestError(f"record {number} has {len(record)} keys, over the limit of {MAX_COLUMNS} columns")
    if not any(IMAGE_COLUMN in record for record in records):
        raise _missing_column()
    return [_cell(row, record.get(IMAGE_COLUMN)) for row, record in enumerate(records)]


def _columns_cells(columns: dict) -> list:
    if len(columns) > MAX_COLUMNS:
        raise RequestError(f"{len(columns)} columns, over the limit of {MAX_COLUMNS} columns")
    if IMAGE_COLUMN not in columns:
        raise _missing_column()
    cells = columns[IMAGE_COLUMN]
    cells = cells if isinstance(cells, list) else [cells]
    if len(cells) > MAX_ROWS:
        raise _too_many_rows(len(cells))
    return [_cell(row, value) for row, value in enumerate(cells)]


def _split_cells(split: Any) -> list:
    if not isinstance(split, dict) or not isinstance(split.get("data", []), list):
        raise RequestError("dataframe_split must be an object with 'columns' and 'data' (a list of rows)")
    columns, data = split.get("columns"), split.get("data", [])
    if not isinstance(columns, list) or IMAGE_COLUMN not in columns:
        raise _missing_column()
    if len(columns) > MAX_COLUMNS:
        raise RequestError(f"{len(columns)} columns, over the limit of {MAX_COLUMNS} columns")
    if len(data) > MAX_ROWS:
        raise _too_many_rows(len(data))
    where = columns.index(IMAGE_COLUMN)
    for row, values in enumerate(data):
        if not isinstance(values, list) or len(values) != len(columns):
            raise RequestError(f"row {row} of dataframe_split is not a list of {len(columns)} value(s), one per column")
    return [_cell(row, values[where]) for row, values in enumerate(data)]


def _image_cells(body: Any) -> list:
    """The ``image`` cells of a parsed JSON request, in row order, whichever of the four formats it uses."""
    if not isinstance(body, dict):
        raise RequestError(f"the request must be a JSON object with one of {_FORMATS_TEXT}")
    present = [name for name in _FORMATS if name in body]
    if len(present) != 1:
        raise RequestError(
            f"the request must hold exactly one of {_FORMATS_TEXT} (it holds {len(present)}); see the README"
        )
    name, value = present[0], body[present[0]]
    if name == "dataframe_split":
        return _split_cells(value)
    if name == "dataframe_records" and isinstance(value, list):
        return _records_cells(value)
    if isinstance(value, dict):
        return _columns_cells(value)
    if isinstance(value, list) and all(isinstance(record, dict) for record in value):
        return _records_cells(value)
    raise RequestError(f"{name} must be a list of records, or an object of columns ({{'{IMAGE_COLUMN}': [...]}})")


_PARAM_TYPES = {
    "boolean": ((bool,), "true or false"),
    "string": ((str,), "a string"),
    "integer": ((int,), "an integer"),
    "long": ((int,), "an integer"),
    "float": ((int, float), "a number"),
    "double": ((int, float), "a number"),
}


def check_params(params: Any, schema: Any) -> None:
    """Refuse ``params`` the model's params schema does not declare, or of the wrong type, quoting nothing.

    Args:
        params: The request's ``params`` (None when absent).
        schema: The model's :class:`mlflow.types.ParamSchema` (None: no params accepted).

    Raises:
        RequestError: Unknown parameters (counted, not named: a name is client text) or a
            declared one of the wrong JSON type (its name is the model's, the value is not quoted).
    """
    if params is None:
        return
    if not isinstance(params, dict):
        raise RequestError(f"params must be a JSON object, got {type(params).__name__}")
    specs = {spec.name: spec for spec in schema.params} if schema is not None else {}
    unknown = sum(1 for name in params if name not in specs)
    if unknown:
        raise RequestError(
            f"{unknown} unknown parameter(s) in params (not named here); "
            f"this model accepts: {', '.join(specs) or 'none'}"
        )
    for name, value in params.items():
        kinds, text = _PARAM_TYPES.get(getattr(specs[name].dtype, "name", ""), ((object,), "of its declared type"))
        wrong_bool = isinstance(value, bool) and bool not in kinds
        if not isinstance(value, kinds) or wrong_bool:
            raise RequestError(f"params.{name} must be {text}, got {type(value).__name__}")


def _rebuilt(cells: list, params: dict | None) -> dict:
    """The request MLflow gets: the image column only, in MLflow's split format, and the checked params."""
    request: dict[str, Any] = {"dataframe_split": {"columns": [IMAGE_COLUMN], "data": [[cell] for cell in cells]}}
    if params is not None:
        request["params"] = params
    return request


def _frame_cells(frame: pd.DataFrame) -> list:
    if IMAGE_COLUMN not in frame.columns:
        raise _missing_column()
    return [None if pd.isna(value) else value for value in frame[IMAGE_COLUMN]]


def read_request(data: bytes | str, mime_type: str, params_schema: Any) -> dict:
    """Check a raw request body and rebuild it as the only request MLflow's parser sees.

    Args:
        data: The body as received.
        mime_type: ``application/json`` or ``text/csv`` (anything else is refused).
        params_schema: The model's params schema.

    Returns:
        A parsed ``dataframe_split`` request holding the ``image`` column only (plus ``params``).

    Raises:
        RequestError: A body over a limit (refused before parsing where the raw bytes show it),
            or one that cannot be read; the message never quotes it.
    """
    body = data.encode("utf-8", errors="replace") if isinstance(data, str) else bytes(data)
    if len(body) > MAX_BODY_BYTES:
        raise RequestError(f"the request body is {len(body):,} bytes, over the limit of {MAX_BODY_BYTES:,}")
    if mime_type == _JSON:
        _count_rows_in_json(body)
        try:
            parsed = json.loads(body)
        except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise _not_json() from None
        check_params(parsed.get("params") if isinstance(parsed, dict) else None, params_schema)
        return _rebuilt(_image_cells(parsed), parsed.get("params"))
    if mime_type == _CSV:
        _count_rows_in_csv(body)
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError("the CSV body is not UTF-8 text (send base64 text, one image per row)") from None
        try:
            frame = pd.read_csv(io.StringIO(text), dtype=str, usecols=lambda name: name == IMAGE_COLUMN)
        except Exception as error:  # noqa: BLE001  (pandas' messages may quote the text)
            raise RequestError(f"the CSV body cannot be parsed ({type(error).__name__})") from None
        return _rebuilt(_frame_cells(frame), None)
    # Parquet is refused too: its row count is only known by reading its footer with pyarrow,
    # which the served model does not depend on, and no client of this model sends it.
    raise RequestError(f"content type not accepted: send {_JSON} (or {_CSV}), UTF-8", error_code=BAD_REQUEST)


def _mime_type(content_type: str | None) -> str | None:
    """The media type of a Content-Type header; None when it has parameters other than a UTF-8 charset."""
    parts = [part.strip() for part in (content_type or "").split(";")]
    for parameter in parts[1:]:
        key, _, value = parameter.partition("=")
        if key.strip().lower() != "charset" or value.strip().strip('"').lower() != "utf-8":
            return None
    return parts[0].lower()


def guard_scoring_server() -> None:
    """Make MLflow's scoring server, in this process, read requests through :func:`read_request`.

    ``mlflow.pyfunc.scoring_server.invocations(data, content_type, model, input_schema)`` (MLflow
    3.17.2) parses the body and calls ``predict``; the server looks it up by name at every
    request, so replacing it here covers every request. The replacement hands the original a
    parsed, rebuilt JSON request (``_decode_json_input`` passes a dict through unparsed). A
    :class:`RequestError` passes unchanged; any other ``MlflowException`` keeps its status with a
    fixed message (MLflow's may quote the data) and no stack trace; any other exception becomes a
    400 naming its type. The pyfunc calls this from ``load_context``; harmless outside a server.
    """
    from mlflow.pyfunc import scoring_server

    original = scoring_server.invocations
    if getattr(original, "_pneumo_guarded", False):
        return

    @functools.wraps(original)
    def invocations(data, content_type, model, input_schema):
        try:
            mime_type = _mime_type(content_type)
            if mime_type is None:
                raise RequestError("content type parameters not accepted: send Content-Type: application/json")
            request = read_request(data, mime_type, model.metadata.get_params_schema())
            return original(request, _JSON, model, input_schema)
        except RequestError:
            raise
        except MlflowException as error:
            log.warning("MLflow refused a request (%s; message withheld: it may quote the request)", error.error_code)
            raise RequestError(
                f"the request was refused by MLflow's input checks ({error.error_code}); send one base64 file per "
                f"row in a column '{IMAGE_COLUMN}' with one of {_FORMATS_TEXT}",
                error_code=ErrorCode.Value(error.error_code),
            ) from None
        except Exception as error:  # noqa: BLE001  (answered without a traceback)
            log.error("request failed with %s (request not logged)", type(error).__name__)
            raise RequestError(f"the request could not be read ({type(error).__name__})") from None

    invocations._pneumo_guarded = True
    scoring_server.invocations = invocations


class _WithholdMessage(logging.Filter):
    """Replace a record's text, which may quote a DICOM header value, with a fixed line."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = "%s message withheld (it may quote a file's header)", (record.name,)
        return True


_WITHHOLD = _WithholdMessage()


def withhold_decoder_messages() -> None:
    """Keep pydicom's warnings, which quote header values (e.g. an invalid NumberOfFrames), out of this process's log.

    pydicom sends each such warning both to its logger ``pydicom`` and to :func:`warnings.warn`
    (``pydicom.misc.warn_and_log``), and the server writes both to its log. No hook in the
    decoding path can stop it per request in a thread-safe way (``warnings.catch_warnings``
    changes process-wide state), so the served model, when it loads, gives the ``pydicom`` logger
    a filter that replaces each record's text with a fixed line, and ignores warnings raised from
    pydicom's modules. Idempotent.
    """
    logger = logging.getLogger("pydicom")
    if _WITHHOLD not in logger.filters:
        logger.addFilter(_WITHHOLD)
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
