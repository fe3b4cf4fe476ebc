"""Entry point ``aug_cnn``: the main job, a CNN on class-balanced, augmented batches with a chosen threshold."""

from __future__ import annotations

import logging

import mlflow

from pneumo import models, tracking
from pneumo.config import AugmentConfig, CNNConfig, DataConfig, RunConfigs, TrainConfig
from pneumo.training import train_model

log = logging.getLogger(__name__)


def aug_cnn(data: DataConfig, train: TrainConfig, augment: AugmentConfig, cnn: CNNConfig) -> str:
    """Entry point ``aug_cnn``: the main job, a CNN with balanced batches and augmentation."""
    configs = RunConfigs("aug_cnn", data, train, augment, cnn)
    with tracking.start_run(configs) as run:
        result = train_model(configs, lambda: models.build_aug_cnn(data.image_size, data.channels, cnn))
        log.info("%s", result.summary())
        mlflow.set_tag("mlflow.note.content", result.summary())
        return run.info.run_id
