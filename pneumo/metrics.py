"""Clinical metrics and operating-threshold rules for a binary pneumonia classifier.

Every number the project reports about predictions (training's validation metrics, ``evaluate``,
``cv``, ``tune`` and registration) is computed here with scikit-learn, and every figure about
them is drawn by :mod:`pneumo.plots` from these numbers.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    roc_auc_score,
    roc_curve,
)

from pneumo import CLASS_NAMES


def threshold_for_sensitivity(labels: np.ndarray, probabilities: np.ndarray, target: float) -> float:
    """Highest threshold whose sensitivity (recall of pneumonia) is at least ``target``.

    The highest such threshold keeps specificity as high as the sensitivity target allows.

    Args:
        labels: True labels (1 = pneumonia).
        probabilities: Predicted probabilities of pneumonia.
        target: Wanted sensitivity in (0, 1].

    Returns:
        The threshold; predict pneumonia when ``probability >= threshold``.
    """
    if labels.sum() == 0:
        return 0.5
    _, tpr, thresholds = roc_curve(labels, probabilities, drop_intermediate=False)
    reaching = np.flatnonzero(tpr >= target)
    threshold = float(thresholds[reaching[0]])
    return float(min(threshold, 1.0))


def roc_auc(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """ROC AUC; NaN (undefined) when the labels hold only one class."""
    labels = np.asarray(labels).astype(int)
    return float(roc_auc_score(labels, probabilities)) if len(np.unique(labels)) == 2 else float("nan")


def binary_metrics(labels: np.ndarray, probabilities: np.ndarray, threshold: float) -> dict[str, float]:
    """Clinical metrics at one threshold, plus threshold-free AUCs and the Brier score.

    Returns:
        accuracy, roc_auc, pr_auc, sensitivity, specificity, ppv, npv, f1, brier, tp, fp, tn, fn.
    """
    labels = np.asarray(labels).astype(int)
    probabilities = np.asarray(probabilities, dtype=float)
    predicted = (probabilities >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(labels, predicted, labels=[0, 1]).ravel()

    def ratio(numerator: float, denominator: float) -> float:
        return float(numerator / denominator) if denominator else float("nan")

    both_classes = len(np.unique(labels)) == 2
    return {
        "accuracy": ratio(tp + tn, len(labels)),
        "roc_auc": roc_auc(labels, probabilities),
        "pr_auc": float(average_precision_score(labels, probabilities)) if both_classes else float("nan"),
        "sensitivity": ratio(tp, tp + fn),
        "specificity": ratio(tn, tn + fp),
        "ppv": ratio(tp, tp + fp),
        "npv": ratio(tn, tn + fn),
        "f1": float(f1_score(labels, predicted, zero_division=0)),
        "brier": float(brier_score_loss(labels, probabilities)),
        "tp": int(tp),
        "fp": int(fp),
        "tn": int(tn),
        "fn": int(fn),
    }


def metrics_at_thresholds(
    labels: np.ndarray, probabilities: np.ndarray, threshold: float, prefix: str
) -> dict[str, float]:
    """Metrics of one split at the operating threshold and at 0.5, named for MLflow.

    Threshold-free figures appear once (``<prefix>_roc_auc``, ``_pr_auc``, ``_brier``); the others
    twice, as ``<prefix>_<metric>_at_threshold`` and ``<prefix>_<metric>_at_0.5``.
    """
    metrics: dict[str, float] = {}
    for suffix, value in (("threshold", threshold), ("0.5", 0.5)):
        for name, number in binary_metrics(labels, probabilities, value).items():
            if name in ("roc_auc", "pr_auc", "brier"):
                metrics[f"{prefix}_{name}"] = number
            else:
                metrics[f"{prefix}_{name}_at_{suffix}"] = number
    return metrics


# The figures a training run keeps as metrics, to sort and compare runs on (``<prefix>_<name>``); the
# rest of metrics_at_thresholds (counts, accuracy and F1, everything at 0.5) goes to its summary table.
HEADLINE_METRICS = (
    "roc_auc",
    "pr_auc",
    "brier",
    "sensitivity_at_threshold",
    "specificity_at_threshold",
    "ppv_at_threshold",
    "npv_at_threshold",
)


def split_headline(scores: dict[str, float], prefix: str) -> tuple[dict[str, float], dict[str, float]]:
    """Split :func:`metrics_at_thresholds`' figures into the headline ones (:data:`HEADLINE_METRICS`) and the rest."""
    names = {f"{prefix}_{name}" for name in HEADLINE_METRICS}
    headline = {key: value for key, value in scores.items() if key in names}
    return headline, {key: value for key, value in scores.items() if key not in names}


