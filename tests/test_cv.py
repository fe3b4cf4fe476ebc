"""SciKeras under scikit-learn >= 1.6: classifier tags, stratified grouped folds, and honest ROC AUC."""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
from scikeras.wrappers import KerasClassifier
from sklearn.base import clone, is_classifier
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, check_cv, cross_validate
from sklearn.utils import get_tags

from pneumo import models, pipeline, training
from pneumo.config import CVConfig, DataConfig, TrainConfig
from pneumo.cv import SCORING, BinaryKerasClassifier, cv_arrays, fold_splits, make_estimator
from pneumo.data import discover
from pneumo.errors import DataError
from pneumo.preprocessing import InputSpec

DATA = DataConfig(image_size=24, channels=3, seed=11)
TRAIN = TrainConfig(batch_size=16, epochs=3, optimizer="rmsprop", cosine_decay=False, precision="float32")


@pytest.fixture(scope="module", autouse=True)
def float32_policy():
    """Exact comparisons need float32 compute, whatever policy an earlier in-process run left."""
    previous = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy("float32")
    yield
    keras.mixed_precision.set_global_policy(previous)


@pytest.fixture(scope="module")
def arrays(small_data):
    """Real images (about 60 per class), labels and patient ids, as the cv entry point sees them."""
    frame = discover(small_data).images
    return cv_arrays(pipeline.load_split(frame, small_data, InputSpec(DATA.image_size, DATA.channels)))


def test_plain_scikeras_is_not_a_classifier_for_this_scikit_learn():
    # The trap this module exists for: if this starts failing, SciKeras fixed it upstream.
    assert not is_classifier(KerasClassifier())


def test_binary_keras_classifier_is_a_classifier_with_stratified_default_folds():
    estimator = make_estimator(DATA, TRAIN, CVConfig())
    assert is_classifier(estimator)
    tags = get_tags(estimator)
    assert tags.estimator_type == "classifier" and tags.classifier_tags.multi_class is False
    y = np.array([0] * 10 + [1] * 30)
    assert isinstance(check_cv(5, y, classifier=is_classifier(estimator)), StratifiedKFold)
    twin = clone(estimator)
    assert twin.get_params()["oversample"] is True and twin.get_params()["epochs"] == TRAIN.epochs


def test_balance_setting_picks_oversampling_or_class_weights():
    assert make_estimator(DATA, TRAIN, CVConfig()).class_weight is None
    weighted = make_estimator(DATA, TrainConfig(balance="class_weight"), CVConfig())
    assert weighted.class_weight == "balanced" and weighted.oversample is False
    with pytest.raises(ValueError, match="balance"):
        make_estimator(DATA, TrainConfig(balance="smote"), CVConfig())


def test_fold_splits_are_patient_grouped_stratified_and_cover_every_image(arrays):
    _, y, groups = arrays
    splits = fold_splits(y, groups, 3, seed=4)
    tested = np.concatenate([test for _, test in splits])
    assert sorted(tested.tolist()) == list(range(len(y)))
    for fit, test in splits:
        assert not set(groups[fit]) & set(groups[test])
        assert abs(y[test].mean() - y.mean()) < 0.15
    assert [t.tolist() for _, t in fold_splits(y, groups, 3, seed=4)] == [t.tolist() for _, t in splits]


def test_fold_splits_refuse_folds_without_both_classes():
    y = np.array([0, 0, 1, 1, 1, 1])
    groups = np.array(["a", "b", "c", "d", "e", "f"])
    with pytest.raises(DataError, match="patient"):
        fold_splits(y, groups, 3, seed=0)
    with pytest.raises(DataError, match="at least 2"):
        fold_splits(y, groups, 1, seed=0)


@pytest.mark.slow
def test_oversampling_happens_inside_fit_only(arrays):
    X, y, _ = arrays
    estimator = BinaryKerasClassifier(
        model=lambda: _tiny_model(), oversample=True, epochs=1, batch_size=32, random_state=0, verbose=0
    )
    estimator.fit(X, y)
    assert estimator.X_shape_[0] == 2 * np.bincount(y).max()  # what Keras was fitted on
    assert estimator.predict_proba(X).shape == (len(y), 2)  # scoring sees the data unchanged


def _tiny_model():
    return training.compile_model(models.build_dense(DATA.image_size, DATA.channels), training.make_optimizer(TRAIN, 1))


@pytest.mark.slow
def test_cross_validated_roc_auc_is_finite_and_equals_a_fold_refitted_by_hand(arrays):
    X, y, groups = arrays
    splits = fold_splits(y, groups, 3, seed=DATA.seed)
    estimator = make_estimator(DATA, TRAIN, CVConfig(folds=3))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # "Scoring failed ... set to nan" is a UserWarning
        results = cross_validate(
            estimator, X, y, groups=groups, cv=splits, scoring=SCORING, return_estimator=True, error_score="raise"
        )
    auc = results["test_roc_auc"]
    assert np.isfinite(auc).all() and len(auc) == 3
    assert (auc > 0.5).all(), "the network should beat chance on real images"
    for (_, test), fitted, score in zip(splits, results["estimator"], auc):
        probability = fitted.predict_proba(X[test])[:, 1]
        # Column 1 of predict_proba is the network's sigmoid: the probability of pneumonia.
        np.testing.assert_allclose(
            probability, np.asarray(fitted.model_(X[test].astype(np.float32))).ravel(), atol=1e-6
        )
        assert roc_auc_score(y[test], probability) == pytest.approx(score, abs=1e-12)
    # An independent fit on the same fold (SciKeras seeds and makes TF deterministic) scores the same.
    fit, test = splits[1]
    by_hand = clone(estimator).fit(X[fit], y[fit])
    assert roc_auc_score(y[test], by_hand.predict_proba(X[test])[:, 1]) == pytest.approx(auc[1], abs=1e-6)
    accuracy = (by_hand.predict(X[test]) == y[test]).mean()
    assert accuracy == pytest.approx(results["test_accuracy"][1], abs=1e-12)
