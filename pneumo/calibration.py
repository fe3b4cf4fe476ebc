"""Probabilities that mean what they say: Platt scaling of a model's score, and how to measure it.

A model trained on class-balanced batches and picked for ROC AUC ranks images well but its
sigmoid output is not a frequency: among images it scores 0.8, far fewer or far more than 80% may
have pneumonia. :class:`Calibration` maps the score through ``sigmoid(slope * logit(p) +
intercept)``, fitted by logistic regression on labelled scores the model did not train on (the
validation split at training time; a site's out-of-fold scores for a site version). It is
increasing, so the operating threshold mapped through it makes the same decisions as before on
every image: calibration changes what the served probability means, never a label.

The expected calibration error (:func:`expected_calibration_error`) is reported before and after;
"after" on the data the calibration was fitted on is measured out of fold (:func:`cross_fitted`),
so it is not flattered by the fit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Equal-width bins of the expected calibration error and the reliability diagram.
BINS = 15
# Scores are clipped this far from 0 and 1 before the logit: a float32 sigmoid saturates.
_EPSILON = 1e-7
# Folds of the out-of-fold "after" figure.
_FOLDS = 5


def logit(probabilities: np.ndarray) -> np.ndarray:
    """Log-odds of probabilities clipped to ``[1e-7, 1 - 1e-7]``."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), _EPSILON, 1.0 - _EPSILON)
    return np.log(p) - np.log1p(-p)


def _fit(labels: np.ndarray, probabilities: np.ndarray) -> tuple[float, float]:
    """Slope and intercept of the logistic regression of labels on logit scores (identity if unfit)."""
    if len(np.unique(labels)) < 2:
        return 1.0, 0.0
    # Imported here: only fitting needs scikit-learn, and the served model (which applies a stored
    # calibration) does not list it among its requirements.
    from sklearn.linear_model import LogisticRegression

    # Almost unpenalised: two parameters on hundreds of images need no shrinkage.
    regression = LogisticRegression(C=1e6, max_iter=1000).fit(logit(probabilities)[:, None], labels)
    slope, intercept = float(regression.coef_[0, 0]), float(regression.intercept_[0])
    # A slope <= 0 would reverse the ranking (it only happens when the scores carry no signal).
    return (slope, intercept) if slope > 0 else (1.0, 0.0)


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray, bins: int = BINS) -> float:
    """Expected calibration error: the image-weighted mean gap between confidence and frequency.

    Computed over ``bins`` equal-width bins of the probability of pneumonia (NaN without images).
    """
    labels, probabilities = np.asarray(labels, dtype=np.float64), np.asarray(probabilities, dtype=np.float64)
    if len(labels) == 0:
        return float("nan")
    which = np.minimum((probabilities * bins).astype(int), bins - 1)
    gap = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            gap += members.sum() * abs(probabilities[members].mean() - labels[members].mean())
    return float(gap / len(labels))


def reliability(labels: np.ndarray, probabilities: np.ndarray, bins: int = BINS) -> dict[str, np.ndarray]:
    """Per equal-width bin: mean probability, observed frequency of pneumonia, image count."""
    labels, probabilities = np.asarray(labels, dtype=np.float64), np.asarray(probabilities, dtype=np.float64)
    which = np.minimum((probabilities * bins).astype(int), bins - 1)
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore"):
        confidence = np.bincount(which, weights=probabilities, minlength=bins) / count
        frequency = np.bincount(which, weights=labels, minlength=bins) / count
    return {"confidence": confidence, "frequency": frequency, "count": count}


@dataclass(frozen=True)
class Calibration:
    """Platt scaling stored with a model: ``calibrated = sigmoid(slope * logit(p) + intercept)``.

    Attributes:
        slope: Multiplies the score's log-odds (> 0, so the ranking is kept; 1/temperature).
        intercept: Added to them (shifts for the prevalence the model was trained at).
        fitted_on: Which labelled scores it was fitted on, in words free of local paths.
        n_images: How many.
        ece_before: Expected calibration error of the raw scores there.
        ece_after: Expected calibration error after calibration there, out of fold.
    """

    slope: float
    intercept: float
    fitted_on: str
    n_images: int
    ece_before: float
    ece_after: float

    def apply(self, probabilities: np.ndarray | float) -> np.ndarray:
        """Calibrated probabilities of raw model scores."""
        return 1.0 / (1.0 + np.exp(-(self.slope * logit(probabilities) + self.intercept)))


def cross_fitted(labels: np.ndarray, probabilities: np.ndarray, seed: int = 0) -> np.ndarray:
    """Calibrated probabilities of each image from a calibration fitted on the other folds.

    Args:
        labels: 0/1 labels.
        probabilities: Raw scores.
        seed: Seed of the stratified fold split.
    """
    labels, probabilities = np.asarray(labels), np.asarray(probabilities, dtype=np.float64)
    folds = min(_FOLDS, int(np.bincount(labels, minlength=2).min()))
    if folds < 2:
        return probabilities.copy()
    from sklearn.model_selection import StratifiedKFold  # fitting only, as in _fit

    out = np.empty(len(labels))
    for train, held in StratifiedKFold(folds, shuffle=True, random_state=seed).split(probabilities, labels):
        slope, intercept = _fit(labels[train], probabilities[train])
        out[held] = 1.0 / (1.0 + np.exp(-(slope * logit(probabilities[held]) + intercept)))
    return out


def fit_calibration(labels: np.ndarray, probabilities: np.ndarray, fitted_on: str, seed: int = 0) -> Calibration:
    """Fit Platt scaling on labelled raw scores and measure it there (after: out of fold).

    Args:
        labels: 0/1 labels of images the model did not train on.
        probabilities: The model's raw scores of them.
        fitted_on: Which images, in words (stored with the model and shown in its card).
        seed: Seed of the out-of-fold split of the "after" figure.
    """
    labels = np.asarray(labels, dtype=np.int64)
    slope, intercept = _fit(labels, probabilities)
    return Calibration(
        slope=slope,
        intercept=intercept,
        fitted_on=fitted_on,
        n_images=int(len(labels)),
        ece_before=expected_calibration_error(labels, probabilities),
        ece_after=expected_calibration_error(labels, cross_fitted(labels, probabilities, seed)),
    )
