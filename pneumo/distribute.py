"""Training on several accelerators: ``tf.distribute.MirroredStrategy`` across the visible GPUs.

``distribute=auto`` (the default) mirrors the model on every visible GPU when there are two or
more and trains on the one device otherwise; ``mirrored`` forces it (over the GPUs, or over the
logical CPU devices when there is no GPU: how the tests check it on a CPU); ``none`` never
distributes. ``batch_size`` is per replica: the global batch is ``batch_size`` times the number
of replicas, so each device keeps the batch it was tuned for and an epoch takes fewer steps.
Multi-machine training (``MultiWorkerMirroredStrategy`` with ``TF_CONFIG``) is the next step;
README's "Several GPUs" says how.
"""

from __future__ import annotations

import dataclasses
import logging

import tensorflow as tf

from pneumo.config import TrainConfig

log = logging.getLogger(__name__)


def choose_strategy(setting: str) -> tf.distribute.Strategy:
    """The strategy ``setting`` (``auto``, ``mirrored`` or ``none``) asks for on this machine."""
    gpus = tf.config.list_logical_devices("GPU")
    if setting == "none" or (setting == "auto" and len(gpus) < 2):
        return tf.distribute.get_strategy()  # the default: one device
    devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
    strategy = tf.distribute.MirroredStrategy(devices=devices)
    log.info("training mirrored on %d devices: %s", strategy.num_replicas_in_sync, ", ".join(devices))
    return strategy


def global_batch(config: TrainConfig, strategy: tf.distribute.Strategy) -> TrainConfig:
    """``config`` with ``batch_size`` scaled from per replica to global (unchanged on one device)."""
    return dataclasses.replace(config, batch_size=config.batch_size * strategy.num_replicas_in_sync)
