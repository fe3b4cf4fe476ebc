"""prepare, baseline, cv and cnn, each run once for real through ``mlflow.projects.run``.

Every run goes through MLproject and the command line exactly as ``mlflow run . -e X
--env-manager local`` does, on ~60 real images per class, with tiny epochs. The assertions read
back what the tracking store holds: parameters, metric histories, artifacts, the dataset input,
tags and a loadable model.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import re
import shlex
import subprocess
from pathlib import Path
from types import SimpleNamespace

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image
from sklearn.metrics import roc_auc_score

from conftest import REPO
from helpers import artifacts, download, read_json, run_project, tree_state, use_tracking_store
from pneumo import CLASS_NAMES, UNCERTAIN
from pneumo.cli import ENTRY_POINTS
from pneumo.cnn import cnn
from pneumo.config import parse_configs
from pneumo.data import manifest_digest
from pneumo.tracking import read_summary

# Every test here runs an entry point in a subprocess (or trains): all slow.
pytestmark = pytest.mark.slow

EXPERIMENT = "pneumo-core-entrypoints"
EPOCHS = 2
FOLDS = 3
# Small inputs keep the runs fast; cnn's three conv/pool blocks still fit in 32x32.
TRAINING = {"image_size": 32, "epochs": EPOCHS, "batch_size": 16, "seed": 7, "cache_dir": ""}
# Keras' epoch metrics as MLflow keys: "<quantity>/<split>", one run-page section per quantity.
PER_EPOCH = tuple(
    f"{name}/{split}" for name in ("loss", "accuracy", "auc", "precision", "recall") for split in ("train", "val")
)
TRAINING_ARTIFACTS = (
    "plots/training_curves.png",
    "plots/confusion_matrix_val_threshold.png",
    "plots/confusion_matrix_val_0.5.png",
    "confusion_matrix_val.json",
    "manifest.csv",
    "threshold.json",
    "val_predictions.csv",
)
# Written only when a run discovers the images itself; every run logs manifest.csv and manifest_meta.json.
PREPARE_ONLY = ("rejected_files.csv", "plots/class_distribution.png")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One tracking store (SQLite + artifact folder in tmp) shared by every run of this module."""
    root = tmp_path_factory.mktemp("core_store")
    with pytest.MonkeyPatch.context() as patch:
        use_tracking_store(patch, root, EXPERIMENT)
        patch.delenv("PNEUMO_DATA_DIR", raising=False)
        uri = mlflow.get_tracking_uri()
        yield SimpleNamespace(root=root, uri=uri, client=MlflowClient(uri))
        mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def prepare_run(store, repo, small_data):
    """A real prepare run, with the state of the source folder before and after it."""
    before = tree_state(small_data)
    submitted = run_project(repo, "prepare", {"data_dir": str(small_data), "cache_dir": "", "seed": 7}, EXPERIMENT)
    return SimpleNamespace(run_id=submitted.run_id, before=before, after=tree_state(small_data))


@pytest.fixture(scope="module")
def manifest_csv(store, prepare_run, tmp_path_factory) -> Path:
    """prepare's manifest as a lone CSV file (no manifest_meta.json beside it)."""
    folder = tmp_path_factory.mktemp("manifest_csv")
    return Path(store.client.download_artifacts(prepare_run.run_id, "manifest.csv", str(folder)))


@pytest.fixture(scope="module")
def training_runs(store, repo, small_data, prepare_run, manifest_csv):
    """baseline (manifest = prepare's run id), cnn (manifest = a CSV path), cv (no manifest).

    Submitted together: each is a subprocess and they share nothing but the tracking store.
    """
    parameters = {
        # No data_dir: it must come from the prepare run's manifest metadata.
        "baseline": {**TRAINING, "manifest": prepare_run.run_id},
        "cnn": {**TRAINING, "manifest": str(manifest_csv), "data_dir": str(small_data)},
        # No manifest: cv prepares its own split.
        "cv": {**TRAINING, "data_dir": str(small_data), "folds": FOLDS},
    }
    submitted = {name: run_project(repo, name, p, EXPERIMENT, synchronous=False) for name, p in parameters.items()}
    finished = {name: run.wait() for name, run in submitted.items()}
    assert all(finished.values()), f"failed entry points: {[n for n, ok in finished.items() if not ok]}"
    return {name: SimpleNamespace(run_id=run.run_id, parameters=parameters[name]) for name, run in submitted.items()}


