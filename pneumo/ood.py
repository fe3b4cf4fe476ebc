"""The input gate: does an image look like the frontal chest X-rays a model was trained on?

A classifier answers something for any input; this says when it should not be believed. The gate
travels with every model (:class:`~pneumo.contract.ModelContract` ``input_gate``), is fitted at
training time on the training images as the model's :class:`~pneumo.preprocessing.InputSpec`
decodes them, and judges the same decoded ``uint8`` images the model sees, so it costs a few
small array operations per image next to a forward pass.

It scores three things, each scaled so that 1.0 is its limit; an image passes when all three are
at most 1 (its ``ood_score`` is the largest):

- **layout**: the image shrunk to :data:`THUMBNAIL` x :data:`THUMBNAIL` pixels, as a distance from
  the training thumbnails (Mahalanobis distance in their first :data:`COMPONENTS` principal
  components, plus the residual off them). A chest film has a fixed layout: two dark lung fields
  either side of a bright mediastinum, shoulders above, diaphragm below. Photographs, text pages
  and inverted films do not.
- **texture**: eight global statistics (brightness, contrast, edge strength at two scales, the
  histogram's entropy, the dark and bright fractions, the layout's contrast), as a Mahalanobis
  distance from the training images'. Blank frames, noise and checkerboards have a layout that a
  thumbnail cannot tell from a faint chest, but nothing like a radiograph's texture.
- **orientation**: the layout distance of the image over that of the same image turned by 90° or
  by 270°, whichever is nearer. Above 1, the image looks more like a chest X-ray turned on its
  side: a film fed sideways (or a JPEG whose EXIF orientation tag is wrong). This part needs no
  limit fitted; the ratio itself is the test.

The layout and texture limits are set on the validation split so that :data:`VALIDATION_PASS_RATE`
of its X-rays pass. What the gate does not catch is said in README and in the model card: it
knows what the training hospital's frontal pediatric films look like, so a lateral view or an
adult's film may pass, and it cannot tell a chest X-ray from a good forgery of one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import cv2
import numpy as np

# Thumbnail side: large enough to show the lung fields and mediastinum, small enough that the
# training hospital's framing differences average out.
THUMBNAIL = 16
# Principal components of the layout model; the rest of each thumbnail counts as its residual.
COMPONENTS = 16
# Share of the validation X-rays that pass (the "about 99%").
VALIDATION_PASS_RATE = 0.99
# Pixels counted as black or white by the texture statistics (of 0..1).
_DARK, _BRIGHT = 0.04, 0.96
# Smallest variance a direction of the texture model may have, relative to the mean one: a
# statistic that hardly varies on the training images (the white fraction) would otherwise make
# any small difference on another hospital's films look infinitely far.
_VARIANCE_FLOOR = 1e-3


def _gray(images: np.ndarray) -> np.ndarray:
    """``(n, side, side)`` float32 intensities 0..1 of a ``(n, side, side, channels)`` uint8 batch."""
    return _levels(images).astype(np.float32) * np.float32(1.0 / (255 * images.shape[-1]))


def thumbnails(gray: np.ndarray) -> np.ndarray:
    """``(n, THUMBNAIL, THUMBNAIL)`` area-averaged thumbnails of a gray batch."""
    return np.stack([cv2.resize(image, (THUMBNAIL, THUMBNAIL), interpolation=cv2.INTER_AREA) for image in gray])


def _halved(gray: np.ndarray) -> np.ndarray:
    """The batch at half resolution (2 x 2 means; an odd last row or column is dropped)."""
    n, height, width = gray.shape
    even = gray[:, : height // 2 * 2, : width // 2 * 2]
    return (even[:, ::2, ::2] + even[:, 1::2, ::2] + even[:, ::2, 1::2] + even[:, 1::2, 1::2]) * np.float32(0.25)


def _edges(batch: np.ndarray) -> np.ndarray:
    """Log of the mean absolute difference between neighbouring pixels, down and across."""
    down = np.abs(batch[:, 1:] - batch[:, :-1]).mean(axis=(1, 2))
    across = np.abs(batch[:, :, 1:] - batch[:, :, :-1]).mean(axis=(1, 2))
    return np.log(down + across + 1e-3)


def _levels(images: np.ndarray) -> np.ndarray:
    """The batch's gray levels as integers ``0 .. 255 * channels`` (the channels' sum), uint8 or uint16."""
    return images[..., 0] if images.shape[-1] == 1 else images.sum(axis=-1, dtype=np.uint16)


def texture_statistics(images: np.ndarray, gray: np.ndarray, thumbs: np.ndarray) -> np.ndarray:
    """``(n, 8)`` global statistics of a batch (see the module docstring).

    Args:
        images: The ``(n, side, side, channels)`` uint8 batch.
        gray: Its intensities 0..1 (:func:`_gray`), for the edge strengths.
        thumbs: Its thumbnails, for the layout's contrast.

    Brightness, contrast, the histogram's entropy and the dark and bright shares come from one
    exact histogram of each image's integer gray levels (OpenCV's, in C): the same figures as from
    the pixels, at a fraction of the cost.
    """
    n = len(images)
    levels = _levels(images)
    top = 255 * images.shape[-1]
    value = np.arange(top + 1) / top  # the intensity (0..1) of each level
    counts = np.stack([cv2.calcHist([image], [0], None, [top + 1], [0, top + 1]).ravel() for image in levels])
    shares = counts / counts.sum(axis=1, keepdims=True)
    mean = shares @ value
    std = np.sqrt(np.maximum(shares @ value**2 - mean**2, 0.0))
    coarse = np.zeros((top + 1, 16))
    coarse[np.arange(top + 1), np.minimum(np.arange(top + 1) * 16 // top, 15)] = 1.0
    sixteenths = shares @ coarse
    entropy = -(sixteenths * np.log(np.where(sixteenths > 0, sixteenths, 1.0))).sum(axis=1)
    return np.stack(
        [
            mean,
            std,
            _edges(gray),
            _edges(_halved(gray)),
            entropy,
            shares @ (value < _DARK),
            shares @ (value > _BRIGHT),
            thumbs.reshape(n, -1).std(axis=1),
        ],
        axis=1,
    ).astype(np.float64)


@dataclass(frozen=True)
class Gaussian:
    """A Gaussian model of feature vectors, in its principal directions.

    Attributes:
        mean: Mean of the fitted features.
        scale: Per-feature standard deviation the features are divided by before the directions.
        directions: Principal directions kept (rows, unit length).
        variances: Variance along each direction.
        residual_scale: Mean squared residual off the kept directions on the fitted features; 0 when
            every direction is kept (no residual).
    """

    mean: tuple[float, ...]
    scale: tuple[float, ...]
    directions: tuple[tuple[float, ...], ...]
    variances: tuple[float, ...]
    residual_scale: float

    @classmethod
    def fit(cls, features: np.ndarray, components: int | None = None) -> Gaussian:
        """Fit on ``(n, d)`` features, keeping ``components`` directions (all when ``None``)."""
        mean = features.mean(axis=0)
        scale = features.std(axis=0)
        scale = np.where(scale > 1e-12, scale, 1.0)
        centred = (features - mean) / scale
        _, singular, directions = np.linalg.svd(centred, full_matrices=False)
        keep = min(components or features.shape[1], len(singular), max(len(features) - 1, 1))
        variances = singular[:keep] ** 2 / max(len(features) - 1, 1)
        variances = np.maximum(variances, _VARIANCE_FLOOR * max(variances.mean(), 1e-12))
        gaussian = cls(
            tuple(mean.tolist()),
            tuple(scale.tolist()),
            tuple(map(tuple, directions[:keep].tolist())),
            tuple(variances.tolist()),
            0.0,
        )
        if keep == features.shape[1]:
            return gaussian
        residual = float(gaussian._residual(centred).mean())
        return cls(gaussian.mean, gaussian.scale, gaussian.directions, gaussian.variances, max(residual, 1e-12))

    @functools.cached_property
    def _arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return (np.asarray(self.mean), np.asarray(self.scale), np.asarray(self.directions), np.asarray(self.variances))

    def _residual(self, centred: np.ndarray) -> np.ndarray:
        directions = np.asarray(self.directions)
        return ((centred - centred @ directions.T @ directions) ** 2).sum(axis=1)

    def distance(self, features: np.ndarray) -> np.ndarray:
        """Per row: mean squared Mahalanobis distance per kept direction, plus the scaled residual.

        About 1 (about 2 with a residual) on the features it was fitted on.
        """
        mean, scale, directions, variances = self._arrays
        centred = (features - mean) / scale
        distance = ((centred @ directions.T) ** 2 / variances).sum(axis=1) / len(variances)
        if self.residual_scale > 0:
            distance = distance + self._residual(centred) / self.residual_scale
        return distance


@dataclass(frozen=True)
class GateScores:
    """The gate's judgement of a batch: each part scaled to its limit (passes at <= 1)."""

    layout: np.ndarray
    texture: np.ndarray
    orientation: np.ndarray

    @property
    def score(self) -> np.ndarray:
        """The ``ood_score`` served per image: the largest part; an image passes at <= 1."""
        return np.maximum(np.maximum(self.layout, self.texture), self.orientation)

    @property
    def passed(self) -> np.ndarray:
        """Whether each image looks like a frontal chest X-ray the model was made for."""
        return self.score <= 1.0


