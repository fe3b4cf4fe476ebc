"""The served model: an MLflow pyfunc that takes base64 image files and returns labels.

The pyfunc carries the Keras model (``.keras``, loaded with ``safe_mode=True``), a
``model_config.json`` (input size, channels, operating threshold, every hyperparameter) and the
``pneumo`` package itself, so ``mlflow models serve`` runs the very decode path training used.

Errors a client can fix (bad base64, a file that is not an image, a decompression bomb, ...)
raise :class:`mlflow.exceptions.MlflowException` with ``INVALID_PARAMETER_VALUE``, which the
MLflow scoring server answers with HTTP 400 and the message; the server keeps serving.
"""

from __future__ import annotations

import base64
import binascii
import json
import tempfile
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, Schema

from pneumo import CLASS_NAMES
from pneumo.config import json_text
from pneumo.errors import ConfigError
from pneumo.preprocessing import ImageError, decode_image

IMAGE_COLUMN = "image"
MODEL_ARTIFACT = "keras_model"
CONFIG_ARTIFACT = "model_config"
OUTPUT_COLUMNS = ("label", "probability", "threshold")
INPUT_SCHEMA = Schema([ColSpec("string", IMAGE_COLUMN)])
OUTPUT_SCHEMA = Schema([ColSpec("string", "label"), ColSpec("double", "probability"), ColSpec("double", "threshold")])
# Packages the served model imports, pinned to the versions it was trained with; only the
# installed TensorFlow distribution (GPU "tensorflow" or "tensorflow-cpu") is pinned.
_REQUIREMENTS = (
    "tensorflow",
    "tensorflow-cpu",
    "keras",
    "numpy",
    "pandas",
    "pillow",
    "pydicom",
    "scikit-learn",
    "imbalanced-learn",
    "matplotlib",
    "mlflow",
)
# Images per forward pass: bounds the float32 activations of one call, whatever the request size.
_CHUNK = 64
# Bad rows listed in one error message; a client sending thousands of bad rows needs only a sample.
_MAX_LISTED_ERRORS = 10


def bad_request(message: str) -> MlflowException:
    """An exception the scoring server turns into HTTP 400 with ``message``."""
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def load_keras_model(path: str | Path):
    """Load a ``.keras`` file without executing arbitrary code (``safe_mode=True``)."""
    import keras

    import pneumo.augmentation  # noqa: F401  (registers pneumo's serialisable layers)
    import pneumo.models  # noqa: F401

    return keras.saving.load_model(str(path), compile=False, safe_mode=True)


def encode_file(path: str | Path) -> str:
    """Base64 text of a file, as the served model expects in its ``image`` column."""
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def decode_base64_image(value: Any, image_size: int, channels: int) -> np.ndarray:
    """Turn one ``image`` cell (base64 text of a JPEG/PNG/DICOM file) into a model input.

    Raises:
        ImageError: The cell is not base64 text, or its bytes are not a usable image; the message
            says which.
    """
    if value is None or (isinstance(value, float) and np.isnan(value)):
        raise ImageError(f"'{IMAGE_COLUMN}' is missing (null)")
    if not isinstance(value, (str, bytes)):
        raise ImageError(f"'{IMAGE_COLUMN}' must be base64 text, got {type(value).__name__}")
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    # Line-wrapped base64 (the `base64` tool's default) and browser data URLs are common and
    # unambiguous; anything else that is not strict base64 is refused rather than guessed at.
    text = "".join(value.split())
    if text.startswith("data:") and ";base64," in text:
        text = text.split(";base64,", 1)[1]
    if not text:
        raise ImageError(f"'{IMAGE_COLUMN}' is an empty string")
    try:
        payload = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ImageError(f"'{IMAGE_COLUMN}' is not valid base64 ({error})") from error
    return decode_image(payload, image_size, channels)


