"""Fitting Keras models and logging everything about them to MLflow.

:func:`train_model` is the one training loop behind ``baseline``, ``cnn``, ``aug_cnn`` and each
``tune`` trial: balanced/augmented ``tf.data`` input, early stopping with the best weights
restored, a checkpoint of the best epoch, per-epoch metrics, then the validation threshold,
figures and the served model. ``resnet`` (head and fine-tuning) and ``cv`` (the refit) use its
parts: :func:`fit`, :func:`evaluate_validation` and :func:`log_outputs`.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import keras
import mlflow
import numpy as np
import pandas as pd
import tensorflow as tf

import pneumo.distribute as distribute
from pneumo import CLASS_NAMES, calibration, manifests, metrics, model_io, ood, pipeline, plots, runs, tracking
from pneumo.augmentation import build_augmenter
from pneumo.config import HIGHER_IS_BETTER, AugmentConfig, DataConfig, RunConfigs, TrainConfig
from pneumo.contract import Figures, ModelContract
from pneumo.data import patient_key
from pneumo.synthetic import synthetic_chests

log = logging.getLogger(__name__)
# Patient-grouped bootstrap resamples behind the validation intervals stored with every model.
VALIDATION_RESAMPLES = 2000
# What the validation figures and the calibration rest on, as the contract and the model card say it.
VALIDATION_ON = "validation split of the training hospital (patient-grouped)"


def bf16_supported() -> bool:
    """Whether this machine computes bfloat16 natively (a GPU, or a CPU with AVX512-BF16 or AMX)."""
    if tf.config.list_physical_devices("GPU"):
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def set_precision(precision: str) -> str:
    """Set Keras' global dtype policy (``TrainConfig.precision``); returns the policy name actually used."""
    policy = (
        "mixed_bfloat16" if precision == "mixed_bfloat16" or (precision == "auto" and bf16_supported()) else "float32"
    )
    keras.mixed_precision.set_global_policy(policy)
    return policy


def make_optimizer(
    config: TrainConfig, steps_per_epoch: int, learning_rate: float | None = None
) -> keras.optimizers.Optimizer:
    """The configured optimizer, with cosine decay over the planned steps when enabled."""
    rate: Any = learning_rate if learning_rate is not None else config.learning_rate
    if config.cosine_decay:
        rate = keras.optimizers.schedules.CosineDecay(
            rate, decay_steps=max(1, steps_per_epoch * config.epochs), alpha=0.05
        )
    ema = {"use_ema": config.ema, "ema_momentum": 0.99}
    optimizers = {
        "adam": lambda: keras.optimizers.Adam(rate, **ema),
        "adamw": lambda: keras.optimizers.AdamW(rate, weight_decay=1e-4, **ema),
        "rmsprop": lambda: keras.optimizers.RMSprop(rate, **ema),
        "sgd": lambda: keras.optimizers.SGD(rate, momentum=0.9, nesterov=True, **ema),
    }
    return optimizers[config.optimizer]()


def compile_model(
    model: keras.Model, optimizer: keras.optimizers.Optimizer, label_smoothing: float = 0.0
) -> keras.Model:
    """Compile for binary classification with accuracy, ROC AUC, precision and recall."""
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.BinaryCrossentropy(label_smoothing=label_smoothing),
        metrics=[
            keras.metrics.BinaryAccuracy(name="accuracy"),
            keras.metrics.AUC(name="auc", num_thresholds=500),
            keras.metrics.Precision(name="precision"),
            keras.metrics.Recall(name="recall"),
        ],
    )
    return model


def epoch_metric_key(name: str) -> str:
    """The MLflow key of a Keras epoch metric: ``val_auc`` -> ``auc/val``, ``auc`` -> ``auc/train``.

    MLflow's run page puts the charts of keys sharing a prefix before the last ``/`` in one
    section named by that prefix, so the training and validation curves of one quantity sit
    side by side (section ``auc``, charts ``train`` and ``val``) instead of far apart in one
    alphabetical list. The learning rate gets its own section, ``optimizer``.
    """
    if name == "learning_rate":
        return "optimizer/learning_rate"
    return f"{name.removeprefix('val_')}/val" if name.startswith("val_") else f"{name}/train"


