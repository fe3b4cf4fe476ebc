"""Training-time augmentation built from Keras 3 preprocessing layers, applied to whole batches.

The augmenter works on ``float32`` batches in the 0..255 range inside the ``tf.data`` pipeline.
It is never part of a saved model, so evaluation and serving cannot augment by accident.
"""

from __future__ import annotations

import keras
from keras import layers

from pneumo.config import AugmentConfig

# Augmentation runs in float32 whatever the training policy: bfloat16 cannot hold 0..255 exactly.
_DTYPE = "float32"


@keras.saving.register_keras_serializable(package="pneumo")
class RandomIntensity(layers.Layer):
    """Random multiplicative brightness, then a random gamma curve, per image; clipped to 0..255.

    Keras' ``RandomBrightness`` adds an offset; radiographs differ by exposure (a gain) and by the
    detector's response curve (a gamma), which is what this layer varies.

    Args:
        brightness: ``(low, high)`` range of the gain, e.g. ``(1.0, 1.5)`` as in the notebook.
        gamma: Maximum deviation of the gamma exponent from 1 (0 disables).
        seed: Seed of the layer's random stream.
    """

    def __init__(self, brightness: tuple[float, float] = (1.0, 1.0), gamma: float = 0.0, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.brightness = tuple(float(b) for b in brightness)
        self.gamma = float(gamma)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=True):
        if not training:
            return images
        ops = keras.ops
        shape = (ops.shape(images)[0], 1, 1, 1)
        gain = keras.random.uniform(shape, *self.brightness, seed=self.seed_generator)
        images = ops.clip(images * gain, 0.0, 255.0)
        if self.gamma > 0:
            exponent = keras.random.uniform(shape, 1.0 - self.gamma, 1.0 + self.gamma, seed=self.seed_generator)
            images = 255.0 * ops.power(images / 255.0, exponent)
        return images

    def get_config(self):
        return {**super().get_config(), "brightness": self.brightness, "gamma": self.gamma, "seed": self.seed}


def build_augmenter(config: AugmentConfig, seed: int) -> keras.Sequential:
    """Build the batch augmenter for the given ranges.

    Args:
        config: Augmentation ranges; zero ranges leave their layer out.
        seed: Base seed; each layer gets its own stream from it.

    Returns:
        A ``keras.Sequential`` taking and returning float batches in 0..255.
    """
    stack = []
    if config.flip:
        stack.append(layers.RandomFlip("horizontal", seed=seed, dtype=_DTYPE))
    if config.rotation > 0:
        stack.append(layers.RandomRotation(config.rotation / 360.0, fill_mode="nearest", seed=seed + 1, dtype=_DTYPE))
    if config.width_shift > 0 or config.height_shift > 0:
        stack.append(
            layers.RandomTranslation(
                config.height_shift, config.width_shift, fill_mode="nearest", seed=seed + 2, dtype=_DTYPE
            )
        )
    if config.zoom > 0:
        stack.append(layers.RandomZoom(config.zoom, fill_mode="nearest", seed=seed + 3, dtype=_DTYPE))
    if config.brightness_low != 1.0 or config.brightness_high != 1.0 or config.gamma > 0:
        stack.append(RandomIntensity(
                (config.brightness_low, config.brightness_high), config.gamma, seed=seed + 4, dtype=_DTYPE
            ))
    if config.contrast > 0:
        stack.append(layers.RandomContrast(config.contrast, value_range=(0, 255), seed=seed + 5, dtype=_DTYPE))
    return keras.Sequential(stack, name="augmenter")
