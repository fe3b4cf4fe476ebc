"""The served model over HTTP: a real `mlflow models serve` process on 127.0.0.1.

One server per module, serving the session's learned CNN through a registry alias. The same
images must get the same answers over HTTP (split and records), from the in-process pyfunc and
from `python -m pneumo.predict`; bad input must get a 4xx naming the problem and the row, and
the server must go on answering.
"""

from __future__ import annotations

import base64
import io
import json
import os
import threading
from pathlib import Path
from typing import NamedTuple

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
from mlflow.models import Model
from PIL import Image
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless
from sklearn.metrics import roc_auc_score

import xray_files as xf
from helpers import ANSWER_COLUMNS, serve_model
from pneumo import CLASS_NAMES, predict
from pneumo.limits import MAX_REQUEST_PIXELS, MAX_ROWS
from pneumo.model_io import IMAGE_COLUMN
from pneumo.synthetic import synthetic_example_base64

pytest_plugins = ["model_fixtures"]
# Every test here trains (the session's models) and talks to a served model: all slow.
pytestmark = pytest.mark.slow

SERVED_NAME = "pneumonia-classifier-serving-test"
SERVED_URI = f"models:/{SERVED_NAME}@champion"
STARTUP_SECONDS = 180


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def split_body(cells: list) -> dict:
    return {"dataframe_split": {"columns": [IMAGE_COLUMN], "data": [[cell] for cell in cells]}}


def records_body(cells: list) -> dict:
    return {"dataframe_records": [{IMAGE_COLUMN: cell} for cell in cells]}


def inputs_body(cells: list) -> dict:
    return {"inputs": {IMAGE_COLUMN: cells}}


def instances_body(cells: list) -> dict:
    return {"instances": [{IMAGE_COLUMN: cell} for cell in cells]}


FORMATS = {"split": split_body, "records": records_body, "inputs": inputs_body, "instances": instances_body}
PIECE = 24  # no answer or log may hold this many consecutive characters of a request's base64


def _strings(body) -> list[str]:
    if isinstance(body, dict):
        return [s for value in body.values() for s in _strings(value)]
    if isinstance(body, list):
        return [s for value in body for s in _strings(value)]
    return [body] if isinstance(body, str) else []


class Raw(NamedTuple):
    """A body sent as these bytes with this content type (not as JSON built from a dict)."""

    data: bytes
    content_type: str = "application/json"


def send(server, body) -> requests.Response:
    return server.invoke(body.data, body.content_type) if isinstance(body, Raw) else server.invoke(body)


# Every identifier planted in a request below contains this; it must never reach an answer or the log.
MARK = "MRN4471"
PHI = f"PatientName=DOE^JANE PatientID={MARK}"


def assert_no_echo(body, text: str) -> None:
    """No PIECE-character piece of any long string in the request occurs in ``text``; no traceback.

    A raw body is checked at every PIECE-th offset (so any echo of 2 x PIECE characters is found):
    bodies of millions of characters stay fast to check.
    """
    assert MARK not in text, text[:2000]
    pieces = {text[i : i + PIECE] for i in range(max(len(text) - PIECE + 1, 0))}
    cells, step = ([body.data.decode("latin-1")], PIECE) if isinstance(body, Raw) else (set(_strings(body)), 1)
    for cell in cells:
        for start in range(0, max(len(cell) - PIECE + 1, 0), step):
            assert cell[start : start + PIECE] not in pieces, f"request data echoed: {cell[start : start + PIECE]!r}"
    assert "Traceback" not in text and 'File "' not in text and "stack_trace" not in text, text[:2000]


@pytest.fixture(scope="module")
def server(trained_models, tmp_path_factory):
    """Register the learned CNN as <name>@champion and serve that URI; stop the server afterwards."""
    log = tmp_path_factory.mktemp("server") / "serve.log"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", trained_models.tracking_uri)
        mlflow.set_tracking_uri(trained_models.tracking_uri)
        try:
            version = mlflow.register_model(trained_models.model_uri(trained_models.cnn), SERVED_NAME)
            mlflow.MlflowClient().set_registered_model_alias(SERVED_NAME, "champion", version.version)
        finally:
            mlflow.set_tracking_uri(None)
    env = {**os.environ, "MLFLOW_TRACKING_URI": trained_models.tracking_uri}
    with serve_model(SERVED_URI, env, log, STARTUP_SECONDS) as running:
        yield running


