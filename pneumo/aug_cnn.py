"""Entry point ``aug_cnn``: the main job, a CNN on class-balanced, augmented batches with a chosen threshold."""

from __future__ import annotations

import logging

import mlflow

from pneumo import models, tracking
from pneumo.config import AugmentConfig, CNNConfig, DataConfig, TrainConfig
from pneumo.training import train_model

log = logging.getLogger(__name__)


def aug_cnn(data: DataConfig, train: TrainConfig, augment: AugmentConfig, cnn: CNNConfig) -> str:
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
