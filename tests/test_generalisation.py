"""What the generalisation work added: the composed warp, crop and equalisation, test-time views,
confidence intervals, the shared-id subset and site calibration."""

from __future__ import annotations

import math

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest
from keras import layers
from mlflow.tracking import MlflowClient

from conftest import require_real_data
from helpers import read_json
from pneumo.augmentation import TTA_VIEWS, RandomAffine, RandomDegrade, affine_matrix, tta_views
from pneumo.config import DataConfig, EvalConfig
from pneumo.data import ids_shared_with_training
from pneumo.errors import ConfigError
from pneumo.evaluate import evaluate
from pneumo.metrics import bootstrap_intervals, positives_needed
from pneumo.model_io import IDENTITY_COLUMNS, OUTPUT_COLUMNS, encode_file, load_trained_model
from pneumo.preprocessing import InputSpec, clahe, decode_file
from pneumo.tracking import read_summary

pytest_plugins = ["model_fixtures"]


def _xray_file() -> str:
    return str(require_real_data() / "train" / "NORMAL" / "IM-0115-0001.jpeg")  # skips without X-rays


def _xray(side: int = 128) -> np.ndarray:
    return decode_file(_xray_file(), InputSpec(side, 1))[None].astype("float32")


def test_composed_warp_matches_the_separate_keras_layers():
    image = _xray()
    degrees, shift_x, shift_y, zoom = 8.0, 0.07, -0.05, 0.1
    separate = keras.Sequential(
        [
            layers.RandomRotation((degrees / 360, degrees / 360), fill_mode="nearest"),
            layers.RandomTranslation((shift_y, shift_y), (shift_x, shift_x), fill_mode="nearest"),
            layers.RandomZoom((zoom, zoom), fill_mode="nearest"),
        ]
    )
    expected = np.asarray(separate(image, training=True))

    def composed(angle: float) -> np.ndarray:
        values = (angle, shift_x * 128, shift_y * 128, 1 + zoom)
        matrix = affine_matrix(*(keras.ops.convert_to_tensor([v]) for v in values), 128, 128)
        return np.asarray(keras.ops.image.affine_transform(image, matrix, fill_mode="nearest"))

    inner = (slice(None), slice(16, -16), slice(16, -16))
    close = np.abs(composed(math.radians(degrees)) - expected)[inner].mean()
    mirrored = np.abs(composed(-math.radians(degrees)) - expected)[inner].mean()
    # One resampling instead of three differs by interpolation only: about 1 grey level in 255.
    assert close < 2.0
    assert mirrored > 10 * close  # and the comparison can tell a wrong sign


def test_random_layers_pass_through_at_prediction_and_vary_per_image_in_training():
    batch = np.repeat(_xray(64), 4, axis=0)
    for layer in (RandomAffine(10, 0.1, 0.1, 0.15, seed=3), RandomDegrade(0.6, 0.03, seed=3)):
        assert np.array_equal(np.asarray(layer(batch, training=False)), batch)
        changed = np.asarray(layer(batch, training=True))
        assert changed.min() >= 0 and changed.max() <= 255
        assert not np.allclose(changed[0], changed[1])


def test_tta_views_are_fixed_and_start_with_the_image():
    batch = _xray(64).astype(np.uint8)
    first, second = tta_views(batch), tta_views(batch)
    assert len(first) == len(TTA_VIEWS)
    assert np.array_equal(first[0], batch)
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    assert all(not np.array_equal(view, batch) for view in first[1:])


def test_crop_and_equalisation_are_part_of_the_spec():
    plain = decode_file(_xray_file(), InputSpec(64, 1))
    cropped = decode_file(_xray_file(), InputSpec(64, 1, crop=0.1))
    equalised = decode_file(_xray_file(), InputSpec(64, 1, equalize="clahe"))
    assert plain.shape == cropped.shape == equalised.shape == (64, 64, 1)
    assert not np.array_equal(plain, cropped) and not np.array_equal(plain, equalised)
    with pytest.raises(ValueError, match="equalize"):
        InputSpec(64, 1, equalize="gamma")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="crop"):
        DataConfig(crop=0.6)


def test_clahe_spreads_a_low_contrast_image_and_keeps_its_order():
    rng = np.random.default_rng(0)
    image = (100 + 20 * rng.random((128, 128))).astype(np.uint8)
    image[:, 64:] += 10
    out = clahe(image)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert out.std() > 2 * image.std()
    assert out[:, 64:].mean() > out[:, :64].mean()


def test_intervals_cover_the_estimate_and_shrink_as_the_sample_grows():
    rng = np.random.default_rng(1)

    def sample(n_patients: int) -> dict:
        labels = np.repeat(rng.integers(0, 2, n_patients), 2)  # two images per patient
        probabilities = np.clip(0.5 + (labels - 0.5) * 0.6 + rng.normal(0, 0.45, len(labels)), 0, 1)
        groups = np.repeat(np.arange(n_patients).astype(str), 2)
        return bootstrap_intervals(labels, probabilities, 0.5, groups, n_resamples=500)

    small, large = sample(60), sample(600)
    for name in ("roc_auc", "sensitivity", "specificity"):
        for point, low, high in (small[name], large[name]):
            assert low <= point <= high
        assert large[name][2] - large[name][1] < 0.6 * (small[name][2] - small[name][1])


