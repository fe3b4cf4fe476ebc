"""Entry point ``cv``: patient-grouped, stratified k-fold cross-validation of the L2 dense baseline.

The notebook wrapped its L2-regularised dense network in a scikit-learn classifier and called
``cross_val_score``. Two things go wrong when that is repeated today with SciKeras 0.13 and
scikit-learn >= 1.6: SciKeras does not declare the estimator tags scikit-learn now reads, so
``is_classifier`` is False, ``scoring="roc_auc"`` fails inside ``cross_validate`` and is silently
recorded as NaN, and ``cv=<int>`` falls back to plain (unstratified) ``KFold``. And k-fold on
images ignores patients, so images of one child land in both the fitted and the scored part.

:class:`BinaryKerasClassifier` declares itself a binary classifier, :func:`fold_splits` builds
explicit ``StratifiedGroupKFold`` folds, and ``cross_validate`` runs with ``error_score="raise"``
so a failing scorer can never again turn into a quiet NaN.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
from scikeras.wrappers import KerasClassifier
from sklearn.base import clone
from sklearn.model_selection import StratifiedGroupKFold, cross_validate
from sklearn.utils import ClassifierTags

from pneumo import metrics, models, pipeline, plots, tracking, training
from pneumo.config import CVConfig, DataConfig, RunConfigs, TrainConfig
from pneumo.data import split_groups
from pneumo.errors import DataError

log = logging.getLogger(__name__)
SCORING = {"accuracy": "accuracy", "roc_auc": "roc_auc"}


class BinaryKerasClassifier(KerasClassifier):
    """SciKeras ``KerasClassifier`` that scikit-learn >= 1.6 recognises as a binary classifier.

    Args:
        model: Callable returning a compiled Keras model with one sigmoid output.
        oversample: Oversample the minority class of the fitted data to parity with
            imbalanced-learn's ``RandomOverSampler`` (applied inside ``fit``, so in
            cross-validation only the training folds are resampled, never the scored fold).
        **kwargs: Any other ``KerasClassifier`` parameter (epochs, batch_size, random_state, ...).
    """

    def __init__(self, model=None, *, oversample: bool = False, **kwargs):
        super().__init__(model=model, **kwargs)
        self.oversample = oversample

    def __sklearn_tags__(self):
        # scikit-learn >= 1.6 reads the type from these tags only; BaseWrapper's inherited
        # BaseEstimator.__sklearn_tags__ shadows ClassifierMixin's, leaving estimator_type None.
        tags = super().__sklearn_tags__()
        tags.estimator_type = "classifier"
        tags.classifier_tags = ClassifierTags(multi_class=False)
        tags.target_tags.required = True
        return tags

    def fit(self, X, y, sample_weight=None, **kwargs) -> "BinaryKerasClassifier":
        """Fit on ``(X, y)``, oversampled first when ``oversample`` is set.

        Args:
            X: Images, shape ``(n, size, size, channels)``.
            y: Labels, 1 = pneumonia.
            sample_weight: Optional per-image weights (resampled along with the images).
            **kwargs: Passed on to ``keras.Model.fit`` (e.g. ``validation_data``).

        Returns:
            The fitted estimator.
        """
        if self.oversample:
            y = np.asarray(y)
            index = pipeline.balanced_indices(y, self.random_state or 0)
            X, y = X[index], y[index]
            if sample_weight is not None:
                sample_weight = np.asarray(sample_weight)[index]
        return super().fit(X, y, sample_weight=sample_weight, **kwargs)


def _build_compiled(meta: dict, data: DataConfig, train: TrainConfig, l2: float) -> keras.Model:
    """SciKeras model function: the L2 dense net compiled like every other entry point's model."""
    steps_per_epoch = max(1, math.ceil(meta["X_shape_"][0] / train.batch_size))
    return training.compile_model(
        models.build_dense(data.image_size, data.channels, l2), training.make_optimizer(train, steps_per_epoch)
    )


def make_estimator(data: DataConfig, train: TrainConfig, cv: CVConfig) -> BinaryKerasClassifier:
    """The cross-validated estimator: fixed epochs, balancing per ``train.balance``, seeded.

    Args:
        data: Input size, channels and seed.
        train: Batch size, epochs, optimizer, learning rate and ``balance``.
        cv: L2 factor of the first dense layer.

    Returns:
        An unfitted :class:`BinaryKerasClassifier`.
    """
    return BinaryKerasClassifier(
        model=functools.partial(_build_compiled, data=data, train=train, l2=cv.l2),
        oversample=train.balance == "oversample",
        class_weight="balanced" if train.balance == "class_weight" else None,
        epochs=train.epochs,
        batch_size=train.batch_size,
        # SciKeras seeds Python, NumPy and TensorFlow and enables op determinism around each
        # build and fit, so every fold is repeatable.
        random_state=data.seed,
        verbose=0,
    )


