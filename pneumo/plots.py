"""Every figure the project logs, drawn with matplotlib on the headless Agg backend.

Functions here only draw: they take numbers (from :mod:`pneumo.metrics`), images and curves, and
return a figure; callers log it with :func:`pneumo.tracking.log_figure`, which closes it.
"""

from __future__ import annotations

import math
import textwrap
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator
from PIL import Image
from sklearn.calibration import CalibrationDisplay
from sklearn.metrics import ConfusionMatrixDisplay, PrecisionRecallDisplay, RocCurveDisplay, roc_curve

from pneumo import CLASS_NAMES
from pneumo.calibration import expected_calibration_error
from pneumo.metrics import binary_metrics

if TYPE_CHECKING:
    import optuna

# Headless, as figures are drawn on servers. The one place the backend is chosen: it switches even
# with pyplot imported, as long as no figure is open.
matplotlib.use("Agg")

DISPLAY_NAMES = ("Normal", "Pneumonia")


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


def plot_history(history: dict[str, list[float]], title: str, best_epoch: int | None = None) -> plt.Figure:
    """Training curves: accuracy, loss and ROC AUC, train against validation, per epoch.

    Args:
        history: Keras' history (``loss``, ``val_loss``, ...), one value per epoch.
        title: The figure's title.
        best_epoch: The kept epoch (1-based), marked on every panel; None marks none.
    """
    keys = [k for k in ("accuracy", "loss", "auc") if k in history]
    figure, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.8), squeeze=False)
    for axis, key in zip(axes[0], keys):
        epochs = np.arange(1, len(history[key]) + 1)
        axis.plot(epochs, history[key], marker="o", label="train")
        if f"val_{key}" in history:
            axis.plot(epochs, history[f"val_{key}"], marker="o", label="validation")
        if best_epoch is not None:
            axis.axvline(best_epoch, color="crimson", linestyle="--", linewidth=1, label=f"kept: epoch {best_epoch}")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        axis.set_xlabel("epoch")
        axis.set_ylabel(key)
        axis.set_title(key)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def _wrapped(title: str, width: int = 48) -> str:
    """A title broken into lines that fit a single-panel figure (long model names were clipped)."""
    return "\n".join(textwrap.fill(line, width) for line in title.split("\n"))


