"""The ``evaluate`` entry point: clinical metrics, figures and a Grad-CAM error gallery for one model.

The model is opened from its MLflow URI; images are decoded with the model's own input size and
channels through the training pipeline, and predicted by the same function the server uses.
Everything is logged to a new run tagged with the evaluated model's run id. With
``register=true`` the model is registered (see :func:`pneumo.registry.register_evaluated`).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import mlflow
import numpy as np
import pandas as pd
from mlflow.entities import LoggedModelInput
from mlflow.tracking import MlflowClient

from pneumo import (
    CLASS_NAMES,
    calibration,
    gradcam,
    manifests,
    metrics,
    model_io,
    pipeline,
    plots,
    registry,
    serving,
    tracking,
    training,
)
from pneumo.config import DataConfig, EvalConfig, RunConfigs
from pneumo.contract import Figures, Lineage, SiteFigures
from pneumo.data import Manifest, ids_shared_with_training, patient_key, read_checked
from pneumo.errors import ConfigError, DataError
from pneumo.model_io import TrainedModel
from pneumo.preprocessing import decode_image

log = logging.getLogger(__name__)

EVALUATED_RUN_TAG = "pneumo.evaluated_run_id"
MODEL_URI_TAG = "pneumo.model_uri"
# Whether the evaluated images could be checked against the model's training split ("checked", or why not).
OVERLAP_TAG = "pneumo.training_overlap_check"
# Side of the gallery images: the originals at a size a reader can see, not the model's input.
_GALLERY_SIDE = 256


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
    trained = model_io.load_trained_model(config.model_uri or default_model_uri())
    threshold = trained.contract.threshold if config.threshold < 0 else float(config.threshold)
    with tracking.start_run(RunConfigs("evaluate", data, config, name=run_name(config))) as run:
        _log_evaluated_model(trained, config)
        manifest = manifests.resolve_manifest(data)
        manifests.log_manifest(manifest, context="evaluation")
        predicted = _predict_evaluated_split(trained, manifest, config.split, data.cache_dir, config.tta)
        site_threshold = _site_threshold(predicted, config) if config.calibrate else None  # refuses early
        scores = _log_metrics(trained, predicted, threshold, config.split)
        trust = _log_trust(trained, predicted, config.split)
        intervals = _log_intervals(predicted, threshold, config.split, config.bootstrap)
        _log_without_shared_ids(manifest, predicted, threshold, config.split)
        title = f"{_model_name(trained)} on {config.split} ({len(predicted.labels)} images)"
        _log_figures(trained, predicted, threshold, config.split, title)
        if data.patient_images and config.gallery_size > 0:
            _log_error_gallery(trained, predicted, threshold, manifest.data_dir, config.gallery_size, title)
        else:
            mlflow.set_tag("pneumo.gradcam", "no gallery: patient images are kept out of artifacts (patient_images)")
        if site_threshold is not None:
            _register_site_version(trained, predicted, site_threshold, config, manifest)
        decision = None
        if config.register:
            decision = registry.register_evaluated(
                trained,
                config.registered_name,
                _validation_scorer(trained, predicted, config, manifest, data),
                manifest.digest,
                manifest.split("val")["sha256"],
                registry.Floors(config.floor_sensitivity, config.floor_specificity, config.floor_roc_auc),
                _card_figures(predicted, threshold, intervals, config.split, trust),
            )
        summary = (
            f"{title}: ROC AUC {scores[f'{config.split}_roc_auc']:.4f}; at threshold {threshold:.3f} "
            f"sensitivity {scores[f'{config.split}_sensitivity_at_threshold']:.3f}, "
            f"specificity {scores[f'{config.split}_specificity_at_threshold']:.3f}."
        )
        if decision is not None:
            summary += f" Registered as {decision.model_uri} ({decision.alias or 'no alias'}: {decision.reason})."
        log.info("%s", summary)
        # The run's description in the UI, which was empty for evaluate runs.
        mlflow.set_tag("mlflow.note.content", summary)
        return run.info.run_id


def run_name(config: EvalConfig) -> str:
    """``evaluate-test-models:/pneumonia-classifier@champion[-register]``: the split and the model evaluated."""
    return "-".join(
        ["evaluate", config.split, config.model_uri or "latest-aug_cnn", *(["register"] if config.register else [])]
    )


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


@dataclass
class Predictions:
    """A model's probabilities of pneumonia for the decoded images of some manifest rows."""

    images: pipeline.ImageSet  # undecodable files left out
    probabilities: np.ndarray
    n_skipped: int = 0  # rows that could not be decoded

    @property
    def labels(self) -> np.ndarray:
        return self.images.labels