class MlflowEpochLogger(keras.callbacks.Callback):
    """Log every Keras epoch metric (train and validation) and the learning rate (keys: :func:`epoch_metric_key`)."""

    def __init__(self, step_offset: int = 0):
        super().__init__()
        self.step_offset = step_offset

    def on_epoch_end(self, epoch, logs=None):
        scalars = {k: v for k, v in (logs or {}).items() if np.isscalar(v)}
        if "learning_rate" not in scalars and getattr(self.model, "optimizer", None) is not None:
            # Keras 3 evaluates the schedule (cosine decay) at the current step when this is read.
            scalars["learning_rate"] = float(np.asarray(self.model.optimizer.learning_rate))
        tracking.log_metrics({epoch_metric_key(k): v for k, v in scalars.items()}, step=self.step_offset + epoch)


@dataclass
class TrainResult:
    """What a training run produced: the model with its best weights, and its validation results."""

    model: keras.Model
    history: dict[str, list[float]]
    val_probabilities: np.ndarray  # aligned with the validation ImageSet's labels
    threshold: float  # chosen on validation for the target sensitivity
    val_metrics: dict[str, float]  # val_* at the threshold and at 0.5
    cross_validation: dict[str, float] | None = None  # cv's fold summary, stored in the contract

    def summary(self) -> str:
        """One line on the validation result (the run's note)."""
        metrics = self.val_metrics
        return (
            f"Validation ROC AUC {metrics['val_roc_auc']:.4f}; at threshold {self.threshold:.3f}: "
            f"sensitivity {metrics['val_sensitivity_at_threshold']:.3f}, "
            f"specificity {metrics['val_specificity_at_threshold']:.3f}."
        )


def fit(
    model: keras.Model,
    train_set: pipeline.Examples | pipeline.ImageSet,
    val_set: pipeline.Examples | pipeline.ImageSet,
    config: TrainConfig,
    augment: AugmentConfig | None,
    seed: int,
    checkpoint: Path,
    extra_callbacks: list[keras.callbacks.Callback] | None = None,
    step_offset: int = 0,
    prefix: str = "",
) -> dict[str, list[float]]:
    """Compile and fit ``model``; the best epoch's weights are saved to ``checkpoint`` and left in ``model``.

    Also adds the wall time, epochs run and training throughput to the run's summary table (names
    start with ``prefix``).

    Returns:
        Keras' history dict (one list per metric).
    """
    augmenter = build_augmenter(augment, seed) if augment is not None else None
    train_ds, steps = pipeline.train_dataset(
        train_set, config.batch_size, config.epochs, seed, config.balance == "oversample", augmenter
    )
    compile_model(model, make_optimizer(config, steps), config.label_smoothing)
    mode = "max" if HIGHER_IS_BETTER[config.monitor] else "min"
    # With EMA the averaged weights are swapped in before validation and the epoch-end callbacks,
    # so early stopping, the checkpoint and the logged model all see the averaged weights.
    callbacks = [
        *([keras.callbacks.SwapEMAWeights(swap_on_epoch=True)] if config.ema else []),
        keras.callbacks.EarlyStopping(config.monitor, mode=mode, patience=config.patience, restore_best_weights=True),
        keras.callbacks.ModelCheckpoint(str(checkpoint), monitor=config.monitor, mode=mode, save_best_only=True),
        MlflowEpochLogger(step_offset),
        runs.keras_callback(),  # a SIGTERM/SIGINT stops at the next batch
        *(extra_callbacks or []),
    ]
    class_weight = None
    if config.balance == "class_weight":
        counts = np.bincount(train_set.labels, minlength=2)
        class_weight = {c: len(train_set.labels) / (2.0 * max(1, counts[c])) for c in (0, 1)}
    started = time.perf_counter()
    history = model.fit(
        train_ds,
        epochs=config.epochs,
        steps_per_epoch=steps,
        validation_data=pipeline.eval_dataset(val_set, config.batch_size * 2),
        callbacks=callbacks,
        class_weight=class_weight,
        # The batches are already shuffled (and balanced) per epoch by the pipeline.
        shuffle=False,
        verbose=2,
    )
    seconds = time.perf_counter() - started
    epochs_run = len(history.history.get("loss", []))
    tracking.log_summary(
        {
            f"{prefix}fit_seconds": seconds,
            f"{prefix}epochs_run": epochs_run,
            f"{prefix}train_images_per_second": steps * config.batch_size * epochs_run / max(seconds, 1e-9),
        }
    )
    # The best epoch's weights: with EMA, fit() ends by writing the *last* average into the model.
    # No checkpoint means no epoch improved on the first (a NaN monitor): the final weights stay.
    if checkpoint.is_file():
        model.load_weights(checkpoint)
    return {k: [float(v) for v in values] for k, values in history.history.items()}