def plot_class_distribution(manifest: pd.DataFrame, title: str = "Images per class and split") -> plt.Figure:
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
    # Room above each tile for a two-line caption, so captions never sit on the image above.
    figure, axes = plt.subplots(rows, columns, figsize=(1.8 * columns, 2.4 * rows), squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    for axis, image, label in zip(axes.ravel(), images, titles):
        image = np.clip(np.asarray(image, dtype=np.float32), 0, 255).astype(np.uint8)
        axis.imshow(image.squeeze(-1) if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=255)
        axis.set_title(label, fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def _mark_thresholds(
    axis: plt.Axes,
    labels: np.ndarray,
    probabilities: np.ndarray,
    threshold: float,
    position: Callable[[dict[str, float]], tuple[float, float]],
    describe: Callable[[dict[str, float]], str],
) -> None:
    """Mark the operating threshold (red circle) and 0.5 (grey square) on a curve, where defined.

    ``position`` and ``describe`` turn the metrics at a threshold into the point and its legend.
    """
    for value, marker, colour in ((threshold, "o", "crimson"), (0.5, "s", "dimgray")):
        point = binary_metrics(labels, probabilities, value)
        x, y = position(point)
        if math.isfinite(x) and math.isfinite(y):  # e.g. no precision when nothing is predicted positive
            axis.plot(x, y, marker, color=colour, markersize=9, label=f"threshold {value:.3f}: {describe(point)}")


def plot_roc(labels: np.ndarray, probabilities: np.ndarray, threshold: float, name: str, title: str) -> plt.Figure:
    """ROC curve (scikit-learn's display) with the operating threshold and 0.5 marked."""
    figure, axis = plt.subplots(figsize=(5.2, 5.0))
    RocCurveDisplay.from_predictions(labels, probabilities, name=name, ax=axis, plot_chance_level=True)
    _mark_thresholds(
        axis,
        labels,
        probabilities,
        threshold,
        lambda p: (1 - p["specificity"], p["sensitivity"]),
        lambda p: f"sens {p['sensitivity']:.3f}, spec {p['specificity']:.3f}",
    )
    axis.set_xlabel("1 - specificity (false positive rate)")
    axis.set_ylabel("sensitivity (true positive rate)")
    axis.set_title(_wrapped(title), fontsize=10)
    axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    return figure


def plot_precision_recall(
    labels: np.ndarray, probabilities: np.ndarray, threshold: float, name: str, title: str
) -> plt.Figure:
    """Precision-recall curve (scikit-learn's display) with the operating threshold and 0.5 marked."""
    figure, axis = plt.subplots(figsize=(5.2, 5.0))
    PrecisionRecallDisplay.from_predictions(labels, probabilities, name=name, ax=axis, plot_chance_level=True)
    _mark_thresholds(
        axis,
        labels,
        probabilities,
        threshold,
        lambda p: (p["sensitivity"], p["ppv"]),
        lambda p: f"recall {p['sensitivity']:.3f}, precision {p['ppv']:.3f}",
    )
    axis.set_xlabel("recall (sensitivity)")
    axis.set_ylabel("precision (PPV)")
    axis.set_title(_wrapped(title), fontsize=10)
    axis.legend(loc="lower left", fontsize=8)
    figure.tight_layout()
    return figure


def plot_calibration(labels: np.ndarray, scored: dict[str, np.ndarray], title: str) -> plt.Figure:
    """Reliability diagrams (quantile bins) of one or more scorings, above a histogram of the last.

    Args:
        labels: 0/1 labels.
        scored: ``{name: probabilities}``, e.g. the raw score and the calibrated one; each curve's
            legend gives its expected calibration error (:func:`pneumo.calibration.expected_calibration_error`).
        title: Figure title.
    """
    figure, (curve, histogram) = plt.subplots(2, 1, figsize=(5.2, 6.4), height_ratios=(3, 1.3), sharex=True)
    # Quantile bins hold equally many images: the probabilities of a trained model crowd near 0 and 1.
    bins = int(np.clip(len(labels) // 20, 3, 10))
    for name, probabilities in scored.items():
        ece = expected_calibration_error(labels, probabilities)
        CalibrationDisplay.from_predictions(
            labels, probabilities, n_bins=bins, strategy="quantile", name=f"{name} (ECE {ece:.3f})", ax=curve
        )
    curve.set_title(_wrapped(title), fontsize=10)
    curve.set_xlabel("")
    curve.set_ylabel("observed share with pneumonia")
    curve.legend(loc="upper left", fontsize=8)
    last_name, last = list(scored.items())[-1]
    for label, colour in ((0, "#4c72b0"), (1, "#dd8452")):
        histogram.hist(
            last[labels == label], bins=20, range=(0, 1), alpha=0.6, color=colour, label=DISPLAY_NAMES[label]
        )
    histogram.set_xlabel(f"probability of pneumonia ({last_name})")
    histogram.set_ylabel("images")
    histogram.legend(fontsize=8)
    figure.tight_layout()
    return figure


def plot_threshold_sweep(labels: np.ndarray, probabilities: np.ndarray, threshold: float, title: str) -> plt.Figure:
    """Sensitivity and specificity against the decision threshold, operating point and 0.5 marked."""
    fpr, tpr, thresholds = roc_curve(labels, probabilities, drop_intermediate=False)
    thresholds = np.clip(thresholds, 0.0, 1.0)  # the first is +inf: "predict nothing positive"
    figure, axis = plt.subplots(figsize=(6.0, 4.2))
    axis.step(thresholds, tpr, where="post", label="sensitivity")
    axis.step(thresholds, 1 - fpr, where="post", label="specificity")
    axis.axvline(threshold, color="crimson", linestyle="--", label=f"operating threshold {threshold:.3f}")
    axis.axvline(0.5, color="dimgray", linestyle=":", label="0.5")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1.02)
    axis.set_xlabel("threshold on the probability of pneumonia")
    axis.set_ylabel("rate")
    axis.set_title(_wrapped(title, 60), fontsize=10)
    axis.grid(alpha=0.3)
    # Below the axes: inside, the legend covered the specificity curve.
    axis.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    figure.tight_layout()
    return figure


def plot_registration(curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str) -> plt.Figure:
    """ROC curves of the candidate and the champion on the same validation images."""
    figure, axis = plt.subplots(figsize=(5.2, 5.0))
    for name, (labels, probabilities) in curves.items():
        RocCurveDisplay.from_predictions(labels, probabilities, name=name, ax=axis)
    axis.plot([0, 1], [0, 1], "k:", linewidth=1)
    axis.set_title(_wrapped(title), fontsize=10)
    axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    return figure


def plot_scores_by_class(
    labels: np.ndarray, scores: dict[str, np.ndarray], thresholds: dict[str, float], title: str
) -> plt.Figure:
    """Histograms of each model's probabilities, normal and pneumonia apart, with its threshold marked."""
    figure, axes = plt.subplots(1, len(scores), figsize=(5.0 * len(scores), 3.8), sharey=True, squeeze=False)
    for axis, (name, values) in zip(axes[0], scores.items()):
        for label, colour in ((0, "#4c72b0"), (1, "#dd8452")):
            axis.hist(
                values[labels == label], bins=25, range=(0, 1), alpha=0.6, color=colour, label=DISPLAY_NAMES[label]
            )
        axis.axvline(thresholds[name], color="crimson", linestyle="--", label=f"threshold {thresholds[name]:.3f}")
        axis.set_title(name)
        axis.set_xlabel("probability of pneumonia")
        axis.legend(fontsize=8)
    axes[0][0].set_ylabel("images")
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def plot_learning_curve(points: list[dict], target_sensitivity: float) -> plt.Figure:
    """Out-of-fold ROC AUC and specificity at the target sensitivity against the number of site images."""
    figure, axis = plt.subplots(figsize=(6.0, 4.2))
    n = [point["n_images"] for point in points]
    axis.plot(n, [point["oof_roc_auc"] for point in points], marker="o", label="out-of-fold ROC AUC")
    axis.plot(
        n,
        [point["oof_specificity_at_sensitivity"] for point in points],
        marker="s",
        label=f"out-of-fold specificity at sensitivity >= {target_sensitivity}",
    )
    axis.set_xlabel("labelled site images")
    axis.set_ylabel("figure")
    axis.set_ylim(0, 1.02)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="lower right")
    axis.set_title("How many images to label: adapt's learning curve")
    figure.tight_layout()
    return figure


@dataclass
class GalleryImage:
    """One tile of the error gallery."""

    picture: np.ndarray  # the original, uint8 (side, side) grayscale
    heatmap: np.ndarray | None  # Grad-CAM in [0, 1] at any resolution; None = not available
    caption: str


def _resize(heatmap: np.ndarray, side: int) -> np.ndarray:
    return np.asarray(
        Image.fromarray(heatmap.astype(np.float32), mode="F").resize((side, side), Image.Resampling.BILINEAR)
    )


def plot_error_gallery(
    rows: dict[str, list[GalleryImage]], columns: int, threshold: float, title: str, subtitle: str
) -> plt.Figure:
    """Rows of error images (e.g. ``false negatives``, ``false positives``), heatmaps overlaid.

    Args:
        rows: Row name (plural) -> its tiles, at most ``columns`` each.
        columns: Tiles per row.
        threshold: The threshold the errors were made at (shown for an empty row).
        title: First line of the title.
        subtitle: What the heatmaps show, or why there are none.
    """
    columns = max(columns, 1)
    figure, axes = plt.subplots(len(rows), columns, figsize=(2.6 * columns, 3.1 * len(rows)), squeeze=False)
    for row, (kind, tiles) in enumerate(rows.items()):
        for axis in axes[row]:
            axis.axis("off")
        if not tiles:
            axes[row][0].text(0.0, 0.5, f"no {kind}\nat threshold {threshold:.3f}", fontsize=10, va="center")
        for axis, tile in zip(axes[row], tiles):
            axis.imshow(tile.picture, cmap="gray", vmin=0, vmax=255)
            note = ""
            if tile.heatmap is not None:
                heat = _resize(tile.heatmap, tile.picture.shape[0])
                # Opacity follows the heat, so regions that did not matter stay readable.
                overlay = matplotlib.colormaps["jet"](heat)
                overlay[..., 3] = 0.6 * heat
                axis.imshow(overlay)
                note = " (no pneumonia evidence)" if tile.heatmap.max() == 0 else ""
            axis.set_title(f"{tile.caption}{note}", fontsize=7)
    # About 30 characters a column fit; the title used to run off both sides of a narrow gallery.
    figure.suptitle(
        _wrapped(f"{title}\nmost confident errors at threshold {threshold:.3f}; {subtitle}", 30 * columns),
        fontsize=9,
    )
    figure.tight_layout()
    if any(tile.heatmap is not None for tiles in rows.values() for tile in tiles):
        figure.subplots_adjust(right=0.8)  # room for the colour bar and its label beside the tiles
        scale = matplotlib.cm.ScalarMappable(norm=matplotlib.colors.Normalize(0, 1), cmap="jet")
        figure.colorbar(scale, cax=figure.add_axes([0.83, 0.15, 0.025, 0.6]), label="Grad-CAM (relative)")
    return figure


def plot_folds(histories: list[dict[str, list[float]]], scores: dict[str, np.ndarray], title: str) -> plt.Figure:
    """Per-fold training loss and accuracy by epoch, and each fold's held-out scores, under ``title``."""
    figure, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for number, history in enumerate(histories, start=1):
        epochs = np.arange(1, len(history["loss"]) + 1)
        axes[0].plot(epochs, history["loss"], marker="o", label=f"fold {number}")
        axes[1].plot(epochs, history["accuracy"], marker="o", label=f"fold {number}")
    for axis, name in zip(axes[:2], ("training loss", "training accuracy")):
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_title(name)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    positions = np.arange(1, len(histories) + 1)
    for offset, (name, values) in zip((-0.2, 0.2), scores.items()):
        axes[2].bar(positions + offset, values, width=0.4, label=f"{name} (mean {values.mean():.3f})")
    axes[2].set_xticks(positions)
    axes[2].set_xlabel("fold")
    axes[2].set_ylim(0, 1)
    axes[2].set_title("held-out fold scores")
    axes[2].legend(fontsize=7, loc="lower right")
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def plot_study(study: optuna.Study) -> tuple[dict[str, plt.Figure], list[str]]:
    """Optuna's plots of a study, drawn with matplotlib, as far as the study supports them.

    Returns:
        ``{name: figure}`` (names as in ``plots/optuna_<name>.png``), and one line per plot the
        study cannot support yet (parameter importances need two completed trials), saying why.
    """
    # Imported here: only tune draws these, and Optuna's visualisation is slow to import.
    from optuna.exceptions import ExperimentalWarning
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as ovm

    completed = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    reported = any(t.intermediate_values for t in study.get_trials(deepcopy=False))
    plots: list[tuple[str, Callable[[optuna.Study], Any], bool, str]] = [
        ("optimization_history", ovm.plot_optimization_history, completed >= 1, "no completed trial"),
        ("param_importances", ovm.plot_param_importances, completed >= 2, f"{completed} completed trial(s), need 2"),
        ("parallel_coordinate", ovm.plot_parallel_coordinate, completed >= 1, "no completed trial"),
        ("slice", ovm.plot_slice, completed >= 1, "no completed trial"),
        ("intermediate_values", ovm.plot_intermediate_values, reported, "no per-epoch values reported"),
    ]
    figures, skipped = {}, []
    for name, plot, possible, reason in plots:
        if not possible:
            skipped.append(f"{name}: {reason}")
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                figure = np.atleast_1d(plot(study)).flat[0].figure
        except (ValueError, RuntimeError, ZeroDivisionError) as error:
            # e.g. importances when every completed trial has the same value
            plt.close("all")
            skipped.append(f"{name}: {error}")
            continue
        # One panel or axis per parameter: widen; their colour bars do not support tight_layout.
        if name == "slice":
            figure.set_size_inches(max(8.0, 3.0 * len(study.best_trial.params)), 3.5)
        elif name == "parallel_coordinate":
            figure.set_size_inches(12.0, 6.0)
        else:
            figure.tight_layout()
        figures[name] = figure
    return figures, skipped