def predict_probabilities(model, images: np.ndarray) -> np.ndarray:
    """Probabilities of pneumonia for uint8 images, in chunks, without augmentation."""
    if len(images) == 0:
        return np.zeros(0, np.float64)
    outputs = [
        np.asarray(model(images[i : i + _CHUNK].astype(np.float32), training=False)).reshape(-1)
        for i in range(0, len(images), _CHUNK)
    ]
    return np.concatenate(outputs).astype(np.float64)


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
        self.config = json.loads(Path(context.artifacts[CONFIG_ARTIFACT]).read_text())
        self.model = load_keras_model(context.artifacts[MODEL_ARTIFACT])

    # The pd.DataFrame hints silence MLflow's "add type hints" advice without replacing the
    # explicit signature: MLflow infers no schema from a DataFrame hint.
    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Classify every row.

        Args:
            context: MLflow's model context (unused; artifacts are read in ``load_context``).
            model_input: One row per image, base64 file bytes in column ``image``.
            params: Unused; the threshold is the one chosen on validation at training time.

        Returns:
            ``label``, ``probability`` (of pneumonia) and ``threshold`` per row.

        Raises:
            MlflowException: (HTTP 400) the column is missing, or rows cannot be decoded; the
                message names each bad row and its problem.
        """
        if not isinstance(model_input, pd.DataFrame):
            raise bad_request(f"expected a DataFrame with an '{IMAGE_COLUMN}' column, got {type(model_input).__name__}")
        if IMAGE_COLUMN not in model_input.columns:
            raise bad_request(
                f"missing column '{IMAGE_COLUMN}' (got {list(map(str, model_input.columns))}); "
                f"send base64-encoded image files in a column named '{IMAGE_COLUMN}'"
            )
        size, channels = int(self.config["image_size"]), int(self.config["channels"])
        images, errors = [], []
        # Every row is decoded before any compute is spent, so one response lists all bad rows.
        for row, value in enumerate(model_input[IMAGE_COLUMN]):
            try:
                images.append(decode_base64_image(value, size, channels))
            except ImageError as error:
                errors.append(f"row {row}: {error}")
        if errors:
            listed = "; ".join(errors[:_MAX_LISTED_ERRORS])
            more = f"; and {len(errors) - _MAX_LISTED_ERRORS} more" if len(errors) > _MAX_LISTED_ERRORS else ""
            raise bad_request(
                f"{len(errors)} of {len(model_input)} row(s) are not usable images, nothing was predicted: {listed}{more}"
            )
        batch = np.stack(images) if images else np.zeros((0, size, size, channels), np.uint8)
        return label_frame(predict_probabilities(self.model, batch), float(self.config["threshold"]))


@dataclass
class TrainedModel:
    """A logged pneumo model opened for evaluation or batch prediction (no pyfunc wrapper)."""

    model: Any  # keras.Model
    config: dict[str, Any]
    uri: str
    run_id: str | None = None
    model_id: str | None = None  # MLflow 3 LoggedModel id: models:/<model_id> names exactly this model

    @property
    def image_size(self) -> int:
        return int(self.config["image_size"])

    @property
    def channels(self) -> int:
        return int(self.config["channels"])

    @property
    def threshold(self) -> float:
        return float(self.config["threshold"])


def load_trained_model(model_uri: str, dst_path: str | None = None) -> TrainedModel:
    """Download a logged pneumo pyfunc and open its Keras model and ``model_config``.

    Unlike ``mlflow.pyfunc.load_model`` this neither puts the model's copy of ``pneumo`` on
    ``sys.path`` nor wraps the Keras model, so Grad-CAM can reach its layers.

    Args:
        model_uri: ``runs:/<run>/model``, ``models:/<name>@<alias>``, ``models:/<name>/<version>``
            or a local folder.
        dst_path: Folder to download into; a temporary one when ``None`` (the Keras model is
            fully read into memory, so the files are not needed afterwards).

    Returns:
        The model, its configuration and the URI.

    Raises:
        MlflowException: The URI cannot be resolved.
        ConfigError: The URI does not point at a pneumo model.
    """
    with tempfile.TemporaryDirectory() as folder:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=dst_path or folder))
        mlmodel = Model.load(str(local))
        artifacts = mlmodel.flavors.get("python_function", {}).get("artifacts", {})
        if MODEL_ARTIFACT not in artifacts or CONFIG_ARTIFACT not in artifacts:
            raise ConfigError(
                f"{model_uri} is not a pneumo model (no '{MODEL_ARTIFACT}'/'{CONFIG_ARTIFACT}' artifacts)"
            )
        config = json.loads((local / artifacts[CONFIG_ARTIFACT]["path"]).read_text())
        model = load_keras_model(local / artifacts[MODEL_ARTIFACT]["path"])
    return TrainedModel(model, config, model_uri, mlmodel.run_id or config.get("run_id"), mlmodel.model_id)


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
        config_path.write_text(json_text(model_config))
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(Path(__file__).with_name("pyfunc_model.py")),
            artifacts={MODEL_ARTIFACT: str(keras_path), CONFIG_ARTIFACT: str(config_path)},
            code_paths=[str(Path(__file__).resolve().parent)],
            signature=ModelSignature(inputs=INPUT_SCHEMA, outputs=OUTPUT_SCHEMA),
            input_example=pd.DataFrame({IMAGE_COLUMN: [encode_file(example_file)]}),
            pip_requirements=pip_requirements(),
        )