def cv_arrays(images: pipeline.ImageSet) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inputs, labels and patient groups handed to scikit-learn.

    The images stay ``(n, size, size, channels)`` uint8: the network's own Flatten layer turns
    them into the notebook's flattened pixel vectors, so the refitted model serves raw images.

    Returns:
        ``X``, ``y`` (int, 1 = pneumonia) and ``groups`` (patients, united with identical files:
        :func:`pneumo.data.split_groups`).
    """
    return images.images, images.labels.astype(np.int64), split_groups(images.frame).to_numpy(str)


def fold_splits(y: np.ndarray, groups: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified, patient-grouped k-fold splits; every scored fold holds both classes.

    Args:
        y: Labels.
        groups: Patient id of each image.
        folds: Number of folds (at least 2).
        seed: Seed of the fold assignment.

    Returns:
        ``(train_index, test_index)`` pairs.

    Raises:
        DataError: Too few patients for ``folds``, or a fold without one of the classes (its
            ROC AUC would be undefined).
    """
    if folds < 2:
        raise DataError(f"folds must be at least 2, got {folds}")
    for label in (0, 1):
        patients = len(np.unique(groups[y == label]))
        if patients < folds:
            raise DataError(f"only {patients} patient(s) of class {label} for {folds} folds")
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    splits = list(splitter.split(np.zeros(len(y)), y, groups=groups))
    for number, (_, test) in enumerate(splits, start=1):
        if len(np.unique(y[test])) < 2:
            raise DataError(f"fold {number} has images of one class only; use fewer folds")
    return splits


@dataclass
class Folds:
    """Cross-validation of the training split: every fold's fitted estimator, scores and predictions."""

    estimator: BinaryKerasClassifier  # the unfitted estimator each fold was a clone of
    splits: list[tuple[np.ndarray, np.ndarray]]  # (fit, held-out) indices per fold
    fitted: list[BinaryKerasClassifier]
    scores: dict[str, np.ndarray]  # SCORING name -> held-out score per fold
    fit_seconds: np.ndarray
    y: np.ndarray
    groups: np.ndarray
    out_of_fold: np.ndarray  # each image's probability from the fold that held it out
    fold_of: np.ndarray  # each image's fold number (from 1)

    def summary(self) -> dict[str, float]:
        """Mean and standard deviation of each score, and the pooled out-of-fold ROC AUC and accuracy."""
        # ddof=1: an estimate of how much a fold's score varies, not the spread of these k alone.
        summary = {
            f"cv_{name}_{stat}": float(fn(values))
            for name, values in self.scores.items()
            for stat, fn in (("mean", np.mean), ("std", lambda v: np.std(v, ddof=1)))
        }
        pooled = metrics.binary_metrics(self.y, self.out_of_fold, 0.5)
        summary["cv_oof_roc_auc"], summary["cv_oof_accuracy"] = pooled["roc_auc"], pooled["accuracy"]
        return summary

    def report(self) -> list[dict[str, Any]]:
        """One entry per fold: sizes, patients, class balance, scores, fit time and training history."""
        return [
            {
                "fold": number,
                "n_fit": len(fit_index),
                "n_test": len(test_index),
                "test_patients": int(len(np.unique(self.groups[test_index]))),
                "test_pneumonia_fraction": float(self.y[test_index].mean()),
                **{name: float(values[number - 1]) for name, values in self.scores.items()},
                "fit_seconds": float(self.fit_seconds[number - 1]),
                "history": {k: [float(v) for v in values] for k, values in fitted.model_.history.history.items()},
            }
            for number, ((fit_index, test_index), fitted) in enumerate(zip(self.splits, self.fitted), start=1)
        ]


def cross_validate_training_split(
    images: pipeline.ImageSet, data: DataConfig, train: TrainConfig, config: CVConfig
) -> Folds:
    """Fit and score the estimator on patient-grouped, stratified folds of the training images."""
    X, y, groups = cv_arrays(images)
    splits = fold_splits(y, groups, config.folds, data.seed)
    estimator = make_estimator(data, train, config)
    results = cross_validate(
        estimator, X, y, groups=groups, cv=splits, scoring=SCORING, return_estimator=True, error_score="raise"
    )
    out_of_fold, fold_of = np.empty(len(y)), np.empty(len(y), dtype=int)
    for number, ((_, held_out), fitted) in enumerate(zip(splits, results["estimator"]), start=1):
        out_of_fold[held_out] = fitted.predict_proba(X[held_out])[:, 1]
        fold_of[held_out] = number
    return Folds(
        estimator=estimator,
        splits=splits,
        fitted=list(results["estimator"]),
        scores={name: np.asarray(results[f"test_{name}"], dtype=float) for name in SCORING},
        fit_seconds=np.asarray(results["fit_time"], dtype=float),
        y=y,
        groups=groups,
        out_of_fold=out_of_fold,
        fold_of=fold_of,
    )


