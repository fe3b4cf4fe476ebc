"""Entry point ``baseline``: the notebook's dense network (flattened pixels, Dense 32 -> 8 -> 1)."""

from __future__ import annotations

from pneumo import models, tracking
from pneumo.config import DataConfig, DenseConfig, RunConfigs, TrainConfig
from pneumo.training import train_model


def baseline(data: DataConfig, train: TrainConfig, dense: DenseConfig) -> str:
    """Entry point ``baseline``: the notebook's dense network on oversampled training data."""
    configs = RunConfigs("baseline", data, train, dense)
    with tracking.start_run(configs) as run:
        train_model(configs, lambda: models.build_dense(data.image_size, data.channels, dense.l2))
        return run.info.run_id
