"""Outputs a clinician can trust: the input gate flags what is not a chest X-ray, and calibrated
probabilities keep every decision of the operating threshold.

The gate is fitted here as training fits it (:func:`pneumo.ood.fit_gate`) on real X-rays decoded
by the default aug_cnn input spec, and judged on files run through the one decode path, as the
server and ``predict`` see them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import xray_files as xf
from conftest import SHARED_DATA, require_real_data
from pneumo import CLASS_NAMES, UNCERTAIN, pipeline
from pneumo.calibration import Calibration, cross_fitted, expected_calibration_error, fit_calibration, logit
from pneumo.config import DataConfig
from pneumo.contract import Figures, ModelContract, contract_text, read_contract
from pneumo.data import prepare_manifest, site_manifest
from pneumo.model_card import model_card
from pneumo.ood import VALIDATION_PASS_RATE, fit_gate
from pneumo.preprocessing import decode_image
from pneumo.serving import answer_frame, served_threshold

SPEC = DataConfig().input_spec  # what aug_cnn trains and serves with by default
# Files per class: fitted on, limits set on, and never seen by either.
FIT, CALIBRATE, UNSEEN = 200, 100, 60


def _files(name: str) -> list[Path]:
    return sorted(p for p in (require_real_data() / "train" / name).iterdir() if not p.name.startswith("."))


def _decode(paths: list[Path]) -> np.ndarray:
    return np.stack([decode_image(path.read_bytes(), SPEC) for path in paths])


@pytest.fixture(scope="module")
def small_gate():
    """A gate fitted on 400 real training X-rays, its limits set on 200 others; 120 unseen ones."""
    files = {name: _files(name) for name in CLASS_NAMES}
    parts = {"fit": slice(0, FIT), "calibrate": slice(FIT, FIT + CALIBRATE), "unseen": slice(-UNSEEN, None)}
    split = {part: [path for name in CLASS_NAMES for path in files[name][where]] for part, where in parts.items()}
    gate = fit_gate(_decode(split["fit"]), _decode(split["calibrate"]))
    return gate, split["unseen"]


def test_the_gate_passes_about_99_percent_of_validation_xrays(small_gate):
    gate, unseen = small_gate
    assert VALIDATION_PASS_RATE <= gate.validation_pass_rate <= 1.0
    assert gate.validation_pass_rate < 1.0 or gate.n_calibrated < 100  # calibrated, not a gate that passes all
    # Unseen X-rays of the same hospital pass too: the gate is not fitted to its own images only.
    assert gate.judge(_decode(unseen)).passed.mean() >= 0.95


def test_every_kind_of_input_that_is_not_a_chest_xray_is_flagged(small_gate):
    gate, unseen = small_gate
    xrays = unseen[::12]  # both classes
    for kind, files in xf.not_chest_xrays(xrays).items():
        judged = gate.judge(np.stack([decode_image(data, SPEC) for data in files]))
        assert not judged.passed.any(), f"{kind}: {np.round(judged.score, 2)} passed the gate"
    # The same films upright pass: it is the rotation that is flagged, not the films.
    assert gate.judge(_decode(xrays)).passed.all()


def test_the_gate_judges_three_channel_models_inputs_too():
    files = [path for name in CLASS_NAMES for path in _files(name)[:200]]
    spec = DataConfig(image_size=64, channels=3, equalize="none").input_spec
    images = np.stack([decode_image(path.read_bytes(), spec) for path in files])
    gate = fit_gate(images[::2], images[1::2])
    noise = decode_image(xf.png(np.random.default_rng(1).integers(0, 256, (500, 500), dtype=np.uint8)), spec)
    assert not gate.judge(noise[None]).passed.any() and gate.validation_pass_rate >= VALIDATION_PASS_RATE


@pytest.mark.slow
def test_on_the_full_data_99_percent_of_validation_and_98_percent_of_the_test_half_pass():
    """The rates README gives: fitted on the default manifest's training split, as aug_cnn does."""
    config = DataConfig(data_dir=str(require_real_data()), cache_dir="")
    manifest = prepare_manifest(config)
    train, val = (pipeline.load_split(manifest.split(s), manifest.data_dir, SPEC) for s in ("train", "val"))
    gate = fit_gate(train.images, val.images)
    assert 0.985 <= gate.validation_pass_rate <= 0.995
    test_half = SHARED_DATA / "test"
    if not (test_half / "NORMAL").is_dir():
        pytest.skip("no test half beside the training data")
    site = site_manifest(str(test_half))
    images = pipeline.load_split(site.frame, site.data_dir, SPEC)
    assert gate.judge(images.images).passed.mean() >= 0.98


