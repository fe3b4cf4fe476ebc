"""``tf.data`` input pipelines: decode once, cache, balance, augment on whole batches.

Images are decoded by :func:`pneumo.preprocessing.decode_image` (the serving path) inside a
parallel ``tf.data`` map, once, into a ``uint8`` array kept in memory and optionally on disk.
Training batches are then drawn by index: imbalanced-learn's ``RandomOverSampler`` picks a
class-balanced set of indices for each epoch, the batch is gathered from the cached tensor and
augmented by Keras preprocessing layers in one vectorised call. No Python runs per image.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from imblearn.over_sampling import RandomOverSampler

from pneumo import runs
from pneumo.data import read_checked
from pneumo.preprocessing import InputSpec, decode_file, decode_image
from pneumo.progress import progress

log = logging.getLogger(__name__)
AUTOTUNE = tf.data.AUTOTUNE
# Bump when decode_image changes, so stale disk caches are not reused.
_DECODER_VERSION = "2"


@dataclass
class Examples:
    """Model inputs and their labels: what the pipeline batches (images, or features computed from them)."""

    inputs: np.ndarray  # (n, ...) one input per example
    labels: np.ndarray  # (n,) int32, 1 = pneumonia


@dataclass
class ImageSet:
    """Decoded images of one split with their labels and manifest rows (failed decodes dropped)."""

    images: np.ndarray  # (n, size, size, channels) uint8
    labels: np.ndarray  # (n,) int32, 1 = pneumonia
    frame: pd.DataFrame  # manifest rows, aligned with images

    @property
    def inputs(self) -> np.ndarray:
        """The images, as the pipeline's inputs (see :class:`Examples`)."""
        return self.images


