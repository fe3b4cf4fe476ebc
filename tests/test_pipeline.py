"""The tf.data pipeline: the label contract on real images, balanced epochs, and the decode cache."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import make_subset
from helpers import cached_set
from pneumo import CLASS_NAMES, pipeline
from pneumo.cv import cv_arrays
from pneumo.data import build_manifest, discover, split_groups
from pneumo.preprocessing import InputSpec

SIZE, CHANNELS = 32, 3


def _folder_label(data_dir: Path, relative: str) -> int:
    """Class of a file from the class folder its real bytes live in, ignoring every label column."""
    return CLASS_NAMES.index((data_dir / relative).resolve().parent.name)


@pytest.fixture(scope="module")
def contract(tmp_path_factory):
    """Real images of both classes, their manifest, decoded set, and a pixel-digest -> class map."""
    root = make_subset(tmp_path_factory.mktemp("contract"), 8, offset=200)
    manifest = build_manifest(discover(root).images, 0.3, 1)
    images = pipeline.load_split(manifest, root, InputSpec(SIZE, CHANNELS))
    truth = [_folder_label(root, p) for p in images.frame["path"]]
    by_pixels: dict[str, set[int]] = {}
    for image, label in zip(images.images, truth):
        by_pixels.setdefault(hashlib.sha1(image.tobytes()).hexdigest(), set()).add(label)
    # Byte-identical copies exist in the dataset, but never with two labels.
    assert all(len(labels) == 1 for labels in by_pixels.values())
    return root, manifest, images, np.array(truth), {k: v.pop() for k, v in by_pixels.items()}


def _true_labels(batch: np.ndarray, by_pixels: dict[str, int]) -> list[int]:
    # A float batch of uint8 pixels converts back exactly.
    return [by_pixels[hashlib.sha1(image.astype(np.uint8).tobytes()).hexdigest()] for image in batch]


def test_manifest_and_decoded_labels_follow_the_folders(contract):
    root, manifest, images, truth, _ = contract
    assert sorted(set(truth)) == [0, 1]
    assert manifest["label"].tolist() == [_folder_label(root, p) for p in manifest["path"]]
    assert (manifest["label_name"] == [CLASS_NAMES[i] for i in manifest["label"]]).all()
    assert images.labels.tolist() == truth.tolist()


@pytest.mark.parametrize("balance", [True, False])
def test_training_batches_carry_normal_0_pneumonia_1(contract, balance):
    _, _, images, _, by_pixels = contract
    dataset, steps = pipeline.train_dataset(images, 4, 2, seed=3, balance=balance)
    seen = 0
    for batch, labels in dataset.as_numpy_iterator():
        assert batch.dtype == np.float32 and labels.dtype == np.float32
        assert batch.shape[1:] == (SIZE, SIZE, CHANNELS)
        assert labels.tolist() == _true_labels(batch, by_pixels)
        seen += 1
    assert seen == 2 * steps


def test_evaluation_batches_carry_normal_0_pneumonia_1_in_manifest_order(contract):
    _, _, images, truth, by_pixels = contract
    labels_seen, truth_seen = [], []
    for batch, labels in pipeline.eval_dataset(images, 5).as_numpy_iterator():
        labels_seen += labels.astype(int).tolist()
        truth_seen += _true_labels(batch, by_pixels)
    assert labels_seen == truth_seen == truth.tolist()


def test_cv_arrays_carry_normal_0_pneumonia_1(contract):
    _, _, images, truth, by_pixels = contract
    X, y, groups = cv_arrays(images)
    assert X.dtype == np.uint8 and X.shape == (len(truth), SIZE, SIZE, CHANNELS)
    assert y.tolist() == truth.tolist() == _true_labels(X, by_pixels)
    # Folds group patients (by source folder's id space), united with byte-identical files.
    assert groups.tolist() == split_groups(images.frame).tolist()
    assert groups.tolist() == [f"train/{patient}" for patient in images.frame["patient_id"]]


def test_balanced_indices_give_equal_class_counts():
    labels = np.array([0] * 13 + [1] * 41)
    indices = pipeline.balanced_indices(labels, seed=5)
    assert np.bincount(labels[indices]).tolist() == [41, 41]
    # Every majority image exactly once; the minority repeated, none left out.
    assert np.bincount(indices[labels[indices] == 1], minlength=54)[13:].tolist() == [1] * 41
    assert set(indices[labels[indices] == 0]) == set(range(13))
    assert not np.array_equal(indices, np.sort(indices)), "an epoch must be shuffled"
    np.testing.assert_array_equal(indices, pipeline.balanced_indices(labels, seed=5))
    assert not np.array_equal(indices, pipeline.balanced_indices(labels, seed=6))


def test_every_epoch_is_a_fresh_balanced_draw():
    labels = np.array([1] * 30 + [0] * 7)
    epochs = pipeline.epoch_indices(labels, 3, seed=1, balance=True)
    for order in epochs:
        assert np.bincount(labels[order]).tolist() == [30, 30]
    assert not np.array_equal(epochs[0], epochs[1])
    plain = pipeline.epoch_indices(labels, 2, seed=1, balance=False)
    assert all(sorted(order) == list(range(37)) for order in plain)


def test_balanced_training_batches_are_balanced_in_every_epoch(contract):
    # Real images, batch 2: every image of the majority class once per epoch, the minority drawn up to it.
    _, _, images, _, _ = contract
    dataset, steps = pipeline.train_dataset(images, 2, 1, seed=0, balance=True)
    labels = np.concatenate([y for _, y in dataset.as_numpy_iterator()])
    majority = int(np.bincount(images.labels).max())
    assert steps == majority and len(labels) == 2 * majority
    assert labels.sum() == majority
    # 30 normal to 90 pneumonia over three epochs: each epoch balanced, up to the dropped remainder.
    data = cached_set(30, 90)
    dataset, steps = pipeline.train_dataset(data, batch_size=12, epochs=3, seed=1, balance=True)
    labels = np.concatenate([y.numpy() for _, y in dataset])
    assert steps == 180 // 12
    for epoch in range(3):
        counts = np.bincount(labels[epoch * steps * 12 : (epoch + 1) * steps * 12].astype(int), minlength=2)
        assert abs(counts[0] - counts[1]) <= 12, counts  # only the dropped remainder may differ
    # Without balancing the draw keeps the natural 1:3 ratio.
    plain, _ = pipeline.train_dataset(data, batch_size=12, epochs=1, seed=1, balance=False)
    assert np.concatenate([y.numpy() for _, y in plain]).mean() == pytest.approx(0.75, abs=0.05)


def test_train_dataset_refuses_a_batch_larger_than_the_data(contract):
    _, _, images, _, _ = contract
    with pytest.raises(ValueError, match="exceeds"):
        pipeline.train_dataset(images, 10_000, 1, seed=0, balance=False)


def test_decoded_images_are_cached_by_content_and_shape(contract, tmp_path):
    root, manifest, images, _, _ = contract
    cache = tmp_path / "cache"
    first = pipeline.load_split(manifest, root, InputSpec(SIZE, CHANNELS), str(cache))
    assert len(list(cache.glob("images-*.npz"))) == 1
    np.testing.assert_array_equal(first.images, images.images)
    # Served from the cache: the data folder is not even needed any more.
    again = pipeline.load_split(manifest, tmp_path / "no-such-folder", InputSpec(SIZE, CHANNELS), str(cache))
    np.testing.assert_array_equal(again.images, images.images)
    np.testing.assert_array_equal(again.labels, images.labels)
    pipeline.load_split(manifest, root, InputSpec(SIZE, 1), str(cache))
    assert len(list(cache.glob("images-*.npz"))) == 2, "another shape must not reuse the cache"


def test_undecodable_rows_are_skipped_and_labels_stay_aligned(contract, tmp_path, caplog):
    root, manifest, _, _, _ = contract
    broken = tmp_path / "train" / "PNEUMONIA"
    broken.mkdir(parents=True)
    (broken / "person9_virus_9.jpeg").write_bytes(b"\xff\xd8 not really a jpeg")
    rows = manifest.head(4).copy()
    # Manifest paths are relative to data_dir ("/" here, so both folders are inside it).
    rows["path"] = [str((root / p).resolve().relative_to("/")) for p in rows["path"]]
    bad_path = (broken / "person9_virus_9.jpeg").resolve().relative_to("/")
    bad = rows.iloc[[0]].assign(path=str(bad_path), label=1, sha256="0" * 64)
    frame = pd.concat([rows.iloc[:2], bad, rows.iloc[2:]], ignore_index=True)
    with caplog.at_level(logging.WARNING, logger="pneumo.pipeline"):
        result = pipeline.load_split(frame, Path("/"), InputSpec(SIZE, CHANNELS))
    assert "could not be decoded" in caplog.text
    assert result.frame["path"].tolist() == rows["path"].tolist()
    assert result.labels.tolist() == rows["label"].tolist()
    assert len(result.images) == 4
