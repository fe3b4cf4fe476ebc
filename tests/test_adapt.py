"""Site adaptation (`adapt`): out-of-fold figures, refusals, lineage, and a served site version.

The test half of the official test split stands in for another hospital's labelled sample, as
README's "Make it work at your hospital" describes; the parent is the session's short aug_cnn,
trained on the training folder only.
"""

from __future__ import annotations

import base64
import os

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from conftest import SHARED_DATA, require_real_data
from helpers import download, serve_model
from pneumo import CLASS_NAMES, metrics
from pneumo.adapt import SiteSample, adapt, check_sample, fold_splits
from pneumo.config import AdaptConfig, DataConfig
from pneumo.data import patient_key, site_manifest
from pneumo.errors import ConfigError, DataError
from pneumo.model_io import load_trained_model

pytest_plugins = ["model_fixtures"]

NAME = "pneumonia-classifier-adapt-test"


def _sample(n_normal_patients: int, n_pneumonia: int, images_per_patient: int = 1) -> SiteSample:
    labels = np.array([0] * n_normal_patients * images_per_patient + [1] * n_pneumonia, np.int32)
    groups = np.array(
        [f"n{i // images_per_patient}" for i in range(n_normal_patients * images_per_patient)]
        + [f"p{i}" for i in range(n_pneumonia)]
    )
    return SiteSample(np.zeros((len(labels), 8, 8, 1), np.uint8), labels, groups)


def test_cross_fitting_never_puts_a_patient_on_both_sides():
    site = require_real_data() / "test"
    frame = site_manifest(str(site)).frame
    groups = patient_key(frame).to_numpy(str)
    sample = SiteSample(np.zeros((len(frame), 1)), frame["label"].to_numpy(np.int32), groups)
    assert len(np.unique(groups)) < len(groups)  # the test half has patients with several images
    splits = fold_splits(sample, 5, seed=3)
    held_out = np.concatenate([test for _, test in splits])
    assert sorted(held_out) == list(range(len(frame)))  # every image scored out of fold exactly once
    for fit, test in splits:
        assert not set(groups[fit]) & set(groups[test])
        assert set(sample.labels[test]) == {0, 1}


@pytest.mark.parametrize(
    "sample, config, message",
    [
        (_sample(10, 0), AdaptConfig(site_dir="x"), "no PNEUMONIA images"),
        (_sample(3, 200), AdaptConfig(site_dir="x", folds=5), "3 NORMAL patient\\(s\\), fewer than folds=5"),
        # Many normal images, but from 4 children only: patients, not images, must cover the folds.
        (_sample(4, 200, images_per_patient=10), AdaptConfig(site_dir="x"), "4 NORMAL patient"),
        (_sample(50, 100), AdaptConfig(site_dir="x"), "has 100 pneumonia images, but at least 149 are needed"),
    ],
)
def test_a_sample_that_cannot_support_the_target_is_refused_with_the_numbers(sample, config, message):
    with pytest.raises(ConfigError, match=message):
        check_sample(sample, config)
    check_sample(_sample(50, 60), AdaptConfig(site_dir="x", site_sensitivity=0.95))  # 59 needed: accepted


def test_a_site_folder_without_a_class_is_refused(tmp_path):
    (tmp_path / "NORMAL").mkdir()
    with pytest.raises(DataError, match="lacks PNEUMONIA/"):
        site_manifest(str(tmp_path))


@pytest.mark.slow
def test_adapt_improves_out_of_fold_ranking_keeps_the_champion_and_serves_the_site_version(models_store, tmp_path):
    require_real_data()
    client = MlflowClient()
    champion = mlflow.register_model(models_store.model_uri(models_store.aug_cnn), NAME)
    client.set_registered_model_alias(NAME, "champion", champion.version)
    champion_threshold = load_trained_model(f"models:/{NAME}@champion").contract.threshold
    config = AdaptConfig(
        model_uri=f"models:/{NAME}@champion",
        site_dir=str(SHARED_DATA / "test"),
        folds=3,
        epochs=6,
        learning_rate=3e-4,
        bootstrap=200,
    )
    run_id = adapt(DataConfig(data_dir=str(models_store.data_dir), cache_dir="", seed=7), config)

    run = client.get_run(run_id)
    metrics_logged = run.data.metrics
    # On a sample acquired differently, the adapted model ranks better out of fold than the parent.
    assert metrics_logged["site_oof_roc_auc"] >= metrics_logged["parent_site_roc_auc"] + 0.02
    # The stored threshold is the one the out-of-fold scores give for the target, not an in-sample one.
    scores = pd.read_csv(download(client, run_id, "site_predictions.csv", tmp_path))
    out_of_fold = metrics.threshold_for_sensitivity(
        scores["label"].to_numpy(), scores["fold_probability"].to_numpy(), 0.98
    )
    site = load_trained_model(f"models:/{NAME}@site")
    assert site.contract.threshold == pytest.approx(out_of_fold) == pytest.approx(metrics_logged["site_threshold"])
    assert site.contract.threshold_rule.startswith("site out-of-fold sensitivity >= 0.98")
    # Lineage: the parent's registered version, the site manifest, and the out-of-fold figures with intervals.
    lineage = site.contract.lineage
    assert (lineage.method, lineage.parent_version, lineage.parent_uri) == (
        "site adaptation",
        f"{NAME}/{champion.version}",
        config.model_uri,
    )
    assert lineage.site_manifest_digest == run.inputs.dataset_inputs[0].dataset.digest
    figures = site.contract.site.figures
    assert figures.metrics["roc_auc"] == pytest.approx(metrics_logged["site_oof_roc_auc"])
    assert figures.intervals["roc_auc"][1] <= figures.metrics["roc_auc"] <= figures.intervals["roc_auc"][2]
    assert site.contract.site.parent_figures.metrics["roc_auc"] == pytest.approx(metrics_logged["parent_site_roc_auc"])
    assert "forgetting_val_roc_auc" in metrics_logged  # the training hospital's validation split, re-scored
    # The champion is untouched: same version, same threshold.
    assert client.get_model_version_by_alias(NAME, "champion").version == champion.version
    assert load_trained_model(f"models:/{NAME}@champion").contract.threshold == champion_threshold
    assert client.get_model_version_by_alias(NAME, "site").version != champion.version

    # Served by alias, the site version answers with the same contract, at its own threshold.
    image = sorted((SHARED_DATA / "test" / "PNEUMONIA").iterdir())[0]
    body = {"dataframe_records": [{"image": base64.b64encode(image.read_bytes()).decode("ascii")}]}
    env = {**os.environ, "MLFLOW_TRACKING_URI": models_store.tracking_uri}
    with serve_model(f"models:/{NAME}@site", env, tmp_path / "serve.log", 180) as server:
        answer = server.invoke(body)
    assert answer.status_code == 200, answer.text
    served = pd.DataFrame(answer.json()["predictions"])
    assert list(served.columns)[:5] == ["label", "probability", "threshold", "in_distribution", "ood_score"]
    # Recalibrated on the site's out-of-fold scores; the threshold is served on that scale.
    assert site.contract.calibration.fitted_on == "the site sample's out-of-fold scores"
    assert served["threshold"].iloc[0] == pytest.approx(float(site.contract.calibration.apply(site.contract.threshold)))
    assert served["label"].iloc[0] == CLASS_NAMES[int(served["probability"].iloc[0] >= served["threshold"].iloc[0])]
