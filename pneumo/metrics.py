"""Clinical metrics and operating-threshold rules for a binary pneumonia classifier.

Every number the project reports about predictions (training's validation metrics, ``evaluate``,
``cv``, ``tune`` and registration) is computed here with scikit-learn, and every figure about
them is drawn by :mod:`pneumo.plots` from these numbers.
"""

from __future__ import annotations

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
