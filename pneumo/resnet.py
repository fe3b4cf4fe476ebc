"""The ``resnet`` entry point: a frozen ResNet50 with a small head, optionally fine-tuned.

A frozen base gives the same features for an image in every epoch, so they are computed once
and the head is trained on them (the balanced sampler indexes the cached features exactly as
it indexes cached images). The trained head is then joined to the base into one image-to-
probability model, which is what gets thresholded, logged and served.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import keras
import numpy as np

from pneumo import models, tracking
from pneumo.config import DataConfig, ResNetConfig, RunConfigs, TrainConfig, replace_fields
from pneumo.errors import ConfigError
from pneumo.pipeline import Examples, ImageSet
from pneumo.training import (
    TrainResult,
    evaluate_validation,
    fit,
    load_training_data,
    log_outputs,
    set_up_keras,
)

log = logging.getLogger(__name__)


def extract_features(base: keras.Model, data: ImageSet, batch_size: int = 64) -> Examples:
    """Run the frozen base once over every image; the result indexes like the images did."""
    features = np.concatenate(
        [
            np.asarray(base(data.images[i : i + batch_size].astype(np.float32), training=False), dtype=np.float32)
            for i in range(0, len(data.images), batch_size)
        ]
    )
    return Examples(features, data.labels)


def resnet_base(data: DataConfig, config: ResNetConfig) -> keras.Model:
    """The frozen base for ``config.weights``; weights that cannot be had are the user's to fix.

    Raises:
        ConfigError: The ImageNet download failed (offline) or the weights file does not exist;
            :func:`pneumo.models.build_resnet_base` raises these as RuntimeError and FileNotFoundError.
    """
    try:
        return models.build_resnet_base(data.image_size, data.channels, config.weights)
    except (RuntimeError, FileNotFoundError) as error:
        raise ConfigError(str(error)) from error


def fine_tune(
    model: keras.Model,
    train_set: ImageSet,
    val_set: ImageSet,
    train: TrainConfig,
    config: ResNetConfig,
    seed: int,
    checkpoint: Path,
    step_offset: int,
) -> dict[str, list[float]]:
    """Second stage: unfreeze ResNet50's last block (BatchNorm frozen) and train at a low learning rate."""
    unfrozen = models.unfreeze_top_block(model)
    log.info("fine-tuning %d layers of the last block for %d epochs", unfrozen, config.fine_tune_epochs)
    stage = replace_fields(train, epochs=config.fine_tune_epochs, learning_rate=config.fine_tune_learning_rate)
    return fit(
        model, train_set, val_set, stage, None, seed + 1, checkpoint, step_offset=step_offset, prefix="fine_tune_"
    )


def resnet(data: DataConfig, train: TrainConfig, resnet_config: ResNetConfig) -> str:
    """Entry point ``resnet``: ResNet50 features, a trained head, optional fine-tuning; returns the run id."""
    configs = RunConfigs("resnet", data, train, resnet_config)
    with tracking.start_run(configs) as run:
        set_up_keras(data.seed, train.precision)
        base = resnet_base(data, resnet_config)
        images = load_training_data(data)

        started = time.perf_counter()
        train_features, val_features = extract_features(base, images.train), extract_features(base, images.val)
        tracking.log_summary({"feature_extraction_seconds": time.perf_counter() - started})

        head = models.build_resnet_head(train_features.inputs.shape[1:], resnet_config)
        with tempfile.TemporaryDirectory() as folder:
            head_checkpoint, checkpoint = Path(folder) / "head.keras", Path(folder) / "best.keras"
            history = fit(head, train_features, val_features, train, None, data.seed, head_checkpoint, prefix="head_")
            model = models.stack_resnet(base, head)
            if resnet_config.fine_tune_epochs > 0:
                tuned = fine_tune(
                    model, images.train, images.val, train, resnet_config, data.seed, checkpoint, len(history["loss"])
                )
                history = {k: history[k] + tuned.get(k, []) for k in history}
            probabilities, threshold, val_metrics = evaluate_validation(model, images.val, train.target_sensitivity)
            log_outputs(configs, TrainResult(model, history, probabilities, threshold, val_metrics), images)
        return run.info.run_id
