"""The ``evaluate`` entry point: clinical metrics, figures and a Grad-CAM error gallery for one model.

The model is opened from its MLflow URI; images are decoded with the model's own input size and
channels through the training pipeline, and predicted by the same function the server uses.
Everything is logged to a new run tagged with the evaluated model's run id. With
``register=true`` the model is registered and the ``champion``/``challenger`` aliases are set
from validation ROC AUC recomputed for both models on the same validation images.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import mlflow
import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient
from sklearn.metrics import roc_auc_score

from pneumo import CLASS_NAMES, gradcam, metrics, model_io, pipeline, plots, registry, tracking
from pneumo.config import DataConfig, EvalConfig
from pneumo.data import read_manifest, split_frame
from pneumo.errors import ConfigError, DataError
from pneumo.metrics import confident_errors
from pneumo.preprocessing import decode_file

log = logging.getLogger(__name__)

EVALUATED_RUN_TAG = "pneumo.evaluated_run_id"
MODEL_URI_TAG = "pneumo.model_uri"
# Side of the gallery images: the originals at a size a reader can see, not the model's input.
_GALLERY_SIDE = 256


def default_model_uri() -> str:
    """URI of the model of the newest finished ``aug_cnn`` run in the active experiment.

    Raises:
        ConfigError: There is no such run.
    """
    runs = mlflow.search_runs(
        filter_string=f"tags.`{tracking.ENTRY_POINT_TAG}` = 'aug_cnn' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
        output_format="list",
    )
    if not runs:
        raise ConfigError(
            "no finished aug_cnn run in the active experiment to evaluate; train one "
            "(mlflow run . -e aug_cnn) or pass model_uri=runs:/<run id>/model or models:/<name>@<alias>"
        )
    return f"runs:/{runs[0].info.run_id}/model"


def predict_split(
    trained: model_io.TrainedModel, frame: pd.DataFrame, data_dir: Path, cache_dir: str
) -> tuple[pipeline.ImageSet, np.ndarray]:
    """Decode manifest rows with the model's input settings and predict them.

    Returns:
        The decoded images (undecodable files left out) and their probabilities of pneumonia.
    """
    images = pipeline.load_split(frame, data_dir, trained.image_size, trained.channels, cache_dir)
    return images, model_io.predict_probabilities(trained.model, images.images)


def error_gallery(
    trained: model_io.TrainedModel,
    images: pipeline.ImageSet,
    probabilities: np.ndarray,
    threshold: float,
    data_dir: Path,
    count: int,
    title: str,
) -> tuple[plt.Figure, str | None]:
    """The most confident false negatives (top row) and false positives, with Grad-CAM overlaid.

    Grad-CAM explains the pneumonia score in both rows: for a false positive it shows what made
    the model call pneumonia, for a false negative where it saw the (too weak) signs of it. The
    "normal" class of a sigmoid model rarely has positive evidence of its own, so its map would
    mostly be blank. Computed on the model's own input, shown over the original image.

    Returns:
        The figure, and why no heatmap is shown (None when Grad-CAM was drawn).
    """
    rows = dict(
        zip(("false negatives", "false positives"), confident_errors(images.labels, probabilities, threshold, count))
    )
    picked = np.concatenate(list(rows.values()))
    try:
        subtitle = f"Grad-CAM of the pneumonia score on layer '{gradcam.target_layer(trained.model).name}'"
        heatmaps = list(gradcam.gradcam(trained.model, images.images[picked], 1))
        unavailable = None
    except gradcam.GradCamUnavailable as error:
        log.warning("error gallery without heatmaps: %s", error)
        unavailable, subtitle, heatmaps = str(error), f"no heatmaps: {error}", [None] * len(picked)
    heat = dict(zip(picked.tolist(), heatmaps))
    tiles = {
        kind: [
            plots.GalleryImage(
                # The originals at a size a reader can see, not the model's input.
                decode_file(str(data_dir / images.frame["path"].iloc[i]), _GALLERY_SIDE, 1)[..., 0],
                heat[i],
                f"{Path(images.frame['path'].iloc[i]).name[:26]}\n{kind[:-1]}: p={probabilities[i]:.3f}",
            )
            for i in indices.tolist()
        ]
        for kind, indices in rows.items()
    }
    return plots.plot_error_gallery(tiles, count, threshold, title, subtitle), unavailable


def _training_overlap(run_id: str | None, frame: pd.DataFrame) -> int | None:
    """How many evaluated images (by content hash) the model was trained on; None if unknown."""
    if not run_id:
        return None
    try:
        with tempfile.TemporaryDirectory() as folder:
            trained_on = read_manifest(MlflowClient().download_artifacts(run_id, tracking.MANIFEST_ARTIFACT, folder))
    except Exception as error:  # another tracking server, or a run without a manifest
        log.info("cannot check the evaluated images against the training manifest of run %s: %s", run_id, error)
        return None
    return int(frame["sha256"].isin(trained_on.loc[trained_on["split"] == "train", "sha256"]).sum())


def _val_roc_auc(
    trained: model_io.TrainedModel, val_frame: pd.DataFrame, data_dir: Path, cache_dir: str
) -> tuple[float, np.ndarray, np.ndarray]:
    """Validation ROC AUC of a model on the given validation rows, with labels and probabilities."""
    images, probabilities = predict_split(trained, val_frame, data_dir, cache_dir)
    return float(roc_auc_score(images.labels, probabilities)), images.labels, probabilities


def _register(
    trained: model_io.TrainedModel,
    model_uri: str,
    config: EvalConfig,
    manifest: pd.DataFrame,
    data_dir: Path,
    cache_dir: str,
    evaluated: tuple[np.ndarray, np.ndarray] | None,
) -> registry.Decision | None:
    """Register the model and set its alias from validation ROC AUC against the champion's.

    Args:
        evaluated: Labels and probabilities already computed on the validation split, if any.

    Returns:
        The decision, or None when this model (same run) already is the champion.
    """
    champion = registry.current_champion(config.registered_name)
    if champion is not None and trained.run_id and champion.run_id == trained.run_id:
        log.info(
            "run %s already is %s@%s (version %s); nothing registered",
            trained.run_id,
            config.registered_name,
            registry.CHAMPION,
            champion.version,
        )
        mlflow.set_tag("pneumo.registration", f"already champion (version {champion.version})")
        return None
    val_frame = split_frame(manifest, "val")
    if evaluated is not None:
        labels, probabilities = evaluated
        candidate_auc = float(roc_auc_score(labels, probabilities))
    else:
        candidate_auc, labels, probabilities = _val_roc_auc(trained, val_frame, data_dir, cache_dir)
    curves = {f"candidate ({trained.run_id[:8] if trained.run_id else model_uri})": (labels, probabilities)}
    champion_auc = None
    if champion is not None:
        champion_model = model_io.load_trained_model(f"models:/{config.registered_name}@{registry.CHAMPION}")
        champion_auc, champion_labels, champion_probabilities = _val_roc_auc(
            champion_model, val_frame, data_dir, cache_dir
        )
        curves[f"champion v{champion.version}"] = (champion_labels, champion_probabilities)
    decision = registry.register(
        f"models:/{trained.model_id}" if trained.model_id else model_uri,
        config.registered_name,
        candidate_auc,
        champion,
        champion_auc,
        tags={
            "val_roc_auc": f"{candidate_auc:.6f}",
            "manifest_digest": tracking.manifest_digest(manifest),
            "evaluation_run_id": mlflow.active_run().info.run_id,
        },
    )
    mlflow.log_metric("registration_candidate_val_roc_auc", candidate_auc)
    if champion_auc is not None:
        mlflow.log_metric("registration_champion_val_roc_auc", champion_auc)
    mlflow.set_tags({"pneumo.registered_version": decision.version, "pneumo.alias": decision.alias})
    tracking.log_json(
        {**decision.as_dict(), "manifest_digest": tracking.manifest_digest(manifest), "n_val_images": int(len(labels))},
        "registration.json",
    )
    tracking.log_figure(
        plots.plot_registration(curves, f"Registration: validation ROC ({decision.alias}: {decision.reason})"),
        "plots/registration_roc.png",
    )
    return decision


def evaluate(data: DataConfig, config: EvalConfig) -> str:
    """Entry point ``evaluate``: metrics, figures and a Grad-CAM gallery for a model; optional registration.

    The input size and channels come from the model; ``data.image_size`` and ``data.channels``
    are not used (the model's are logged as ``model_image_size`` and ``model_channels``).

    Args:
        data: Where the images are and which manifest splits them.
        config: Model URI, split, threshold and registration settings.

    Returns:
        The evaluation run's id.

    Raises:
        DataError: The split is empty or lacks a class.
        ConfigError: No model to evaluate.
    """
    model_uri = config.model_uri or default_model_uri()
    trained = model_io.load_trained_model(model_uri)
    threshold = trained.threshold if config.threshold < 0 else float(config.threshold)
    with tracking.start_run("evaluate", data, config) as run:
        # Params keep the values as given (``mlflow run`` has logged them already); what was
        # actually used is logged next to them.
        mlflow.log_params({"model_image_size": trained.image_size, "model_channels": trained.channels})
        mlflow.set_tags(
            {
                EVALUATED_RUN_TAG: trained.run_id or "",
                MODEL_URI_TAG: model_uri,
                "pneumo.evaluated_entry_point": str(trained.config.get("entry_point", "")),
                "pneumo.threshold_source": "model" if config.threshold < 0 else "parameter",
            }
        )
        manifest, data_dir = tracking.resolve_manifest(data, context="evaluation")
        try:
            frame = split_frame(manifest, config.split)
        except DataError as error:
            raise DataError(
                f"cannot evaluate split '{config.split}': {error}. Evaluate another split (split=val) or "
                f"point data_dir at a folder with {config.split}/NORMAL and {config.split}/PNEUMONIA."
            ) from error
        images, probabilities = predict_split(trained, frame, data_dir, data.cache_dir)
        labels = images.labels
        present = np.unique(labels)
        if len(present) < 2:
            raise DataError(
                f"split '{config.split}' holds only {CLASS_NAMES[int(present[0])] if len(present) else 'no'} images "
                "that could be decoded; ROC and precision-recall need both classes"
            )
        split = config.split
        scores = metrics.metrics_at_thresholds(labels, probabilities, threshold, split)
        scores.update(
            {"threshold": threshold, f"n_{split}_images": len(labels), "n_skipped_images": len(frame) - len(labels)}
        )
        overlap = _training_overlap(trained.run_id, images.frame)
        if overlap is not None:
            scores["n_images_seen_in_training"] = overlap
            if overlap:
                log.warning(
                    "%d of the %d evaluated images were in the model's training split: the metrics are optimistic",
                    overlap,
                    len(labels),
                )
        # NaN is logged too: "NPV undefined at 0.5 (nothing predicted normal)" is a finding.
        mlflow.log_metrics({k: float(v) for k, v in scores.items()})

        name = f"{trained.config.get('entry_point', 'model')} ({(trained.run_id or '')[:8]})"
        title = f"{name} on {split} ({len(labels)} images)"
        for suffix, value in (("threshold", threshold), ("0.5", 0.5)):
            tracking.log_figure(
                plots.plot_confusion_matrix(labels, probabilities, value, title), f"plots/confusion_matrix_{suffix}.png"
            )
        tracking.log_json(
            {
                "split": split,
                "at_threshold": metrics.confusion_counts(labels, probabilities, threshold),
                "at_0.5": metrics.confusion_counts(labels, probabilities, 0.5),
            },
            "confusion_matrix.json",
        )
        tracking.log_figure(
            plots.plot_roc(labels, probabilities, threshold, name, f"ROC: {title}"), "plots/roc_curve.png"
        )
        tracking.log_figure(
            plots.plot_precision_recall(labels, probabilities, threshold, name, f"Precision-recall: {title}"),
            "plots/pr_curve.png",
        )
        tracking.log_figure(
            plots.plot_calibration(labels, probabilities, name, f"Calibration: {title}"), "plots/calibration.png"
        )
        tracking.log_figure(
            plots.plot_threshold_sweep(labels, probabilities, threshold, f"Sensitivity and specificity: {title}"),
            "plots/threshold_sweep.png",
        )
        predicted = probabilities >= threshold
        tracking.log_dataframe(
            pd.DataFrame(
                {
                    "file": images.frame["path"],
                    "patient_id": images.frame["patient_id"],
                    "true_label": [CLASS_NAMES[label] for label in labels],
                    "probability": probabilities,
                    "predicted_label": [CLASS_NAMES[int(p)] for p in predicted],
                }
            ),
            "predictions.csv",
        )
        gallery, unavailable = error_gallery(
            trained, images, probabilities, threshold, data_dir, config.gallery_size, title
        )
        tracking.log_figure(gallery, "plots/error_gallery.png")
        mlflow.set_tag("pneumo.gradcam", "unavailable: " + unavailable if unavailable else "on")
        if config.register:
            _register(
                trained,
                model_uri,
                config,
                manifest,
                data_dir,
                data.cache_dir,
                (labels, probabilities) if split == "val" else None,
            )
        log.info(
            "%s: ROC AUC %.4f; at threshold %.3f sensitivity %.3f, specificity %.3f",
            title,
            scores[f"{split}_roc_auc"],
            threshold,
            scores[f"{split}_sensitivity_at_threshold"],
            scores[f"{split}_specificity_at_threshold"],
        )
        return run.info.run_id
