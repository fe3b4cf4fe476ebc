"""Manifests in MLflow: logging one to the active run, fetching the one a run logged, and what a model trained on.

Making or reading a manifest is :mod:`pneumo.data`'s work. Every run that reads images logs the
manifest it used, so a run id can stand for a manifest (``-P manifest=<run id>``), and a model's
training run tells which images it was trained on (:func:`training_overlap`).
"""

from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path
from typing import Iterable

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pneumo import tracking
from pneumo.config import DataConfig
from pneumo.data import (
    DUPLICATES_FILE,
    MANIFEST_FILE,
    MANIFEST_META_FILE,
    Manifest,
    load_manifest,
    prepare_manifest,
    read_manifest,
)
from pneumo.errors import DataError
from pneumo.plots import plot_class_distribution

REJECTED_ARTIFACT = "rejected_files.csv"


def _log_manifest_input(manifest: Manifest, context: str) -> None:
    """Record the manifest as an MLflow dataset input (with its digest) of the active run."""
    with warnings.catch_warnings():  # MLflow's notes on source ambiguity and integer columns
        warnings.simplefilter("ignore", UserWarning)
        dataset = mlflow.data.from_pandas(
            manifest.frame,
            source=str(manifest.data_dir),
            targets="label",
            name="chest_xray_manifest",
            digest=manifest.digest,
        )
        try:  # the schema is inferred lazily, here, hence inside the filter
            mlflow.log_input(dataset, context=context)
        except MlflowException as error:
            # Two runs (e.g. parallel tune workers) registering the same new dataset at once: the
            # loser hits the store's unique key; the dataset now exists, and a retry links to it.
            if "UNIQUE" not in str(error).upper():
                raise
            time.sleep(0.5)
            mlflow.log_input(dataset, context=context)


def log_manifest(manifest: Manifest, context: str) -> None:
    """Log a manifest to the active run: what every run records about the images it used.

    Always the manifest (``manifest.csv``), its metadata (``manifest_meta.json``, so that this run's
    id can be the ``manifest`` of later runs) and an MLflow dataset input with its digest. For a
    manifest made now also the discovery report: ``rejected_files.csv``, the class distribution
    plot and the counts (in the run's summary table).

    Args:
        manifest: The manifest.
        context: Dataset-input context: ``prepare``, ``training`` or ``evaluation``.
    """
    tracking.log_dataframe(manifest.frame, MANIFEST_FILE)
    tracking.log_json(manifest.meta_json(), MANIFEST_META_FILE)
    if manifest.rejected is not None:
        tracking.log_dataframe(manifest.rejected, REJECTED_ARTIFACT)
        if manifest.duplicates is not None:  # groups of byte-identical files (pneumo.data.duplicate_report)
            tracking.log_dataframe(manifest.duplicates, DUPLICATES_FILE)
        tracking.log_figure(plot_class_distribution(manifest.frame), "plots/class_distribution.png")
        counts = manifest.frame.groupby(["split", "label_name"]).size()
        tracking.log_summary(
            {
                **{f"n_{split}_{name.lower()}": n for (split, name), n in counts.items()},
                "n_rejected": len(manifest.rejected),
            }
        )
    _log_manifest_input(manifest, context)


def _download_manifest(run_id: str, folder: str) -> Path:
    """Download a run's manifest (and its metadata, when logged) into ``folder``; returns the CSV."""
    client = MlflowClient()
    if any(a.path == MANIFEST_META_FILE for a in client.list_artifacts(run_id)):
        client.download_artifacts(run_id, MANIFEST_META_FILE, folder)
    return Path(client.download_artifacts(run_id, MANIFEST_FILE, folder))


def run_manifest_frame(run_id: str) -> pd.DataFrame:
    """The rows of the manifest a run logged (only the rows: its data folder need not exist here).

    Raises:
        DataError: The run, or its manifest, cannot be read from the tracking store.
    """
    with tempfile.TemporaryDirectory() as folder:
        try:
            path = _download_manifest(run_id, folder)
        except (MlflowException, OSError) as error:
            raise DataError(f"the manifest of run {run_id} cannot be read ({type(error).__name__})") from error
        return read_manifest(path)


def training_overlap(run_id: str | None, hashes: Iterable[str]) -> int:
    """How many of the images ``hashes`` (SHA-256 of their bytes) were in the training split of ``run_id``.

    The one check that a model is not judged on images it was trained on: ``evaluate`` reports
    the count, registration refuses any overlap.

    Raises:
        DataError: It cannot be checked: the model has no training run, or its manifest cannot be read.
    """
    if not run_id:
        raise DataError("the model has no training run, so its training images are unknown")
    trained_on = run_manifest_frame(run_id)
    return int(pd.Series(list(hashes), dtype=str).isin(trained_on.loc[trained_on["split"] == "train", "sha256"]).sum())


def resolve_manifest(config: DataConfig) -> Manifest:
    """The manifest ``config.manifest`` names: a CSV path or the id of a run that logged one; empty = make one now.

    Raises:
        DataError: ``manifest`` is neither, or its data folder cannot be found.
    """
    if not config.manifest:
        return prepare_manifest(config)
    path = Path(config.manifest).expanduser()
    if path.is_file():
        return load_manifest(path, config.data_dir)
    with tempfile.TemporaryDirectory() as folder:
        try:
            csv_path = _download_manifest(config.manifest, folder)
        except Exception as error:
            raise DataError(
                f"manifest {config.manifest!r} is neither a CSV file nor the id of a run with a "
                f"{MANIFEST_FILE} artifact ({error})"
            ) from error
        return load_manifest(csv_path, config.data_dir)
