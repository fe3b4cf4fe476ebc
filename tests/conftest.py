"""Shared fixtures: an isolated MLflow store per test, and small real-image data sets.

Real images come from ``../shared/data/chest_xray`` (never copied into the repo): small
subsets are exposed through symlinks in a temporary folder, keeping whole patients together.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import mlflow
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PNEUMO_SHARED_DATA", REPO.parent / "shared" / "data" / "chest_xray")).resolve()

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MPLBACKEND", "Agg")
# Tests must never reach a network: kagglehub and Keras downloads fail fast instead of hanging.
os.environ.setdefault("KAGGLEHUB_CACHE", str(Path("/tmp") / "pneumo-test-kagglehub"))


def pytest_configure(config):
    if not (SHARED_DATA / "train" / "NORMAL").is_dir():
        pytest.exit(f"real data missing: {SHARED_DATA}/train (set PNEUMO_SHARED_DATA)", returncode=2)


@pytest.fixture
def tracking(tmp_path, monkeypatch):
    """A fresh SQLite tracking store and artifact folder, active for this test and its subprocesses.

    Yields:
        The tracking URI. ``MLFLOW_EXPERIMENT_NAME`` points at an experiment whose artifacts live
        under ``tmp_path``.
    """
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    experiment_id = mlflow.create_experiment("pneumo-test", artifact_location=(tmp_path / "artifacts").as_uri())
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "pneumo-test")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    mlflow.set_experiment(experiment_id=experiment_id)
    # set_experiment exports MLFLOW_EXPERIMENT_ID; register it so teardown removes it again.
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)
    yield uri
    mlflow.set_tracking_uri(None)


def make_subset(root: Path, per_class: int, offset: int = 0) -> Path:
    """Symlink about ``per_class`` real training images per class into ``root/train/<CLASS>``."""
    for name in ("NORMAL", "PNEUMONIA"):
        target = root / "train" / name
        target.mkdir(parents=True, exist_ok=True)
        files = sorted(p for p in (SHARED_DATA / "train" / name).iterdir() if not p.name.startswith("."))
        for path in _patient_subset_from(files[offset:], per_class):
            (target / path.name).symlink_to(path)
    return root


def _patient_subset_from(files: list[Path], count: int) -> list[Path]:
    from pneumo.data import patient_id

    chosen = files[:count]
    last = patient_id(chosen[-1].name)
    return chosen + [p for p in files[count:] if patient_id(p.name) == last]


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    """About 60 real images per class in the Kaggle layout (train only), via symlinks."""
    return make_subset(tmp_path_factory.mktemp("small_data"), 60)


@pytest.fixture(scope="session")
def repo() -> Path:
    """The project root (for ``mlflow.projects.run``)."""
    return REPO


@pytest.fixture(scope="session")
def python() -> str:
    """The interpreter running the tests (subprocesses use the same environment)."""
    return sys.executable
