"""The main job: aug_cnn and resnet through `mlflow run`, train-only augmentation, the precision policy.

(Balanced batches are tested with the rest of the input pipeline, in test_pipeline.py.)
"""

from __future__ import annotations

import subprocess

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from helpers import ANSWER_COLUMNS, artifacts, cached_set, read_json, read_text, run_project
from pneumo import training
from pneumo.augmentation import build_augmenter
from pneumo.config import AugmentConfig, CNNConfig, DataConfig, ResNetConfig, TrainConfig
from pneumo.contract import CONTRACT_VERSION, read_contract
from pneumo.errors import ConfigError
from pneumo.manifests import resolve_manifest
from pneumo.metrics import HEADLINE_METRICS
from pneumo.model_io import encode_file, predict_probabilities
from pneumo.models import build_aug_cnn, build_resnet_base, build_resnet_head, stack_resnet, unfreeze_top_block
from pneumo.pipeline import train_dataset
from pneumo.tracking import read_summary

EPOCHS = 2


@pytest.fixture
def aug_cnn_run(repo, tracking, small_data):
    params = {
        "data_dir": str(small_data),
        "cache_dir": "",
        "image_size": 64,
        "epochs": EPOCHS,
        "batch_size": 16,
        "width": 8,
        "rotation": 12,
        "gamma": 0.25,
        "seed": 7,
    }
    return run_project(repo, "aug_cnn", params, "pneumo-test").run_id, params


@pytest.mark.slow
def test_aug_cnn_logs_everything(aug_cnn_run, small_data):
    run_id, params = aug_cnn_run
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["pneumo.entry_point"] == "aug_cnn"
    for name in (
        "rotation",
        "width_shift",
        "height_shift",
        "zoom",
        "brightness_low",
        "brightness_high",
        "contrast",
        "gamma",
        "flip",
        "learning_rate",
        "optimizer",
        "batch_size",
        "epochs",
        "image_size",
        "channels",
        "width",
        "target_sensitivity",
        "dtype_policy",
    ):
        assert name in run.data.params, name
    assert float(run.data.params["rotation"]) == 12 and run.data.params["flip"].lower() == "false"
    # What the run page charts: each epoch series as <quantity>/<split> (a section per quantity),
    # the learning rate, and the headline single values; nothing else (the rest is in summary.json).
    per_epoch = {f"{q}/{s}" for q in ("loss", "accuracy", "auc", "precision", "recall") for s in ("train", "val")}
    headline = {"threshold", *(f"val_{name}" for name in HEADLINE_METRICS)}
    charted = {key for key in run.data.metrics if not key.startswith("system/")}
    assert charted == per_epoch | {"optimizer/learning_rate"} | headline
    for metric in (*per_epoch, "optimizer/learning_rate"):
        history = client.get_metric_history(run_id, metric)
        assert [m.step for m in history] == list(range(EPOCHS)), metric
    summary = read_summary(run_id)
    assert {"val_accuracy_at_0.5", "val_tp_at_threshold", "val_roc_auc_ci_low", "fit_seconds"} <= set(summary)
    # The input gate and the calibration fitted with the model, and how they did on validation.
    assert 0.95 <= summary["val_ood_pass_rate"] <= 1.0
    assert 0.0 <= summary["val_ece_calibrated"] <= 1.0 and 0.0 <= summary["val_ece"] <= 1.0
    logged = artifacts(client, run_id)
    for expected in (
        "plots/augmented_samples.png",
        "plots/training_curves.png",
        "plots/confusion_matrix_val_threshold.png",
        "plots/confusion_matrix_val_0.5.png",
        "plots/calibration_val.png",
        "confusion_matrix_val.json",
        "threshold.json",
        "manifest.csv",
        "val_predictions.csv",
    ):
        assert expected in logged, expected
    threshold = read_json(client.download_artifacts(run_id, "threshold.json"))
    assert 0.0 <= threshold["threshold"] <= 1.0
    assert threshold["threshold"] == pytest.approx(run.data.metrics["threshold"])
    assert run.data.metrics["val_sensitivity_at_threshold"] >= 0.97
    # The served model carries the threshold and every hyperparameter.
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    files = (
        sorted((small_data / "train" / "PNEUMONIA").iterdir())[:2]
        + sorted((small_data / "train" / "NORMAL").iterdir())[:2]
    )
    out = model.predict(pd.DataFrame({"image": [encode_file(f) for f in files]}))
    assert list(out.columns) == ANSWER_COLUMNS
    # Every row says which model answered: this run's logged model, and the commit that trained it.
    assert (out["model_run_id"] == run_id).all() and out["model_id"].str.startswith("m-").all()
    assert (out["code_version"] == run.data.tags.get("mlflow.source.git.commit", "")).all()
    assert out["probability"].between(0, 1).all()
    # The served threshold is the stored one on the calibrated scale (the label's decision is the same).
    served = model.unwrap_python_model().contract
    assert np.allclose(out["threshold"], float(served.calibration.apply(threshold["threshold"])), rtol=0, atol=1e-12)
    assert out["in_distribution"].all() and (out["ood_score"] <= 1).all()  # training X-rays pass the gate
    # Any training run's id works as the manifest of a later run (same images, same data folder).
    manifest = resolve_manifest(DataConfig(manifest=run_id))
    summary = read_summary(run_id)
    assert manifest.data_dir == small_data.resolve() and len(manifest.frame) == int(
        summary["n_train_images"] + summary["n_val_images"]
    )
    contract = read_contract(read_text(client.download_artifacts(run_id, "model/artifacts/model_config.json")))
    assert (contract.input_spec.image_size, contract.input_spec.channels) == (64, 1)
    assert contract.hyperparameters["augment"]["rotation"] == 12.0
    assert contract.version == CONTRACT_VERSION and contract.threshold == pytest.approx(threshold["threshold"])
    # The validation figures travel with the model, with patient-grouped intervals around them.
    low, high = contract.validation.intervals["roc_auc"][1:]
    assert low <= contract.validation.metrics["roc_auc"] <= high
    assert contract.validation.metrics["roc_auc"] == pytest.approx(run.data.metrics["val_roc_auc"])


