"""The evaluate entry point, Grad-CAM and registration, on models trained in this session."""

from __future__ import annotations

import json

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image
from sklearn.metrics import roc_auc_score

from helpers import read_json
from pneumo import CLASS_NAMES, gradcam, models
from pneumo.calibration import expected_calibration_error
from pneumo.cli import main as cli_main
from pneumo.config import CNNConfig, DataConfig, EvalConfig
from pneumo.evaluate import default_model_uri, evaluate
from pneumo.metrics import HEADLINE_METRICS
from pneumo.tracking import read_summary

pytest_plugins = ["model_fixtures"]

REGISTERED = "pneumonia-classifier"
THRESHOLD_METRICS = ("accuracy", "sensitivity", "specificity", "ppv", "npv", "f1", "tp", "fp", "tn", "fn")
FIGURES = (
    "confusion_matrix_threshold",
    "confusion_matrix_0.5",
    "roc_curve",
    "pr_curve",
    "calibration",
    "threshold_sweep",
    "error_gallery",
)


def evaluate_model(store, patient_images: bool = True, **changes) -> str:
    """Run ``evaluate`` in this process on the session's manifest (validation split unless changed)."""
    data = DataConfig(
        data_dir=str(store.data_dir), manifest=store.manifest, cache_dir="", patient_images=patient_images
    )
    return evaluate(data, EvalConfig(**{"split": "val", **changes}))


def artifact(run_id: str, path: str, tmp_path) -> str:
    return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(tmp_path))


@pytest.mark.slow
def test_evaluate_logs_metrics_figures_predictions_and_gallery(models_store, tmp_path):
    run_id = evaluate_model(models_store)  # no model_uri: the newest aug_cnn run's model
    run = mlflow.get_run(run_id)
    model_run = mlflow.get_run(models_store.aug_cnn)
    assert run.data.tags["pneumo.entry_point"] == "evaluate"
    assert run.data.tags["pneumo.evaluated_run_id"] == models_store.aug_cnn
    assert run.data.tags["pneumo.model_uri"] == f"runs:/{models_store.aug_cnn}/model"
    assert run.data.tags["pneumo.gradcam"] == "on"
    assert run.data.params["model_image_size"] == "64" and run.data.params["model_channels"] == "1"

    # The headline figures are metrics; the others rows of the run's summary table, never both.
    metrics, summary = run.data.metrics, read_summary(run_id)
    for name in THRESHOLD_METRICS:
        at_threshold = f"val_{name}_at_threshold"
        assert (at_threshold in metrics) == (f"{name}_at_threshold" in HEADLINE_METRICS) != (at_threshold in summary)
        assert f"val_{name}_at_0.5" in summary and f"val_{name}_at_0.5" not in metrics, name
    assert summary["n_skipped_images"] == 0
    assert summary["n_val_images"] == len(pd.read_csv(artifact(run_id, "predictions.csv", tmp_path)))
    threshold = metrics["threshold"]
    assert threshold == pytest.approx(model_run.data.metrics["threshold"])  # the stored one
    assert metrics["n_images_seen_in_training"] == 0

    predictions = pd.read_csv(artifact(run_id, "predictions.csv", tmp_path))
    assert list(predictions.columns) == [
        *("file", "patient_id", "true_label", "probability", "predicted_label"),
        *("served_label", "served_probability", "in_distribution", "ood_score"),
    ]
    # What the server would answer: the same decisions, on the calibrated scale, UNCERTAIN where the gate fails.
    judged = predictions["in_distribution"].astype(bool)
    assert (predictions["served_label"][judged] == predictions["predicted_label"][judged]).all()
    assert (predictions["served_label"][~judged] == "UNCERTAIN").all()
    assert summary["val_ood_pass_rate"] == pytest.approx(judged.mean())
    served_truth = (predictions["true_label"] == "PNEUMONIA").to_numpy()
    assert summary["val_ece_calibrated"] == pytest.approx(
        expected_calibration_error(served_truth, predictions["served_probability"].to_numpy())
    )
    assert summary["val_ece"] == pytest.approx(expected_calibration_error(served_truth, predictions["probability"]))
    manifest = pd.read_csv(artifact(run_id, "manifest.csv", tmp_path))
    assert sorted(predictions["file"]) == sorted(manifest.loc[manifest["split"] == "val", "path"])
    assert (
        predictions["predicted_label"] == np.where(predictions["probability"] >= threshold, "PNEUMONIA", "NORMAL")
    ).all()
    truth = (predictions["true_label"] == "PNEUMONIA").to_numpy()
    assert all(f.startswith(f"train/{label}/") for f, label in zip(predictions["file"], predictions["true_label"]))
    # Decoded with the model's own size and channels, predicted like serving: the same AUC as
    # the training run measured on the same validation images.
    assert metrics["val_roc_auc"] == pytest.approx(roc_auc_score(truth, predictions["probability"]))
    assert metrics["val_roc_auc"] == pytest.approx(model_run.data.metrics["val_roc_auc"], abs=1e-6)
    predicted = (predictions["predicted_label"] == "PNEUMONIA").to_numpy()
    counts = read_json(artifact(run_id, "confusion_matrix.json", tmp_path))
    assert counts["at_threshold"]["tp"] == summary["val_tp_at_threshold"] == int((truth & predicted).sum())
    assert counts["at_threshold"]["fn"] == summary["val_fn_at_threshold"] == int((truth & ~predicted).sum())
    assert (
        counts["at_0.5"]["fp"] == summary["val_fp_at_0.5"] == int((~truth & (predictions["probability"] >= 0.5)).sum())
    )
    assert counts["at_threshold"]["class_names"] == list(CLASS_NAMES)

    for figure in FIGURES:
        with Image.open(artifact(run_id, f"plots/{figure}.png", tmp_path)) as image:
            assert min(image.size) > 200, figure