@pytest.fixture(scope="module")
def unseen(trained_models) -> pd.DataFrame:
    """Images no model saw, with their class and file bytes."""
    rows = [(path, name) for name in CLASS_NAMES for path in trained_models.unseen[name]]
    return pd.DataFrame(
        {
            "path": [p for p, _ in rows],
            "label_name": [n for _, n in rows],
            "image": [b64(p.read_bytes()) for p, _ in rows],
        }
    )


@pytest.fixture(scope="module")
def good_cell(unseen) -> str:
    return unseen["image"].iloc[-1]


def predictions(response: requests.Response) -> pd.DataFrame:
    assert response.status_code == 200, response.text[:2000]
    frame = pd.DataFrame(response.json()["predictions"])
    assert list(frame.columns) == ANSWER_COLUMNS
    return frame


def test_http_split_and_records_match_pyfunc_and_predict_command(server, unseen, models_store, tmp_path):
    over_split = predictions(server.invoke(split_body(list(unseen["image"]))))
    over_records = predictions(server.invoke(records_body(list(unseen["image"]))))
    in_process = mlflow.pyfunc.load_model(SERVED_URI).predict(unseen[["image"]])
    folder = tmp_path / "images"
    folder.mkdir()
    for path in unseen["path"]:
        (folder / path.name).symlink_to(path)
    csv = tmp_path / "out" / "predictions.csv"
    assert predict.main([str(folder), "--model-uri", SERVED_URI, "--output", str(csv)]) == 0
    from_command = (
        pd.read_csv(csv, keep_default_na=False).set_index("file").loc[[str(folder / p.name) for p in unseen["path"]]]
    )

    assert list(from_command.columns) == [
        *("label", "probability", "threshold", "in_distribution", "ood_score", "error"),
        *predict.UID_COLUMNS,
    ]
    assert (from_command["error"] == "").all()
    for other in (over_records, in_process, from_command.reset_index()):
        np.testing.assert_allclose(over_split["probability"], other["probability"], rtol=0, atol=1e-6)
        assert list(over_split["label"]) == list(other["label"])
        assert np.allclose(over_split["threshold"], other["threshold"])
        np.testing.assert_allclose(over_split["ood_score"], other["ood_score"], rtol=0, atol=1e-9)
    # Calibrated probability and threshold make the label's decision; the gate's failures are UNCERTAIN.
    judged = over_split["label"] != "UNCERTAIN"
    assert (judged == over_split["in_distribution"].astype(bool)).all() and judged.mean() >= 0.9
    decided = np.where(over_split["probability"] >= over_split["threshold"], "PNEUMONIA", "NORMAL")
    assert (over_split["label"][judged] == decided[judged]).all()


def test_images_from_pneumonia_come_back_pneumonia(server, unseen):
    served = predictions(server.invoke(split_body(list(unseen["image"]))))
    truth = (unseen["label_name"] == "PNEUMONIA").to_numpy()
    # The model learned (unseen images ranked well) and probability means pneumonia: a swapped
    # label contract would rank them backwards and label pneumonia NORMAL. Checked on rates, not
    # on every image, so that one borderline image in a different training outcome cannot fail it.
    assert roc_auc_score(truth, served["probability"]) >= 0.75
    said_pneumonia = served["label"] == "PNEUMONIA"
    assert said_pneumonia[truth].mean() > said_pneumonia[~truth].mean()
    assert said_pneumonia[truth].mean() >= 0.5 and (~said_pneumonia[~truth]).any()


def test_inputs_that_are_not_chest_xrays_are_answered_uncertain_with_a_probability(server, unseen):
    """The served gate: each kind of non-X-ray is UNCERTAIN (never NORMAL or PNEUMONIA); the films themselves pass."""
    films = list(unseen["path"].iloc[::8])  # one of each class
    kinds = xf.not_chest_xrays(films)
    cells = [b64(data) for files in kinds.values() for data in files]
    served = predictions(server.invoke(split_body(cells)))
    kind_of = [kind for kind, files in kinds.items() for _ in files]
    for kind, (_, row) in zip(kind_of, served.iterrows()):
        assert row["label"] == "UNCERTAIN" and row["in_distribution"] is not None, (kind, row.to_dict())
        assert not row["in_distribution"], kind
        assert row["ood_score"] > 1.0 and 0.0 <= row["probability"] <= 1.0, kind
    upright = predictions(server.invoke(split_body([b64(path.read_bytes()) for path in films])))
    assert upright["in_distribution"].all() and set(upright["label"]) <= set(CLASS_NAMES)


