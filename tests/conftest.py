"""Shared fixtures: an isolated MLflow store per test, small real-image data sets, sample image files.

Real images come from the first of ``$PNEUMO_SHARED_DATA``, ``../shared/data/chest_xray``,
``$PNEUMO_DATA_DIR``, ``./data/chest_xray`` and the kagglehub cache (never copied into the repo):
small subsets are exposed through symlinks in a temporary folder, keeping whole patients
together. Without any, only the tests that need real X-rays skip, with one reason.
Tests that train, start a subprocess or serve are marked ``slow``: ``pytest -m "not slow"`` runs
the others in under a minute.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MPLBACKEND", "Agg")

from pneumo.data import cached_dataset  # noqa: E402


def find_real_data() -> Path | None:
    """The first folder with real X-rays in the Kaggle layout, in the order README's test section gives."""
    candidates = [
        os.environ.get("PNEUMO_SHARED_DATA"),
        REPO.parent / "shared" / "data" / "chest_xray",
        os.environ.get("PNEUMO_DATA_DIR"),
        REPO / "data" / "chest_xray",
    ]
    for candidate in filter(None, candidates):
        path = Path(candidate).expanduser()
        if (path / "train" / "NORMAL").is_dir() and (path / "train" / "PNEUMONIA").is_dir():
            return path.resolve()
    return cached_dataset()  # the user's kagglehub cache, read before the override below


REAL_DATA = find_real_data()
# Where tests read real images; a path that does not exist when there are none (those tests skip).
SHARED_DATA = REAL_DATA or REPO.parent / "shared" / "data" / "chest_xray"
NO_REAL_DATA = (
    "no real chest X-rays: looked in $PNEUMO_SHARED_DATA, ../shared/data/chest_xray, $PNEUMO_DATA_DIR, "
    "./data/chest_xray and the kagglehub cache (run `python -m entrypoints.prepare` once to download them)"
)

# Tests must never reach a network: kagglehub and Keras downloads fail fast instead of hanging.
os.environ["KAGGLEHUB_CACHE"] = str(Path("/tmp") / "pneumo-test-kagglehub")

# Imported only now: TensorFlow (imported through helpers) reads TF_CPP_MIN_LOG_LEVEL when loaded.
import mlflow  # noqa: E402
import pytest  # noqa: E402

import xray_files  # noqa: E402
from helpers import use_tracking_store  # noqa: E402
from pneumo.data import patient_id  # noqa: E402


def require_real_data() -> Path:
    """The real-data folder; skips the calling test (or fixture) with one clear reason when there is none."""
    if REAL_DATA is None:
        pytest.skip(NO_REAL_DATA)
    return REAL_DATA


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
    require_real_data()
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
