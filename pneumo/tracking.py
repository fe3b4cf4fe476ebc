"""MLflow plumbing shared by the entry points: runs, tags, metrics, artifacts, and the manifest's records.

Making or reading a manifest is :mod:`pneumo.data`'s work; fetching the one a run logged and
logging one to the active run is done here.
"""

from __future__ import annotations

import contextlib
import logging
import os
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
from mlflow.utils import name_utils

from pneumo.config import DataConfig, RunConfigs, json_text
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
from pneumo.experiment import tag_experiment_kind
from pneumo.plots import plot_class_distribution
from pneumo.runs import guarded

log = logging.getLogger(__name__)
REJECTED_ARTIFACT = "rejected_files.csv"
ENTRY_POINT_TAG = "pneumo.entry_point"


def _is_generated_name(name: str | None) -> bool:
    """Whether ``name`` is empty or one MLflow made up (``unequaled-grub-968``), not one the user chose."""
    if not name:
        return True
    parts = name.split("-")
    return (
        len(parts) == 3
        and parts[0] in name_utils._GENERATOR_PREDICATES
        and parts[1] in name_utils._GENERATOR_NOUNS
        and parts[2].isdigit()
    )


def describe_run(configs: RunConfigs) -> str:
    """A run name that says what the run is: its entry point and key parameters.

    E.g. ``aug_cnn-128px-lr0.001-16ep``, ``tune-aug_cnn-30trials-12ep``,
    ``evaluate-test-models:/pneumonia-classifier@champion``.
    """
    params = configs.params()
    entry_point = configs.entry_point
    if entry_point == "prepare":
        parts = [entry_point, f"val{params['val_fraction']:g}"]
    elif entry_point == "evaluate":
        parts = [entry_point, params["split"], params["model_uri"] or "latest-aug_cnn"]
        parts += ["register"] if params["register"] else []
    elif entry_point == "tune":
        parts = [entry_point, params["study_name"], f"{params['n_trials']}trials", f"{params['epochs']}ep"]
    else:
        parts = [entry_point, f"{params['image_size']}px", f"lr{params['learning_rate']:g}", f"{params['epochs']}ep"]
        parts += [f"{params['folds']}folds"] if "folds" in params else []
    if params.get("limit_per_class"):
        parts.append(f"limit{params['limit_per_class']}")
    return "-".join(str(part) for part in parts)


def _system_metrics(nested: bool) -> bool | None:
    """System metrics (CPU, memory, GPU where present) for top-level runs, unless the user set the variable."""
    if nested:
        return False
    return None if "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING" in os.environ else True


@contextlib.contextmanager
def start_run(configs: RunConfigs, nested: bool = False, run_name: str | None = None) -> Iterator[mlflow.ActiveRun]:
    """Start (or, under ``mlflow run``, resume) a run; log every config field and the entry-point tag.

    The code version is MLflow's own tag ``mlflow.source.git.commit``, set when the run is started
    from the checkout (``mlflow run`` or ``python -m entrypoints.X``). Top-level runs log MLflow's
    system metrics (``system/...``) unless ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING`` says otherwise.
    The run's experiment is tagged ``mlflow.experimentKind=custom_model_development`` (unless it
    has a kind) so that MLflow's UI opens it on its runs.

    Args:
        configs: The run's configs: every field is logged as a param; the entry point is stored in
            the ``pneumo.entry_point`` tag.
        nested: Start a child run of the active run.
        run_name: Display name; defaults to :func:`describe_run` (also replacing the random name
            ``mlflow run`` gives, but not one the user chose with ``--run-name``).
    """
    client = MlflowClient()
    if run_name is None:
        resumed = os.environ.get("MLFLOW_RUN_ID") if not nested and mlflow.active_run() is None else None
        current = client.get_run(resumed).info.run_name if resumed else None
        run_name = describe_run(configs) if _is_generated_name(current) else current
    with (
        mlflow.start_run(nested=nested, run_name=run_name, log_system_metrics=_system_metrics(nested)) as run,
        guarded(run, nested),  # SIGTERM/SIGINT end the run KILLED (pneumo.runs)
    ):
        try:
            tag_experiment_kind(client, client.get_experiment(run.info.experiment_id))
        except MlflowException as error:  # a read-only or foreign experiment: the tag is a convenience
            log.warning("could not tag the experiment's kind: %s", error)
        mlflow.set_tag(ENTRY_POINT_TAG, configs.entry_point)
        # Under `mlflow run` the entry point's parameters are already logged, shell-quoted (""
        # as "''"), and MLflow refuses to change a param: log only the others.
        logged = client.get_run(run.info.run_id).data.params
        mlflow.log_params({k: v for k, v in configs.params().items() if k not in logged})
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


def log_metrics(metrics: dict[str, Any], step: int | None = None) -> None:
    """Log metrics as floats, NaN included.

    The one policy for undefined values: they are logged, not dropped, because "NPV undefined at
    0.5 (nothing predicted normal)" or "training loss became NaN" is a finding.
    """
    mlflow.log_metrics({name: float(value) for name, value in metrics.items()}, step=step)


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
    plot and the counts as metrics.

    Args:
        manifest: The manifest.
        context: Dataset-input context: ``prepare``, ``training`` or ``evaluation``.
    """
    log_dataframe(manifest.frame, MANIFEST_FILE)
    log_json(manifest.meta_json(), MANIFEST_META_FILE)
    if manifest.rejected is not None:
        log_dataframe(manifest.rejected, REJECTED_ARTIFACT)
        if manifest.duplicates is not None:  # groups of byte-identical files (pneumo.data.duplicate_report)
            log_dataframe(manifest.duplicates, DUPLICATES_FILE)
        log_figure(plot_class_distribution(manifest.frame), "plots/class_distribution.png")
        counts = manifest.frame.groupby(["split", "label_name"]).size()
        log_metrics({f"n_{split}_{name.lower()}": n for (split, name), n in counts.items()})
        log_metrics({"n_rejected": len(manifest.rejected)})
    _log_manifest_input(manifest, context)


def _download_manifest(run_id: str, folder: str) -> Path:
    """Download a run's manifest (and its metadata, when logged) into ``folder``; returns the CSV."""
    client = MlflowClient()
    if any(a.path == MANIFEST_META_FILE for a in client.list_artifacts(run_id)):
        client.download_artifacts(run_id, MANIFEST_META_FILE, folder)
    return Path(client.download_artifacts(run_id, MANIFEST_FILE, folder))


def run_manifest_frame(run_id: str) -> pd.DataFrame:
    """The rows of the manifest a run logged (only the rows: its data folder need not exist here)."""
    with tempfile.TemporaryDirectory() as folder:
        return read_manifest(_download_manifest(run_id, folder))


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
