"""The model contract: one typed, versioned record per model, read and written in one module.

A model logged before the contract existed (version 1, an untyped dict) must still load and serve
with the input it was trained on; a contract this pneumo cannot read must be refused with a
message that says why, whether opened for evaluation or served.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from pneumo import CLASS_NAMES, model_io
from pneumo.contract import (
    CONTRACT_FILE,
    CONTRACT_VERSION,
    Figures,
    Lineage,
    ModelContract,
    SiteFigures,
    contract_text,
    read_contract,
)
from pneumo.errors import ConfigError
from pneumo.model_card import model_card
from pneumo.models import build_aug_cnn
from pneumo.preprocessing import InputSpec
from pneumo.synthetic import synthetic_example_base64

# What aug_cnn wrote as model_config.json before the contract (version 1), trimmed to its keys.
V1_CONFIG = {
    "entry_point": "aug_cnn",
    "image_size": 32,
    "channels": 1,
    "crop": 0.0,
    "equalize": "clahe",
    "threshold": 0.42,
    "class_names": ["NORMAL", "PNEUMONIA"],
    "val_metrics": {"val_roc_auc": 0.99, "val_sensitivity_at_threshold": 0.97, "val_sensitivity_at_0.5": 0.9},
    "run_id": "abc123",
    "config": {"train": {"target_sensitivity": 0.97}, "augment": {"rotation": 10.0}},
}


def _contract(**changes) -> ModelContract:
    fields = dict(
        entry_point="aug_cnn",
        input_spec=InputSpec(32, 1, equalize="clahe"),
        threshold=0.3,
        threshold_rule="validation sensitivity >= 0.97",
        hyperparameters={"train": {"epochs": 2}},
        validation=Figures("validation", {"roc_auc": 0.9}, {"roc_auc": (0.9, 0.85, 0.95)}, 50, 40),
    )
    return ModelContract(**{**fields, **changes})


def test_a_contract_round_trips_through_its_file_with_nan_as_null():
    site = SiteFigures(0.98, 150, Figures("site, out of fold", {"roc_auc": 0.98, "npv": float("nan")}, {}, 300, 200))
    lineage = Lineage("site adaptation", "models:/m@champion", "m/3", "run1", "digest")
    contract = _contract(lineage=lineage, site=site, cross_validation={"cv_roc_auc_mean": 0.8})
    text = contract_text(contract)
    assert "NaN" not in text and json.loads(text)["site"]["figures"]["metrics"]["npv"] is None
    back = read_contract(text)
    assert back.site.figures.metrics["roc_auc"] == 0.98 and np.isnan(back.site.figures.metrics["npv"])
    assert back.lineage == lineage and back.input_spec == contract.input_spec
    assert back.validation.intervals["roc_auc"] == (0.9, 0.85, 0.95)
    assert back.version == CONTRACT_VERSION and back.class_names == CLASS_NAMES


def test_a_version_1_file_is_upgraded_with_its_own_clahe():
    contract = read_contract(json.dumps(V1_CONFIG))
    # Models before OpenCV's CLAHE keep the hand-written one they were trained with.
    assert contract.input_spec == InputSpec(32, 1, 0.0, "clahe-pneumo")
    assert contract.threshold == 0.42 and contract.threshold_rule == "validation sensitivity >= 0.97"
    assert contract.validation.metrics == {"roc_auc": 0.99, "sensitivity": 0.97}
    assert contract.hyperparameters["augment"]["rotation"] == 10.0 and contract.run_id == "abc123"
    old = {key: value for key, value in V1_CONFIG.items() if key not in ("crop", "equalize")}
    assert read_contract(json.dumps(old)).input_spec == InputSpec(32, 1)  # before crop and equalize existed


@pytest.mark.parametrize(
    "text,message",
    [
        (json.dumps({**V1_CONFIG, "version": CONTRACT_VERSION + 1}), "newer than this pneumo reads"),
        ("[1, 2]", "not a JSON object"),
        ("{not json", "not valid JSON"),
        (json.dumps({key: v for key, v in V1_CONFIG.items() if key != "threshold"}), "lacks 'threshold'"),
        (json.dumps({**V1_CONFIG, "equalize": "gamma"}), "malformed"),
        (json.dumps({**V1_CONFIG, "class_names": ["PNEUMONIA", "NORMAL"]}), "label contract"),
        (json.dumps({**V1_CONFIG, "threshold": 7}), "not a probability"),
    ],
)
def test_an_unreadable_contract_is_refused_with_its_reason(text, message):
    with pytest.raises(ConfigError, match=message):
        read_contract(text)


def _log_with_config(config_text: str, folder: Path) -> str:
    """Log a tiny model the way pneumo did, but with ``config_text`` as its model_config.json."""
    keras_path, config_path = folder / "model.keras", folder / CONTRACT_FILE
    build_aug_cnn(32, 1).save(keras_path)
    config_path.write_text(config_text)
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(Path(model_io.__file__).with_name("pyfunc_model.py")),
            artifacts={model_io.MODEL_ARTIFACT: str(keras_path), model_io.CONFIG_ARTIFACT: str(config_path)},
            code_paths=[str(Path(model_io.__file__).resolve().parent)],
            signature=mlflow.models.ModelSignature(inputs=model_io.INPUT_SCHEMA, outputs=model_io.OUTPUT_SCHEMA),
        )
    return info.model_uri


@pytest.mark.slow
def test_a_model_logged_before_the_contract_still_loads_and_serves(tracking, tmp_path):
    uri = _log_with_config(json.dumps(V1_CONFIG), tmp_path)
    trained = model_io.load_trained_model(uri)
    assert trained.contract.input_spec.equalize == "clahe-pneumo" and trained.contract.threshold == 0.42
    served = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"image": [synthetic_example_base64()]}))
    assert served["threshold"].iloc[0] == 0.42 and served["label"].iloc[0] in CLASS_NAMES


@pytest.mark.slow
def test_a_model_with_a_newer_contract_is_refused_when_opened_and_when_served(tracking, tmp_path):
    uri = _log_with_config(json.dumps({**json.loads(contract_text(_contract())), "version": 99}), tmp_path)
    with pytest.raises(ConfigError, match="version 99, newer"):
        model_io.load_trained_model(uri)
    with pytest.raises(ConfigError, match="version 99, newer"):
        mlflow.pyfunc.load_model(uri)


def test_the_model_card_is_written_from_the_contract_with_every_section_and_no_local_path():
    site = SiteFigures(
        0.98, 194, Figures("the site sample, out of fold", {"roc_auc": 0.98, "sensitivity": 0.985}, {}, 311, 200)
    )
    lineage = Lineage("site adaptation", "models:/m@champion", "m/3", "run1", "digest123")
    contract = _contract(lineage=lineage, site=site, run_id="run9")
    evaluation = Figures("the official test split", {"roc_auc": 0.96}, {"roc_auc": (0.96, 0.94, 0.98)}, 311, 200)
    card = model_card(contract, "m", "4", "site: adapted", "abc123", evaluation)
    for section in (
        "## Intended use",
        "## Training data and licence",
        "## Input contract",
        "## Figures",
        "## Site version: lineage and site figures",
        "## Known limits",
        "## Provenance",
    ):
        assert section in card, section
    assert "not a diagnosis" in card and "CC BY 4.0" in card and "rotated" in card and "Adults" in card
    assert "| roc auc | 0.960 | [0.940, 0.980] |" in card  # the other acquisition's figures, with intervals
    assert "`m/3`" in card and "digest123" in card and "abc123" in card and "0.3000" in card
    assert not re.search(r"(?<![\w:])/(?:home|tmp|work|root|Users|mnt|data)\b", card)  # no absolute local path


class _NotPneumo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input


@pytest.mark.slow
def test_a_model_that_is_not_pneumos_is_refused_by_name(tracking):
    with mlflow.start_run():
        uri = mlflow.pyfunc.log_model(name="model", python_model=_NotPneumo()).model_uri
    with pytest.raises(ConfigError, match="is not a pneumo model"):
        model_io.load_trained_model(uri)