def evaluate_validation(
    model: keras.Model, val_set: pipeline.ImageSet, target_sensitivity: float
) -> tuple[np.ndarray, float, dict[str, float]]:
    """Predict the validation split, pick the threshold, and compute metrics at 0.5 and at it.

    Returns:
        The probabilities, the threshold, and the metrics (``val_*``, see
        :func:`pneumo.metrics.metrics_at_thresholds`).
    """
    probabilities = model_io.predict_probabilities(model, val_set.images)
    threshold = metrics.threshold_for_sensitivity(val_set.labels, probabilities, target_sensitivity)
    return probabilities, threshold, metrics.metrics_at_thresholds(val_set.labels, probabilities, threshold, "val")


@dataclass
class TrainingData:
    """The decoded training and validation images of a run, and the folder they were read from."""

    data_dir: Path
    train: pipeline.ImageSet
    val: pipeline.ImageSet


def load_training_data(config: DataConfig) -> TrainingData:
    """Resolve the manifest, log it to the active run, and decode the train and validation images."""
    manifest = manifests.resolve_manifest(config)
    manifests.log_manifest(manifest, context="training")
    train, val = (
        pipeline.load_split(manifest.split(split), manifest.data_dir, config.input_spec, config.cache_dir)
        for split in ("train", "val")
    )
    tracking.log_summary({"n_train_images": len(train.labels), "n_val_images": len(val.labels)})
    return TrainingData(manifest.data_dir, train, val)


def set_up_keras(seed: int, precision: str) -> str:
    """Seed Python, NumPy and TensorFlow, set the precision policy, and log it as ``dtype_policy``.

    Returns:
        The policy used.
    """
    keras.utils.set_random_seed(seed)
    policy = set_precision(precision)
    mlflow.log_param("dtype_policy", policy)
    return policy


def validation_figures(labels: np.ndarray, probabilities: np.ndarray, threshold: float, frame: pd.DataFrame) -> Figures:
    """The validation figures stored in the contract: metrics at the threshold, patient-grouped 95% intervals."""
    groups = patient_key(frame).to_numpy(str)
    return Figures(
        on=VALIDATION_ON,
        metrics=metrics.binary_metrics(labels, probabilities, threshold),
        intervals=metrics.bootstrap_intervals(labels, probabilities, threshold, groups, VALIDATION_RESAMPLES),
        n_images=int(len(labels)),
        n_patients=int(len(set(groups))),
    )


