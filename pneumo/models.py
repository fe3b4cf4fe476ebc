"""Pure builder functions: each returns an uncompiled ``keras.Model``.

Every model takes ``uint8``-range pixels (as float) of shape ``(size, size, channels)`` and does its
own scaling inside, so a saved model carries its input normalisation with it. Only layers that
are built into Keras or registered below are used: models load with ``safe_mode=True``.
"""

from __future__ import annotations

from pathlib import Path

import keras
from keras import layers, regularizers

from pneumo.config import CNNConfig, ResNetConfig


@keras.saving.register_keras_serializable(package="pneumo")
class PerImageStandardization(layers.Layer):
    """Scale each image to zero mean and unit variance (over all its pixels and channels).

    Removes global exposure and contrast differences between machines, which otherwise let a
    model learn the acquisition site rather than the lungs.
    """

    def call(self, images):
        ops = keras.ops
        images = ops.cast(images, "float32")
        mean = ops.mean(images, axis=(1, 2, 3), keepdims=True)
        std = ops.std(images, axis=(1, 2, 3), keepdims=True)
        return (images - mean) / ops.maximum(std, 1.0)


@keras.saving.register_keras_serializable(package="pneumo")
class ImageNetCaffeNormalization(layers.Layer):
    """ResNet50's ``preprocess_input`` as a layer: RGB->BGR, subtract the ImageNet channel means.

    Grayscale input is repeated to three channels first.
    """

    MEANS = (103.939, 116.779, 123.68)  # BGR

    def call(self, images):
        ops = keras.ops
        images = ops.cast(images, "float32")
        if images.shape[-1] == 1:
            images = ops.repeat(images, 3, axis=-1)
        return ops.flip(images, axis=-1) - ops.convert_to_tensor(self.MEANS, dtype="float32")


def _inputs(image_size: int, channels: int) -> keras.KerasTensor:
    return keras.Input(shape=(image_size, image_size, channels), name="image")


def _sigmoid_output(x: keras.KerasTensor) -> keras.KerasTensor:
    # float32 output keeps probabilities exact under mixed precision.
    return layers.Dense(1, activation="sigmoid", dtype="float32", name="pneumonia")(x)


def build_dense(image_size: int = 64, channels: int = 3, l2: float = 0.0) -> keras.Model:
    """The notebook's dense baseline: flattened pixels, Dense 32 ReLU, Dense 8 ReLU, sigmoid.

    Args:
        image_size: Input side (notebook: 64).
        channels: Input channels (notebook: 3).
        l2: L2 factor on the first Dense layer (notebook's L2 baseline: 0.01).
    """
    inputs = _inputs(image_size, channels)
    x = layers.Rescaling(1.0 / 255.0)(inputs)
    x = layers.Flatten()(x)
    x = layers.Dense(32, activation="relu", kernel_regularizer=regularizers.L2(l2) if l2 else None)(x)
    x = layers.Dense(8, activation="relu")(x)
    return keras.Model(inputs, _sigmoid_output(x), name="dense_l2" if l2 else "dense")


def build_notebook_cnn(image_size: int = 64, channels: int = 3) -> keras.Model:
    """The notebook's 3-block CNN: Conv 32 3x3, Conv 32 4x4, Conv 64 3x3 (each + max-pool), Dense 64."""
    inputs = _inputs(image_size, channels)
    x = layers.Rescaling(1.0 / 255.0)(inputs)
    for filters, kernel in ((32, 3), (32, 4), (64, 3)):
        x = layers.Conv2D(filters, kernel, activation="relu")(x)
        x = layers.MaxPooling2D()(x)
    x = layers.Flatten()(x)
    x = layers.Dense(64, activation="relu")(x)
    return keras.Model(inputs, _sigmoid_output(x), name="cnn")


def _normalization(kind: str) -> layers.Layer:
    """The input normalisation ``CNNConfig.normalization`` names (the config checked the choice)."""
    if kind == "per_image":
        return PerImageStandardization(name="per_image_standardization")
    return layers.Rescaling(1.0 / 255.0, name="rescale")


def _conv_bn_relu(x: keras.KerasTensor, filters: int, kernel: int = 3, strides: int = 1) -> keras.KerasTensor:
    x = layers.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False)(x)
    # Momentum 0.9 (Keras: 0.99): the moving statistics used at inference settle within tens of
    # steps, so short or small-data runs do not validate with unconverged BatchNorm statistics.
    x = layers.BatchNormalization(momentum=0.9)(x)
    return layers.ReLU()(x)


