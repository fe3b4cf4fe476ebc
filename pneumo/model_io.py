"""A logged pneumo model on disk and in MLflow: its artifacts, how it is logged, opened and run.

Training logs every model through :func:`log_model` as an MLflow pyfunc (defined from code in
``pyfunc_model.py``, served by :class:`pneumo.serving.PneumoniaClassifier`). It carries the Keras
model (``.keras``, loaded with ``safe_mode=True``), its :class:`~pneumo.contract.ModelContract`
(``model_config.json``: input spec, operating threshold, every hyperparameter, validation figures,
lineage) and the ``pneumo`` package itself. ``evaluate``, registration, ``adapt`` and ``predict``
open it again with :func:`load_trained_model`, and everyone predicts with :func:`predict_probabilities`.
"""

from __future__ import annotations

import base64
import tempfile
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import Model, ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from pneumo.contract import CONTRACT_FILE, ModelContract, contract_text, read_contract
from pneumo.errors import ConfigError
from pneumo.synthetic import synthetic_example_base64

IMAGE_COLUMN = "image"
MODEL_ARTIFACT = "keras_model"
CONFIG_ARTIFACT = "model_config"
# label: NORMAL or PNEUMONIA at the threshold, or UNCERTAIN when in_distribution is false;
# probability and threshold: calibrated (pneumo.calibration), so probability >= threshold is the
# decision; in_distribution and ood_score: the input gate's verdict (pneumo.ood; passes at <= 1).
OUTPUT_COLUMNS = ("label", "probability", "threshold", "in_distribution", "ood_score")
# Which model answered, on every served row: the logged model's MLflow id (a registered version's
# source is models:/<model_id>), its training run and the git commit of the code that trained it.
IDENTITY_COLUMNS = ("model_id", "model_run_id", "code_version")
# Optional on purpose: MLflow refuses a missing required column with a message that echoes the
# request's data; an optional one is dropped, and pneumo.limits.check_request refuses it instead.
INPUT_SCHEMA = Schema([ColSpec("string", IMAGE_COLUMN, required=False)])
OUTPUT_SCHEMA = Schema(
    [
        ColSpec("string", "label"),
        ColSpec("double", "probability"),
        ColSpec("double", "threshold"),
        ColSpec("boolean", "in_distribution"),
        ColSpec("double", "ood_score"),
    ]
    + [ColSpec("string", name) for name in IDENTITY_COLUMNS]
)
# Request parameters: {"params": {"tta": true}} averages over the fixed test-time views.
PARAMS_SCHEMA = ParamSchema([ParamSpec("tta", "boolean", False)])
# Packages the served model imports, pinned to the versions it was trained with; only one
# TensorFlow distribution, the first installed of these (GPU "tensorflow", else "tensorflow-cpu").
# Keras imports scikit-learn and matplotlib when they are there, but needs neither.
# pydicom decodes compressed DICOM through the pylibjpeg plugins, found when installed.
_TENSORFLOW = ("tensorflow", "tensorflow-cpu")
_REQUIREMENTS = (
    "keras",
    "numpy",
    "pandas",
    "pillow",
    "pydicom",
    "opencv-python-headless",
    "pylibjpeg",
    "pylibjpeg-libjpeg",
    "pylibjpeg-openjpeg",
    "pylibjpeg-rle",
    "mlflow",
)
# Images per forward pass: bounds the float32 activations of one call, whatever the request size.
_CHUNK = 64


def load_keras_model(path: str | Path):
    """Load a ``.keras`` file without executing arbitrary code (``safe_mode=True``)."""
    # Imported here, not at the top: TensorFlow takes seconds to import and only loading needs it
    # (``predict --help`` and the served module's import stay fast).
    import keras

    import pneumo.augmentation  # noqa: F401  (registers pneumo's serialisable layers)
    import pneumo.models  # noqa: F401

    return keras.saving.load_model(str(path), compile=False, safe_mode=True)


def encode_file(path: str | Path) -> str:
    """Base64 text of a file, as the served model expects in its ``image`` column."""
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def predict_probabilities(model, images: np.ndarray, tta: bool = False) -> np.ndarray:
    """Probabilities of pneumonia for uint8 images, in chunks.

    Args:
        model: The Keras model.
        images: ``(n, side, side, channels)`` ``uint8`` batch.
        tta: Average over the fixed test-time views of :func:`pneumo.augmentation.tta_views`
            (7 forward passes per image) instead of the image alone.
    """
    if len(images) == 0:
        return np.zeros(0, np.float64)
    if tta:
        from pneumo.augmentation import tta_views  # TensorFlow: only when asked for

        return np.mean([predict_probabilities(model, view) for view in tta_views(images)], axis=0)
    outputs = [
        np.asarray(model(images[i : i + _CHUNK].astype(np.float32), training=False)).reshape(-1)
        for i in range(0, len(images), _CHUNK)
    ]
    return np.concatenate(outputs).astype(np.float64)


