"""Class-activation heatmaps: where in the X-ray the model's convolutional features drove its answer.

Grad-CAM (Selvaraju et al., 2017) weighs each channel of a feature map by the *mean* gradient of the
class score over the map, sums the channels and keeps the positive part. On an intermediate stage
that average is not faithful: aug_cnn's 8 x 8 stage is followed by more convolutions and pooling,
so positive and negative gradients at different places cancel in the mean, and for the default
model's most confident false positives (p 0.94-0.97, logits near +3) the weighted sum came out
negative everywhere: empty maps, captioned "no pneumonia evidence". Here each position keeps its
own gradient (HiResCAM, Draelos & Carin, 2020): the map is the positive part of the sum over
channels of gradient times activation, position by position, which is what the first-order change of
the score at that position is. The class score is the logit (the output layer's sigmoid is bypassed
while computing it), because the sigmoid's gradient vanishes exactly for the confident mistakes a
reviewer most wants explained.

The target is the last convolutional stage of the top-level graph with a grid fine enough to
read (see :func:`target_layer`): a ``Conv2D`` together with the batch normalisation and
activation applied directly to it (``aug_cnn``, the notebook ``cnn``), or a nested backbone such
as ResNet50 taken as a whole (its output is its last conv block). Nested backbones are why the
features are obtained by running the top-level layers one after another instead of by a
sub-model on an inner layer's output: an inner layer of a nested model is not connected to the
outer model's inputs. Models without a convolution (the dense
baseline) have no spatial feature map, hence no Grad-CAM.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import keras
import numpy as np
import tensorflow as tf

from pneumo.errors import PneumoError

_CONV_TYPES = (keras.layers.Conv2D, keras.layers.SeparableConv2D, keras.layers.DepthwiseConv2D)
# Layers that act on each position of a conv output without mixing positions or changing the grid.
_POINTWISE_TYPES = (keras.layers.BatchNormalization, keras.layers.ReLU, keras.layers.Activation, keras.layers.LeakyReLU)


# Coarsest feature grid worth showing a radiologist (ResNet50's last block gives 7x7 at 224 px).
MIN_GRID = 7


class GradCamUnavailable(PneumoError, ValueError):
    """Raised when a model has no convolutional feature map to explain; the message says why."""


def _contains_conv(layer: keras.layers.Layer) -> bool:
    if isinstance(layer, _CONV_TYPES):
        return True
    return isinstance(layer, keras.Model) and any(_contains_conv(inner) for inner in layer.layers)


def _is_spatial(layer: keras.layers.Layer) -> bool:
    shape = layer.output.shape if not isinstance(layer, keras.Model) else layer.outputs[0].shape
    return len(shape) == 4


def _grid(layer: keras.layers.Layer) -> int:
    shape = layer.output.shape if not isinstance(layer, keras.Model) else layer.outputs[0].shape
    return int(min(shape[1], shape[2]))


def target_layer(model: keras.Model) -> keras.layers.Layer:
    """The top-level layer whose output Grad-CAM explains.

    The last convolutional stage is the most semantic, but in a small network it can be too coarse
    to read: aug_cnn's sees a 4x4 grid at 128 px, a sixteenth of the chest per cell, which cannot
    tell a lobe from the heart. So the last stage whose grid is at least :data:`MIN_GRID` cells on
    a side is used, and the last stage of all only when none is that fine.

    Args:
        model: A functional Keras model whose top level is a chain of layers.

    Returns:
        A convolution (extended through the batch norm and activation directly after it), or a
        nested model that contains convolutions and outputs a feature map.

    Raises:
        GradCamUnavailable: The model has no convolutional layer.
    """
    stages: list[keras.layers.Layer] = []
    for layer in model.layers:
        if isinstance(layer, _CONV_TYPES) or (
            isinstance(layer, keras.Model) and _contains_conv(layer) and _is_spatial(layer)
        ):
            stages.append(layer)
        elif stages and isinstance(layer, _POINTWISE_TYPES) and _follows(layer, stages[-1]):
            stages[-1] = layer
    if not stages:
        raise GradCamUnavailable(
            f"model '{model.name}' has no convolutional layer, so Grad-CAM has no feature map to use"
        )
    fine = [layer for layer in stages if _grid(layer) >= MIN_GRID]
    return fine[-1] if fine else stages[-1]


def _follows(layer: keras.layers.Layer, previous: keras.layers.Layer) -> bool:
    """Whether ``layer`` takes ``previous``'s output as its only input (top-level graph)."""
    try:
        return layer.input is previous.output
    except (AttributeError, ValueError):
        return False