def predict_split(
    trained: TrainedModel, frame: pd.DataFrame, data_dir: Path, cache_dir: str, tta: bool = False
) -> Predictions:
    """Decode manifest rows with the model's input settings and predict them (optionally with TTA)."""
    images = pipeline.load_split(frame, data_dir, trained.contract.input_spec, cache_dir)
    return Predictions(
        images, model_io.predict_probabilities(trained.model, images.images, tta), len(frame) - len(images.labels)
    )


def _model_name(trained: TrainedModel) -> str:
    return f"{trained.contract.entry_point} ({(trained.run_id or '')[:8]})"


def _log_evaluated_model(trained: TrainedModel, config: EvalConfig) -> None:
    """Tag the run with the model evaluated, log it as the run's model input, and the input size and channels used.

    The model input makes the run page list the evaluated model under "Logged models", and the
    versions registered from it (by this run or another) under "Registered models": MLflow's UI
    finds both through the run's model inputs and outputs, while a version's ``run_id`` stays the
    run that trained it.
    """
    # Params keep the values as given (``mlflow run`` has logged them already); what was
    # actually used is logged next to them.
    spec = trained.contract.input_spec
    mlflow.log_params({"model_image_size": spec.image_size, "model_channels": spec.channels})
    mlflow.set_tags(
        {
            EVALUATED_RUN_TAG: trained.run_id or "",
            MODEL_URI_TAG: trained.uri,
            "pneumo.evaluated_entry_point": trained.contract.entry_point,
            "pneumo.threshold_source": "model" if config.threshold < 0 else "parameter",
        }
    )
    if trained.model_id:
        # The client's call: the fluent mlflow.log_inputs takes models on Databricks only.
        MlflowClient().log_inputs(mlflow.active_run().info.run_id, models=[LoggedModelInput(trained.model_id)])


def _predict_evaluated_split(
    trained: TrainedModel, manifest: Manifest, split: str, cache_dir: str, tta: bool = False
) -> Predictions:
    """Predict the split to evaluate, which must hold decodable images of both classes.

    Raises:
        DataError: The split is empty or lacks a class.
    """
    try:
        frame = manifest.split(split)
    except DataError as error:
        raise DataError(
            f"cannot evaluate split '{split}': {error}. Evaluate another split (split=val) or "
            f"point data_dir at a folder with {split}/NORMAL and {split}/PNEUMONIA."
        ) from error
    predicted = predict_split(trained, frame, manifest.data_dir, cache_dir, tta)
    present = np.unique(predicted.labels)
    if len(present) < 2:
        raise DataError(
            f"split '{split}' holds only {CLASS_NAMES[int(present[0])] if len(present) else 'no'} images "
            "that could be decoded; ROC and precision-recall need both classes"
        )
    return predicted


def _log_metrics(trained: TrainedModel, predicted: Predictions, threshold: float, split: str) -> dict[str, float]:
    """Log the clinical metrics at the threshold and at 0.5, counts, and overlap with training.

    The headline figures (:data:`pneumo.metrics.HEADLINE_METRICS`), ``threshold`` and
    ``n_images_seen_in_training`` are metrics; the rest go to the run's summary table.

    Returns:
        Every figure logged, by name.
    """
    scores = metrics.metrics_at_thresholds(predicted.labels, predicted.probabilities, threshold, split)
    headline, details = metrics.split_headline(scores, split)
    headline["threshold"] = threshold
    details.update({f"n_{split}_images": len(predicted.labels), "n_skipped_images": predicted.n_skipped})
    try:
        overlap = manifests.training_overlap(trained.run_id, predicted.images.frame["sha256"])
    except DataError as error:  # recorded, never silent: the figures cannot be vouched for
        log.warning("the evaluated images cannot be checked against the model's training split: %s", error)
        mlflow.set_tag(OVERLAP_TAG, f"not checked: {error}")
    else:
        # A metric, not a summary row: above 0 the figures are optimistic, and runs are sorted on it.
        headline["n_images_seen_in_training"] = overlap
        mlflow.set_tag(OVERLAP_TAG, "checked")
        if overlap:
            log.warning(
                "%d of the %d evaluated images were in the model's training split: the metrics are optimistic",
                overlap,
                len(predicted.labels),
            )
    tracking.log_metrics(headline)
    tracking.log_summary(details)
    return {**headline, **details}