@pytest.mark.slow
def test_dense_model_gets_a_gallery_without_heatmaps_and_a_given_threshold(models_store, tmp_path):
    run_id = evaluate_model(models_store, model_uri=models_store.model_uri(models_store.dense), threshold=0.5)
    run = mlflow.get_run(run_id)
    assert run.data.tags["pneumo.gradcam"].startswith("unavailable: model 'dense' has no convolutional layer")
    assert run.data.tags["pneumo.threshold_source"] == "parameter"
    assert run.data.metrics["threshold"] == 0.5
    figures = {**run.data.metrics, **read_summary(run_id)}
    for name in THRESHOLD_METRICS:
        assert figures[f"val_{name}_at_threshold"] == pytest.approx(figures[f"val_{name}_at_0.5"], nan_ok=True)
    with Image.open(artifact(run_id, "plots/error_gallery.png", tmp_path)) as image:
        assert min(image.size) > 200


# The floors are tested on their own below; these tests are about the comparison.
NO_FLOORS = {"floor_sensitivity": 0.0, "floor_specificity": 0.0, "floor_roc_auc": 0.0}


@pytest.mark.slow
def test_register_moves_champion_only_for_a_better_model(models_store, tmp_path):
    client = MlflowClient()
    # The models are ranked by what training measured, whatever order seed noise gives them.
    auc = {
        run_id: mlflow.get_run(run_id).data.metrics["val_roc_auc"]
        for run_id in (models_store.dense, models_store.cnn, models_store.aug_cnn)
    }
    worst, middle, best = sorted(auc, key=auc.get)
    assert auc[worst] < auc[best], auc  # a barely trained dense net and a learned CNN must differ

    first = mlflow.get_run(
        evaluate_model(models_store, model_uri=models_store.model_uri(worst), register=True, **NO_FLOORS)
    )
    assert first.data.tags["pneumo.alias"] == "champion"
    assert client.get_registered_model(REGISTERED).aliases == {"champion": 1}
    # The evaluate run points at the version it registered: tags, description, and its model input,
    # whose logged model lists the version (what the run page's "Registered models" shows). The
    # version itself still belongs to the run that trained it.
    assert first.data.tags["pneumo.registered_model_uri"] == f"models:/{REGISTERED}/1"
    assert f"Registered as models:/{REGISTERED}/1 (champion: " in first.data.tags["mlflow.note.content"]
    [model_input] = first.inputs.model_inputs
    logged = mlflow.get_logged_model(model_input.model_id)
    assert logged.source_run_id == worst
    versions = [(v["name"], str(v["version"])) for v in json.loads(logged.tags["mlflow.modelVersions"])]
    assert (REGISTERED, "1") in versions
    assert client.get_model_version(REGISTERED, "1").run_id == worst

    better = evaluate_model(models_store, model_uri=models_store.model_uri(best), register=True, **NO_FLOORS)
    decision = read_json(artifact(better, "registration.json", tmp_path))
    assert decision["alias"] == "champion" and decision["version"] == "2" and decision["champion_version"] == "1"
    # Both AUCs recomputed on this manifest's validation split: equal to what training measured.
    assert decision["candidate_val_roc_auc"] == pytest.approx(auc[best], abs=1e-6)
    assert decision["champion_val_roc_auc"] == pytest.approx(auc[worst], abs=1e-6)
    assert client.get_registered_model(REGISTERED).aliases == {"champion": 2}

    # Evaluated on train (so the validation AUC is computed separately): not better, so challenger.
    worse_id = evaluate_model(
        models_store, model_uri=models_store.model_uri(middle), register=True, split="train", **NO_FLOORS
    )
    worse = mlflow.get_run(worse_id)
    assert worse.data.tags["pneumo.alias"] == "challenger"
    assert worse.data.metrics["registration_candidate_val_roc_auc"] == pytest.approx(auc[middle], abs=1e-6)
    assert worse.data.metrics["registration_champion_val_roc_auc"] == pytest.approx(auc[best], abs=1e-6)
    assert worse.data.metrics["n_images_seen_in_training"] > 0  # train split: flagged as optimistic
    assert client.get_registered_model(REGISTERED).aliases == {"champion": 2, "challenger": 3}
    version = client.get_model_version(REGISTERED, "3")
    assert version.current_stage == "None"  # aliases only, never stages
    assert version.run_id == middle
    assert version.tags["evaluation_run_id"] == worse_id
    with Image.open(artifact(worse_id, "plots/registration_roc.png", tmp_path)) as image:
        assert min(image.size) > 200

    # The champion itself evaluated again: nothing new registered.
    again = mlflow.get_run(
        evaluate_model(models_store, model_uri=f"models:/{REGISTERED}@champion", register=True, **NO_FLOORS)
    )
    assert again.data.tags["pneumo.registration"] == "already champion (version 2)"
    assert len(client.search_model_versions(f"name = '{REGISTERED}'")) == 3


