"""The served model: an MLflow pyfunc that takes base64 image files and returns labels.

The pyfunc carries the Keras model (``.keras``, loaded with ``safe_mode=True``), a
``model_config.json`` (input size, channels, operating threshold, every hyperparameter) and the
``pneumo`` package itself, so ``mlflow models serve`` runs the very decode path training used.
"""

from __future__ import annotations

import base64
import binascii
import json
import tempfile
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, Schema

from pneumo import CLASS_NAMES
from pneumo.preprocessing import ImageError, decode_image

IMAGE_COLUMN = "image"
MODEL_ARTIFACT = "keras_model"
CONFIG_ARTIFACT = "model_config"
INPUT_SCHEMA = Schema([ColSpec("string", IMAGE_COLUMN)])
OUTPUT_SCHEMA = Schema([ColSpec("string", "label"), ColSpec("double", "probability"), ColSpec("double", "threshold")])
# Packages the served model imports, pinned to the versions it was trained with.
_REQUIREMENTS = ("tensorflow-cpu", "keras", "numpy", "pandas", "pillow", "pydicom", "scikit-learn", "imbalanced-learn", "matplotlib", "mlflow")
# Predict in chunks so a large request cannot hold every decoded image in memory at once.
_CHUNK = 64


def bad_request(message: str) -> MlflowException:
    """An exception the scoring server turns into HTTP 400 with ``message``."""
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def load_keras_model(path: str):
    """Load a ``.keras`` file without executing arbitrary code (``safe_mode=True``)."""
    import keras

    import pneumo.augmentation  # noqa: F401  (registers pneumo's serialisable layers)
    import pneumo.models  # noqa: F401

    return keras.saving.load_model(path, compile=False, safe_mode=True)


def encode_file(path: str | Path) -> str:
    """Base64 text of a file, as the served model expects in its ``image`` column."""
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _decode_row(row: int, value: Any, image_size: int, channels: int) -> np.ndarray:
    if not isinstance(value, (str, bytes)):
        raise bad_request(f"row {row}: '{IMAGE_COLUMN}' must be a base64 string, got {type(value).__name__}")
    if isinstance(value, str) and not value.strip():
        raise bad_request(f"row {row}: '{IMAGE_COLUMN}' is an empty string")
    try:
        payload = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as error:
        raise bad_request(f"row {row}: '{IMAGE_COLUMN}' is not valid base64 ({error})") from error
    try:
        return decode_image(payload, image_size, channels)
    except ImageError as error:
        raise bad_request(f"row {row}: {error}") from error


# The signature is declared explicitly; MLflow's hint about type-hinted predict() does not apply.
warnings.filterwarnings("ignore", message=".*Add type hints to the `predict` method")


class PneumoniaClassifier(mlflow.pyfunc.PythonModel):
    """Pyfunc: DataFrame column ``image`` (base64 JPEG/PNG/DICOM) -> label, probability, threshold."""

    def load_context(self, context):
        self.config = json.loads(Path(context.artifacts[CONFIG_ARTIFACT]).read_text())
        self.model = load_keras_model(context.artifacts[MODEL_ARTIFACT])

    def predict(self, context, model_input, params=None):
        """Classify every row; a bad row raises a 400 naming the row and the problem."""
        if not isinstance(model_input, pd.DataFrame):
            raise bad_request(f"expected a DataFrame with an '{IMAGE_COLUMN}' column, got {type(model_input).__name__}")
        if IMAGE_COLUMN not in model_input.columns:
            raise bad_request(
                f"missing column '{IMAGE_COLUMN}' (got {list(map(str, model_input.columns))}); "
                f"send base64-encoded image files in a column named '{IMAGE_COLUMN}'"
            )
        size, channels = int(self.config["image_size"]), int(self.config["channels"])
        threshold = float(self.config["threshold"])
        # Decode every row first: a bad row fails the request before any compute is spent.
        images = np.stack([_decode_row(i, v, size, channels) for i, v in enumerate(model_input[IMAGE_COLUMN])]) \
            if len(model_input) else np.zeros((0, size, size, channels), np.uint8)
        probabilities = predict_probabilities(self.model, images)
        return pd.DataFrame(
            {
                "label": [CLASS_NAMES[int(p >= threshold)] for p in probabilities],
                "probability": probabilities.astype(float),
                "threshold": threshold,
            }
        )


def predict_probabilities(model, images: np.ndarray) -> np.ndarray:
    """Probabilities of pneumonia for uint8 images, in chunks, without augmentation."""
    if len(images) == 0:
        return np.zeros(0, np.float64)
    outputs = [
        np.asarray(model(images[i : i + _CHUNK].astype(np.float32), training=False)).reshape(-1)
        for i in range(0, len(images), _CHUNK)
    ]
    return np.concatenate(outputs).astype(np.float64)


def pip_requirements() -> list[str]:
    """Pinned requirements of the served model, taken from the training environment."""
    pinned = []
    for name in _REQUIREMENTS:
        try:
            pinned.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            continue
    return pinned


def log_model(keras_path: str | Path, model_config: dict, example_file: str | Path, name: str = "model"):
    """Log a trained Keras model as the pneumo pyfunc in the active run.

    Args:
        keras_path: The ``.keras`` file (best checkpoint).
        model_config: Input size, channels, threshold, class names and hyperparameters.
        example_file: A real image file used as the input example.
        name: Logged-model name in the run.

    Returns:
        MLflow's ``ModelInfo``.
    """
    with tempfile.TemporaryDirectory() as folder:
        config_path = Path(folder) / "model_config.json"
        config_path.write_text(json.dumps(model_config, indent=2, default=float))
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(Path(__file__).with_name("pyfunc_model.py")),
            artifacts={MODEL_ARTIFACT: str(keras_path), CONFIG_ARTIFACT: str(config_path)},
            code_paths=[str(Path(__file__).resolve().parent)],
            signature=ModelSignature(inputs=INPUT_SCHEMA, outputs=OUTPUT_SCHEMA),
            input_example=pd.DataFrame({IMAGE_COLUMN: [encode_file(example_file)]}),
            pip_requirements=pip_requirements(),
        )
