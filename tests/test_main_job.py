"""The main job: aug_cnn and resnet through `mlflow run`, balanced batches, train-only augmentation."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from pneumo.augmentation import build_augmenter
from pneumo.config import AugmentConfig, CNNConfig
from pneumo.model_io import encode_file, predict_probabilities
from pneumo.models import build_aug_cnn
from pneumo.pipeline import ImageSet, train_dataset

EPOCHS = 2


def _artifacts(client: MlflowClient, run_id: str, path: str = "") -> set[str]:
    found = set()
    for info in client.list_artifacts(run_id, path):
        found |= _artifacts(client, run_id, info.path) if info.is_dir else {info.path}
    return found


def _project_run(repo, entry_point: str, parameters: dict) -> str:
    submitted = mlflow.projects.run(
        str(repo),
        entry_point=entry_point,
        parameters=parameters,
        env_manager="local",
        experiment_name="pneumo-test",
        synchronous=True,
    )
    return submitted.run_id


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
    return _project_run(repo, "aug_cnn", params), params


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
    for metric in ("loss", "val_loss", "auc", "val_auc", "accuracy", "val_accuracy", "precision", "val_recall"):
        history = client.get_metric_history(run_id, metric)
        assert [m.step for m in history] == list(range(EPOCHS)), metric
    artifacts = _artifacts(client, run_id)
    for expected in (
        "plots/augmented_samples.png",
        "plots/training_curves.png",
        "plots/confusion_matrix_val_threshold.png",
        "plots/confusion_matrix_val_0.5.png",
        "confusion_matrix_val.json",
        "threshold.json",
        "manifest.csv",
        "val_predictions.csv",
    ):
        assert expected in artifacts, expected
    threshold = json.loads(open(client.download_artifacts(run_id, "threshold.json")).read())
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
    assert list(out.columns) == ["label", "probability", "threshold"]
    assert out["probability"].between(0, 1).all()
    assert (out["threshold"] == threshold["threshold"]).all()
    # Any training run's id works as the manifest of a later run (same images, same data folder).
    from pneumo.config import DataConfig
    from pneumo.tracking import resolve_manifest

    manifest = resolve_manifest(DataConfig(manifest=run_id))
    assert manifest.data_dir == small_data.resolve() and len(manifest.frame) == int(
        run.data.metrics["n_train_images"] + run.data.metrics["n_val_images"]
    )
    config = json.loads(open(client.download_artifacts(run_id, "model/artifacts/model_config.json")).read())
    assert config["image_size"] == 64 and config["channels"] == 1
    assert config["config"]["augment"]["rotation"] == 12.0


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
    run_id = _project_run(repo, "resnet", params)
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.data.params["weights"] == "none"
    assert run.data.tags["pneumo.entry_point"] == "resnet"
    assert run.data.metrics["feature_extraction_seconds"] > 0
    # Head epochs, then the fine-tuning epoch continuing the same curves.
    assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == list(range(EPOCHS + 1))
    assert run.data.metrics["head_epochs_run"] == EPOCHS and run.data.metrics["fine_tune_epochs_run"] == 1
    artifacts = _artifacts(client, run_id)
    assert {"plots/training_curves.png", "plots/confusion_matrix_val_threshold.png", "threshold.json"} <= artifacts
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    image = sorted((small_data / "train" / "NORMAL").iterdir())[0]
    out = model.predict(pd.DataFrame({"image": [encode_file(image)]}))
    assert 0.0 <= out["probability"].iloc[0] <= 1.0


def test_resnet_imagenet_offline_fails_with_a_clear_message(repo, tracking, small_data, python, tmp_path, monkeypatch):
    import subprocess

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
    assert result.returncode != 0
    assert "weights=none" in result.stderr and "ImageNet weights" in result.stderr


def test_fine_tuning_unfreezes_only_the_last_block_without_batchnorm():
    import keras

    from pneumo.config import ResNetConfig
    from pneumo.models import build_resnet_base, build_resnet_head, stack_resnet, unfreeze_top_block

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


def _cached_set(n_normal: int, n_pneumonia: int) -> ImageSet:
    labels = np.array([0] * n_normal + [1] * n_pneumonia, dtype=np.int32)
    images = np.random.default_rng(0).integers(0, 255, (len(labels), 32, 32, 1), dtype=np.uint8)
    return ImageSet(images, labels, pd.DataFrame({"label": labels}))


def test_balanced_batches_are_balanced_over_an_epoch():
    data = _cached_set(30, 90)
    dataset, steps = train_dataset(data, batch_size=12, epochs=3, seed=1, balance=True)
    labels = np.concatenate([y.numpy() for _, y in dataset])
    assert steps == 180 // 12
    for epoch in range(3):
        counts = np.bincount(labels[epoch * steps * 12 : (epoch + 1) * steps * 12].astype(int), minlength=2)
        assert abs(counts[0] - counts[1]) <= 12, counts  # only the dropped remainder may differ
    # Without balancing the draw keeps the natural 1:3 ratio.
    plain, _ = train_dataset(data, batch_size=12, epochs=1, seed=1, balance=False)
    assert np.concatenate([y.numpy() for _, y in plain]).mean() == pytest.approx(0.75, abs=0.05)


def test_augmentation_only_in_training():
    """The training pipeline augments; prediction of the same image twice is identical."""
    data = _cached_set(8, 8)
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
    import keras

    from pneumo import training

    try:
        monkeypatch.setattr(training, "bf16_supported", lambda: False)
        assert training.set_precision("auto") == "float32"
        monkeypatch.setattr(training, "bf16_supported", lambda: True)
        assert training.set_precision("auto") == "mixed_bfloat16"
        assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
        assert training.set_precision("float32") == "float32"
        with pytest.raises(ValueError, match="precision"):
            training.set_precision("float16")
    finally:
        keras.mixed_precision.set_global_policy("float32")