@pytest.mark.slow
def test_by_default_no_patient_image_reaches_the_artifacts(models_store):
    run_id = evaluate_model(models_store, patient_images=False)
    logged = {item.path for item in MlflowClient().list_artifacts(run_id, "plots")}
    assert "plots/error_gallery.png" not in logged and "plots/roc_curve.png" in logged
    assert mlflow.get_run(run_id).data.tags["pneumo.gradcam"].startswith("no gallery: patient images are kept out")


@pytest.mark.slow
def test_the_floors_refuse_a_weak_model_even_without_a_champion(models_store, tmp_path):
    name = "pneumonia-classifier-floor-test"
    run_id = evaluate_model(
        models_store, model_uri=models_store.model_uri(models_store.dense), registered_name=name, register=True
    )
    decision = read_json(artifact(run_id, "registration.json", tmp_path))
    # Registered, so it can be inspected, but holding no alias: there was no champion, yet it is not one.
    assert decision["alias"] is None and decision["champion_version"] is None
    assert decision["reason"].startswith("not promoted: validation ")
    assert "is below the floor" in decision["reason"]
    assert MlflowClient().get_registered_model(name).aliases == {}
    version = MlflowClient().get_model_version(name, decision["version"])
    assert version.run_id == models_store.dense and "**Status**: no alias: not promoted" in version.description
    # Its description is its model card, written from its contract: sections, no local paths.
    assert "## Intended use" in version.description and "## Known limits" in version.description
    assert str(models_store.data_dir) not in version.description and "/tmp/" not in version.description
    assert mlflow.get_run(run_id).data.tags["pneumo.alias"] == "none (below the floors)"


@pytest.mark.slow
def test_empty_split_is_a_clear_error(models_store):
    argv = [
        "--data_dir",
        str(models_store.data_dir),
        "--manifest",
        models_store.manifest,
        "--cache_dir",
        "",
        "--model_uri",
        models_store.model_uri(models_store.cnn),
        "--split",
        "test",
    ]
    with pytest.raises(SystemExit) as exited:
        cli_main("evaluate", argv)
    message = str(exited.value.code)
    assert "cannot evaluate split 'test'" in message and "no 'test' images" in message and "split=val" in message


