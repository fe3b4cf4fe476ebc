"""Training-time augmentation built from Keras 3 layers, applied to whole batches; test-time views.

The augmenter works on ``float32`` batches in the 0..255 range inside the ``tf.data`` pipeline.
It is never part of a saved model, so evaluation and serving cannot augment by accident; the
fixed test-time views (:func:`tta_views`) are applied only when a caller asks for them.
"""

from __future__ import annotations

import math

import keras
import numpy as np
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


@keras.saving.register_keras_serializable(package="pneumo")
class RandomAffine(layers.Layer):
    """Random rotation, shift and zoom composed into one affine warp per image.

    Keras' ``RandomRotation``, ``RandomTranslation`` and ``RandomZoom`` each resample the whole
    batch; composing their matrices first resamples once, which costs a third of the work and
    blurs the image once instead of three times.

    Args:
        rotation: Maximum rotation in degrees.
        width_shift: Maximum horizontal shift as a fraction of the width.
        height_shift: Maximum vertical shift as a fraction of the height.
        zoom: Maximum zoom in or out as a fraction (the scale is drawn from ``1 ± zoom``).
        fill_mode: How points outside the image are filled (see ``keras.ops.image.affine_transform``).
        seed: Seed of the layer's random stream.
    """

    def __init__(
        self, rotation=0.0, width_shift=0.0, height_shift=0.0, zoom=0.0, fill_mode="nearest", seed=None, **kwargs
    ):
        super().__init__(**kwargs)
        self.rotation = float(rotation)
        self.width_shift = float(width_shift)
        self.height_shift = float(height_shift)
        self.zoom = float(zoom)
        self.fill_mode = fill_mode
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=True):
        if not training:
            return images
        ops = keras.ops
        batch = ops.shape(images)[0]

        def draw(limit):
            return keras.random.uniform((batch,), -limit, limit, seed=self.seed_generator)

        angle = draw(self.rotation) * (math.pi / 180.0)
        height, width = ops.shape(images)[1], ops.shape(images)[2]
        shift_x = draw(self.width_shift) * ops.cast(width, "float32")
        shift_y = draw(self.height_shift) * ops.cast(height, "float32")
        scale = 1.0 + draw(self.zoom)
        return ops.image.affine_transform(
            images, affine_matrix(angle, shift_x, shift_y, scale, height, width), fill_mode=self.fill_mode
        )

    def get_config(self):
        return {
            **super().get_config(),
            "rotation": self.rotation,
            "width_shift": self.width_shift,
            "height_shift": self.height_shift,
            "zoom": self.zoom,
            "fill_mode": self.fill_mode,
            "seed": self.seed,
        }


def affine_matrix(angle, shift_x, shift_y, scale, height, width):
    """Rows ``[a0, a1, a2, b0, b1, b2, 0, 0]`` mapping output to input pixels, one per image.

    The same warp as Keras' rotation (``angle`` radians about the centre), then translation by
    ``(shift_x, shift_y)`` pixels, then zoom by ``scale`` about the centre: an output point ``p``
    samples the input at ``c + scale * R(angle) (p - c) - R(angle) shift``.
    """
    ops = keras.ops
    cos, sin = ops.cos(angle), ops.sin(angle)
    cx = (ops.cast(width, "float32") - 1.0) / 2.0
    cy = (ops.cast(height, "float32") - 1.0) / 2.0
    a0, a1 = scale * cos, -scale * sin
    b0, b1 = scale * sin, scale * cos
    a2 = cx - a0 * cx - a1 * cy - (cos * shift_x - sin * shift_y)
    b2 = cy - b0 * cx - b1 * cy - (sin * shift_x + cos * shift_y)
    zeros = ops.zeros_like(angle)
    return ops.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)