def _dataset_input(run) -> SimpleNamespace:
    (entry,) = run.inputs.dataset_inputs
    tags = {t.key: t.value for t in entry.tags}
    return SimpleNamespace(
        name=entry.dataset.name, digest=entry.dataset.digest, context=tags.get("mlflow.data.context")
    )


def _assert_standard_tags(run, entry_point: str) -> None:
    assert run.data.tags["pneumo.entry_point"] == entry_point
    # The code version is MLflow's own tag; the project no longer repeats it as git_commit.
    assert "git_commit" not in run.data.tags
    commit = run.data.tags["mlflow.source.git.commit"]
    assert re.fullmatch(r"[0-9a-f]{40}", commit)
    assert subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=REPO).returncode == 0


def _assert_params(run, entry_point: str, overrides: dict) -> None:
    config_types, defaults = ENTRY_POINTS[entry_point].configs, ENTRY_POINTS[entry_point].defaults
    fields = {f.name: defaults.get(f.name, f.default) for t in config_types for f in dataclasses.fields(t)}
    assert set(fields) <= set(run.data.params)
    for name, default in fields.items():
        expected = overrides.get(name, default)
        # `mlflow run` logs entry-point parameters shell-quoted before the entry point starts
        # (an empty string as ''), and a param cannot change afterwards.
        logged = shlex.split(run.data.params[name])[0] if run.data.params[name] == "''" else run.data.params[name]
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            assert float(logged) == float(expected), name
        else:
            assert logged == str(expected), name


# --- prepare ------------------------------------------------------------------------------------


def test_prepare_leaves_the_source_untouched(prepare_run):
    assert prepare_run.after == prepare_run.before
    assert sum(1 for k in prepare_run.before if k.startswith("train/")) > 100


def test_prepare_logs_manifest_report_plot_and_dataset(store, prepare_run, small_data, tmp_path):
    client = store.client
    run = client.get_run(prepare_run.run_id)
    assert run.info.status == "FINISHED"
    _assert_standard_tags(run, "prepare")
    _assert_params(run, "prepare", {"data_dir": str(small_data), "cache_dir": "", "seed": 7})
    assert set(PREPARE_ONLY) | {"manifest.csv", "manifest_meta.json"} <= artifacts(client, run.info.run_id)

    manifest = pd.read_csv(download(client, run.info.run_id, "manifest.csv", tmp_path), dtype={"patient_id": str})
    folders = manifest["path"].str.split("/").str[1]
    assert (manifest["label"] == folders.map({n: i for i, n in enumerate(CLASS_NAMES)})).all()
    assert (manifest.groupby("patient_id")["split"].nunique() == 1).all()
    assert set(manifest["split"]) == {"train", "val"}
    n_files = sum(1 for p in small_data.rglob("*") if p.is_file())
    assert len(manifest) == n_files

    counts = manifest.groupby(["split", "label_name"]).size()
    # The counts are single figures: in the run's summary table, not among its charted metrics.
    summary = read_summary(run.info.run_id)
    for (split, name), n in counts.items():
        assert summary[f"n_{split}_{name.lower()}"] == n
        assert f"n_{split}_{name.lower()}" not in run.data.metrics
    assert summary["n_rejected"] == 0
    meta = read_json(download(client, run.info.run_id, "manifest_meta.json", tmp_path))
    assert meta["data_dir"] == str(small_data.resolve()) and meta["digest"] == manifest_digest(manifest)

    dataset = _dataset_input(run)
    assert (dataset.name, dataset.digest, dataset.context) == (
        "chest_xray_manifest",
        manifest_digest(manifest),
        "prepare",
    )
    with Image.open(download(client, run.info.run_id, "plots/class_distribution.png", tmp_path)) as plot:
        assert plot.width > 300 and plot.height > 200