@pytest.mark.slow
def test_no_model_to_evaluate_is_a_clear_error(models_store):
    mlflow.set_experiment("no-runs-here")
    with pytest.raises(ValueError, match="no finished aug_cnn run .* pass model_uri="):
        default_model_uri()


def test_gradcam_points_at_the_evidence():
    # One conv filter that responds to brightness, pooled and weighed positively: the evidence for
    # "pneumonia" is exactly the bright square, so Grad-CAM must light up there and nowhere else.
    inputs = keras.Input((32, 32, 1))
    features = keras.layers.Conv2D(
        1, 3, padding="same", activation="relu", name="conv", kernel_initializer="ones", bias_initializer="zeros"
    )(inputs)
    pooled = keras.layers.GlobalAveragePooling2D()(features)
    output = keras.layers.Dense(
        1, activation="sigmoid", kernel_initializer="ones", bias_initializer=keras.initializers.Constant(-1.0)
    )(pooled)
    model = keras.Model(inputs, output)
    images = np.zeros((2, 32, 32, 1), np.uint8)
    images[0, 4:10, 20:28] = 1
    images[1, 22:30, 2:8] = 1
    heat = gradcam.gradcam(model, images, 1)
    for image, cam in zip(images[..., 0], heat):
        assert cam[image == 1].mean() > 0.5 and cam[image == 0].mean() < 0.2
    # Explaining "normal" instead: nothing in the picture argues for it.
    assert gradcam.gradcam(model, images, 0).max() == 0


@pytest.mark.parametrize("name", ["aug_cnn", "cnn", "resnet", "dense"])
def test_gradcam_finds_the_last_convolution_of_every_model(name):
    size = 64
    if name == "resnet":
        base = models.build_resnet_base(size, 1, "none")
        model = models.stack_resnet(base, models.build_resnet_head(base.output_shape[1:]))
    else:
        model = {
            "aug_cnn": lambda: models.build_aug_cnn(size, 1, CNNConfig(width=8)),
            "cnn": lambda: models.build_notebook_cnn(size, 1),
            "dense": lambda: models.build_dense(size, 1),
        }[name]()
    if name == "dense":
        with pytest.raises(gradcam.GradCamUnavailable, match="no convolutional layer"):
            gradcam.target_layer(model)
        return
    expected = {"aug_cnn": keras.layers.ReLU, "cnn": keras.layers.Conv2D, "resnet": keras.Model}[name]
    target = gradcam.target_layer(model)
    assert isinstance(target, expected)
    if name == "aug_cnn":  # its last stage is 2x2 at 64 px: the last stage with a readable grid is used
        grids = [layer.output.shape[1] for layer in model.layers if isinstance(layer, keras.layers.ReLU)]
        assert target.output.shape[1] == min(g for g in grids if g >= gradcam.MIN_GRID) == 8
    images = np.random.default_rng(0).integers(0, 256, (2, size, size, 1)).astype(np.uint8)
    heat = gradcam.gradcam(model, images, np.array([1, 0]))
    assert heat.shape == (2, size, size) and heat.dtype == np.float32
    assert np.isfinite(heat).all() and heat.min() >= 0 and heat.max() <= 1


@pytest.mark.slow
def test_the_heatmaps_of_the_most_confident_predictions_are_not_empty(models_store):
    """Grad-CAM's position-averaged weights went negative everywhere for confident false positives."""
    from pneumo import model_io, pipeline
    from pneumo.manifests import resolve_manifest

    trained = model_io.load_trained_model(models_store.model_uri(models_store.aug_cnn))
    manifest = resolve_manifest(DataConfig(data_dir=str(models_store.data_dir), manifest=models_store.manifest))
    images = pipeline.load_split(manifest.split("val"), manifest.data_dir, trained.contract.input_spec)
    probabilities = model_io.predict_probabilities(trained.model, images.images)
    confident = np.argsort(-probabilities)[:8]
    heatmaps = gradcam.gradcam(trained.model, images.images[confident], 1)
    assert all(heatmap.max() > 0 for heatmap in heatmaps), probabilities[confident]