def build_aug_cnn(image_size: int = 128, channels: int = 1, config: CNNConfig | None = None) -> keras.Model:
    """The main-job CNN: a strided stem and four conv/BN/pool blocks, then global pooling.

    Sized for a 2-core CPU: the 5x5 stride-2 stem halves the resolution before the costly layers,
    global average pooling keeps the head tiny (few parameters to overfit the training site).

    Args:
        image_size: Input side.
        channels: Input channels.
        config: Width, dropout and input normalisation.
    """
    config = config or CNNConfig()
    inputs = _inputs(image_size, channels)
    x = _normalization(config.normalization)(inputs)
    x = _conv_bn_relu(x, config.width, kernel=5, strides=2)
    for multiplier in (1, 2, 4, 6):
        x = _conv_bn_relu(x, config.width * multiplier)
        x = layers.MaxPooling2D()(x)
    x = _conv_bn_relu(x, config.width * 8)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(config.dropout)(x)
    return keras.Model(inputs, _sigmoid_output(x), name="aug_cnn")


def build_resnet_base(image_size: int, channels: int, weights: str) -> keras.Model:
    """ResNet50 without its top, with ImageNet preprocessing inside; frozen.

    Args:
        image_size: Input side (at least 32).
        channels: 1 (repeated to RGB inside) or 3.
        weights: ``imagenet``, ``none`` or a path to a Keras weights file.

    Raises:
        RuntimeError: ImageNet weights could not be downloaded (no network); the message says how
            to run offline.
    """
    resolved = None if weights.lower() == "none" else weights
    if resolved not in (None, "imagenet") and not Path(resolved).is_file():
        raise FileNotFoundError(f"ResNet50 weights file {resolved} does not exist")
    inputs = _inputs(image_size, channels)
    x = ImageNetCaffeNormalization(name="imagenet_caffe")(inputs)
    try:
        backbone = keras.applications.ResNet50(
            include_top=False, weights=resolved, input_shape=(image_size, image_size, 3)
        )
    except Exception as error:
        if resolved != "imagenet":
            raise
        raise RuntimeError(
            "Could not download the ImageNet weights of ResNet50 "
            f"({type(error).__name__}: {error}). Offline, pass -P weights=none to train from "
            "scratch, or -P weights=/path/to/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5 "
            "(copy it from ~/.keras/models/ on a machine with network)."
        ) from error
    backbone.trainable = False
    # training=False keeps BatchNorm in inference mode, even when the top block is unfrozen later.
    x = backbone(x, training=False)
    return keras.Model(inputs, x, name="resnet50_base")


def build_resnet_head(feature_shape: tuple[int, ...], config: ResNetConfig | None = None) -> keras.Model:
    """Classifier head on ResNet50 features: pooling or Flatten, Dense 256 ReLU, dropout, sigmoid."""
    config = config or ResNetConfig()
    inputs = keras.Input(shape=feature_shape, name="features")
    # ResNetConfig checked the choice: "avg" or "flatten".
    x = layers.GlobalAveragePooling2D()(inputs) if config.pooling == "avg" else layers.Flatten()(inputs)
    x = layers.Dense(256, activation="relu")(x)
    x = layers.Dropout(config.dropout)(x)
    return keras.Model(inputs, _sigmoid_output(x), name="resnet_head")


def stack_resnet(base: keras.Model, head: keras.Model) -> keras.Model:
    """Join the base and a (trained) head into one image-to-probability model."""
    return keras.Model(base.input, head(base.output), name="resnet50")


def _find_backbone(model: keras.Model) -> keras.Model:
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            if layer.name.startswith("resnet50") and any(sub.name.startswith("conv5_") for sub in layer.layers):
                return layer
            try:
                return _find_backbone(layer)
            except LookupError:
                continue
    raise LookupError("no ResNet50 backbone in the model")


def unfreeze_top_block(model: keras.Model) -> int:
    """Make ResNet50's last stage (``conv5_*``) trainable, keeping every BatchNorm frozen.

    Returns:
        Number of layers made trainable.
    """
    backbone = _find_backbone(model)
    backbone.trainable = True
    count = 0
    for layer in backbone.layers:
        trainable = layer.name.startswith("conv5_") and not isinstance(layer, layers.BatchNormalization)
        layer.trainable = trainable
        count += trainable
    return count