def _log_trust(trained: TrainedModel, predicted: Predictions, split: str) -> dict[str, float]:
    """Log what the served answers would say about the split beyond the label: calibration and the input gate.

    ``<split>_ece`` (raw score) and ``<split>_ece_calibrated`` (as served), and the input gate's
    ``<split>_ood_pass_rate`` and ``n_<split>_uncertain`` (images the server would answer UNCERTAIN).
    """
    labels, probabilities, contract = predicted.labels, predicted.probabilities, trained.contract
    figures = {f"{split}_ece": calibration.expected_calibration_error(labels, probabilities)}
    if contract.calibration is not None:
        figures[f"{split}_ece_calibrated"] = calibration.expected_calibration_error(
            labels, contract.calibration.apply(probabilities)
        )
    if contract.input_gate is not None:
        passed = contract.input_gate.judge(predicted.images.images).passed
        figures |= {f"{split}_ood_pass_rate": float(passed.mean()), f"n_{split}_uncertain": int((~passed).sum())}
    else:
        mlflow.set_tag("pneumo.input_gate", "none: the model was logged before the input gate existed")
    tracking.log_summary(figures)
    return figures


def _log_intervals(predicted: Predictions, threshold: float, prefix: str, resamples: int) -> dict:
    """Log patient-grouped bootstrap 95% intervals of ROC AUC, sensitivity and specificity.

    Summary-table rows ``<prefix>_roc_auc_ci_low``/``_ci_high`` and
    ``<prefix>_{sensitivity,specificity}_at_threshold_ci_*``, and ``<prefix>_confidence_intervals.json``.
    With ``resamples`` 0 nothing is logged.
    """
    if resamples <= 0:
        return {}
    groups = patient_key(predicted.images.frame).to_numpy(str)
    intervals = metrics.bootstrap_intervals(predicted.labels, predicted.probabilities, threshold, groups, resamples)
    names = {"roc_auc": "roc_auc", "sensitivity": "sensitivity_at_threshold", "specificity": "specificity_at_threshold"}
    tracking.log_summary(
        {
            f"{prefix}_{names[metric]}_ci_{side}": bound
            for metric, (_, low, high) in intervals.items()
            for side, bound in (("low", low), ("high", high))
        }
    )
    payload = {
        "threshold": threshold,
        "confidence": 0.95,
        "method": f"percentile bootstrap over patients, {resamples} resamples",
        "n_images": int(len(groups)),
        "n_patients": int(len(set(groups))),
        **{metric: dict(zip(("estimate", "low", "high"), values)) for metric, values in intervals.items()},
    }
    tracking.log_json(payload, f"{prefix}_confidence_intervals.json")
    return intervals


def _log_without_shared_ids(manifest: Manifest, predicted: Predictions, threshold: float, split: str) -> None:
    """Log the split's metrics again without images whose patient id also occurs in the training folder.

    The dataset numbers patients per folder, so ``person102`` in test and in train may or may not be
    one child. Reporting both figures shows whether such possible repeats flatter the result:
    metrics ``<split>_excl_shared_ids_*``, and the counts ``n_<split>_shared_id_images`` and
    ``n_<split>_excl_shared_ids_images`` in the summary table.
    """
    if split not in ("test",):
        return
    shared = ids_shared_with_training(manifest.frame, predicted.images.frame)
    tracking.log_summary({f"n_{split}_shared_id_images": int(shared.sum())})
    keep = ~shared
    if shared.any() and len(np.unique(predicted.labels[keep])) == 2:
        subset = metrics.binary_metrics(predicted.labels[keep], predicted.probabilities[keep], threshold)
        tracking.log_metrics(
            {
                f"{split}_excl_shared_ids_roc_auc": subset["roc_auc"],
                f"{split}_excl_shared_ids_sensitivity_at_threshold": subset["sensitivity"],
                f"{split}_excl_shared_ids_specificity_at_threshold": subset["specificity"],
            }
        )
        tracking.log_summary({f"n_{split}_excl_shared_ids_images": int(keep.sum())})