@pytest.mark.slow
def test_resnet_trains_head_on_cached_features(repo, tracking, small_data):
    params = {
        "data_dir": str(small_data),
        "cache_dir": "",
        "image_size": 32,
        "epochs": EPOCHS,
        "batch_size": 16,
        "weights": "none",
        "seed": 3,
        "fine_tune_epochs": 1,
    }
    run_id = run_project(repo, "resnet", params, "pneumo-test").run_id
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.data.params["weights"] == "none"
    assert run.data.tags["pneumo.entry_point"] == "resnet"
    summary = read_summary(run_id)
    assert summary["feature_extraction_seconds"] > 0
    # Head epochs, then the fine-tuning epoch continuing the same curves.
    assert [m.step for m in client.get_metric_history(run_id, "loss/val")] == list(range(EPOCHS + 1))
    assert summary["head_epochs_run"] == EPOCHS and summary["fine_tune_epochs_run"] == 1
    logged = artifacts(client, run_id)
    assert {"plots/training_curves.png", "plots/confusion_matrix_val_threshold.png", "threshold.json"} <= logged
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    image = sorted((small_data / "train" / "NORMAL").iterdir())[0]
    out = model.predict(pd.DataFrame({"image": [encode_file(image)]}))
    assert 0.0 <= out["probability"].iloc[0] <= 1.0


@pytest.mark.slow
def test_resnet_imagenet_offline_fails_with_a_clear_message(repo, tracking, small_data, python, tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))  # no cached weights
    result = subprocess.run(
        [
            python,
            "-m",
            "entrypoints.resnet",
            "--data_dir",
            str(small_data),
            "--cache_dir",
            "",
            "--image_size",
            "32",
            "--weights",
            "imagenet",
        ],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr  # one clear line, the user's to fix
    assert "weights=none" in result.stderr and "ImageNet weights" in result.stderr


def test_fine_tuning_unfreezes_only_the_last_block_without_batchnorm():
    base = build_resnet_base(32, 1, "none")
    model = stack_resnet(base, build_resnet_head(base.output.shape[1:], ResNetConfig()))
    head_weights = len(model.trainable_weights)  # the base is frozen: only the head trains
    unfrozen = unfreeze_top_block(model)
    backbone = next(layer for layer in base.layers if isinstance(layer, keras.Model))
    trainable = [layer for layer in backbone.layers if layer.trainable and layer.weights]
    assert unfrozen > 0 and trainable
    assert all(layer.name.startswith("conv5_") for layer in trainable)
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in trainable)
    assert len(model.trainable_weights) > head_weights


def test_augmentation_only_in_training():
    """The training pipeline augments; prediction of the same image twice is identical."""
    data = cached_set(8, 8)
    plain, _ = train_dataset(data, batch_size=16, epochs=1, seed=0, balance=False)
    augmenter = build_augmenter(AugmentConfig(rotation=15, zoom=0.2), seed=0)
    augmented, _ = train_dataset(data, batch_size=16, epochs=1, seed=0, balance=False, augmenter=augmenter)
    (plain_x, plain_y), (aug_x, aug_y) = next(iter(plain)), next(iter(augmented))
    np.testing.assert_array_equal(plain_y, aug_y)  # same draw, so the same images in the same order
    assert not np.allclose(plain_x, aug_x)
    model = build_aug_cnn(32, 1, CNNConfig(width=4))
    image = data.images[:1]
    assert predict_probabilities(model, image)[0] == predict_probabilities(model, image)[0]
    # A built (and hence saved) model contains no augmentation layer at all.
    assert not any(layer.name.startswith("random") for layer in model.layers)


def test_precision_policy_follows_the_hardware(monkeypatch):
    try:
        monkeypatch.setattr(training, "bf16_supported", lambda: False)
        assert training.set_precision("auto") == "float32"
        monkeypatch.setattr(training, "bf16_supported", lambda: True)
        assert training.set_precision("auto") == "mixed_bfloat16"
        assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
        assert training.set_precision("float32") == "float32"
        # Choices are checked once, by the config, before anything runs.
        with pytest.raises(ConfigError, match="precision"):
            TrainConfig(precision="float16")
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_an_augmenter_with_every_range_at_zero_is_the_identity():
    still = AugmentConfig(
        rotation=0, width_shift=0, height_shift=0, zoom=0, brightness_low=1, brightness_high=1, contrast=0, gamma=0
    )
    batch = np.random.default_rng(0).uniform(0, 255, (2, 16, 16, 1)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(build_augmenter(still, seed=1)(batch, training=True)), batch)
