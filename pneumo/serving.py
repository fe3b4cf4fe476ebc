"""The served model: an MLflow pyfunc that takes base64 image files and returns labels.

The pyfunc (logged by :func:`pneumo.model_io.log_model`) carries the ``pneumo`` package itself,
so ``mlflow models serve`` runs the very decode path training used.

Errors a client can fix (bad base64, a file that is not an image, a decompression bomb, ...)
raise :class:`pneumo.limits.RequestError` (an ``MlflowException``, ``INVALID_PARAMETER_VALUE``), which the
MLflow scoring server answers with HTTP 400 and the message; the server keeps serving.
"""

from __future__ import annotations

import base64
import binascii
import time
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import Model

from pneumo import CLASS_NAMES, UNCERTAIN
from pneumo.contract import ModelContract, read_contract
from pneumo.errors import ImageError
from pneumo.limits import (
    PredictionSlots,
    RequestError,
    bound_threads,
    check_decode_time,
    check_request_pixels,
    guard_scoring_server,
    refuse_safely,
    strip_base64,
    withhold_decoder_messages,
)
from pneumo.model_io import (
    CONFIG_ARTIFACT,
    IDENTITY_COLUMNS,
    IMAGE_COLUMN,
    MODEL_ARTIFACT,
    OUTPUT_COLUMNS,
    load_keras_model,
    predict_probabilities,
)
from pneumo.preprocessing import InputSpec, decode_image

# Bad rows listed in one error message; a client sending thousands of bad rows needs only a sample.
_MAX_LISTED_ERRORS = 10


def decode_base64_image(value: Any, spec: InputSpec) -> np.ndarray:
    """Turn one ``image`` cell (base64 text of a JPEG/PNG/DICOM file) into a model input.

    Raises:
        ImageError: The cell is not base64 text, or its bytes are not a usable image; the message
            says which.
    """
    return decode_image(base64_payload(value), spec)