def _card_figures(
    predicted: Predictions, threshold: float, intervals: dict, split: str, trust: dict[str, float]
) -> Figures | None:
    """The evaluated split's figures for the model card: only the official test split (another acquisition).

    With the calibration error and the input gate's pass rate there (``ece``, ``ece_calibrated``,
    ``ood_pass_rate``, from :func:`_log_trust`).
    """
    if split != "test":
        return None
    return Figures(
        on="the official test split's local half (another hospital's acquisition)",
        metrics=metrics.binary_metrics(predicted.labels, predicted.probabilities, threshold)
        | {key.removeprefix(f"{split}_"): value for key, value in trust.items() if key.startswith(f"{split}_")},
        intervals=intervals,
        n_images=int(len(predicted.labels)),
        n_patients=int(patient_key(predicted.images.frame).nunique()),
    )


def _site_threshold(predicted: Predictions, config: EvalConfig) -> float:
    """The threshold reaching ``site_sensitivity`` on the local sample.

    Raises:
        ConfigError: The sample has too few pneumonia images to show that sensitivity (see
            :func:`pneumo.metrics.positives_needed`).
    """
    positives = int(predicted.labels.sum())
    needed = metrics.positives_needed(config.site_sensitivity)
    if positives < needed:
        raise ConfigError(
            f"site calibration refused: the '{config.split}' sample has {positives} pneumonia images, but at least "
            f"{needed} are needed to show sensitivity >= {config.site_sensitivity} at 95% confidence (even "
            "catching every one of them); add labelled pneumonia images or lower site_sensitivity"
        )
    return metrics.threshold_for_sensitivity(predicted.labels, predicted.probabilities, config.site_sensitivity)


def _register_site_version(
    trained: TrainedModel, predicted: Predictions, threshold: float, config: EvalConfig, manifest: Manifest
) -> None:
    """Log the site-calibrated figures and register the model again, with the site threshold, under ``site_alias``."""
    intervals = _log_intervals(predicted, threshold, "site", max(config.bootstrap, 1000))
    tracking.log_metrics({"site_threshold": threshold})
    labels, probabilities = predicted.labels, predicted.probabilities
    groups = patient_key(predicted.images.frame)
    figures = Figures(
        on=f"the site sample (split '{config.split}'), in sample: the threshold was fitted to these images",
        metrics=metrics.binary_metrics(labels, probabilities, threshold),
        intervals=intervals,
        n_images=int(len(labels)),
        n_patients=int(groups.nunique()),
    )
    parent_figures = dataclasses.replace(
        figures,
        on="the site sample, at the parent's own threshold",
        metrics=metrics.binary_metrics(labels, probabilities, trained.contract.threshold),
        intervals={},
    )
    # The weights are the parent's, so its scores of the sample are already out of sample: the
    # calibration is refitted on them, as the threshold is.
    fitted = training.log_calibration(labels, probabilities, "the site sample (the parent's weights)", 0, "site")
    contract = trained.contract.derived(
        threshold=float(threshold),
        threshold_rule=f"site sample sensitivity >= {config.site_sensitivity}",
        calibration=fitted,
        run_id=mlflow.active_run().info.run_id,
        lineage=Lineage(
            method="site calibration",
            parent_uri=trained.uri,
            parent_version=registry.registered_version(trained.uri),
            parent_run_id=trained.run_id,
            site_manifest_digest=manifest.digest,
        ),
        site=SiteFigures(
            target_sensitivity=config.site_sensitivity,
            n_pneumonia=int(labels.sum()),
            figures=figures,
            parent_figures=parent_figures,
            details={"parent_threshold": trained.contract.threshold},
        ),
    )
    tracking.log_json(
        {"threshold": threshold, "target_sensitivity": config.site_sensitivity, "figures": dataclasses.asdict(figures)},
        "site_calibration.json",
    )
    registry.register_site_version(trained.model, contract, config.registered_name, config.site_alias)


def _log_figures(trained: TrainedModel, predicted: Predictions, threshold: float, split: str, title: str) -> None:
    """Log confusion matrices, ROC, precision-recall, calibration, threshold sweep and the predictions."""
    labels, probabilities, name = predicted.labels, predicted.probabilities, _model_name(trained)
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
    tracking.log_figure(plots.plot_roc(labels, probabilities, threshold, name, f"ROC: {title}"), "plots/roc_curve.png")
    tracking.log_figure(
        plots.plot_precision_recall(labels, probabilities, threshold, name, f"Precision-recall: {title}"),
        "plots/pr_curve.png",
    )
    scored = {f"{name}, raw score": probabilities}
    if trained.contract.calibration is not None:
        scored["calibrated (as served)"] = trained.contract.calibration.apply(probabilities)
    tracking.log_figure(plots.plot_calibration(labels, scored, f"Calibration: {title}"), "plots/calibration.png")
    tracking.log_figure(
        plots.plot_threshold_sweep(labels, probabilities, threshold, f"Sensitivity and specificity: {title}"),
        "plots/threshold_sweep.png",
    )
    tracking.log_dataframe(
        pd.DataFrame(
            {
                "file": predicted.images.frame["path"],
                "patient_id": predicted.images.frame["patient_id"],
                "true_label": [CLASS_NAMES[label] for label in labels],
                "probability": probabilities,
                "predicted_label": [CLASS_NAMES[int(p)] for p in probabilities >= threshold],
            }
        ).join(
            serving.answer_frame(trained.contract, predicted.images.images, probabilities)[
                ["label", "probability", "in_distribution", "ood_score"]
            ]
            .rename(columns={"label": "served_label", "probability": "served_probability"})
            .set_axis(predicted.images.frame.index)
        ),
        "predictions.csv",
    )


