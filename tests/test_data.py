"""Discovery, patient ids and the split manifest, on synthetic files and on the real data."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import threading
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

import xray_files as xf
from conftest import require_real_data
from helpers import tree_state
from pneumo import CLASS_NAMES
from pneumo.config import DataConfig
from pneumo.data import (
    MANIFEST_COLUMNS,
    build_manifest,
    discover,
    grouped_split,
    patient_id,
    patient_key,
    prepare_manifest,
    read_checked,
    read_manifest,
    resolve_data_dir,
    split_frame,
)
from pneumo.errors import ConfigError, DataError
from pneumo.manifests import log_manifest
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
    with pytest.raises(ConfigError, match="val_scheme"):  # checked once, by the config
        DataConfig(val_scheme="random")


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


# --- the data path under hostile files (issue 18 §5, issue 14 §4) ----------------------------


def _kaggle_layout(root: Path, per_class: int = 6, test_per_class: int = 3) -> Path:
    """Distinct small PNGs: ``per_class`` patients (two images each) per class in train, a few in test."""
    make_tiny_layout(root, per_class)
    for label, name in enumerate(CLASS_NAMES):
        folder = root / "test" / name
        folder.mkdir(parents=True)
        for i in range(test_per_class):
            stem = f"IM-{i + 500:04d}-0001" if label == 0 else f"person{i + 500}_virus_{i}"
            (folder / f"{stem}.png").write_bytes(distinct_png(f"test/{label}/{i}"))
    return root


def _run_with_timeout(function, seconds: float = 60):
    """Run ``function`` in a thread; the result, or the exception it raised; None while it still runs."""
    outcome = {}

    def target():
        try:
            outcome["value"] = function()
        except BaseException as error:  # handed to the test
            outcome["value"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    return None if thread.is_alive() else outcome["value"]


def test_a_fifo_is_refused_without_being_opened(tmp_path):
    fifo = tmp_path / "train" / "NORMAL" / "IM-0001-0001.jpeg"
    fifo.parent.mkdir(parents=True)
    os.mkfifo(fifo)
    try:
        # Opening a FIFO for reading blocks until a writer comes: evaluate hung until killed.
        outcome = _run_with_timeout(lambda: read_checked(tmp_path, "train/NORMAL/IM-0001-0001.jpeg", ""))
        assert isinstance(outcome, DataError), f"read_checked returned {outcome!r} (None: it blocked)"
        assert "not a regular file" in str(outcome)
        (tmp_path / "train" / "PNEUMONIA").mkdir()
        found = _run_with_timeout(lambda: discover(tmp_path))
        assert found is not None, "discovery blocked on the FIFO"
        assert found.rejected.to_dict("records") == [
            {"path": "train/NORMAL/IM-0001-0001.jpeg", "reason": "not a regular file"}
        ]
    finally:
        with contextlib.suppress(OSError):  # release a reader that did block, so the thread can end
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


def test_a_non_utf8_file_name_is_rejected_and_prepare_goes_on(tmp_path, tracking):
    root = _kaggle_layout(tmp_path / "data")
    raw = os.path.join(os.fsencode(root / "train" / "NORMAL"), b"IM-0777-0001-caf\xe9.png")
    with open(raw, "wb") as handle:
        handle.write(distinct_png("latin-1 name"))
    manifest = prepare_manifest(DataConfig(data_dir=str(root), val_fraction=0.3))
    assert manifest.rejected.to_dict("records") == [
        {"path": "train/NORMAL/IM-0777-0001-caf\\xe9.png", "reason": "file name is not valid UTF-8 (rename the file)"}
    ]
    assert len(manifest.frame) == 2 * 2 * 6 + 2 * 3
    with mlflow.start_run() as run:  # the reports are written and logged (a raw name crashed here)
        log_manifest(manifest, context="prepare")
    rejected = pd.read_csv(mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/rejected_files.csv"))
    assert rejected["path"].tolist() == ["train/NORMAL/IM-0777-0001-caf\\xe9.png"]


@pytest.mark.parametrize("kind", ["GIF", "TIFF", "BMP"])
def test_other_formats_named_jpeg_are_rejected_by_content(tmp_path, kind):
    folder = tmp_path / "train" / "NORMAL"
    folder.mkdir(parents=True)
    picture = Image.fromarray(xf.noise(64, 64), "L")
    (folder / "IM-0001-0001.jpeg").write_bytes(xf.encode(picture, kind))
    # A PNG named .jpeg is what decode_image reads (by content) in training and serving: accepted.
    (folder / "IM-0002-0001.jpeg").write_bytes(xf.encode(picture, "PNG"))
    found = discover(tmp_path)
    assert found.rejected.to_dict("records") == [
        {
            "path": "train/NORMAL/IM-0001-0001.jpeg",
            "reason": f"undecodable: the content is {kind}, not JPEG, PNG or DICOM",
        }
    ]
    assert found.images["path"].tolist() == ["train/NORMAL/IM-0002-0001.jpeg"]
    assert found.images[["width", "height", "mode"]].values.tolist() == [[64, 64, "L"]]


def test_discovery_accepts_exactly_what_decode_image_accepts(tmp_path):
    folder = tmp_path / "train" / "PNEUMONIA"
    folder.mkdir(parents=True)
    gray = xf.noise(80, 70)
    (folder / "person1_virus_1.dcm").write_bytes(xf.dicom(gray))  # a hospital's site folder may hold DICOM
    (folder / "person2_virus_2.dicom").write_bytes(xf.dicom(gray, photometric="MONOCHROME1", bits_stored=8))
    # Pillow opens WebP, ICO, PCX and dozens more: none of them reaches a model.
    (folder / "person3_virus_3.png").write_bytes(xf.encode(Image.fromarray(gray, "L"), "WEBP"))
    found = discover(tmp_path)
    images = found.images.set_index("path")
    assert images.loc["train/PNEUMONIA/person1_virus_1.dcm", ["width", "height", "mode"]].tolist() == [70, 80, "I;16"]
    assert images.loc["train/PNEUMONIA/person2_virus_2.dicom", ["width", "height", "mode"]].tolist() == [70, 80, "L"]
    assert found.rejected["path"].tolist() == ["train/PNEUMONIA/person3_virus_3.png"]
    for path in images.index:
        assert decode_file(str(tmp_path / path), InputSpec(32, 1)).shape == (32, 32, 1)
    assert images.loc["train/PNEUMONIA/person1_virus_1.dcm", "patient_id"] == "person1"


def test_an_oversized_sparse_file_is_refused_from_its_size_alone(tmp_path):
    folder = tmp_path / "train" / "NORMAL"
    folder.mkdir(parents=True)
    huge = folder / "IM-0001-0001.jpeg"
    with open(huge, "wb") as handle:
        handle.write(b"\xff\xd8\xff\xe0")
        handle.truncate(1 << 30)  # 1 GB, sparse: nothing on disk, everything for a reader
    found = discover(tmp_path)
    assert found.rejected["reason"].tolist() == ["1,073,741,824 bytes, over the 67,108,864-byte limit"]
    with pytest.raises(DataError, match="1,073,741,824 bytes, over the 67,108,864-byte limit"):
        read_checked(tmp_path, "train/NORMAL/IM-0001-0001.jpeg", "")


@pytest.mark.slow
def test_discovery_of_a_sparse_gigabyte_stays_small_in_memory(tmp_path):
    folder = tmp_path / "train" / "NORMAL"
    folder.mkdir(parents=True)
    with open(folder / "IM-0001-0001.jpeg", "wb") as handle:
        handle.truncate(1 << 30)
    # VmHWM is this process's own peak (reset at exec), read before and after discovery.
    script = (
        "import re, sys; from pathlib import Path; from pneumo.data import discover\n"
        "peak = lambda: int(re.search(r'VmHWM:\\s+(\\d+)', Path('/proc/self/status').read_text()).group(1))\n"
        "start = peak(); found = discover(Path(sys.argv[1])); assert len(found.rejected) == 1\n"
        "print((peak() - start) / 1024)"
    )
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    growth_mb = float(result.stdout.split()[-1])
    assert growth_mb < 100, f"discovery grew the peak by {growth_mb:.0f} MB: the file was read (1.38 GB before)"


def test_identical_content_shares_a_side_and_copies_of_test_images_are_left_out(tmp_path, tracking):
    root = _kaggle_layout(tmp_path / "data")
    normal, pneumonia = root / "train" / "NORMAL", root / "train" / "PNEUMONIA"
    # The same picture under another patient's name, and a link to a test image.
    (normal / "IM-0900-0001.png").write_bytes((normal / "IM-0000-0000.png").read_bytes())
    (pneumonia / "person900_virus_1.png").symlink_to(root / "test" / "PNEUMONIA" / "person500_virus_0.png")
    for seed in range(12):  # a random split of the two patients would separate them about half the time
        manifest = prepare_manifest(DataConfig(data_dir=str(root), val_fraction=0.5, seed=seed)).frame
        sides = manifest.set_index("path")["split"]
        assert sides["train/NORMAL/IM-0900-0001.png"] == sides["train/NORMAL/IM-0000-0000.png"], seed
        assert "train/PNEUMONIA/person900_virus_1.png" not in sides.index
        assert (manifest.groupby("sha256")["split"].nunique() == 1).all()
    prepared = prepare_manifest(DataConfig(data_dir=str(root), val_fraction=0.5))
    assert prepared.meta["duplicates"] == {"groups": 2, "files": 4, "excluded_test_copies": 1}
    with mlflow.start_run() as run:
        log_manifest(prepared, context="prepare")
    report = pd.read_csv(
        mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/duplicates.csv"), keep_default_na=False
    )
    assert sorted(map(sorted, report.groupby("group")["path"].apply(list))) == [
        ["test/PNEUMONIA/person500_virus_0.png", "train/PNEUMONIA/person900_virus_1.png"],
        ["train/NORMAL/IM-0000-0000.png", "train/NORMAL/IM-0900-0001.png"],
    ]
    leak = report.set_index("path").loc["train/PNEUMONIA/person900_virus_1.png"]
    assert leak["split"] == "excluded" and leak["note"] == "copy of a test image: left out of training"
    assert report.set_index("path").loc["test/PNEUMONIA/person500_virus_0.png", "split"] == "test"


@pytest.mark.parametrize("how", ["empty", "all rejected"])
def test_a_class_folder_without_usable_images_is_refused_naming_it(tmp_path, how):
    root = _kaggle_layout(tmp_path)
    folder = root / "train" / "PNEUMONIA"
    for path in folder.iterdir():
        if how == "empty":
            path.unlink()
        else:
            path.write_bytes(b"GIF89a not an x-ray")
    with pytest.raises(DataError, match=f"no usable PNEUMONIA images for training: the folder {folder} is empty"):
        prepare_manifest(DataConfig(data_dir=str(root)))