def _output_dense(model: keras.Model) -> keras.layers.Dense | None:
    """The final sigmoid ``Dense`` (looking inside a nested head), or None."""
    last = model.layers[-1]
    if isinstance(last, keras.Model):
        return _output_dense(last)
    if isinstance(last, keras.layers.Dense) and last.activation is keras.activations.sigmoid:
        return last
    return None


@contextlib.contextmanager
def _logit_output(model: keras.Model) -> Iterator[bool]:
    """Temporarily make the model output its logit; yields whether that was possible."""
    dense = _output_dense(model)
    if dense is None:
        yield False
        return
    dense.activation = keras.activations.linear
    try:
        yield True
    finally:
        dense.activation = keras.activations.sigmoid


def _run_chain(model: keras.Model, images: tf.Tensor, target: keras.layers.Layer) -> tuple[tf.Tensor, tf.Tensor]:
    """Apply the top-level layers in order; return the target's output and the model output."""
    features = None
    x = images
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        x = layer(x, training=False)
        if layer is target:
            features = x
    return features, x


def gradcam(model: keras.Model, images: np.ndarray, target_class: np.ndarray | int = 1) -> np.ndarray:
    """Grad-CAM heatmaps for a batch of model inputs.

    Args:
        model: The classifier (sigmoid output = probability of pneumonia).
        images: ``uint8`` inputs of shape ``(n, size, size, channels)`` as the model takes them.
        target_class: Class to explain per image (1 = pneumonia, 0 = normal), or one for all.

    Returns:
        Float array ``(n, size, size)`` in ``[0, 1]``, resized to the input size; an all-zero map
        means no position argued for the class.

    Raises:
        GradCamUnavailable: No convolutional layer, or the top level is not a chain of layers.
    """
    images = np.asarray(images)
    if len(images) == 0:
        return np.zeros((0, *images.shape[1:3]), np.float32)
    target = target_layer(model)
    inputs = tf.convert_to_tensor(images.astype(np.float32))
    signs = np.where(np.broadcast_to(np.asarray(target_class), (len(images),)) == 1, 1.0, -1.0).astype(np.float32)
    reference = np.asarray(model(inputs, training=False), dtype=np.float32).reshape(-1)
    with _logit_output(model) as is_logit:
        with tf.GradientTape() as tape:
            features, output = _run_chain(model, inputs, target)
            score = tf.reshape(tf.cast(output, tf.float32), [-1])
        gradients = tape.gradient(score, features)
    chained = tf.sigmoid(score).numpy() if is_logit else score.numpy()
    if not np.allclose(chained, reference, atol=1e-2):
        raise GradCamUnavailable(
            f"model '{model.name}' is not a chain of layers at its top level; Grad-CAM would not explain its output"
        )
    features = tf.cast(features, tf.float32)
    # A sign per image: the gradient of -logit explains "normal" exactly as +logit explains pneumonia.
    gradients = tf.cast(gradients, tf.float32) * signs[:, None, None, None]
    # Element-wise, not averaged over positions first (see the module docstring).
    cams = tf.nn.relu(tf.reduce_sum(gradients * features, axis=-1))[..., None]
    cams = tf.image.resize(cams, images.shape[1:3], method="bilinear")[..., 0].numpy()
    peaks = cams.reshape(len(cams), -1).max(axis=1)
    return np.where(peaks[:, None, None] > 0, cams / np.maximum(peaks, 1e-12)[:, None, None], 0.0).astype(np.float32)