def base64_payload(value: Any) -> bytes:
    """The file bytes of one ``image`` cell (base64 text), not yet decoded as an image.

    Raises:
        ImageError: The cell is null, not text, empty or not valid base64; the message says which.
    """
    if value is None or (isinstance(value, float) and np.isnan(value)):
        raise ImageError(f"'{IMAGE_COLUMN}' is missing (null)")
    if not isinstance(value, (str, bytes)):
        raise ImageError(f"'{IMAGE_COLUMN}' must be base64 text, got {type(value).__name__}")
    # Line-wrapped base64 (the `base64` tool's default) and browser data URLs are common and
    # unambiguous; anything else that is not strict base64 is refused rather than guessed at.
    text = strip_base64(value)
    if text.startswith(b"data:") and b";base64," in text[:200]:
        text = text.split(b";base64,", 1)[1]
    if not text:
        raise ImageError(f"'{IMAGE_COLUMN}' is an empty string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ImageError(f"'{IMAGE_COLUMN}' is not valid base64 ({error})") from error


def served_threshold(contract: ModelContract) -> float:
    """The operating threshold on the scale of the served probability (calibrated, if the model is)."""
    calibration = contract.calibration
    return float(calibration.apply(contract.threshold)) if calibration else contract.threshold


def answer_frame(contract: ModelContract, images: np.ndarray, probabilities: np.ndarray) -> pd.DataFrame:
    """The answer for each image, as the server, ``predict`` and ``score_pacs`` give it.

    Args:
        contract: The model's contract: threshold, calibration and input gate.
        images: The decoded batch the model scored (the gate judges the same pixels).
        probabilities: The model's raw scores of them.

    Returns:
        :data:`~pneumo.model_io.OUTPUT_COLUMNS`: ``label`` is the class at the operating threshold,
        decided on the raw score, or ``UNCERTAIN`` where the gate says the input is not what the
        model was made for; ``probability`` and ``threshold`` are calibrated (the raw ones for a
        model without a calibration), and, the calibration being increasing, ``probability >=
        threshold`` exactly where the label is PNEUMONIA. ``in_distribution`` and ``ood_score`` are
        the gate's verdict; empty (null, NaN) for a model logged before the gate existed.
    """
    raw = np.asarray(probabilities, dtype=np.float64)
    positive = raw >= contract.threshold
    calibration = contract.calibration
    served = calibration.apply(raw) if calibration else raw
    threshold = served_threshold(contract)
    # The decision is the raw score's; rounding must not put a calibrated score on the wrong side.
    served = np.where(positive, np.maximum(served, threshold), np.minimum(served, np.nextafter(threshold, 0.0)))
    labels = np.array([CLASS_NAMES[int(p)] for p in positive], dtype=object)
    if contract.input_gate is None:
        passed: list[bool | None] = [None] * len(raw)
        scores = np.full(len(raw), np.nan)
    else:
        scores = contract.input_gate.scores(images)
        passed = [bool(p) for p in scores <= 1.0]
        labels[scores > 1.0] = UNCERTAIN
    return pd.DataFrame(
        {
            "label": labels,
            "probability": served,
            "threshold": np.full(len(raw), threshold),
            "in_distribution": pd.Series(passed, dtype=object),
            "ood_score": scores,
        },
        columns=list(OUTPUT_COLUMNS),
    )


class PneumoniaClassifier(mlflow.pyfunc.PythonModel):
    """Pyfunc: column ``image`` (base64 JPEG/PNG/DICOM) -> :func:`answer_frame`'s columns and the model's identity."""

    def load_context(self, context):
        """Load the Keras model (safe mode) and its configuration from the logged artifacts."""
        guard_scoring_server()  # no answer of the server may echo the request (pneumo.limits)
        withhold_decoder_messages()  # nor may its log quote a file's header
        self.slots = PredictionSlots.from_environment()
        bound_threads()  # before the model is loaded: TensorFlow's pools are fixed at its first op
        config_path = Path(context.artifacts[CONFIG_ARTIFACT])
        self.contract = read_contract(config_path.read_text())
        self.model = load_keras_model(context.artifacts[MODEL_ARTIFACT])
        # The model folder holds MLmodel above its artifacts/ folder: its id names this very model.
        model_id = Model.load(str(config_path.parents[1])).model_id or ""
        self.identity = dict(zip(IDENTITY_COLUMNS, (model_id, self.contract.run_id or "", self.contract.code_version)))

    # The pd.DataFrame hints silence MLflow's "add type hints" advice without replacing the
    # explicit signature: MLflow infers no schema from a DataFrame hint.
    @refuse_safely
    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Classify every row.

        Args:
            context: MLflow's model context (unused; artifacts are read in ``load_context``).
            model_input: One row per image, base64 file bytes in column ``image``.
            params: ``tta`` (bool): average the probability over the fixed test-time views
                (:data:`pneumo.augmentation.TTA_VIEWS`, 7 forward passes per image). The threshold
                is always the one chosen on validation at training time.

        Returns:
            Per row, :func:`answer_frame`'s ``label`` (NORMAL, PNEUMONIA or UNCERTAIN),
            ``probability`` (of pneumonia, calibrated), ``threshold``, ``in_distribution`` and
            ``ood_score``, then which model answered: ``model_id`` (MLflow's logged-model id; a
            registered version's source is ``models:/<model_id>``), ``model_run_id`` (its training
            run) and ``code_version`` (the git commit that trained it).

        Raises:
            RequestError: (HTTP 400) the column is missing, a limit of :mod:`pneumo.limits` is
                exceeded (rows, base64, the request's pixels from the headers, decoding time),
                or rows cannot be decoded; the message names the limit, or each bad row and its problem.
        """
        spec = self.contract.input_spec
        payloads: list[bytes | None] = []
        errors: dict[int, str] = {}
        for row, value in enumerate(model_input[IMAGE_COLUMN]):
            try:
                payloads.append(base64_payload(value))
            except ImageError as error:
                payloads.append(None)
                errors[row] = str(error)
        # The whole request's pixels are summed from the headers before any is decoded, and
        # decoding runs outside the prediction slot: a heavy request is refused fast, and one
        # being decoded does not hold up the others' forward passes.
        check_request_pixels(payloads)
        images = []
        started = time.monotonic()
        for row, payload in enumerate(payloads):
            if payload is None:
                continue
            check_decode_time(time.monotonic() - started)
            try:
                images.append(decode_image(payload, spec))
            except ImageError as error:
                errors[row] = str(error)
        if errors:
            listed = "; ".join(f"row {row}: {errors[row]}" for row in sorted(errors)[:_MAX_LISTED_ERRORS])
            more = f"; and {len(errors) - _MAX_LISTED_ERRORS} more" if len(errors) > _MAX_LISTED_ERRORS else ""
            raise RequestError(
                f"{len(errors)} of {len(model_input)} row(s) are not usable images, nothing was predicted: "
                f"{listed}{more}"
            )
        side = spec.image_size
        batch = np.stack(images) if images else np.zeros((0, side, side, spec.channels), np.uint8)
        tta = bool((params or {}).get("tta", False))
        with self.slots:  # only the forward pass waits for a slot
            probabilities = predict_probabilities(self.model, batch, tta)
        return answer_frame(self.contract, batch, probabilities).assign(**self.identity)