def log_folds(folds: Folds, images: pipeline.ImageSet) -> dict[str, float]:
    """Log the fold scores (metric ``cv_fold_<score>``, step = fold), their summary, report and figures.

    Returns:
        The summary (see :meth:`Folds.summary`).
    """
    for number in range(1, len(folds.splits) + 1):
        tracking.log_metrics({f"cv_fold_{name}": values[number - 1] for name, values in folds.scores.items()}, number)
    summary = folds.summary()
    tracking.log_metrics(summary)
    log.info(
        "cv over %d folds: accuracy %.3f +/- %.3f, ROC AUC %.3f +/- %.3f (pooled out-of-fold %.3f)",
        len(folds.splits),
        summary["cv_accuracy_mean"],
        summary["cv_accuracy_std"],
        summary["cv_roc_auc_mean"],
        summary["cv_roc_auc_std"],
        summary["cv_oof_roc_auc"],
    )
    tracking.log_json({"folds": folds.report(), "summary": summary}, "cv_folds.json")
    tracking.log_figure(
        plots.plot_folds(
            [e.model_.history.history for e in folds.fitted],
            folds.scores,
            "cv: patient-grouped stratified k-fold of the L2 dense baseline",
        ),
        "plots/cv_folds.png",
    )
    tracking.log_figure(
        plots.plot_confusion_matrix(folds.y, folds.out_of_fold, 0.5, "cv: pooled out-of-fold"),
        "plots/confusion_matrix_oof_0.5.png",
    )
    tracking.log_json(metrics.confusion_counts(folds.y, folds.out_of_fold, 0.5), "confusion_matrix_oof.json")
    tracking.log_dataframe(
        images.frame[["path", "patient_id", "label"]].assign(fold=folds.fold_of, probability=folds.out_of_fold),
        "oof_predictions.csv",
    )
    return summary


def refit_and_log(
    configs: RunConfigs, estimator: BinaryKerasClassifier, data: training.TrainingData, summary: dict[str, float]
) -> None:
    """Repeat the cross-validated procedure on all training images and log it as the run's model.

    The validation split is only watched (per-epoch ``val_*`` metrics), never used to stop; it
    chooses the threshold, as for every other entry point.
    """
    X, y, _ = cv_arrays(data.train)
    final = clone(estimator).set_params(callbacks=[training.MlflowEpochLogger()])
    started = time.perf_counter()
    final.fit(X, y, validation_data=(data.val.images, data.val.labels.astype(np.float32)))
    # The refit's own time and length, as every other training run reports them.
    tracking.log_summary(
        {"fit_seconds": time.perf_counter() - started, "epochs_run": len(final.model_.history.history["loss"])}
    )
    probabilities, threshold, val_metrics = training.evaluate_validation(
        final.model_, data.val, configs.train.target_sensitivity
    )
    result = training.TrainResult(
        final.model_, final.model_.history.history, probabilities, threshold, val_metrics, cross_validation=summary
    )
    training.log_outputs(configs, result, data)


def cv(data: DataConfig, train: TrainConfig, cv_config: CVConfig) -> str:
    """Entry point ``cv``: k-fold cross-validation (patient-grouped, stratified) of the L2 dense net.

    Each fold trains for exactly ``epochs`` epochs (a held-out fold must not steer early
    stopping, so ``patience`` and ``monitor`` are not used); the model is then refitted the same
    way on all training images, its threshold chosen on the validation split, and logged as the
    run's model.

    Args:
        data: Data settings (default 64x64 RGB, as in the notebook).
        train: Optimisation settings; ``balance`` picks oversampling or class weights.
        cv_config: Number of folds and L2 factor.

    Returns:
        The MLflow run id.
    """
    configs = RunConfigs("cv", data, train, cv_config)
    with tracking.start_run(configs) as run:
        training.set_up_keras(data.seed, train.precision)
        # Folds come from the training split only: the validation split stays untouched by
        # cross-validation so that it can choose the refitted model's threshold without bias
        # and its metrics compare directly with those of baseline, cnn and aug_cnn.
        images = training.load_training_data(data)
        folds = cross_validate_training_split(images.train, data, train, cv_config)
        summary = log_folds(folds, images.train)
        refit_and_log(configs, folds.estimator, images, summary)
        return run.info.run_id


__all__ = [
    "BinaryKerasClassifier",
    "Folds",
    "cross_validate_training_split",
    "cv",
    "cv_arrays",
    "fold_splits",
    "log_folds",
    "make_estimator",
    "refit_and_log",
]
