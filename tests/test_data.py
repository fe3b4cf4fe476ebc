"""Discovery, patient ids and the split manifest, on synthetic files and on the real data."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import xray_files as xf
from conftest import require_real_data
from helpers import tree_state
from pneumo import CLASS_NAMES
from pneumo.data import (
    MANIFEST_COLUMNS,
    build_manifest,
    discover,
    grouped_split,
    patient_id,
    patient_key,
    read_manifest,
    resolve_data_dir,
    split_frame,
)
from pneumo.errors import DataError
from pneumo.preprocessing import InputSpec, decode_file


@pytest.mark.parametrize(
    "file_name,expected",
    [
        ("person1000_bacteria_2931.jpeg", "person1000"),
        ("person1000_virus_1681.jpeg", "person1000"),
        ("person1_virus_6.jpeg", "person1"),
        ("person1476_virus_2560_2.jpeg", "person1476"),  # person<ID>_virus_<n>_<n>
        ("person22_virus_55_1_2.jpeg", "person22"),
        ("PERSON7_BACTERIA_3.JPEG", "PERSON7"),
        ("IM-0115-0001.jpeg", "IM-0115"),
        ("IM-0117-0001-0002.jpeg", "IM-0117"),  # extra -<n> part
        ("NORMAL2-IM-0123-0001.jpeg", "NORMAL2-IM-0123"),
        ("NORMAL2-IM-0927-0001-0002.jpeg", "NORMAL2-IM-0927"),
        ("NORMAL2-IM-1345-0001-0002-0003.png", "NORMAL2-IM-1345"),
        # Unknown patterns are their own patient, so they can never leak with another image.
        ("scan_from_elsewhere.png", "scan_from_elsewhere"),
        ("IM-0115.jpeg", "IM-0115"),
    ],
)
def test_patient_id_on_every_naming_pattern(file_name, expected):
    assert patient_id(file_name) == expected


def test_patient_id_does_not_merge_different_patients():
    assert patient_id("IM-0115-0001.jpeg") != patient_id("NORMAL2-IM-0115-0001.jpeg")
    assert patient_id("person1_virus_1.jpeg") != patient_id("person10_virus_1.jpeg")


def test_every_real_file_name_matches_a_known_pattern():
    names = [p.name for c in CLASS_NAMES for p in (require_real_data() / "train" / c).iterdir()]
    unmatched = [n for n in names if patient_id(n) == Path(n).stem]
    assert not unmatched, unmatched[:5]


@pytest.fixture
def messy_layout(tmp_path, sample_bytes) -> Path:
    """A Kaggle layout holding good images of every mode and every kind of bad file."""
    normal, pneumonia = tmp_path / "train" / "NORMAL", tmp_path / "train" / "PNEUMONIA"
    normal.mkdir(parents=True)
    pneumonia.mkdir(parents=True)
    good = {
        normal / "IM-0001-0001.jpeg": "L.jpeg",
        normal / "IM-0001-0002.png": "RGBA.png",
        normal / "IM-0002-0001-0002.png": "P-transparent.png",
        normal / "NORMAL2-IM-0003-0001.png": "I16.png",
        pneumonia / "person1_bacteria_1.jpeg": "CMYK.jpeg",
        pneumonia / "person1_virus_2.png": "LA.png",
        pneumonia / "person2_virus_3_4.jpeg": "RGB.jpeg",
        pneumonia / "person3_bacteria_5.png": "P.png",
    }
    for path, sample in good.items():
        path.write_bytes(sample_bytes[sample])
    jpeg = xf.encode(Image.fromarray(xf.noise(300, 300, 3), "RGB"), "JPEG", quality=95)
    (normal / "IM-0004-0001.jpeg").write_bytes(jpeg[: len(jpeg) // 2])  # truncated
    (normal / "IM-0005-0001.png").write_bytes(os.urandom(2048))  # corrupt
    (normal / ".IM-0006-0001.jpeg").write_bytes(sample_bytes["L.jpeg"])  # hidden (a valid image!)
    (pneumonia / "notes.txt").write_text("not an image")
    (pneumonia / "person4_virus_6.png").write_bytes(xf.encode(Image.fromarray(xf.noise(16, 16), "L"), "PNG"))  # tiny
    (pneumonia / "subfolder").mkdir()  # directories are not files to judge
    return tmp_path


def test_discover_lists_every_reject_with_its_reason_and_keeps_every_good_image(messy_layout):
    found = discover(messy_layout)
    reasons = dict(zip(found.rejected["path"], found.rejected["reason"]))
    assert set(reasons) == {
        "train/NORMAL/IM-0004-0001.jpeg",
        "train/NORMAL/IM-0005-0001.png",
        "train/NORMAL/.IM-0006-0001.jpeg",
        "train/PNEUMONIA/notes.txt",
        "train/PNEUMONIA/person4_virus_6.png",
    }
    assert reasons["train/NORMAL/IM-0004-0001.jpeg"].startswith("undecodable")
    assert reasons["train/NORMAL/IM-0005-0001.png"].startswith("undecodable")
    assert reasons["train/NORMAL/.IM-0006-0001.jpeg"] == "hidden file"
    assert reasons["train/PNEUMONIA/notes.txt"].startswith("not an image file")
    assert reasons["train/PNEUMONIA/person4_virus_6.png"].startswith("unusable size")

    images = found.images.set_index("path")
    assert len(images) == 8
    assert images.loc["train/NORMAL/NORMAL2-IM-0003-0001.png", "mode"] == "I;16"
    assert images.loc["train/PNEUMONIA/person1_bacteria_1.jpeg", "mode"] == "CMYK"
    assert images.loc["train/NORMAL/IM-0001-0001.jpeg", ["width", "height"]].tolist() == [45, 60]
    assert images.loc["train/NORMAL/IM-0002-0001-0002.png", "patient_id"] == "IM-0002"
    for path, row in images.iterrows():
        assert row["label_name"] == path.split("/")[1]
        assert row["label"] == CLASS_NAMES.index(row["label_name"])
        assert row["sha256"] == hashlib.sha256((messy_layout / path).read_bytes()).hexdigest()
    # Every good image decodes through the training/serving path.
    for path in images.index:
        assert decode_file(str(messy_layout / path), InputSpec(32, 1)).shape == (32, 32, 1)


def test_discover_on_an_empty_layout_rejects_nothing_and_the_manifest_refuses(tmp_path):
    (tmp_path / "train" / "NORMAL").mkdir(parents=True)
    found = discover(tmp_path)
    assert found.images.empty and found.rejected.empty
    with pytest.raises(DataError, match="no usable images"):
        build_manifest(found.images, 0.1, 0)


def test_resolve_data_dir_explains_a_wrong_layout(tmp_path):
    (tmp_path / "train" / "NORMAL").mkdir(parents=True)
    with pytest.raises(DataError, match="missing train/PNEUMONIA"):
        resolve_data_dir(str(tmp_path))


def test_resolve_data_dir_uses_the_environment_variable(tmp_path, monkeypatch):
    for name in CLASS_NAMES:
        (tmp_path / "train" / name).mkdir(parents=True)
    monkeypatch.setenv("PNEUMO_DATA_DIR", str(tmp_path))
    assert resolve_data_dir("") == tmp_path.resolve()


# --- the split, on the real data -------------------------------------------------------------


@pytest.fixture(scope="module")
def real_images() -> pd.DataFrame:
    """Discovery of all real images, train and test (once per module)."""
    found = discover(require_real_data())
    assert found.rejected.empty, found.rejected.head()
    return found.images


@pytest.fixture(scope="module")
def real_manifest(real_images) -> pd.DataFrame:
    return build_manifest(real_images, 0.1, 42)


def test_real_data_is_fully_discovered_with_folder_labels(real_images):
    counts = real_images.groupby(["source_split", "label_name"]).size().to_dict()
    assert counts == {
        ("train", "NORMAL"): 1341,
        ("train", "PNEUMONIA"): 3875,
        ("test", "NORMAL"): 117,
        ("test", "PNEUMONIA"): 194,
    }
    assert len(real_images) == 5216 + 311
    folder = real_images["path"].str.split("/").str[1]
    assert (folder == real_images["label_name"]).all()
    assert (real_images["label"] == (folder == "PNEUMONIA").astype(int)).all()
    # The dataset holds byte-identical copies (e.g. person258_bacteria_1207..1209), but only
    # within one patient, so grouping by patient also keeps every copy on one side.
    copies = real_images[real_images["sha256"].duplicated(keep=False)]
    assert len(copies) > 0
    assert (copies.assign(patient=patient_key(copies)).groupby("sha256")["patient"].nunique() == 1).all()


def test_patient_ids_name_a_patient_within_their_source_split(real_images):
    # Train and test are numbered separately: the same id in both is two children.
    source = real_images["path"].str.split("/").str[0]
    shared = set(real_images.loc[source == "train", "patient_id"]) & set(
        real_images.loc[source == "test", "patient_id"]
    )
    assert len(shared) == 87 and "person102" in shared
    keys = patient_key(real_images)
    assert keys.nunique() == real_images.groupby([source, real_images["patient_id"]]).ngroups
    row = real_images.assign(path=["val/NORMAL/x.jpeg"] + list(real_images["path"][1:])).iloc[[0]]
    assert patient_key(row).iloc[0].startswith("train/"), "Kaggle's val folder shares train's ids"


def test_grouped_split_on_real_data_keeps_patients_on_one_side(real_manifest):
    manifest = real_manifest
    assert list(manifest.columns) == MANIFEST_COLUMNS
    assert set(manifest["split"]) == {"train", "val", "test"}
    # The official test folder stays test, whole, and nothing else joins it.
    assert (manifest["path"].str.startswith("test/") == (manifest["split"] == "test")).all()
    sides = manifest.groupby(patient_key(manifest))["split"].nunique()
    assert (sides == 1).all(), f"patients on two sides: {list(sides[sides > 1].index[:5])}"
    assert (manifest.groupby("sha256")["split"].nunique() == 1).all(), "identical image on two sides"
    # Several images per patient exist, so the grouping was not trivially satisfied.
    assert manifest.groupby(patient_key(manifest)).size().max() > 1


def test_grouped_split_on_real_data_is_stratified_with_the_requested_size(real_manifest):
    pool = real_manifest[real_manifest["split"] != "test"]  # validation is carved from train only
    val = pool[pool["split"] == "val"]
    assert abs(len(val) / len(pool) - 0.1) < 0.015
    overall = pool["label"].mean()
    assert abs(val["label"].mean() - overall) < 0.02
    assert abs(pool.loc[pool["split"] == "train", "label"].mean() - overall) < 0.01


def test_split_is_repeatable_and_seed_dependent(real_images, real_manifest):
    again = build_manifest(real_images, 0.1, 42)
    pd.testing.assert_frame_equal(again, real_manifest)
    other = build_manifest(real_images, 0.1, 7)
    assert not other["split"].equals(real_manifest["split"])


def test_manifest_round_trips_and_guards_the_label_contract(real_manifest, tmp_path):
    path = tmp_path / "manifest.csv"
    real_manifest.to_csv(path, index=False)
    pd.testing.assert_frame_equal(read_manifest(path), real_manifest, check_dtype=False)
    inverted = real_manifest.assign(label=1 - real_manifest["label"])
    inverted.to_csv(path, index=False)
    with pytest.raises(DataError, match="label contract"):
        read_manifest(path)


def test_limit_per_class_takes_whole_patients(real_images):
    manifest = build_manifest(real_images, 0.1, 42, limit_per_class=50)
    full = real_images.groupby(patient_key(real_images)).size()
    kept = manifest.groupby(patient_key(manifest)).size()
    assert (kept == full[kept.index]).all(), "a patient was cut in half"
    per_cell = manifest.groupby(["split", "label"]).size()
    assert len(per_cell) == 6 and (per_cell >= 50).all() and (per_cell < 50 + full.max()).all()


def test_grouped_split_refuses_impossible_fractions():
    frame = pd.DataFrame(
        {
            "label": [0, 1] * 5,
            "patient_id": [f"p{i}" for i in range(10)],
            "path": [f"train/{CLASS_NAMES[i % 2]}/p{i}.png" for i in range(10)],
            "sha256": [f"{i:064x}" for i in range(10)],
        }
    )
    with pytest.raises(DataError, match="between 0 and 1"):
        grouped_split(frame, 1.0, 0)
    with pytest.raises(DataError, match="too few patients"):
        grouped_split(frame, 0.05, 0)


# --- the notebook's validation scheme ----------------------------------------------------------


def test_notebook_scheme_moves_100_test_images_to_val_without_touching_files(tmp_path):
    for split, per_class in (("train", 15), ("test", 60)):
        for label, name in enumerate(CLASS_NAMES):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                stem = f"IM-{split}{i:04d}-0001" if label == 0 else f"person{i}{split}_virus_{i}"
                (folder / f"{stem}.png").write_bytes(distinct_png(f"{split}/{label}/{i}"))
    before = tree_state(tmp_path)
    manifest = build_manifest(discover(tmp_path).images, 0.1, 3, val_scheme="notebook")
    assert tree_state(tmp_path) == before
    counts = manifest.groupby("split").size().to_dict()
    assert counts == {"train": 30, "val": 100, "test": 20}
    assert manifest.loc[manifest["split"] == "val", "path"].str.startswith("test/").all()
    assert manifest.loc[manifest["split"] == "train", "path"].str.startswith("train/").all()
    assert len(split_frame(manifest, "test")) == 20
    with pytest.raises(DataError, match="val_scheme"):
        build_manifest(discover(tmp_path).images, 0.1, 3, val_scheme="random")


def test_notebook_scheme_needs_a_test_folder(tmp_path):
    found = discover(make_tiny_layout(tmp_path))
    with pytest.raises(DataError, match="test folder"):
        build_manifest(found.images, 0.1, 0, val_scheme="notebook")
    with pytest.raises(DataError, match="no 'test' images"):
        split_frame(build_manifest(found.images, 0.5, 0), "test")


def distinct_png(key: str, side: int = 32) -> bytes:
    """A small grayscale PNG whose bytes differ for every ``key`` (identical files share a split group)."""
    pixels = xf.noise(side, side)
    pixels[0, : len(key)] = np.frombuffer(key.encode(), np.uint8)
    return xf.encode(Image.fromarray(pixels, "L"), "PNG")


def make_tiny_layout(root: Path, per_class: int = 4) -> Path:
    """``per_class`` patients per class, two distinct images each, in train only."""
    for label, name in enumerate(CLASS_NAMES):
        folder = root / "train" / name
        folder.mkdir(parents=True, exist_ok=True)
        for patient in range(per_class):
            for image in range(2):
                stem = f"IM-{patient:04d}-{image:04d}" if label == 0 else f"person{patient}_bacteria_{image}"
                (folder / f"{stem}.png").write_bytes(distinct_png(f"{label}/{patient}/{image}"))
    return root
