"""Entry point ``cnn``: the notebook's 3-block CNN, trained without augmentation."""

from __future__ import annotations

from pneumo import models, tracking
from pneumo.config import DataConfig, TrainConfig
from pneumo.training import train_model


def cnn(data: DataConfig, train: TrainConfig) -> str:
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
