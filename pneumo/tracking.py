"""MLflow plumbing shared by the entry points: runs, tags, artifacts and the split manifest."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import matplotlib.pyplot as plt
import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pneumo import data as data_lib
from pneumo.config import DataConfig, flatten, json_text
from pneumo.errors import DataError
from pneumo.plots import plot_class_distribution

log = logging.getLogger(__name__)
MANIFEST_ARTIFACT = "manifest.csv"
MANIFEST_META_ARTIFACT = "manifest_meta.json"
REJECTED_ARTIFACT = "rejected_files.csv"
ENTRY_POINT_TAG = "pneumo.entry_point"


def git_commit() -> str | None:
    """Commit of the project checkout, or None outside git."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


@contextlib.contextmanager
def start_run(
    entry_point: str, *configs: Any, nested: bool = False, run_name: str | None = None
) -> Iterator[mlflow.ActiveRun]:
    """Start (or, under ``mlflow run``, resume) a run; log every config field and the standard tags.

    Args:
        entry_point: Name of the entry point, stored in the ``pneumo.entry_point`` tag.
        *configs: Dataclass instances whose fields are logged as params.
        nested: Start a child run of the active run.
        run_name: Display name; defaults to MLflow's generated name.
    """
    with mlflow.start_run(nested=nested, run_name=run_name) as run:
        tags = {ENTRY_POINT_TAG: entry_point}
        commit = git_commit()
        if commit:
            tags["git_commit"] = commit
        mlflow.set_tags(tags)
        if configs:
            # Under `mlflow run` the entry point's parameters are already logged, shell-quoted (""
            # as "''"), and MLflow refuses to change a param: log only the others.
            logged = MlflowClient().get_run(run.info.run_id).data.params
            mlflow.log_params({k: v for k, v in flatten(*configs).items() if k not in logged})
        yield run


def log_figure(figure: plt.Figure, artifact_file: str) -> None:
    """Log a matplotlib figure as a PNG artifact and close it."""
    mlflow.log_figure(figure, artifact_file)
    plt.close(figure)


def log_json(payload: Any, artifact_file: str) -> None:
    """Log a JSON-serialisable object as an artifact."""
    mlflow.log_text(json_text(payload), artifact_file)


def log_dataframe(frame: pd.DataFrame, artifact_file: str) -> None:
    """Log a DataFrame as a CSV artifact."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / Path(artifact_file).name
        frame.to_csv(path, index=False)
        mlflow.log_artifact(str(path), str(Path(artifact_file).parent) if "/" in artifact_file else None)


def manifest_digest(manifest: pd.DataFrame) -> str:
    """Short digest of a manifest's content (paths, splits, labels, file hashes)."""
    text = manifest[["path", "split", "label", "sha256"]].to_csv(index=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def log_manifest_input(manifest: pd.DataFrame, data_dir: Path, context: str) -> None:
    """Record the manifest as an MLflow dataset input (with its digest) of the active run."""
    with warnings.catch_warnings():  # MLflow's notes on source ambiguity and integer columns
        warnings.simplefilter("ignore", UserWarning)
        dataset = mlflow.data.from_pandas(
            manifest,
            source=str(data_dir),
            targets="label",
            name="chest_xray_manifest",
            digest=manifest_digest(manifest),
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


def prepare_manifest(config: DataConfig, context: str = "prepare") -> tuple[pd.DataFrame, Path]:
    """Discover, validate and split the images; log manifest, report and plot to the active run.

    Never writes into the data folder.

    Args:
        config: Data settings (``data_dir``, ``val_fraction``, ``val_scheme``, ``seed``, ...).
        context: Dataset-input context (``prepare``, or ``training`` when a training run
            prepares its own manifest).

    Returns:
        The manifest and the resolved data folder.
    """
    data_dir = data_lib.resolve_data_dir(config.data_dir)
    found = data_lib.discover(data_dir)
    manifest = data_lib.build_manifest(
        found.images, config.val_fraction, config.seed, config.val_scheme, config.limit_per_class
    )
    counts = manifest.groupby(["split", "label_name"]).size()
    meta = {
        "data_dir": str(data_dir),
        "digest": manifest_digest(manifest),
        "val_fraction": config.val_fraction,
        "val_scheme": config.val_scheme,
        "seed": config.seed,
        "limit_per_class": config.limit_per_class,
        "counts": {f"{split}/{name}": int(n) for (split, name), n in counts.items()},
        "rejected": len(found.rejected),
        "patients": {
            s: int(manifest.loc[manifest["split"] == s, "patient_id"].nunique()) for s in manifest["split"].unique()
        },
    }
    log_dataframe(manifest, MANIFEST_ARTIFACT)
    log_json(meta, MANIFEST_META_ARTIFACT)
    log_dataframe(found.rejected, REJECTED_ARTIFACT)
    log_figure(plot_class_distribution(manifest), "plots/class_distribution.png")
    mlflow.log_metrics({f"n_{split}_{name.lower()}": int(n) for (split, name), n in counts.items()})
    mlflow.log_metric("n_rejected", len(found.rejected))
    log_manifest_input(manifest, data_dir, context=context)
    log.info("manifest %s: %s; %d file(s) rejected", meta["digest"], meta["counts"], meta["rejected"])
    return manifest, data_dir


def _manifest_from_run(run_id: str) -> tuple[pd.DataFrame, dict]:
    client = MlflowClient()
    with tempfile.TemporaryDirectory() as folder:
        csv_path = client.download_artifacts(run_id, MANIFEST_ARTIFACT, folder)
        has_meta = any(a.path == MANIFEST_META_ARTIFACT for a in client.list_artifacts(run_id))
        meta = (
            json.loads(Path(client.download_artifacts(run_id, MANIFEST_META_ARTIFACT, folder)).read_text())
            if has_meta
            else {}
        )
        return data_lib.read_manifest(csv_path), meta


def resolve_manifest(config: DataConfig, context: str = "training") -> tuple[pd.DataFrame, Path]:
    """Get the manifest for a run: from a CSV path, a prepare run id, or by preparing one now.

    The manifest is logged to the active run (artifact and dataset input) in every case, so each
    training run records exactly which images it saw.

    Args:
        config: Data settings; ``manifest`` may be a path, a run id, or empty.
        context: Dataset-input context (``training`` or ``evaluation``).

    Returns:
        The manifest and the data folder its paths are relative to.
    """
    if not config.manifest:
        return prepare_manifest(config, context=context)
    path = Path(config.manifest).expanduser()
    if path.is_file():
        manifest = data_lib.read_manifest(path)
        meta_path = path.with_name(MANIFEST_META_ARTIFACT)
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    else:
        try:
            manifest, meta = _manifest_from_run(config.manifest)
        except Exception as error:
            raise DataError(
                f"manifest {config.manifest!r} is neither a CSV file nor a prepare run id with a "
                f"{MANIFEST_ARTIFACT} artifact ({error})"
            ) from error
    data_dir = data_lib.resolve_data_dir(config.data_dir or meta.get("data_dir", ""))
    log_dataframe(manifest, MANIFEST_ARTIFACT)
    # With its meta file, this run's id can be passed as `manifest` to later runs too.
    log_json({**meta, "data_dir": str(data_dir), "digest": manifest_digest(manifest)}, MANIFEST_META_ARTIFACT)
    log_manifest_input(manifest, data_dir, context=context)
    return manifest, data_dir