def test_positives_needed_follows_the_exact_binomial_bound():
    assert positives_needed(0.98) == 149
    assert 0.98**149 < 0.05 <= 0.98**148
    assert positives_needed(0.95) == 59
    with pytest.raises(ValueError):
        positives_needed(1.0)


def test_shared_ids_are_found_by_patient_id_across_source_folders():
    manifest = pd.DataFrame(
        {"split": ["train", "val", "test", "test"], "patient_id": ["person1", "person2", "person1", "person9"]}
    )
    assert ids_shared_with_training(manifest, manifest[manifest["split"] == "test"]).tolist() == [True, False]


@pytest.mark.slow
def test_tta_pyfunc_keeps_the_serving_contract_and_is_deterministic(models_store):
    model = mlflow.pyfunc.load_model(models_store.model_uri(models_store.aug_cnn))
    files = models_store.unseen["NORMAL"][:2] + models_store.unseen["PNEUMONIA"][:2]
    frame = pd.DataFrame({"image": [encode_file(f) for f in files]})
    plain = model.predict(frame)
    first, second = model.predict(frame, params={"tta": True}), model.predict(frame, params={"tta": True})
    assert list(first.columns) == list(plain.columns) == [*OUTPUT_COLUMNS, *IDENTITY_COLUMNS]
    pd.testing.assert_frame_equal(first, second)
    assert (first["threshold"] == plain["threshold"]).all()
    assert not np.allclose(first["probability"], plain["probability"])


def _evaluate(store, **changes) -> str:
    data = DataConfig(data_dir=str(store.data_dir), manifest=store.manifest, cache_dir="")
    return evaluate(data, EvalConfig(**{"split": "val", "bootstrap": 300, **changes}))


@pytest.mark.slow
def test_calibration_refuses_a_sample_with_too_few_positives(models_store):
    name = "site-refusal"
    with pytest.raises(ConfigError, match=r"at least 149 are needed"):
        _evaluate(models_store, calibrate=True, site_sensitivity=0.98, registered_name=name)
    assert not MlflowClient().search_model_versions(f"name='{name}'")


@pytest.mark.slow
def test_site_version_carries_its_threshold_and_leaves_the_original_untouched(models_store, tmp_path):
    name = "site-calibrated"
    client = MlflowClient()
    _evaluate(
        models_store, register=True, registered_name=name, floor_sensitivity=0, floor_specificity=0, floor_roc_auc=0
    )
    original = client.get_model_version_by_alias(name, "champion")
    run_id = _evaluate(models_store, split="train", calibrate=True, site_sensitivity=0.9, registered_name=name)
    metrics = mlflow.get_run(run_id).data.metrics
    site = client.get_model_version_by_alias(name, "site")
    assert site.version != original.version
    assert client.get_model_version_by_alias(name, "champion").version == original.version

    served = mlflow.pyfunc.load_model(f"models:/{name}@site")
    champion = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    cell = pd.DataFrame({"image": [encode_file(models_store.unseen["NORMAL"][0])]})
    # Each serves its own threshold on its own calibrated scale: the site one recalibrated on the sample.
    site_contract = served.unwrap_python_model().contract
    assert site_contract.calibration.fitted_on == "the site sample (the parent's weights)"
    assert served.predict(cell)["threshold"].iloc[0] == pytest.approx(
        float(site_contract.calibration.apply(metrics["site_threshold"]))
    )
    champion_contract = champion.unwrap_python_model().contract
    assert champion_contract.calibration != site_contract.calibration
    assert champion.predict(cell)["threshold"].iloc[0] == pytest.approx(
        float(champion_contract.calibration.apply(mlflow.get_run(models_store.aug_cnn).data.metrics["threshold"]))
    )
    assert {"site_ece", "site_ece_calibrated"} <= set(read_summary(run_id))
    details = read_json(
        mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="site_calibration.json", dst_path=str(tmp_path)
        )
    )
    assert details["threshold"] == pytest.approx(metrics["site_threshold"]) and details["target_sensitivity"] == 0.9
    # The site version's contract carries its lineage and its (in-sample) site figures with intervals.
    contract = load_trained_model(f"models:/{name}@site").contract
    assert contract.lineage.method == "site calibration"
    assert contract.lineage.parent_uri == models_store.model_uri(models_store.aug_cnn)
    assert contract.site.target_sensitivity == 0.9 and contract.threshold == pytest.approx(metrics["site_threshold"])
    point, low, high = contract.site.figures.intervals["sensitivity"]
    assert 0.9 <= point and low <= point <= high
    assert "in sample" in contract.site.figures.on
    # Intervals of the evaluated split at the model's own threshold are logged too.
    summary = read_summary(run_id)
    assert summary["train_roc_auc_ci_low"] <= metrics["train_roc_auc"] <= summary["train_roc_auc_ci_high"]
