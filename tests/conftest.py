"""Shared fixtures: an isolated MLflow store per test, small real-image data sets, sample image files.

Real images come from ``../shared/data/chest_xray`` (never copied into the repo): small
subsets are exposed through symlinks in a temporary folder, keeping whole patients together.
Tests that train, start a subprocess or serve are marked ``slow``: ``pytest -m "not slow"`` runs
the others in under a minute.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PNEUMO_SHARED_DATA", REPO.parent / "shared" / "data" / "chest_xray")).resolve()

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MPLBACKEND", "Agg")
# Tests must never reach a network: kagglehub and Keras downloads fail fast instead of hanging.
os.environ.setdefault("KAGGLEHUB_CACHE", str(Path("/tmp") / "pneumo-test-kagglehub"))

# Imported only now: TensorFlow (imported through helpers) reads TF_CPP_MIN_LOG_LEVEL when loaded.
import mlflow  # noqa: E402
import pytest  # noqa: E402

import xray_files  # noqa: E402
from helpers import use_tracking_store  # noqa: E402
from pneumo.data import patient_id  # noqa: E402


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
    experiment_id = use_tracking_store(monkeypatch, tmp_path, "pneumo-test")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "pneumo-test")
    mlflow.set_experiment(experiment_id=experiment_id)
    yield mlflow.get_tracking_uri()
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


@pytest.fixture(scope="session")
def sample_bytes() -> dict[str, bytes]:
    """Encoded bytes of every synthetic sample image (:data:`xray_files.SAMPLES`)."""
    return xray_files.sample_files()
