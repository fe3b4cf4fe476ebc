"""Metrics, operating thresholds and figures, computed with scikit-learn and drawn with matplotlib."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: training runs on servers

import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import (
    ConfusionMatrixDisplay,
    average_precision_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    roc_auc_score,
    roc_curve,
)

from pneumo import CLASS_NAMES

DISPLAY_NAMES = ("Normal", "Pneumonia")


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
        "roc_auc": float(roc_auc_score(labels, probabilities)) if both_classes else float("nan"),
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


def plot_confusion_matrix(labels: np.ndarray, probabilities: np.ndarray, threshold: float, title: str) -> plt.Figure:
    """Labelled heatmap of the confusion matrix (Normal/Pneumonia), as in the seed notebook."""
    predicted = (np.asarray(probabilities) >= threshold).astype(int)
    figure, axis = plt.subplots(figsize=(4.8, 4.2))
    ConfusionMatrixDisplay.from_predictions(
        np.asarray(labels).astype(int),
        predicted,
        labels=[0, 1],
        display_labels=DISPLAY_NAMES,
        cmap="Blues",
        colorbar=False,
        ax=axis,
    )
    axis.set_title(f"{title}\nthreshold {threshold:.3f}")
    figure.tight_layout()
    return figure


def plot_history(history: dict[str, list[float]], title: str) -> plt.Figure:
    """Training curves: accuracy, loss and ROC AUC, train against validation, per epoch."""
    keys = [k for k in ("accuracy", "loss", "auc") if k in history]
    figure, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.6), squeeze=False)
    for axis, key in zip(axes[0], keys):
        epochs = np.arange(1, len(history[key]) + 1)
        axis.plot(epochs, history[key], marker="o", label="train")
        if f"val_{key}" in history:
            axis.plot(epochs, history[f"val_{key}"], marker="o", label="validation")
        axis.set_xlabel("epoch")
        axis.set_ylabel(key)
        axis.set_title(key)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def plot_class_distribution(manifest, title: str = "Images per class and split") -> plt.Figure:
    """Bar chart of image counts per class for each split (the notebook's first plot)."""
    counts = manifest.groupby(["split", "label_name"]).size().unstack(fill_value=0)
    counts = counts.reindex([s for s in ("train", "val", "test") if s in counts.index])
    counts = counts.reindex(columns=list(CLASS_NAMES), fill_value=0)
    figure, axis = plt.subplots(figsize=(6, 4))
    counts.plot.bar(ax=axis, color=["#4c72b0", "#dd8452"], rot=0)
    for container in axis.containers:
        axis.bar_label(container)
    axis.set_xlabel("split")
    axis.set_ylabel("images")
    axis.set_title(title)
    figure.tight_layout()
    return figure


def plot_image_grid(images: np.ndarray, titles: list[str], title: str, columns: int = 8) -> plt.Figure:
    """Show uint8 or 0..255 float images in a grid (e.g. augmented training samples)."""
    rows = int(np.ceil(len(images) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(1.8 * columns, 2.0 * rows), squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    for axis, image, label in zip(axes.ravel(), images, titles):
        image = np.clip(np.asarray(image, dtype=np.float32), 0, 255).astype(np.uint8)
        axis.imshow(image.squeeze(-1) if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=255)
        axis.set_title(label, fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    return figure