def log_outputs(configs: RunConfigs, result: TrainResult, data: TrainingData) -> ModelContract:
    """Log validation metrics, curves, confusion matrices, threshold, predictions and the served model.

    Returns:
        The contract logged with the model.
    """
    labels, probabilities, threshold = data.val.labels, result.val_probabilities, result.threshold
    headline, details = metrics.split_headline(result.val_metrics, "val")
    tracking.log_metrics({**headline, "threshold": threshold})
    tracking.log_summary(details)
    if result.history:
        monitored = result.history.get(configs.train.monitor, [])
        best = None
        if monitored and np.isfinite(monitored).any():
            pick = np.nanargmax if HIGHER_IS_BETTER[configs.train.monitor] else np.nanargmin
            best = int(pick(np.asarray(monitored, dtype=float))) + 1
        figure = plots.plot_history(result.history, configs.entry_point, best)
        tracking.log_figure(figure, "plots/training_curves.png")
    for name, cut in (("threshold", threshold), ("0.5", 0.5)):
        tracking.log_figure(
            plots.plot_confusion_matrix(labels, probabilities, cut, f"{configs.entry_point}: validation"),
            f"plots/confusion_matrix_val_{name}.png",
        )
    tracking.log_json(
        {
            "at_threshold": metrics.confusion_counts(labels, probabilities, threshold),
            "at_0.5": metrics.confusion_counts(labels, probabilities, 0.5),
        },
        "confusion_matrix_val.json",
    )
    rule = f"validation sensitivity >= {configs.train.target_sensitivity}"
    tracking.log_json({"threshold": threshold, "rule": rule}, "threshold.json")
    predictions = data.val.frame[["path", "patient_id", "label"]].assign(probability=probabilities)
    tracking.log_dataframe(predictions, "val_predictions.csv")
    figures = validation_figures(labels, probabilities, threshold, data.val.frame)
    tracking.log_summary(
        {
            f"val_{metric}_ci_{side}": bound
            for metric, (_, low, high) in figures.intervals.items()
            for side, bound in (("low", low), ("high", high))
        }
    )
    gate, fitted = fit_trust(labels, probabilities, data, configs.data.seed)
    trust = {"ece": fitted.ece_before, "ece_calibrated": fitted.ece_after, "ood_pass_rate": gate.validation_pass_rate}
    figures = dataclasses.replace(figures, metrics=figures.metrics | trust)
    contract = ModelContract(
        entry_point=configs.entry_point,
        input_spec=configs.data.input_spec,
        threshold=float(threshold),
        threshold_rule=rule,
        hyperparameters=configs.as_dict(),
        validation=figures,
        run_id=mlflow.active_run().info.run_id,
        code_version=tracking.code_version(),
        cross_validation=result.cross_validation,
        input_gate=gate,
        calibration=fitted,
    )
    model_io.log_model(result.model, contract)
    return contract


def fit_trust(
    labels: np.ndarray, probabilities: np.ndarray, data: TrainingData, seed: int
) -> tuple[ood.InputGate, calibration.Calibration]:
    """Fit the input gate (training images, limits on validation) and the calibration (validation scores).

    Logs ``val_ood_pass_rate`` and what :func:`log_calibration` logs for ``val``.
    """
    gate = ood.fit_gate(data.train.images, data.val.images)
    tracking.log_summary({"val_ood_pass_rate": gate.validation_pass_rate})
    return gate, log_calibration(labels, probabilities, VALIDATION_ON, seed, "val")


def log_calibration(
    labels: np.ndarray, probabilities: np.ndarray, fitted_on: str, seed: int, prefix: str
) -> calibration.Calibration:
    """Fit the calibration on labelled scores the model did not train on, and log how well it does.

    Logs ``<prefix>_ece`` (raw scores), ``<prefix>_ece_calibrated`` (out of fold) and the
    reliability diagram of both, ``plots/calibration_<prefix>.png``.

    Args:
        labels: 0/1 labels.
        probabilities: Raw scores of images the model did not train on (validation, or a site's
            out-of-fold scores).
        fitted_on: Which images, in words.
        seed: Seed of the out-of-fold split.
        prefix: Metric and file prefix (``val``, ``site``).
    """
    fitted = calibration.fit_calibration(labels, probabilities, fitted_on, seed)
    tracking.log_summary({f"{prefix}_ece": fitted.ece_before, f"{prefix}_ece_calibrated": fitted.ece_after})
    scored = {
        "raw score": probabilities,
        "calibrated (out of fold)": calibration.cross_fitted(labels, probabilities, seed),
    }
    tracking.log_figure(
        plots.plot_calibration(labels, scored, f"Calibration on {fitted_on} ({len(labels)} images)"),
        f"plots/calibration_{prefix}.png",
    )
    return fitted


