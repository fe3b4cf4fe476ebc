"""Helpers shared by the test modules: tracking stores, project runs, artifacts, folder snapshots.

Image files are built by :mod:`xray_files`; fixtures live in ``conftest.py`` and ``model_fixtures.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from pneumo.pipeline import ImageSet


def use_tracking_store(patch: pytest.MonkeyPatch, root: Path, experiment: str) -> str:
    """Point MLflow, here and in subprocesses, at a new SQLite store under ``root`` with one experiment.

    The experiment's artifacts live under ``root/artifacts``. No experiment is made active: the
    ``MLFLOW_EXPERIMENT_*`` variables are removed (and restored by ``patch`` afterwards).

    Returns:
        The experiment's id.
    """
    uri = f"sqlite:///{root / 'mlflow.db'}"
    patch.setenv("MLFLOW_TRACKING_URI", uri)
    patch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    # mlflow.set_experiment exports MLFLOW_EXPERIMENT_ID; registering it here makes the patch remove it again.
    patch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    mlflow.set_tracking_uri(uri)
    return mlflow.create_experiment(experiment, artifact_location=(root / "artifacts").as_uri())


def run_project(repo: Path, entry_point: str, parameters: dict, experiment: str, synchronous: bool = True):
    """Run an entry point through MLproject, exactly as ``mlflow run . -e X --env-manager local`` does.

    Returns:
        MLflow's submitted run (``run_id``; ``wait()`` when not synchronous).
    """
    return mlflow.projects.run(
        str(repo),
        entry_point=entry_point,
        parameters=parameters,
        env_manager="local",
        experiment_name=experiment,
        synchronous=synchronous,
    )


def artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    """Every artifact file of a run (paths relative to its artifact root), folders expanded."""
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def download(client: MlflowClient, run_id: str, path: str, folder: Path) -> Path:
    """Download one artifact of a run into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(run_id, path, str(folder)))


def read_json(path: str | Path) -> Any:
    with open(path) as handle:
        return json.load(handle)


def read_text(path: str | Path) -> str:
    with open(path) as handle:
        return handle.read()


def tree_state(root: Path) -> dict[str, tuple]:
    """What "nothing under ``root`` changed" means: every entry's kind, content and times, and every listing.

    Links are followed for the content and the target's mtime, and their own mtime is kept too.
    """
    state: dict[str, tuple] = {}
    for path in sorted(root.rglob("*")):
        link, target = path.lstat(), path.stat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        state[path.relative_to(root).as_posix()] = (path.is_symlink(), digest, link.st_mtime_ns, target.st_mtime_ns)
    for folder in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        state[f"{folder}/ (listing)"] = tuple(sorted(os.listdir(folder)))
    return state


def cached_set(n_normal: int, n_pneumonia: int, side: int = 32) -> ImageSet:
    """A decoded set of random grayscale images, normal ones first."""
    labels = np.array([0] * n_normal + [1] * n_pneumonia, dtype=np.int32)
    images = np.random.default_rng(0).integers(0, 255, (len(labels), side, side, 1), dtype=np.uint8)
    return ImageSet(images, labels, pd.DataFrame({"label": labels}))
