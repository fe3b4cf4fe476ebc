"""Session-wide trained models for the evaluate, register and serving tests (a pytest plugin).

Loaded with ``pytest_plugins = ["model_fixtures"]`` by the test modules that need it, so the
models are trained once per test session however many modules use them. They live in their
own SQLite tracking store under a temporary folder, with real images symlinked from the shared
data: a notebook CNN trained long enough to have learned (64 px RGB), the dense baseline barely
trained (the "worse" model, and one without a convolution), and a short aug_cnn run (64 px
grayscale; the default model of ``evaluate``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest

from conftest import make_subset, require_real_data
from helpers import use_tracking_store
from pneumo.aug_cnn import aug_cnn
from pneumo.baseline import baseline
from pneumo.cnn import cnn
from pneumo.config import AugmentConfig, CNNConfig, DataConfig, DenseConfig, TrainConfig
from pneumo.prepare import prepare

EXPERIMENT = "pneumo-models"
PER_CLASS = 100
VAL_FRACTION = 0.2
# Images far (in sorted order) from the training subset: never seen by any model here.
UNSEEN_PER_CLASS = 8


@dataclass(frozen=True)
class TrainedModels:
    """Where the session's models are and what they were trained on."""

    tracking_uri: str
    experiment_id: str
    data_dir: Path
    manifest: str  # run id of the `prepare` run every model used
    cnn: str  # run ids
    dense: str
    aug_cnn: str
    unseen: dict[str, list[Path]]  # class name -> images no model has seen

    def model_uri(self, run_id: str) -> str:
        return f"runs:/{run_id}/model"


def _unseen_images() -> dict[str, list[Path]]:
    return {
        name: sorted(p for p in (require_real_data() / "train" / name).iterdir() if not p.name.startswith("."))[
            -UNSEEN_PER_CLASS:
        ]
        for name in ("NORMAL", "PNEUMONIA")
    }


@pytest.fixture(scope="session")
def trained_models(tmp_path_factory) -> TrainedModels:
    """Train the three models once (about half a minute on 2 CPU cores)."""
    root = tmp_path_factory.mktemp("trained_models")
    data_dir = make_subset(root / "data", PER_CLASS)
    with pytest.MonkeyPatch.context() as patch:
        experiment_id = use_tracking_store(patch, root, EXPERIMENT)
        uri = mlflow.get_tracking_uri()
        mlflow.set_experiment(experiment_id=experiment_id)
        try:
            base = DataConfig(data_dir=str(data_dir), val_fraction=VAL_FRACTION, cache_dir="", seed=42)
            manifest = prepare(base)
            base = dataclasses.replace(base, manifest=manifest, image_size=64)
            notebook = TrainConfig(
                batch_size=16,
                epochs=10,
                patience=10,
                learning_rate=1e-3,
                optimizer="rmsprop",
                target_sensitivity=0.9,
                monitor="val_loss",
                cosine_decay=False,
                precision="float32",
            )
            cnn_run = cnn(dataclasses.replace(base, channels=3), notebook)
            dense = baseline(
                dataclasses.replace(base, channels=3),
                dataclasses.replace(notebook, epochs=1, patience=1, learning_rate=1e-6),
                DenseConfig(),
            )
            aug_cnn_run = aug_cnn(
                dataclasses.replace(base, channels=1),
                TrainConfig(batch_size=16, epochs=2, patience=2, precision="float32"),
                AugmentConfig(),
                CNNConfig(width=8),
            )
        finally:
            mlflow.set_tracking_uri(None)
    return TrainedModels(uri, experiment_id, data_dir, manifest, cnn_run, dense, aug_cnn_run, _unseen_images())


@pytest.fixture
def models_store(trained_models, monkeypatch) -> TrainedModels:
    """Make the session's tracking store and experiment active for one test and its subprocesses."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained_models.tracking_uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)  # set_experiment exports it; restored after
    mlflow.set_tracking_uri(trained_models.tracking_uri)
    mlflow.set_experiment(experiment_id=trained_models.experiment_id)
    yield trained_models
    mlflow.set_tracking_uri(None)