def log_augmentation_grid(
    train_set: pipeline.ImageSet, augment: AugmentConfig, seed: int, patient_images: bool, count: int = 16
) -> None:
    """Log a grid of the same images before and after augmentation: training images, or synthetic chests.

    Args:
        train_set: The training images.
        augment: The augmentation ranges.
        seed: Seed of the picks and the augmentation.
        patient_images: Show training X-rays; otherwise synthetic chests of the same size, so the
            artifact holds no patient's pixels.
        count: Tiles in all (half originals, half augmented).
    """
    rng = np.random.default_rng(seed)
    shown = min(count // 2, len(train_set.labels))
    if patient_images:
        picks = rng.choice(len(train_set.labels), size=shown, replace=False)
        originals = train_set.images[picks].astype(np.float32)
        names = [CLASS_NAMES[label] for label in train_set.labels[picks]]
        title = "Training samples: originals (top) and augmented (bottom)"
    else:
        side, channels = train_set.images.shape[1], train_set.images.shape[3]
        originals = np.repeat(synthetic_chests(shown, side, seed), channels, axis=-1).astype(np.float32)
        names = ["synthetic"] * shown
        title = "Synthetic chests (no patient images): originals (top) and augmented (bottom)"
    augmented = np.asarray(build_augmenter(augment, seed)(originals, training=True))
    images = np.concatenate([originals, augmented])
    titles = [f"{n}\noriginal" for n in names] + [f"{n}\naugmented" for n in names]
    tracking.log_figure(plots.plot_image_grid(images, titles, title, columns=shown), "plots/augmented_samples.png")


def train_model(
    configs: RunConfigs,
    build: Callable[[], keras.Model],
    data: TrainingData | None = None,
    extra_callbacks: list[keras.callbacks.Callback] | None = None,
    tuning_trial: bool = False,
) -> TrainResult:
    """Train a Keras model end to end inside the active MLflow run.

    Args:
        configs: The run's configs: ``data`` and ``train`` settings; with an ``AugmentConfig`` the
            training batches are augmented. All of them are saved with the model.
        build: Returns a fresh uncompiled model (called after the precision policy is set).
        data: Already decoded images, to share one decode between tuning trials; None = load them.
        extra_callbacks: More Keras callbacks (e.g. Optuna pruning).
        tuning_trial: A tuning trial: it logs its metrics only (no figures, threshold, predictions
            or model).

    Returns:
        The trained model and its validation results.
    """
    set_up_keras(configs.data.seed, configs.train.precision)
    data = data or load_training_data(configs.data)
    if configs.augment is not None and not tuning_trial:
        log_augmentation_grid(data.train, configs.augment, configs.data.seed, configs.data.patient_images)
    strategy = distribute.choose_strategy(configs.train.distribute)
    train = distribute.global_batch(configs.train, strategy)
    if not tuning_trial:
        mlflow.log_params({"replicas": strategy.num_replicas_in_sync, "global_batch_size": train.batch_size})
    with tempfile.TemporaryDirectory() as folder, strategy.scope():  # variables made in scope are mirrored
        model = build()
        history = fit(
            model,
            data.train,
            data.val,
            train,
            configs.augment,
            configs.data.seed,
            Path(folder) / "best.keras",
            extra_callbacks,
        )
        probabilities, threshold, val_metrics = evaluate_validation(model, data.val, configs.train.target_sensitivity)
        result = TrainResult(model, history, probabilities, threshold, val_metrics)
        if not tuning_trial:
            log_outputs(configs, result, data)
    return result