def test_other_formats_are_predicted_like_the_reference(server, unseen):
    gray = xf.gray_pixels(unseen["path"].iloc[-1])
    variants = {
        "rgba_png": xf.rgba_png(gray),
        "png16": xf.png16(gray),
        "cmyk_jpeg": xf.cmyk_jpeg(gray),
        "dicom_monochrome1": xf.dicom(gray, "MONOCHROME1", bits_stored=12),
        "dicom_monochrome2_16bit": xf.dicom(gray, bits_stored=16),
        # Compressed as PACS export them (pylibjpeg decoders, pinned in the served model's requirements).
        "dicom_jpeg2000": xf.compressed_dicom(xf.dicom(gray), JPEG2000Lossless),
        "dicom_jpeg_ls": xf.compressed_dicom(xf.dicom(gray), JPEGLSLossless),
        "dicom_rle": xf.compressed_dicom(xf.dicom(gray, "MONOCHROME1"), RLELossless),
    }
    cells = [b64(xf.reference_png(gray))] + [b64(data) for data in variants.values()]
    served = predictions(server.invoke(split_body(cells)))
    reference = served["probability"].iloc[0]
    for (name, _), probability in zip(variants.items(), served["probability"].iloc[1:]):
        assert probability == pytest.approx(reference, abs=0.03 if name == "cmyk_jpeg" else 1e-5), name