def _overconfident_scores(n: int = 3000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from true probabilities, and a score three times as sure and biased towards pneumonia."""
    rng = np.random.default_rng(seed)
    truth = rng.uniform(0.02, 0.98, n)
    labels = (rng.uniform(size=n) < truth).astype(np.int64)
    scores = 1.0 / (1.0 + np.exp(-(3.0 * logit(truth) + 1.0)))
    return labels, scores


def test_platt_scaling_recovers_a_known_miscalibration_and_lowers_the_error_out_of_fold():
    labels, scores = _overconfident_scores()
    fitted = fit_calibration(labels, scores, "synthetic scores")
    assert fitted.slope == pytest.approx(1 / 3, rel=0.15) and fitted.intercept == pytest.approx(-1 / 3, abs=0.15)
    assert fitted.ece_before > 0.1 and fitted.ece_after < 0.04
    assert fitted.ece_after == pytest.approx(expected_calibration_error(labels, cross_fitted(labels, scores)))
    # A perfectly calibrated score stays close to itself.
    truth = np.random.default_rng(3).uniform(0.02, 0.98, 4000)
    outcome = (np.random.default_rng(4).uniform(size=4000) < truth).astype(np.int64)
    identity = fit_calibration(outcome, truth, "calibrated")
    assert identity.slope == pytest.approx(1.0, abs=0.15) and abs(identity.intercept) < 0.15


def _contract(**changes) -> ModelContract:
    fields = dict(
        entry_point="aug_cnn",
        input_spec=SPEC,
        threshold=0.37,
        threshold_rule="validation sensitivity >= 0.98",
        hyperparameters={},
        validation=Figures("validation", {"roc_auc": 0.99}),
    )
    return ModelContract(**{**fields, **changes})


def test_calibrated_answers_keep_every_decision_of_the_threshold(small_gate):
    gate, unseen = small_gate
    calibration = Calibration(0.45, -1.2, "validation", 500, 0.1, 0.02)
    contract = _contract(calibration=calibration, input_gate=gate)
    images = _decode(unseen)
    # Scores on both sides of the threshold, the threshold itself and its float neighbours.
    threshold = contract.threshold
    scores = np.concatenate(
        [np.linspace(0.0, 1.0, len(images) - 3), [threshold, np.nextafter(threshold, 0), np.nextafter(threshold, 1)]]
    )
    answers = answer_frame(contract, images, scores)
    passed = answers["in_distribution"].astype(bool).to_numpy()
    raw_labels = np.array([CLASS_NAMES[int(s >= threshold)] for s in scores])
    assert (answers["label"].to_numpy()[passed] == raw_labels[passed]).all()
    assert (answers["threshold"] == served_threshold(contract)).all()
    assert served_threshold(contract) == pytest.approx(float(calibration.apply(threshold)))
    assert ((answers["probability"] >= answers["threshold"]).to_numpy() == (scores >= threshold)).all()
    assert np.all(np.diff(answers["probability"].to_numpy()[: len(images) - 3]) >= 0)  # ranking kept
    assert not np.allclose(answers["probability"], scores)  # and the served numbers did change


def test_an_input_the_gate_fails_is_uncertain_and_still_gets_a_probability(small_gate):
    gate, unseen = small_gate
    blank = decode_image(xf.png(np.zeros((600, 600), np.uint8)), SPEC)
    images = np.stack([blank, _decode(unseen[:1])[0]])
    answers = answer_frame(_contract(input_gate=gate), images, np.array([0.99, 0.99]))
    assert answers["label"].tolist() == [UNCERTAIN, "PNEUMONIA"]
    assert answers["in_distribution"].tolist() == [False, True]
    assert answers["ood_score"].iloc[0] > 1.0 >= answers["ood_score"].iloc[1]
    assert answers["probability"].tolist() == [0.99, 0.99]  # no calibration: the raw score
    # A model logged before the gate says nothing about its input, rather than claim it passed.
    old = answer_frame(_contract(), images, np.array([0.99, 0.1]))
    assert old["label"].tolist() == ["PNEUMONIA", "NORMAL"] and old["in_distribution"].isna().all()
    assert old["ood_score"].isna().all()


def test_the_gate_and_calibration_travel_in_the_contract_file(small_gate):
    gate, unseen = small_gate
    contract = _contract(input_gate=gate, calibration=Calibration(0.5, -0.4, "validation", 500, 0.08, 0.02))
    back = read_contract(contract_text(contract))
    assert back.calibration == contract.calibration
    images = _decode(unseen[:20])
    assert np.allclose(back.input_gate.scores(images), gate.scores(images))
    # A version-2 file (before the gate) still reads, without one.
    payload = json.loads(contract_text(contract))
    del payload["input_gate"], payload["calibration"]
    old = read_contract(json.dumps({**payload, "version": 2}))
    assert old.input_gate is None and old.calibration is None


def test_the_model_card_says_what_the_calibration_and_the_gate_are(small_gate):
    gate, _ = small_gate
    fitted = Calibration(0.5, -0.4, "validation split of the training hospital (patient-grouped)", 522, 0.063, 0.016)
    card = model_card(_contract(input_gate=gate, calibration=fitted), "m", "3", "champion", "abc")
    assert "Platt scaling fitted on validation split of the training hospital (patient-grouped) (522 images)" in card
    assert "0.063 raw, 0.016 calibrated (out of fold)" in card
    assert f"{100 * gate.validation_pass_rate:.1f}% of {gate.n_calibrated} validation X-rays pass" in card
    assert "UNCERTAIN" in card and "rotated by 90 or 270 degrees" in card
    # The figures tables carry the calibration error and the gate's pass rate where the figures hold them.
    validation = Figures(
        "validation", {"roc_auc": 0.99, "ece": 0.063, "ece_calibrated": 0.016, "ood_pass_rate": 0.9923}
    )
    tested = Figures("the test half", {"roc_auc": 0.96, "ece": 0.124, "ece_calibrated": 0.158, "ood_pass_rate": 0.984})
    card = model_card(_contract(validation=validation), "m", "3", "champion", "abc", evaluation=tested)
    assert "| expected calibration error, calibrated (as served) | 0.016 |" in card
    assert "| expected calibration error, calibrated (as served) | 0.158 |" in card
    assert "| share passing the input gate | 0.984 |" in card
    bare = model_card(_contract(), "m", "1", "champion", "abc")
    assert "Calibration: none" in bare and "Input gate: none" in bare