def test_prepare_without_data_or_network_fails_fast_with_one_clear_message(store, python, tmp_path):
    # No data_dir (a given but missing one fails at once instead: tests/test_data_integrity.py).
    env = {k: v for k, v in os.environ.items() if k != "PNEUMO_DATA_DIR"}
    env.update(
        PYTHONPATH=str(REPO), KAGGLEHUB_CACHE=str(tmp_path / "kagglehub-cache"), MLFLOW_EXPERIMENT_NAME=EXPERIMENT
    )
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    result = subprocess.run(
        [python, "-m", "entrypoints.prepare", "--data_dir", "", "--cache_dir", ""],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    message = errors[0]
    assert "Could not download the Kaggle dataset 'paultimothymooney/chest-xray-pneumonia/versions/2'" in message
    assert "https://www.kaggle.com/datasets/paultimothymooney/chest-xray-pneumonia" in message
    assert "data_dir" in message and "PNEUMO_DATA_DIR" in message and "./data/chest_xray" in message
    assert list(workdir.iterdir()) == [], "a failed prepare must not leave files behind"


# --- baseline, cnn, cv --------------------------------------------------------------------------


def _assert_training_run(store, run_id: str, entry_point: str, overrides: dict, folder: Path) -> dict:
    """Checks shared by every training entry point; returns the run's manifest and val predictions."""
    client = store.client
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    _assert_standard_tags(run, entry_point)
    _assert_params(run, entry_point, overrides)
    assert run.data.params["dtype_policy"] in ("float32", "mixed_bfloat16")

    for key in PER_EPOCH:
        history = client.get_metric_history(run_id, key)
        assert [m.step for m in history] == list(range(EPOCHS)), key
        assert all(np.isfinite(m.value) for m in history), key
    metrics, summary = run.data.metrics, read_summary(run_id)
    for key in (
        "val_roc_auc",
        "val_pr_auc",
        "val_brier",
        "threshold",
        "val_sensitivity_at_threshold",
        "val_specificity_at_threshold",
    ):
        assert np.isfinite(metrics[key]), key
    for key in ("val_accuracy_at_0.5", "val_f1_at_0.5", "val_roc_auc_ci_low", "fit_seconds", "epochs_run"):
        assert np.isfinite(summary[key]) and key not in metrics, key
    assert 0.0 <= metrics["threshold"] <= 1.0

    logged = artifacts(client, run_id)
    assert set(TRAINING_ARTIFACTS) <= logged, set(TRAINING_ARTIFACTS) - logged
    for plot in (p for p in TRAINING_ARTIFACTS if p.endswith(".png")):
        with Image.open(download(client, run_id, plot, folder)) as image:
            assert image.format == "PNG" and image.width > 250

    manifest = pd.read_csv(download(client, run_id, "manifest.csv", folder), dtype={"patient_id": str})
    predictions = pd.read_csv(download(client, run_id, "val_predictions.csv", folder))
    n_val = int(summary["n_val_images"])
    assert n_val == (manifest["split"] == "val").sum() == len(predictions)
    assert summary["n_train_images"] == (manifest["split"] == "train").sum()
    assert predictions["probability"].between(0, 1).all()

    confusion = read_json(download(client, run_id, "confusion_matrix_val.json", folder))
    threshold = read_json(download(client, run_id, "threshold.json", folder))
    assert threshold["threshold"] == pytest.approx(metrics["threshold"])
    assert confusion["at_threshold"]["threshold"] == pytest.approx(metrics["threshold"])
    for key, cut in (("at_threshold", metrics["threshold"]), ("at_0.5", 0.5)):
        counts = confusion[key]
        assert counts["class_names"] == list(CLASS_NAMES)
        assert np.array(counts["matrix"]).sum() == n_val
        predicted = predictions["probability"] >= cut
        assert counts["tp"] == int((predicted & (predictions["label"] == 1)).sum())
        assert counts["tn"] == int((~predicted & (predictions["label"] == 0)).sum())

    dataset = _dataset_input(run)
    assert dataset.digest == manifest_digest(manifest) and dataset.context == "training"
    return {"run": run, "manifest": manifest, "predictions": predictions}


def _assert_served_model(run_id: str, data_dir: Path, predictions: pd.DataFrame, image_size: int) -> None:
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    contract = model.unwrap_python_model().contract
    spec = contract.input_spec
    assert (spec.image_size, spec.channels, contract.class_names) == (image_size, 3, CLASS_NAMES)
    assert contract.run_id == run_id
    rows = predictions.head(6)
    images = [base64.b64encode((data_dir / p).read_bytes()).decode("ascii") for p in rows["path"]]
    served = model.predict(pd.DataFrame({"image": images}))
    assert served["probability"].between(0, 1).all()
    assert set(served["label"]) <= {*CLASS_NAMES, UNCERTAIN}
    judged = (served["label"] != UNCERTAIN).to_numpy()
    assert (judged == served["in_distribution"].astype(bool).to_numpy()).all()
    assert np.allclose(served["threshold"], float(contract.calibration.apply(contract.threshold)), rtol=0, atol=1e-12)
    decided = [CLASS_NAMES[int(p >= t)] for p, t in zip(served["probability"], served["threshold"])]
    assert (served["label"][judged] == np.array(decided)[judged]).all()
    # The served decode path reproduces the (raw) probabilities computed at training time, calibrated.
    np.testing.assert_allclose(served["probability"], contract.calibration.apply(rows["probability"]), atol=2e-3)


def test_baseline_reuses_the_prepare_run_manifest(store, training_runs, prepare_run, small_data, tmp_path):
    run = training_runs["baseline"]
    outcome = _assert_training_run(store, run.run_id, "baseline", run.parameters, tmp_path)
    # No re-discovery: no report, no plot of its own; the very manifest prepare wrote, and a meta
    # file pointing at the same data folder (so this run's id can serve as a manifest too).
    logged = artifacts(store.client, run.run_id)
    assert not set(PREPARE_ONLY) & logged and "n_rejected" not in outcome["run"].data.metrics
    meta = read_json(download(store.client, run.run_id, "manifest_meta.json", tmp_path / "meta"))
    assert meta["data_dir"] == str(small_data.resolve())
    prepared = download(store.client, prepare_run.run_id, "manifest.csv", tmp_path / "prepare")
    assert download(store.client, run.run_id, "manifest.csv", tmp_path / "own").read_bytes() == prepared.read_bytes()
    assert _dataset_input(outcome["run"]).digest == _dataset_input(store.client.get_run(prepare_run.run_id)).digest
    assert outcome["run"].data.params["balance"] == "oversample"
    _assert_served_model(run.run_id, small_data, outcome["predictions"], 32)


def test_cnn_reads_a_manifest_csv(store, training_runs, prepare_run, manifest_csv, small_data, tmp_path):
    run = training_runs["cnn"]
    outcome = _assert_training_run(store, run.run_id, "cnn", run.parameters, tmp_path)
    assert not set(PREPARE_ONLY) & artifacts(store.client, run.run_id)
    assert _dataset_input(outcome["run"]).digest == manifest_digest(
        pd.read_csv(manifest_csv, dtype={"patient_id": str})
    )
    _assert_served_model(run.run_id, small_data, outcome["predictions"], 32)


def test_cv_logs_folds_their_summary_and_a_refitted_model(store, training_runs, small_data, tmp_path):
    run = training_runs["cv"]
    client = store.client
    outcome = _assert_training_run(store, run.run_id, "cv", run.parameters, tmp_path)
    metrics = outcome["run"].data.metrics
    assert set(PREPARE_ONLY) <= artifacts(client, run.run_id), "without a manifest, cv prepares one"
    assert outcome["run"].data.params["l2"] == "0.01" and outcome["run"].data.params["folds"] == str(FOLDS)

    report = read_json(download(client, run.run_id, "cv_folds.json", tmp_path))
    assert not [key for key in metrics if key.startswith("fold_")], "fold scores are logged once, as cv_fold_*"
    scores = {}
    for name in ("accuracy", "roc_auc"):
        history = client.get_metric_history(run.run_id, f"cv_fold_{name}")
        assert [m.step for m in history] == list(range(1, FOLDS + 1))
        scores[name] = np.array([m.value for m in history])
        assert np.isfinite(scores[name]).all() and ((scores[name] >= 0) & (scores[name] <= 1)).all()
        # Logged once per fold (as the history above), and the same in the fold report.
        assert [fold[name] for fold in report["folds"]] == pytest.approx(scores[name].tolist(), rel=1e-12)
        assert metrics[f"cv_{name}_mean"] == pytest.approx(scores[name].mean())
        assert metrics[f"cv_{name}_std"] == pytest.approx(scores[name].std(ddof=1))
    assert {
        "cv_folds.json",
        "plots/cv_folds.png",
        "plots/confusion_matrix_oof_0.5.png",
        "confusion_matrix_oof.json",
        "oof_predictions.csv",
    } <= artifacts(client, run.run_id)

    out_of_fold = pd.read_csv(download(client, run.run_id, "oof_predictions.csv", tmp_path), dtype={"patient_id": str})
    train_rows = outcome["manifest"][outcome["manifest"]["split"] == "train"]
    assert sorted(out_of_fold["path"]) == sorted(train_rows["path"]), "folds cover exactly the training split"
    assert (out_of_fold.groupby("patient_id")["fold"].nunique() == 1).all(), "a patient in two folds"
    assert sorted(out_of_fold["fold"].unique()) == list(range(1, FOLDS + 1))
    assert out_of_fold["probability"].between(0, 1).all()
    for k in range(1, FOLDS + 1):
        fold = out_of_fold[out_of_fold["fold"] == k]
        assert roc_auc_score(fold["label"], fold["probability"]) == pytest.approx(scores["roc_auc"][k - 1], abs=1e-6)
    assert metrics["cv_oof_roc_auc"] == pytest.approx(roc_auc_score(out_of_fold["label"], out_of_fold["probability"]))
    pooled = read_json(download(client, run.run_id, "confusion_matrix_oof.json", tmp_path))
    assert np.array(pooled["matrix"]).sum() == len(train_rows)
    assert [f["fold"] for f in report["folds"]] == list(range(1, FOLDS + 1))
    assert all(len(f["history"]["loss"]) == EPOCHS for f in report["folds"])
    _assert_served_model(run.run_id, small_data, outcome["predictions"], 32)


# --- repeatability ------------------------------------------------------------------------------


def test_a_fixed_seed_makes_a_run_repeatable(store, training_runs):
    """The cnn run again, in this process, with the same parameters: identical metric histories."""
    original = training_runs["cnn"]
    config_types, defaults = ENTRY_POINTS["cnn"].configs, ENTRY_POINTS["cnn"].defaults
    argv = [item for key, value in original.parameters.items() for item in (f"--{key}", str(value))]
    configs = parse_configs("cnn", *config_types, defaults=defaults, argv=argv)
    policy = keras.mixed_precision.global_policy().name
    mlflow.set_experiment(EXPERIMENT)
    try:
        repeat_id = cnn(*configs)
    finally:
        keras.mixed_precision.set_global_policy(policy)
    client = store.client
    for key in (*PER_EPOCH, "val_roc_auc", "threshold"):
        first = [m.value for m in client.get_metric_history(original.run_id, key)]
        second = [m.value for m in client.get_metric_history(repeat_id, key)]
        assert second == pytest.approx(first, rel=1e-6, abs=1e-7), key
