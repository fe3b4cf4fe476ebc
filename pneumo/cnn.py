"""Entry point ``cnn``: the notebook's 3-block CNN, trained without augmentation."""

from __future__ import annotations

from pneumo import models, tracking
from pneumo.config import DataConfig, RunConfigs, TrainConfig
from pneumo.training import train_model


def cnn(data: DataConfig, train: TrainConfig) -> str:
    """Entry point ``cnn``: the notebook's 3-block CNN without augmentation."""
    configs = RunConfigs("cnn", data, train)
    with tracking.start_run(configs) as run:
        train_model(configs, lambda: models.build_notebook_cnn(data.image_size, data.channels))
        return run.info.run_id