def confusion_counts(labels: np.ndarray, probabilities: np.ndarray, threshold: float) -> dict:
    """Confusion matrix as a JSON-ready dict with class names and the threshold."""
    predicted = (np.asarray(probabilities) >= threshold).astype(int)
    matrix = confusion_matrix(np.asarray(labels).astype(int), predicted, labels=[0, 1])
    tn, fp, fn, tp = matrix.ravel()
    return {
        "class_names": list(CLASS_NAMES),
        "threshold": float(threshold),
        "matrix": matrix.tolist(),  # rows = true class, columns = predicted class
        "tn": int(tn),
        "fp": int(fp),
        "fn": int(fn),
        "tp": int(tp),
    }


def confident_errors(
    labels: np.ndarray, probabilities: np.ndarray, threshold: float, count: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the most confident false negatives (lowest probability first) and false positives."""
    predicted = probabilities >= threshold
    false_negatives = np.flatnonzero((labels == 1) & ~predicted)
    false_positives = np.flatnonzero((labels == 0) & predicted)
    return (
        false_negatives[np.argsort(probabilities[false_negatives], kind="stable")][:count],
        false_positives[np.argsort(-probabilities[false_positives], kind="stable")][:count],
    )


INTERVAL_METRICS = ("roc_auc", "sensitivity", "specificity")


def bootstrap_intervals(
    labels: np.ndarray,
    probabilities: np.ndarray,
    threshold: float,
    groups: np.ndarray,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, tuple[float, float, float]]:
    """Patient-grouped bootstrap intervals of ROC AUC, sensitivity and specificity.

    Images of one patient are correlated, so whole patients are resampled with replacement (a
    cluster bootstrap); resampling images would understate the spread. Each resample is a vector
    of patient multiplicities applied as weights, which equals duplicating the patients' images.

    Args:
        labels: True labels (1 = pneumonia).
        probabilities: Predicted probabilities of pneumonia.
        threshold: Operating threshold for sensitivity and specificity.
        groups: Patient id of each image.
        n_resamples: Bootstrap resamples.
        confidence: Two-sided coverage of the percentile interval.
        seed: Seed of the resampling.

    Returns:
        ``{metric: (point estimate, lower bound, upper bound)}`` for :data:`INTERVAL_METRICS`;
        bounds are NaN where a metric is undefined (e.g. no positives).
    """
    labels = np.asarray(labels).astype(int)
    probabilities = np.asarray(probabilities, dtype=float)
    _, patient = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    n_patients = patient.max() + 1 if len(patient) else 0
    predicted = probabilities >= threshold
    per_patient = {
        name: np.bincount(patient, weights=mask.astype(float), minlength=n_patients)
        for name, mask in {
            "tp": predicted & (labels == 1),
            "pos": labels == 1,
            "tn": ~predicted & (labels == 0),
            "neg": labels == 0,
        }.items()
    }
    both_classes = per_patient["pos"].sum() > 0 and per_patient["neg"].sum() > 0
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n_patients, np.full(n_patients, 1.0 / max(n_patients, 1)), size=n_resamples)
    samples: dict[str, list[float]] = {name: [] for name in INTERVAL_METRICS}
    with np.errstate(invalid="ignore", divide="ignore"):
        samples["sensitivity"] = (weights @ per_patient["tp"]) / (weights @ per_patient["pos"])
        samples["specificity"] = (weights @ per_patient["tn"]) / (weights @ per_patient["neg"])
    auc = np.full(n_resamples, np.nan)
    if both_classes:
        for i, row in enumerate(weights):
            image_weights = row[patient]
            kept = image_weights > 0
            if len(np.unique(labels[kept])) == 2:
                auc[i] = roc_auc_score(labels[kept], probabilities[kept], sample_weight=image_weights[kept])
    samples["roc_auc"] = auc
    point = {
        "roc_auc": float(roc_auc_score(labels, probabilities)) if both_classes else math.nan,
        "sensitivity": float(predicted[labels == 1].mean()) if (labels == 1).any() else math.nan,
        "specificity": float((~predicted[labels == 0]).mean()) if (labels == 0).any() else math.nan,
    }
    tail = (1.0 - confidence) / 2.0 * 100.0
    intervals = {}
    for name in INTERVAL_METRICS:
        values = np.asarray(samples[name], dtype=float)
        values = values[np.isfinite(values)]
        low, high = np.percentile(values, [tail, 100.0 - tail]) if len(values) else (math.nan, math.nan)
        intervals[name] = (point[name], float(low), float(high))
    return intervals


def positives_needed(target_sensitivity: float, confidence: float = 0.95) -> int:
    """Fewest positives for which catching every one demonstrates ``target_sensitivity``.

    With ``n`` positives all detected, the exact one-sided lower confidence bound of the
    sensitivity is ``(1 - confidence) ** (1 / n)``; it reaches the target only from
    ``n = ceil(log(1 - confidence) / log(target))`` on (the "rule of three": about
    ``3 / (1 - target)`` at 95%). With fewer, no threshold on that sample can show the target.
    """
    if not 0.0 < target_sensitivity < 1.0:
        raise ValueError(f"target_sensitivity must be in (0, 1), got {target_sensitivity}")
    return math.ceil(math.log(1.0 - confidence) / math.log(target_sensitivity))