def _log_error_gallery(
    trained: TrainedModel, predicted: Predictions, threshold: float, data_dir: Path, count: int, title: str
) -> None:
    """Log the error gallery; tag ``pneumo.gradcam`` with ``on`` or why it has no heatmaps."""
    gallery, unavailable = error_gallery(trained, predicted, threshold, data_dir, count, title)
    tracking.log_figure(gallery, "plots/error_gallery.png")
    mlflow.set_tag("pneumo.gradcam", "unavailable: " + unavailable if unavailable else "on")


def error_gallery(
    trained: TrainedModel, predicted: Predictions, threshold: float, data_dir: Path, count: int, title: str
) -> tuple[plt.Figure, str | None]:
    """The most confident false negatives (top row) and false positives, with Grad-CAM overlaid.

    Grad-CAM explains the pneumonia score in both rows: for a false positive it shows what made
    the model call pneumonia, for a false negative where it saw the (too weak) signs of it. The
    "normal" class of a sigmoid model rarely has positive evidence of its own, so its map would
    mostly be blank. Computed on the model's own input, shown over the original image.

    Returns:
        The figure, and why no heatmap is shown (None when Grad-CAM was drawn).
    """
    errors = metrics.confident_errors(predicted.labels, predicted.probabilities, threshold, count)
    rows = dict(zip(("false negatives", "false positives"), errors))
    picked = np.concatenate(errors)
    try:
        subtitle = f"Grad-CAM of the pneumonia score on layer '{gradcam.target_layer(trained.model).name}'"
        heatmaps = list(gradcam.gradcam(trained.model, predicted.images.images[picked], 1))
        unavailable = None
    except gradcam.GradCamUnavailable as error:
        log.warning("error gallery without heatmaps: %s", error)
        unavailable, subtitle, heatmaps = str(error), f"no heatmaps: {error}", [None] * len(picked)
    heatmap_of = dict(zip(picked.tolist(), heatmaps))
    # Shown larger and in grey, but cropped and equalised as the model saw it, so heatmaps line up.
    gallery_spec = dataclasses.replace(trained.contract.input_spec, image_size=_GALLERY_SIDE, channels=1)
    frame = predicted.images.frame
    paths = frame["path"]
    tiles = {
        kind: [
            plots.GalleryImage(
                decode_image(read_checked(data_dir, paths.iloc[i], frame["sha256"].iloc[i]), gallery_spec)[..., 0],
                heatmap_of[i],
                f"{_wrapped_name(Path(paths.iloc[i]).name)}\n{kind[:-1]}: p={predicted.probabilities[i]:.3f}",
            )
            for i in indices.tolist()
        ]
        for kind, indices in rows.items()
    }
    return plots.plot_error_gallery(tiles, count, threshold, title, subtitle), unavailable


def _wrapped_name(name: str, width: int = 24) -> str:
    """A file name on as many lines as it needs: cut to a width, names lost their endings."""
    return "\n".join(name[i : i + width] for i in range(0, len(name), width))


def _validation_scorer(
    trained: TrainedModel, predicted: Predictions, config: EvalConfig, manifest: Manifest, data: DataConfig
) -> registry.Scorer:
    """Labels and probabilities of a model on this manifest's validation split, for registration."""

    def score(model: TrainedModel) -> tuple[np.ndarray, np.ndarray]:
        if model is trained and config.split == "val":  # already predicted
            return predicted.labels, predicted.probabilities
        on_val = predict_split(model, manifest.split("val"), manifest.data_dir, data.cache_dir)
        return on_val.labels, on_val.probabilities

    return score
