"""One function per training entry point; each runs inside its own MLflow run and returns its id."""

from __future__ import annotations

import logging

import mlflow

from pneumo import models, tracking
from pneumo.config import AugmentConfig, CNNConfig, DataConfig, DenseConfig, TrainConfig
from pneumo.training import train_model

log = logging.getLogger(__name__)


def run_prepare(data: DataConfig) -> str:
    """Entry point ``prepare``: write and log the split manifest; returns the run id."""
    with tracking.start_run("prepare", data) as run:
        tracking.prepare_manifest(data)
        return run.info.run_id


def run_baseline(data: DataConfig, train: TrainConfig, dense: DenseConfig) -> str:
    """Entry point ``baseline``: the notebook's dense network on oversampled training data."""
    with tracking.start_run("baseline", data, train, dense) as run:
        train_model(
            "baseline",
            lambda: models.build_dense(data.image_size, data.channels, dense.l2),
            data,
            train,
            configs={"data": data, "train": train, "dense": dense},
        )
        return run.info.run_id


def run_cnn(data: DataConfig, train: TrainConfig) -> str:
    """Entry point ``cnn``: the notebook's 3-block CNN without augmentation."""
    with tracking.start_run("cnn", data, train) as run:
        train_model(
            "cnn",
            lambda: models.build_notebook_cnn(data.image_size, data.channels),
            data,
            train,
            configs={"data": data, "train": train},
        )
        return run.info.run_id


def run_aug_cnn(data: DataConfig, train: TrainConfig, augment: AugmentConfig, cnn: CNNConfig) -> str:
    """Entry point ``aug_cnn``: the main job, a CNN with balanced batches and augmentation."""
    with tracking.start_run("aug_cnn", data, train, augment, cnn) as run:
        result = train_model(
            "aug_cnn",
            lambda: models.build_aug_cnn(data.image_size, data.channels, cnn),
            data,
            train,
            augment,
            configs={"data": data, "train": train, "augment": augment, "cnn": cnn},
        )
        log.info(
            "validation ROC AUC %.4f, sensitivity %.3f at threshold %.3f",
            result.val_metrics["val_roc_auc"],
            result.val_metrics["val_sensitivity_at_threshold"],
            result.threshold,
        )
        mlflow.set_tag(
            "mlflow.note.content",
            (
                f"Validation ROC AUC {result.val_metrics['val_roc_auc']:.4f}; at threshold {result.threshold:.3f}: "
                f"sensitivity {result.val_metrics['val_sensitivity_at_threshold']:.3f}, "
                f"specificity {result.val_metrics['val_specificity_at_threshold']:.3f}."
            ),
        )
        return run.info.run_id