@keras.saving.register_keras_serializable(package="pneumo")
class RandomDegrade(layers.Layer):
    """Random blur and sensor noise per image, for detectors sharper or noisier than the training ones.

    Args:
        blur: Largest blend towards a Gaussian blur (sigma 1.5 px), 0 disables.
        noise: Largest standard deviation of additive Gaussian noise, as a fraction of 255; 0 disables.
        seed: Seed of the layer's random stream.
    """

    def __init__(self, blur=0.0, noise=0.0, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.blur = float(blur)
        self.noise = float(noise)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        taps = np.exp(-0.5 * (np.arange(-3, 4) / 1.5) ** 2)
        self._kernel = (taps / taps.sum()).astype("float32")

    def call(self, images, training=True):
        if not training:
            return images
        ops = keras.ops
        shape = (ops.shape(images)[0], 1, 1, 1)
        if self.blur > 0:
            channels = images.shape[-1]
            row = ops.tile(ops.reshape(ops.convert_to_tensor(self._kernel), (1, 7, 1, 1)), (1, 1, channels, 1))
            column = ops.reshape(row, (7, 1, channels, 1))
            blurred = ops.depthwise_conv(ops.depthwise_conv(images, row, padding="same"), column, padding="same")
            amount = keras.random.uniform(shape, 0.0, self.blur, seed=self.seed_generator)
            images = images + amount * (blurred - images)
        if self.noise > 0:
            sigma = keras.random.uniform(shape, 0.0, self.noise * 255.0, seed=self.seed_generator)
            images = images + sigma * keras.random.normal(ops.shape(images), seed=self.seed_generator)
        return ops.clip(images, 0.0, 255.0)

    def get_config(self):
        return {**super().get_config(), "blur": self.blur, "noise": self.noise, "seed": self.seed}


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
    if config.rotation > 0 or config.width_shift > 0 or config.height_shift > 0 or config.zoom > 0:
        stack.append(
            RandomAffine(
                config.rotation, config.width_shift, config.height_shift, config.zoom, seed=seed + 1, dtype=_DTYPE
            )
        )
    if config.brightness_low != 1.0 or config.brightness_high != 1.0 or config.gamma > 0:
        stack.append(
            RandomIntensity((config.brightness_low, config.brightness_high), config.gamma, seed=seed + 4, dtype=_DTYPE)
        )
    if config.contrast > 0:
        stack.append(layers.RandomContrast(config.contrast, value_range=(0, 255), seed=seed + 5, dtype=_DTYPE))
    if config.blur > 0 or config.noise > 0:
        stack.append(RandomDegrade(config.blur, config.noise, seed=seed + 6, dtype=_DTYPE))
    # All ranges zero: a Sequential must hold a layer to be built, so the augmenter is the identity.
    return keras.Sequential(stack or [layers.Identity(dtype=_DTYPE)], name="augmenter")


# Test-time views: mild shifts and zooms that any acquisition could produce. Identity comes first.
TTA_VIEWS = (
    (0.0, 0.0, 1.0),
    (0.04, 0.0, 1.0),
    (-0.04, 0.0, 1.0),
    (0.0, 0.04, 1.0),
    (0.0, -0.04, 1.0),
    (0.0, 0.0, 0.94),
    (0.0, 0.0, 1.06),
)


def tta_views(images: np.ndarray) -> list[np.ndarray]:
    """The :data:`TTA_VIEWS` of a ``uint8`` batch, deterministic (the same views for every request).

    Args:
        images: ``(n, side, side, channels)`` ``uint8`` batch.

    Returns:
        One ``uint8`` batch per view; the first is ``images`` itself.
    """
    side = images.shape[1]
    n = len(images)
    views = [images]
    for shift_x, shift_y, scale in TTA_VIEWS[1:]:
        matrix = affine_matrix(
            keras.ops.zeros((n,)),
            keras.ops.full((n,), shift_x * side),
            keras.ops.full((n,), shift_y * side),
            keras.ops.full((n,), scale),
            side,
            side,
        )
        warped = keras.ops.image.affine_transform(images.astype("float32"), matrix, fill_mode="nearest")
        views.append(np.clip(np.round(np.asarray(warped)), 0, 255).astype(np.uint8))
    return views