def _truncated(unseen) -> bytes:
    data = unseen["path"].iloc[0].read_bytes()
    return data[: len(data) // 3]


BAD_REQUESTS = {
    "invalid_base64": (lambda u: split_body(["%%% not base64 %%%"]), ["row 0", "not valid base64"]),
    "empty_string": (lambda u: split_body([""]), ["row 0", "empty string"]),
    "null": (lambda u: records_body([None]), ["row 0", "missing (null)"]),
    "non_image_bytes": (lambda u: split_body([b64(bytes(range(256)) * 8)]), ["row 0", "not a recognised image"]),
    "truncated_jpeg": (lambda u: split_body([b64(_truncated(u))]), ["row 0", "truncated or corrupt"]),
    "text_file": (
        lambda u: records_body([b64(b"patient: 12345\nfindings: none\n" * 20)]),
        ["row 0", "not a recognised image"],
    ),
    "one_pixel": (lambda u: split_body([b64(xf.tiny_png(1))]), ["row 0", "1x1 pixels, smaller than 32"]),
    "decompression_bomb": (
        lambda u: split_body([b64(xf.png_header_only(100_000, 100_000))]),
        ["row 0", "image too large"],
    ),
    "number_not_text": (lambda u: records_body([12345]), ["row 0", "must be base64 text, got int"]),
    "misnamed_column": (
        lambda u: {"dataframe_split": {"columns": ["img"], "data": [[u["image"].iloc[0]]]}},
        ["missing column 'image'"],
    ),
    "misnamed_inputs": (lambda u: {"inputs": {"img": [u["image"].iloc[0]]}}, ["missing column 'image'"]),
    "missing_column": (lambda u: {"dataframe_records": [{}]}, ["missing column 'image'"]),
    "lab_tiff": (
        lambda u: split_body([b64(xf.encode(Image.new("LAB", (64, 64)), "TIFF"))]),
        ["row 0", "accepted: JPEG, PNG or DICOM"],
    ),
    "dicom_window_width_0": (
        lambda u: split_body([b64(xf.dicom(xf.noise(64, 64), window=(100, 0)))]),
        ["row 0", "WindowWidth must be positive"],
    ),
    "too_many_rows": (lambda u: split_body([u["image"].iloc[0]] * (MAX_ROWS + 1)), [f"limit of {MAX_ROWS} images"]),
    "malformed_json": (lambda u: '{"dataframe_split": {"columns": ["image"], "data": [["abc"]', ["valid JSON"]),
    "malformed_json_with_an_image": (
        lambda u: '{"dataframe_split": {"columns": ["image"], "data": [["' + u["image"].iloc[0] + '"]',
        ["not valid JSON"],
    ),
    "unknown_format": (lambda u: {"images": [u["image"].iloc[0]]}, ["dataframe_split", "dataframe_records"]),
    # Issue 18 §2: nothing of these reaches the answer or the log.
    "raw_jpeg_as_csv": (lambda u: Raw(jpeg_with_comment(u), "text/csv"), ["CSV body is not UTF-8 text"]),
    "tta_holding_text": (
        lambda u: {**split_body([u["image"].iloc[0]]), "params": {"tta": PHI}},
        ["params.tta must be true or false, got str"],
    ),
    "unknown_params": (
        lambda u: {**split_body([u["image"].iloc[0]]), "params": {"tta": True, MARK: PHI}},
        ["1 unknown parameter(s) in params (not named here); this model accepts: tta"],
    ),
    "nested_cell": (lambda u: records_body([{MARK: PHI}]), ["row 0", "must be base64 text, got dict"]),
    "unknown_format_named_by_the_client": (lambda u: {MARK: [PHI]}, ["exactly one of dataframe_split"]),
    "dicom_bad_number_of_frames": (lambda u: split_body([b64(dicom_with(b"1234567 ", b"MRN4471 "))]), ["row 0"]),
    "dicom_photometric_value": (
        lambda u: split_body([b64(xf.dicom(xf.noise(64, 64)).replace(b"MONOCHROME2 ", b"MRN4471DOE2 "))]),
        ["row 0", "photometric interpretation"],
    ),
    # Issue 18 §3: refused from the raw body or the headers, before anything is parsed or decoded.
    "thirty_mb_of_empty_rows": (
        lambda u: Raw(b'{"dataframe_records": [' + b"{}, " * 7_500_000 + b"{}]}"),
        ["refused before parsing", f"the limit of {MAX_ROWS} images per request"],
    ),
    "csv_of_many_lines": (
        lambda u: Raw(b"image\n" + b"\n".join([b"QUJD"] * 1_000_000), "text/csv"),
        ["refused before parsing", f"over the limit of {MAX_ROWS} images per request"],
    ),
    "pixel_budget": (
        lambda u: split_body([b64(xf.png_header_only(5000, 5000))] * MAX_ROWS),
        ["refused before decoding", f"over the limit of {MAX_REQUEST_PIXELS:,} per request"],
    ),
}


def jpeg_with_comment(unseen) -> bytes:
    """A real X-ray as JPEG whose COM segment holds patient identifiers."""
    data = xf.encode(Image.fromarray(xf.gray_pixels(unseen["path"].iloc[0])), "JPEG", comment=PHI.encode())
    assert PHI.encode() in data
    return data


def dicom_with(old: bytes, new: bytes) -> bytes:
    """A DICOM whose NumberOfFrames (written as ``old``) is replaced by the same-length bytes ``new``."""
    import pydicom

    dataset = pydicom.dcmread(io.BytesIO(xf.dicom(xf.noise(64, 64))))
    dataset.NumberOfFrames = old.decode().strip()
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    assert old in buffer.getvalue()
    return buffer.getvalue().replace(old, new)


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_is_a_4xx_naming_the_problem_and_the_server_keeps_serving(server, unseen, good_cell, case):
    make, expected = BAD_REQUESTS[case]
    body = make(unseen)
    response = send(server, body)
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:2000])
    message = response.json()["message"]
    for text in expected:
        assert text in message, message[:2000]
    assert_no_echo(body, response.text)
    assert server.process.poll() is None
    assert predictions(server.invoke(split_body([good_cell])))["label"].iloc[0] in CLASS_NAMES


@pytest.mark.parametrize("form", list(FORMATS))
def test_mixed_batch_names_every_bad_row_and_echoes_nothing_in_any_format(server, good_cell, form):
    body = FORMATS[form]([good_cell, "not*base64" * 10, good_cell, b64(xf.tiny_png(1))])
    response = server.invoke(body)
    assert response.status_code == 400
    message = response.json()["message"]
    assert message.startswith("2 of 4 row(s) are not usable images"), message[:2000]
    assert "row 1: 'image' is not valid base64" in message and "row 3: image is 1x1 pixels" in message
    assert "row 0:" not in message and "row 2:" not in message
    assert_no_echo(body, response.text)