@dataclass
class TrainedModel:
    """A logged pneumo model opened for evaluation, adaptation or batch prediction (no pyfunc wrapper).

    Attributes:
        model: The Keras model.
        contract: What it was logged with: input spec, threshold, figures, lineage.
        uri: The URI it was opened from.
        model_id: MLflow 3 LoggedModel id: ``models:/<model_id>`` names exactly this model.
    """

    model: Any  # keras.Model
    contract: ModelContract
    uri: str
    model_id: str | None = None

    @property
    def run_id(self) -> str | None:
        """The run that logged the model."""
        return self.contract.run_id


def load_trained_model(model_uri: str, dst_path: str | None = None) -> TrainedModel:
    """Download a logged pneumo pyfunc and open its Keras model and contract.

    Unlike ``mlflow.pyfunc.load_model`` this neither puts the model's copy of ``pneumo`` on
    ``sys.path`` nor wraps the Keras model, so Grad-CAM and fine-tuning can reach its layers.

    Args:
        model_uri: ``runs:/<run>/model``, ``models:/<name>@<alias>``, ``models:/<name>/<version>``
            or a local folder.
        dst_path: Folder to download into; a temporary one when ``None`` (the Keras model is
            fully read into memory, so the files are not needed afterwards).

    Returns:
        The model, its contract and the URI.

    Raises:
        MlflowException: The URI cannot be resolved.
        ConfigError: The URI does not point at a pneumo model, or its contract is one this pneumo
            cannot read (see :func:`pneumo.contract.parse_contract`).
    """
    with tempfile.TemporaryDirectory() as folder:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=dst_path or folder))
        mlmodel = Model.load(str(local))
        artifacts = mlmodel.flavors.get("python_function", {}).get("artifacts", {})
        if MODEL_ARTIFACT not in artifacts or CONFIG_ARTIFACT not in artifacts:
            raise ConfigError(
                f"{model_uri} is not a pneumo model (no '{MODEL_ARTIFACT}'/'{CONFIG_ARTIFACT}' artifacts)"
            )
        contract = read_contract((local / artifacts[CONFIG_ARTIFACT]["path"]).read_text())
        model = load_keras_model(local / artifacts[MODEL_ARTIFACT]["path"])
    if contract.run_id is None and mlmodel.run_id:
        contract = contract.derived(run_id=mlmodel.run_id)
    return TrainedModel(model, contract, model_uri, mlmodel.model_id)


def pip_requirements() -> list[str]:
    """Pinned requirements of the served model, taken from the training environment."""
    pinned = []
    for name in _TENSORFLOW:
        try:
            pinned.append(f"{name}=={version(name)}")
            break
        except PackageNotFoundError:
            continue
    for name in _REQUIREMENTS:
        try:
            pinned.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            continue
    return pinned


def log_model(model, contract: ModelContract, name: str = "model"):
    """Log a Keras model with its contract as the pneumo pyfunc in the active run.

    The input example is a synthetic image (:mod:`pneumo.synthetic`), never a patient's, since it
    travels with the model.

    Args:
        model: The Keras model to serve (saved here as a ``.keras`` file).
        contract: What the model is and how to use it (``model_config.json``).
        name: Logged-model name in the run.

    Returns:
        MLflow's ``ModelInfo``.
    """
    with tempfile.TemporaryDirectory() as folder:
        keras_path = Path(folder) / "model.keras"
        model.save(keras_path)
        config_path = Path(folder) / CONTRACT_FILE
        config_path.write_text(contract_text(contract))
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(Path(__file__).with_name("pyfunc_model.py")),
            artifacts={MODEL_ARTIFACT: str(keras_path), CONFIG_ARTIFACT: str(config_path)},
            code_paths=[str(Path(__file__).resolve().parent)],
            signature=ModelSignature(inputs=INPUT_SCHEMA, outputs=OUTPUT_SCHEMA, params=PARAMS_SCHEMA),
            input_example=pd.DataFrame({IMAGE_COLUMN: [synthetic_example_base64()]}),
            pip_requirements=pip_requirements(),
        )