@dataclass(frozen=True)
class InputGate:
    """The fitted gate, as stored in the model contract.

    Attributes:
        layout: Gaussian of the training thumbnails (flattened).
        texture: Gaussian of the training images' texture statistics.
        layout_limit: Layout distance at which an image stops passing.
        texture_limit: Texture distance at which an image stops passing.
        validation_pass_rate: Share of the validation X-rays that pass.
        n_fitted: Training images the Gaussians were fitted on.
        n_calibrated: Validation images the limits were set on.
    """

    layout: Gaussian
    texture: Gaussian
    layout_limit: float
    texture_limit: float
    validation_pass_rate: float
    n_fitted: int
    n_calibrated: int

    def judge(self, images: np.ndarray) -> GateScores:
        """Score a ``(n, side, side, channels)`` uint8 batch, decoded with the model's input spec."""
        if len(images) == 0:
            empty = np.zeros(0)
            return GateScores(empty, empty, empty)
        layout, texture, turned = _distances(self.layout, self.texture, images)
        return GateScores(layout / self.layout_limit, texture / self.texture_limit, layout / turned)

    def scores(self, images: np.ndarray) -> np.ndarray:
        """The ``ood_score`` of each image (see :attr:`GateScores.score`)."""
        return self.judge(images).score


def _distances(layout: Gaussian, texture: Gaussian, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Layout and texture distances of a batch, and the layout distance of its nearer quarter turn."""
    gray = _gray(images)
    thumbs = thumbnails(gray)
    flat = thumbs.reshape(len(thumbs), -1).astype(np.float64)
    # A quarter turn of a square image's thumbnail is the thumbnail of its quarter turn.
    turned = np.minimum(
        layout.distance(np.rot90(thumbs, 1, axes=(1, 2)).reshape(len(thumbs), -1).astype(np.float64)),
        layout.distance(np.rot90(thumbs, 3, axes=(1, 2)).reshape(len(thumbs), -1).astype(np.float64)),
    )
    return layout.distance(flat), texture.distance(texture_statistics(images, gray, thumbs)), np.maximum(turned, 1e-12)


def fit_gate(train_images: np.ndarray, val_images: np.ndarray, pass_rate: float = VALIDATION_PASS_RATE) -> InputGate:
    """Fit the gate on the training images and set its limits on the validation images.

    Both parts' limits are the same quantile of their validation distances: the smallest quantile
    at which ``pass_rate`` of the validation images pass every part, the orientation test included.

    Args:
        train_images: ``(n, side, side, channels)`` uint8 training images, as the model's spec decodes them.
        val_images: The validation split, likewise (the training images stand in when it is empty).
        pass_rate: Share of the validation images that should pass.
    """
    gray = _gray(train_images)
    thumbs = thumbnails(gray)
    layout = Gaussian.fit(thumbs.reshape(len(thumbs), -1).astype(np.float64), COMPONENTS)
    texture = Gaussian.fit(texture_statistics(train_images, gray, thumbs))
    calibration = val_images if len(val_images) else train_images
    layout_distance, texture_distance, turned = _distances(layout, texture, calibration)
    upright = layout_distance <= turned
    for level in np.linspace(pass_rate, 1.0, 201):
        layout_limit = float(np.quantile(layout_distance, level))
        texture_limit = float(np.quantile(texture_distance, level))
        passed = (layout_distance <= layout_limit) & (texture_distance <= texture_limit) & upright
        if passed.mean() >= pass_rate:
            break
    return InputGate(
        layout, texture, layout_limit, texture_limit, float(passed.mean()), len(train_images), len(calibration)
    )
