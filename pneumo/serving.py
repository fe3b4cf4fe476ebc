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
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd

from pneumo import CLASS_NAMES
from pneumo.contract import read_contract
from pneumo.errors import ImageError
from pneumo.limits import RequestError, bound_threads, guard_scoring_server, refuse_safely, strip_base64
from pneumo.model_io import (
    CONFIG_ARTIFACT,
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
        payload = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ImageError(f"'{IMAGE_COLUMN}' is not valid base64 ({error})") from error
    return decode_image(payload, spec)


def label_frame(probabilities: np.ndarray, threshold: float) -> pd.DataFrame:
    """The served output: ``label`` (class name at ``threshold``), ``probability``, ``threshold``."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    return pd.DataFrame(
        {
            "label": [CLASS_NAMES[int(p >= threshold)] for p in probabilities],
            "probability": probabilities,
            "threshold": np.full(len(probabilities), float(threshold)),
        },
        columns=list(OUTPUT_COLUMNS),
    )


class PneumoniaClassifier(mlflow.pyfunc.PythonModel):
    """Pyfunc: DataFrame column ``image`` (base64 JPEG/PNG/DICOM) -> label, probability, threshold."""

    def load_context(self, context):
        """Load the Keras model (safe mode) and its configuration from the logged artifacts."""
        guard_scoring_server()  # no answer of the server may echo the request (pneumo.limits)
        bound_threads()  # before the model is loaded: TensorFlow's pools are fixed at its first op
        self.contract = read_contract(Path(context.artifacts[CONFIG_ARTIFACT]).read_text())
        self.model = load_keras_model(context.artifacts[MODEL_ARTIFACT])

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
            ``label``, ``probability`` (of pneumonia) and ``threshold`` per row.

        Raises:
            MlflowException: (HTTP 400) the column is missing, or rows cannot be decoded; the
                message names each bad row and its problem.
        """
        spec = self.contract.input_spec
        images, errors = [], []
        # Every row is decoded before any compute is spent, so one response lists all bad rows.
        for row, value in enumerate(model_input[IMAGE_COLUMN]):
            try:
                images.append(decode_base64_image(value, spec))
            except ImageError as error:
                errors.append(f"row {row}: {error}")
        if errors:
            listed = "; ".join(errors[:_MAX_LISTED_ERRORS])
            more = f"; and {len(errors) - _MAX_LISTED_ERRORS} more" if len(errors) > _MAX_LISTED_ERRORS else ""
            raise RequestError(
                f"{len(errors)} of {len(model_input)} row(s) are not usable images, nothing was predicted: "
                f"{listed}{more}"
            )
        side = spec.image_size
        batch = np.stack(images) if images else np.zeros((0, side, side, spec.channels), np.uint8)
        tta = bool((params or {}).get("tta", False))
        return label_frame(predict_probabilities(self.model, batch, tta), self.contract.threshold)