def _decode_all(
    paths: list[str], spec: InputSpec, data_dir: Path | None = None, hashes: list[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Decode files in a parallel tf.data map; return images and a per-file success flag.

    With ``data_dir`` and ``hashes``, ``paths`` are manifest paths: each file is read through
    :func:`pneumo.data.read_checked` (confined to ``data_dir``, a regular file, size capped, and
    its bytes must still hash to the manifest's SHA-256), else reported and skipped.
    """
    shape = (spec.image_size, spec.image_size, spec.channels)
    hashes = list(hashes) if hashes is not None else [""] * len(paths)

    def decode(path: bytes, sha256: bytes) -> tuple[np.ndarray, bool]:
        try:
            if data_dir is None:
                return decode_file(path.decode(), spec), True
            return decode_image(read_checked(data_dir, path.decode(), sha256.decode()), spec), True
        except Exception as error:  # reported and skipped, never fatal
            log.warning("skipping %s: %s", path.decode(), error)
            return np.zeros(shape, np.uint8), False

    def tf_decode(path: tf.Tensor, sha256: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        image, ok = tf.numpy_function(decode, [path, sha256], [tf.uint8, tf.bool], stateful=False)
        image.set_shape(shape)
        ok.set_shape(())
        return image, ok

    dataset = tf.data.Dataset.from_tensor_slices((paths, hashes)).map(tf_decode, num_parallel_calls=AUTOTUNE)
    images = np.empty((len(paths), *shape), np.uint8)
    ok = np.empty(len(paths), bool)
    batches = progress(dataset.batch(256).as_numpy_iterator(), -(-len(paths) // 256), "decoding", "batch")
    for start, (batch, flags) in zip(range(0, len(paths), 256), batches):
        runs.check()  # a stop request ends a long first decode within one batch
        images[start : start + len(batch)] = batch
        ok[start : start + len(batch)] = flags
    return images, ok


def load_split(frame: pd.DataFrame, data_dir: Path, spec: InputSpec, cache_dir: str = "") -> ImageSet:
    """Decode the images of manifest rows, from the disk cache when it holds them.

    Args:
        frame: Manifest rows (see :mod:`pneumo.data`).
        data_dir: Folder the manifest paths are relative to.
        spec: How the files become model inputs (size, channels, crop, equalisation).
        cache_dir: Folder for ``.npz`` caches keyed by content hashes and the spec; empty = none.
            The cache holds patients' pixels: files are 0600 in a 0700 folder (see
            :func:`write_cache`). A cache that cannot be written (read-only, full) is warned about
            and the run goes on without it.

    Returns:
        The decoded set. Files that fail to decode are logged and left out.

    Raises:
        pneumo.runs.Stopped: A stop was requested (checked before and after decoding).
    """
    runs.check()
    key = hashlib.sha256("|".join([_DECODER_VERSION, repr(spec), *frame["sha256"]]).encode()).hexdigest()[:24]
    cache = Path(cache_dir) / f"images-{key}.npz" if cache_dir else None
    stored = (
        read_cache(cache, (len(frame), spec.image_size, spec.image_size, spec.channels)) if cache is not None else None
    )
    if stored is not None:
        images, ok = stored
        _tighten(cache)  # a cache written 0644 by an older version
    else:
        images, ok = _decode_all(list(frame["path"]), spec, Path(data_dir), list(frame["sha256"]))
        runs.check()
        if cache is not None:
            try:
                write_cache(cache, images, ok)
            except OSError as error:
                log.warning(
                    "could not write the image cache in %s (%s); going on without it",
                    cache.parent,
                    error.strerror or type(error).__name__,
                )
    if not ok.all():
        log.warning("%d of %d images could not be decoded and were skipped", (~ok).sum(), len(ok))
    kept = frame[ok].reset_index(drop=True)
    return ImageSet(images[ok], kept["label"].to_numpy(np.int32), kept)


def read_cache(cache: Path, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray] | None:
    """Images and flags from a disk cache, or None (a miss) when it is absent, unreadable or the wrong shape."""
    if not cache.is_file():
        return None
    try:
        with np.load(cache, allow_pickle=False) as stored:
            images, ok = stored["images"], stored["ok"]
    except Exception as error:  # truncated, corrupt or foreign: decode again and overwrite it
        log.warning("ignoring unreadable image cache %s (%s)", cache, type(error).__name__)
        return None
    if images.shape != shape or images.dtype != np.uint8 or ok.shape != shape[:1] or ok.dtype != bool:
        log.warning("ignoring image cache %s: holds %s %s, expected %s uint8", cache, images.shape, images.dtype, shape)
        return None
    return images, ok


def _tighten(cache: Path) -> None:
    """Make an existing cache file of this user 0600 and its folder 0700; a failure only costs a warning."""
    try:
        private_folder(cache.parent)
        status = cache.stat()
        if status.st_mode & 0o077 and status.st_uid == os.getuid():
            os.chmod(cache, 0o600)
    except OSError as error:
        log.warning("could not make the image cache %s private (%s)", cache, error.strerror or type(error).__name__)


def private_folder(folder: Path) -> None:
    """Make ``folder`` (and missing parents) and leave it 0700: it is going to hold patients' pixels.

    An existing folder of this user with access for others is tightened to 0700, with a warning;
    one of another user, or a shared sticky folder such as ``/tmp``, is left as it is (the files
    in it are 0600 all the same).
    """
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    status = folder.stat()
    if status.st_mode & 0o077 and status.st_uid == os.getuid() and not status.st_mode & stat.S_ISVTX:
        os.chmod(folder, 0o700)
        log.warning("the image cache folder %s was open to other users; it is now 0700", folder)


def write_cache(cache: Path, images: np.ndarray, ok: np.ndarray) -> None:
    """Write a disk cache atomically under a unique temporary name: concurrent writers never collide.

    The file is 0600 in a 0700 folder (:func:`private_folder`): decoded X-rays are patient data.

    Raises:
        OSError: The folder cannot be made or written (read-only, full); nothing is left behind.
    """
    private_folder(cache.parent)
    handle, partial = tempfile.mkstemp(dir=cache.parent, prefix=f".{cache.stem}-", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as output:
            np.savez(output, images=images, ok=ok)
        os.chmod(partial, 0o600)  # mkstemp's mode, stated: no umask or platform may widen it
        os.replace(partial, cache)  # atomic: a reader sees the old file or the whole new one
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


def balanced_indices(labels: np.ndarray, seed: int) -> np.ndarray:
    """One epoch of shuffled indices in which both classes are equally frequent.

    imbalanced-learn's ``RandomOverSampler`` resamples the row indices (not the pixels), so the
    minority class is repeated without copying images.

    Args:
        labels: Class of each cached image.
        seed: Seed of this epoch's draw.

    Returns:
        Indices into ``labels``; ``2 * majority count`` of them.
    """
    sampler = RandomOverSampler(random_state=seed)
    indices, _ = sampler.fit_resample(np.arange(len(labels)).reshape(-1, 1), labels)
    return np.random.default_rng(seed).permutation(indices.ravel())


def epoch_indices(labels: np.ndarray, epochs: int, seed: int, balance: bool) -> list[np.ndarray]:
    """Index order of every epoch: balanced by oversampling, or a plain shuffle."""
    if balance:
        return [balanced_indices(labels, seed * 1000 + epoch) for epoch in range(epochs)]
    return [np.random.default_rng(seed * 1000 + epoch).permutation(len(labels)) for epoch in range(epochs)]


def train_dataset(
    data: Examples | ImageSet,
    batch_size: int,
    epochs: int,
    seed: int,
    balance: bool,
    augmenter: "keras.layers.Layer | None" = None,
) -> tuple[tf.data.Dataset, int]:
    """Training batches for all epochs, each epoch a fresh (optionally balanced) draw.

    Args:
        data: Cached training inputs (images, or features) and labels.
        batch_size: Images per batch.
        epochs: Number of epochs to draw.
        seed: Seed of the draws.
        balance: Oversample the minority class to parity in every epoch.
        augmenter: Keras layer applied to each whole batch (training only); None = no augmentation.

    Returns:
        The dataset of ``(images float32, labels float32)`` and the steps per epoch.
    """
    orders = epoch_indices(data.labels, epochs, seed, balance)
    steps = len(orders[0]) // batch_size
    if steps == 0:
        raise ValueError(f"batch_size {batch_size} exceeds the {len(orders[0])} training images")
    order = np.concatenate([o[: steps * batch_size] for o in orders]).astype(np.int32)
    images = tf.constant(data.inputs)
    labels = tf.constant(data.labels.astype(np.float32))

    def gather(index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        batch = tf.cast(tf.gather(images, index), tf.float32)
        if augmenter is not None:
            batch = augmenter(batch, training=True)
        return batch, tf.gather(labels, index)

    # One map call per batch, in order: the augmentation's seed stream stays repeatable.
    dataset = tf.data.Dataset.from_tensor_slices(order).batch(batch_size).map(gather).prefetch(AUTOTUNE)
    return dataset, steps


def eval_dataset(data: Examples | ImageSet, batch_size: int) -> tf.data.Dataset:
    """Batches of cached inputs in manifest order, never augmented."""
    return (
        tf.data.Dataset.from_tensor_slices((data.inputs, data.labels.astype(np.float32)))
        .batch(batch_size)
        .map(lambda x, y: (tf.cast(x, tf.float32), y))
        .prefetch(AUTOTUNE)
    )