def test_server_log_holds_no_request_data(server, unseen, good_cell):
    sent = [make(unseen) for make, _ in BAD_REQUESTS.values()] + [split_body([good_cell, "not*base64" * 10])]
    for body in sent:
        send(server, body)
    # Column names and record keys are the client's text too: MLflow would log them as "extra inputs".
    extra = {"dataframe_split": {"columns": [MARK, IMAGE_COLUMN], "data": [[PHI, good_cell]]}}
    assert predictions(server.invoke(extra))["label"].iloc[0] in CLASS_NAMES
    assert len(predictions(server.invoke({"dataframe_records": [{IMAGE_COLUMN: good_cell, MARK: 1}]}))) == 1
    csv = f"{MARK},{IMAGE_COLUMN}\n{PHI},{good_cell}\n".encode()
    assert len(predictions(server.invoke(csv, "text/csv"))) == 1
    log = server.log.read_text(errors="replace")
    assert MARK not in log and "Found extra inputs" not in log and "Unrecognized params" not in log
    for body in sent:
        assert_no_echo(body, log)


@pytest.fixture(scope="module")
def heavy_cell(unseen) -> str:
    """A real X-ray as a 25-Mpx (5,000 x 5,000) 16-bit PNG, the per-image pixel budget: base64, ~3 MB."""
    gray = Image.fromarray(xf.gray_pixels(unseen["path"].iloc[0])).resize((5000, 5000), Image.Resampling.BILINEAR)
    return b64(xf.encode(Image.fromarray(np.asarray(gray).astype(np.uint16) * 257), "PNG", compress_level=1))


def test_a_request_over_the_pixel_budget_is_refused_from_the_headers(server, heavy_cell, good_cell):
    rows = MAX_REQUEST_PIXELS // 25_000_000 + 1
    body = split_body([heavy_cell] * rows)
    response = server.invoke(body)
    assert response.status_code == 400
    assert response.json()["message"] == (
        f"the request's images hold {rows * 25_000_000:,} pixels in all, over the limit of {MAX_REQUEST_PIXELS:,} "
        "per request (refused before decoding); send fewer or smaller images per request"
    )
    assert_no_echo(body, response.text)


def test_ping_and_small_requests_are_answered_while_a_heavy_request_decodes(server, heavy_cell, good_cell):
    heavy = split_body([heavy_cell] * (MAX_REQUEST_PIXELS // 25_000_000))  # at the budget: decoded in full
    answers: dict[str, requests.Response] = {}
    worker = threading.Thread(target=lambda: answers.update(heavy=server.invoke(heavy)))
    worker.start()
    pings = []
    while worker.is_alive():
        pings.append(requests.get(f"{server.url}/ping", timeout=30).status_code)
        if "small" not in answers:
            answers["small"] = server.invoke(split_body([good_cell]))
    worker.join()
    # How long each took is measured in benchmarks/bench_serve.py --heavy; here: all answered, none refused.
    assert pings and set(pings) == {200}
    assert len(predictions(answers["small"])) == 1
    assert len(predictions(answers["heavy"])) == MAX_REQUEST_PIXELS // 25_000_000


def test_logged_signature_and_input_example_work_over_http(server, models_store, tmp_path):
    local = Path(mlflow.artifacts.download_artifacts(SERVED_URI, dst_path=str(tmp_path)))
    model = Model.load(str(local))
    assert model.signature.inputs.input_names() == [IMAGE_COLUMN]
    assert model.signature.outputs.input_names() == ANSWER_COLUMNS
    # MLflow's own serving example is answered, and it is the synthetic image, no patient's: a drawing,
    # which the input gate rightly does not take for a radiograph.
    example = (local / model.saved_input_example_info["serving_input_path"]).read_text()
    answer = predictions(server.invoke(example)).iloc[0]
    assert answer["label"] == "UNCERTAIN" and answer["in_distribution"] is not None and not answer["in_distribution"]
    assert json.loads(example)["dataframe_split"]["data"] == [[synthetic_example_base64()]]


def test_predict_command_reports_unreadable_files_and_goes_on(models_store, unseen, tmp_path):
    good = tmp_path / "good.jpeg"
    good.symlink_to(unseen["path"].iloc[-1])
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    csv = tmp_path / "out.csv"
    assert predict.main([str(good), str(bad), "--model-uri", SERVED_URI, "--output", str(csv)]) == 1
    frame = pd.read_csv(csv, keep_default_na=False).set_index("file")
    assert frame.loc[str(good), "label"] in CLASS_NAMES and frame.loc[str(good), "error"] == ""
    assert frame.loc[str(bad), "label"] == "" and "not a recognised image" in frame.loc[str(bad), "error"]
