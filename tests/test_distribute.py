"""MirroredStrategy on a CPU split into two logical devices: both replicas step, results match one device.

The split has to happen before TensorFlow starts its runtime, so the training runs in a fresh
interpreter (``_SCRIPT``), which prints what the test checks as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from pneumo.config import TrainConfig
from pneumo.distribute import global_batch

_SCRIPT = r"""
import json, os, sys, tempfile
from pathlib import Path
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras, mlflow
from helpers import cached_set
from pneumo import distribute, training
from pneumo.config import TrainConfig


class Counter(keras.layers.Layer):
    # Counts the training images each replica sees (an on-read variable: one value per replica).
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.count = tf.Variable(
            0.0, trainable=False, synchronization=tf.VariableSynchronization.ON_READ,
            aggregation=tf.VariableAggregation.SUM,
        )

    def call(self, x, training=False):
        if training:
            self.count.assign_add(tf.cast(tf.shape(x)[0], tf.float32))
        return x


def run(setting, batch_size):
    keras.utils.set_random_seed(0)
    strategy = distribute.choose_strategy(setting)
    config = TrainConfig(batch_size=batch_size, epochs=2, precision="float32", cosine_decay=False,
                         balance="none", distribute=setting)
    config = distribute.global_batch(config, strategy)
    train, val = cached_set(32, 32, side=16), cached_set(8, 8, side=16)
    with tempfile.TemporaryDirectory() as folder, mlflow.start_run(), strategy.scope():
        counter = Counter()
        model = keras.Sequential([
            keras.Input((16, 16, 1)), counter, keras.layers.Rescaling(1 / 255),
            keras.layers.Conv2D(4, 3, activation="relu"), keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(1, activation="sigmoid"),
        ])
        history = training.fit(model, train, val, config, None, 0, Path(folder) / "best.keras")
    return {
        "replicas": strategy.num_replicas_in_sync,
        "global_batch": config.batch_size,
        "per_replica_images": [float(v) for v in strategy.experimental_local_results(counter.count)],
        "history": history,
    }


mlflow.set_tracking_uri(sys.argv[1])
print("RESULT " + json.dumps({"mirrored": run("mirrored", 8), "single": run("none", 16)}))
"""


def test_global_batch_is_per_replica_batch_times_replicas():
    class Two:
        num_replicas_in_sync = 2

    assert global_batch(TrainConfig(batch_size=16), Two()).batch_size == 32


@pytest.mark.slow
def test_mirrored_training_steps_both_replicas_and_matches_one_device(tmp_path):
    # A fresh store of its own: no MLFLOW_* variable left by other tests (an experiment id of theirs).
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}", TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, f"sqlite:///{tmp_path / 'mlflow.db'}"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    mirrored, single = result["mirrored"], result["single"]
    assert mirrored["replicas"] == 2 and single["replicas"] == 1
    assert mirrored["global_batch"] == single["global_batch"] == 16
    # 64 images, 4 steps of 16 per epoch, 2 epochs: each replica got half of every batch.
    assert mirrored["per_replica_images"] == [64.0, 64.0]
    assert single["per_replica_images"] == [128.0]
    for name in ("loss", "val_loss", "val_auc", "accuracy"):
        np.testing.assert_allclose(mirrored["history"][name], single["history"][name], rtol=1e-3, atol=1e-3)
