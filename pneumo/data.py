"""Finding the images, reading their labels and patients, and splitting them without moving a file.

The split manifest is a CSV with one row per usable image: its path relative to the data folder,
label name, label (NORMAL = 0, PNEUMONIA = 1 everywhere), patient id, split (train/val/test),
SHA-256 of its bytes, width, height and PIL mode. It is the single source of truth about which
image belongs where; the data folder itself is only ever read. A :class:`Manifest` is made now
(:func:`prepare_manifest`) or read from a file (:func:`load_manifest`); logging it to MLflow, or
fetching one a run logged, is :mod:`pneumo.tracking`'s part.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from sklearn.model_selection import StratifiedGroupKFold

from pneumo import CLASS_NAMES, runs
from pneumo.config import DataConfig
from pneumo.errors import DataError, ImageError
from pneumo.pixels import check_dimensions
from pneumo.preprocessing import ACCEPTED_FORMATS, PIL_FORMATS, InputSpec, decode_image
from pneumo.progress import progress

log = logging.getLogger(__name__)

KAGGLE_DATASET = "paultimothymooney/chest-xray-pneumonia"
# Pinned: with a version in the handle kagglehub reads its cache without asking Kaggle for the
# latest version first, so a second run works offline.
KAGGLE_VERSION = 2
KAGGLE_HANDLE = f"{KAGGLE_DATASET}/versions/{KAGGLE_VERSION}"
MANIFEST_COLUMNS = ["path", "label_name", "label", "patient_id", "split", "sha256", "width", "height", "mode"]
SPLITS = ("train", "val", "test")
# File names of a manifest and of the metadata beside it (also their MLflow artifact names).
MANIFEST_FILE = "manifest.csv"
MANIFEST_META_FILE = "manifest_meta.json"
# Groups of byte-identical files found by prepare (an MLflow artifact of the prepare run).
DUPLICATES_FILE = "duplicates.csv"
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".dcm", ".dicom"}
# Largest image file read, by discovery or through a manifest (the largest Kaggle X-ray is a few MB).
MAX_FILE_BYTES = 64 * 1024 * 1024
# Discovery decodes every file with the training and serving decoder, small: what prepare accepts
# is exactly what training and serving can decode.
_PROBE_SPEC = InputSpec(64, 1)
# Leading bytes of the formats met in image folders, to say what a refused file is.
_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
    (b"RIFF", "RIFF/WebP"),
    (b"%PDF", "PDF"),
)

# File-name patterns of the Kermany et al. dataset; the captured group identifies the patient.
_PATIENT_PATTERNS = [
    re.compile(r"^(person\d+)_(?:bacteria|virus)_\d+(?:_\d+)*$", re.IGNORECASE),
    re.compile(r"^(NORMAL2-IM-\d+)(?:-\d+)+$", re.IGNORECASE),
    re.compile(r"^(IM-\d+)(?:-\d+)+$", re.IGNORECASE),
]


def patient_id(file_name: str) -> str:
    """Return the patient id encoded in a file name of the dataset.

    ``person1000_bacteria_2931.jpeg`` -> ``person1000``; ``IM-0115-0001.jpeg`` -> ``IM-0115``;
    ``NORMAL2-IM-0123-0001-0002.jpeg`` -> ``NORMAL2-IM-0123``. A name that matches no pattern
    is its own patient (the safe choice: it can never leak across splits with another image).
    """
    stem = Path(file_name).stem
    for pattern in _PATIENT_PATTERNS:
        match = pattern.match(stem)
        if match:
            return match.group(1)
    return stem


def ids_shared_with_training(manifest: pd.DataFrame, frame: pd.DataFrame) -> np.ndarray:
    """Which rows of ``frame`` carry a patient id that also occurs in the manifest's train or val split.

    Such ids may or may not be the same child (see :func:`patient_key`); ``evaluate`` reports the
    test figures with and without them.
    """
    training_ids = set(manifest.loc[manifest["split"].isin(["train", "val"]), "patient_id"])
    return frame["patient_id"].isin(training_ids).to_numpy()


def patient_key(frame: pd.DataFrame) -> pd.Series:
    """The patient of each row: its patient id qualified by the id space of its source folder.

    The dataset numbers the patients of ``train/`` and ``test/`` separately: 87 ids such as
    ``person102`` name one child in train and another in test, so an id names a patient only within
    its source split. Kaggle's ``val/`` folder was cut from the original training images and shares
    their ids, so it belongs to the train id space (merging two children would be harmless; splitting
    one across train and validation would leak).

    Args:
        frame: Rows with ``path`` (relative, ``<source split>/<class>/<file>``) and ``patient_id``.

    Returns:
        ``"train/<id>"`` or ``"test/<id>"`` per row, aligned with ``frame``.
    """
    source = frame["path"].str.split("/", n=1).str[0]
    return source.where(source == "test", "train") + "/" + frame["patient_id"].astype(str)


def split_groups(frame: pd.DataFrame) -> pd.Series:
    """The group each row must share a side of the split with: its patient, united with identical content.

    Rows of one patient (:func:`patient_key`) form a group, and byte-identical files (same
    ``sha256``, e.g. a copy or a link under another patient's name) join their groups into one, so
    no image can sit on both sides. A group is named by the smallest patient key in it: without
    shared content the groups are the patients themselves.

    Args:
        frame: Rows with ``path``, ``patient_id`` and ``sha256``.

    Returns:
        The group name per row, aligned with ``frame``.
    """
    keys = patient_key(frame)
    parent: dict[str, str] = {key: key for key in keys.unique()}

    def root(key: str) -> str:
        while parent[key] != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    for members in keys.groupby(frame["sha256"].to_numpy()).unique():
        for other in members[1:]:
            low, high = sorted((root(members[0]), root(other)))
            parent[high] = low
    return keys.map(root)


def kagglehub_cache_dir() -> Path:
    """The kagglehub cache folder: ``$KAGGLEHUB_CACHE`` or ``~/.cache/kagglehub``."""
    return Path(os.environ.get("KAGGLEHUB_CACHE") or Path.home() / ".cache" / "kagglehub").expanduser()


def _data_root(root: Path) -> Path | None:
    """The shallowest folder under ``root`` holding ``train/`` (the archive nests ``chest_xray/`` and a macOS copy)."""
    for candidate in sorted(root.rglob("train"), key=lambda p: len(p.parts)):
        if candidate.is_dir() and "__MACOSX" not in candidate.parts:
            return candidate.parent
    return None


def cached_dataset() -> Path | None:
    """The pinned dataset version in the kagglehub cache, found without any network access.

    kagglehub marks a finished download with ``datasets/<owner>/<name>/<version>.complete`` beside
    ``datasets/<owner>/<name>/versions/<version>/``; a folder without the marker is a partial
    download and is ignored.

    Returns:
        The cached folder holding ``train/``, or ``None``.
    """
    owner, name = KAGGLE_DATASET.split("/")
    base = kagglehub_cache_dir() / "datasets" / owner / name
    folder = base / "versions" / str(KAGGLE_VERSION)
    if not (base / f"{KAGGLE_VERSION}.complete").is_file() or not folder.is_dir():
        return None
    return _data_root(folder)


def download_dataset() -> Path:
    """Download the Kaggle dataset (the pinned version) with kagglehub and return its folder holding ``train/``.

    A copy already in the kagglehub cache is used without any network access.

    Raises:
        DataError: kagglehub is missing, the network is unreachable, or the layout is unexpected.
    """
    cached = cached_dataset()
    if cached is not None:
        log.info("using the cached %s in %s", KAGGLE_HANDLE, cached)
        return cached
    try:
        # Imported here: only a download needs it, and a broken install must end in this DataError.
        import kagglehub

        root = Path(kagglehub.dataset_download(KAGGLE_HANDLE))
    except Exception as error:  # kagglehub raises many types (HTTP, connection, auth)
        raise DataError(
            f"Could not download the Kaggle dataset '{KAGGLE_HANDLE}' ({type(error).__name__}: "
            f"{error}). Supply the data yourself: download it from "
            f"https://www.kaggle.com/datasets/{KAGGLE_DATASET}, unzip it, and pass the folder that "
            "holds train/NORMAL and train/PNEUMONIA as data_dir (e.g. -P data_dir=/path/to/chest_xray), "
            "set PNEUMO_DATA_DIR, or place it at ./data/chest_xray."
        ) from error
    found = _data_root(root)
    if found is None:
        raise DataError(f"downloaded {KAGGLE_HANDLE} to {root}, but found no train/ folder in it")
    return found


def resolve_data_dir(data_dir: str) -> Path:
    """Find the data folder: the argument, ``$PNEUMO_DATA_DIR``, ``./data/chest_xray``, or a download.

    Args:
        data_dir: Folder given by the user; empty for automatic.

    Returns:
        An existing folder containing ``train/NORMAL`` and ``train/PNEUMONIA``.

    Raises:
        DataError: The given folder lacks the expected layout, or no data could be obtained.
    """
    candidates = [data_dir] if data_dir else [os.environ.get("PNEUMO_DATA_DIR", ""), "data/chest_xray"]
    for candidate in filter(None, candidates):
        path = Path(candidate).expanduser().resolve()
        if path.is_dir():
            missing = [c for c in CLASS_NAMES if not (path / "train" / c).is_dir()]
            if missing:
                raise DataError(f"{path} is not in the Kaggle layout: missing train/{', train/'.join(missing)}")
            return path
        if data_dir:  # given but absent: a typo must not turn into a 1.2 GB download
            raise DataError(
                f"data_dir {path} does not exist; give an existing folder in the Kaggle layout, "
                "or leave data_dir empty to search $PNEUMO_DATA_DIR, ./data/chest_xray, then download"
            )
    return download_dataset()


@dataclass
class Discovery:
    """Images found in a data folder, and the files that were excluded with the reason."""

    images: pd.DataFrame
    rejected: pd.DataFrame


def _read_regular(path: Path | str, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``, its type and size checked before it is opened.

    ``os.stat`` first (a FIFO would block ``open`` until a writer comes, a sparse file of 1 GB
    would be read whole), then ``open`` with ``O_NONBLOCK`` and ``fstat`` of what was opened: it
    must be the same inode, so a file swapped for a FIFO in between cannot block either.

    Raises:
        DataError: The reason alone (no path): not a regular file, over the limit, or unreadable.
    """
    try:
        before = os.stat(path)
        if not stat.S_ISREG(before.st_mode):
            raise DataError("not a regular file")
        if before.st_size > max_bytes:
            raise DataError(f"{before.st_size:,} bytes, over the {max_bytes:,}-byte limit")
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(descriptor, "rb") as handle:
            opened = os.fstat(handle.fileno())
            if (opened.st_dev, opened.st_ino) != (before.st_dev, before.st_ino) or not stat.S_ISREG(opened.st_mode):
                raise DataError("replaced while it was being opened")
            data = handle.read(max_bytes + 1)
    except OSError as error:
        raise DataError(f"unreadable ({error.strerror or type(error).__name__})") from error
    if len(data) > max_bytes:
        raise DataError(f"over the {max_bytes:,}-byte limit")
    return data


def _content_kind(data: bytes) -> str | None:
    """The format the bytes are, by their leading bytes (not the file name): JPEG, PNG, DICOM, GIF, ..."""
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "DICOM"
    return next((kind for signature, kind in _SIGNATURES if data.startswith(signature)), None)


def _header(data: bytes, kind: str) -> tuple[int, int, str]:
    """Width, height and mode from the header (PIL modes; DICOM as L, I;16 or RGB), no pixel decoded."""
    if kind == "DICOM":
        import pydicom  # only for DICOM files: the header, after decode_image accepted the file

        dataset = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        samples, bits = int(dataset.get("SamplesPerPixel", 1)), int(dataset.get("BitsAllocated", 8))
        return int(dataset.Columns), int(dataset.Rows), "RGB" if samples == 3 else ("L" if bits == 8 else "I;16")
    with Image.open(io.BytesIO(data), formats=[kind]) as image:
        return image.width, image.height, image.mode


def _inspect(path: Path) -> tuple[dict | None, str | None]:
    """Read, hash and decode one file; return its manifest fields or a rejection reason.

    The size is checked before the file is read, the type by its content, and the file is decoded
    by :func:`pneumo.preprocessing.decode_image` (the decoder of training and serving) from the
    very bytes that are hashed.
    """
    if path.name.startswith("."):
        return None, "hidden file"
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return None, f"not an image file (suffix {path.suffix or 'none'})"
    try:
        data = _read_regular(path, MAX_FILE_BYTES)
    except DataError as error:
        return None, str(error)
    kind = _content_kind(data)
    if kind not in (*PIL_FORMATS, "DICOM"):
        return None, f"undecodable: the content is {kind or 'not a known image format'}, not {ACCEPTED_FORMATS}"
    try:
        if kind != "DICOM":  # DICOM's header is read only after decode_image vetted its transfer syntax
            width, height, mode = _header(data, kind)
            check_dimensions(width, height)
    except ImageError as error:
        return None, f"unusable size: {error}"
    except Exception as error:  # a header Pillow cannot parse
        return None, f"undecodable: {kind} header unreadable ({type(error).__name__})"
    try:
        decode_image(data, _PROBE_SPEC)
        if kind == "DICOM":
            width, height, mode = _header(data, kind)
    except ImageError as error:
        return None, f"undecodable: {error}"
    except Exception as error:
        return None, f"undecodable: {type(error).__name__}"
    return {"sha256": hashlib.sha256(data).hexdigest(), "width": width, "height": height, "mode": mode}, None


def _safe_name(relative: str) -> str | None:
    """``relative`` with any bytes that are not UTF-8 written as ``\\xNN``, or None when it is valid UTF-8."""
    try:
        relative.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(relative).decode("utf-8", "backslashreplace")
    return None


def discover(data_dir: Path, workers: int = 4, folders: dict[str, str] | None = None) -> Discovery:
    """List every file under ``{train,val,test}/{NORMAL,PNEUMONIA}`` and check that it decodes.

    Corrupt, truncated, hidden, non-image, oversized and non-regular files, and file names that are
    not UTF-8, are never fatal: they go to ``rejected``. A stop request (SIGTERM, SIGINT) ends the
    work between files (:func:`pneumo.runs.check`).

    Args:
        data_dir: Folder in the Kaggle layout.
        workers: Threads used to hash and decode.
        folders: Source split -> the folder under ``data_dir`` holding its ``NORMAL/`` and
            ``PNEUMONIA/``; None is the Kaggle layout (``train``, ``val``, ``test``).

    Returns:
        The usable images (with the source split in column ``source_split``) and the rejects.
    """
    entries, rejected = [], []
    for source_split, folder_name in (folders or {split: split for split in SPLITS}).items():
        for label, label_name in enumerate(CLASS_NAMES):
            folder = data_dir / folder_name / label_name
            if not folder.is_dir():
                continue
            for path in sorted(folder.iterdir()):
                if path.is_dir():
                    continue
                relative = path.relative_to(data_dir).as_posix()
                escaped = _safe_name(relative)
                if escaped is not None:  # it could not be written to the manifest, a log or a report
                    rejected.append({"path": escaped, "reason": "file name is not valid UTF-8 (rename the file)"})
                    continue
                entries.append((source_split, label, label_name, path, relative))
    rows = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_inspect, entry[3]) for entry in entries]
        try:
            for entry, future in zip(entries, progress(futures, len(futures), "hashing and checking")):
                runs.check()
                source_split, label, label_name, path, relative = entry
                fields, reason = future.result()
                if reason:
                    rejected.append({"path": relative, "reason": reason})
                    continue
                rows.append(
                    {
                        "path": relative,
                        "label_name": label_name,
                        "label": label,
                        "patient_id": patient_id(path.name),
                        "source_split": source_split,
                        **fields,
                    }
                )
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # the files being read now, not all the rest
            raise
    if rejected:
        log.warning("excluded %d unusable file(s) from %s; see the rejected-files report", len(rejected), data_dir)
    return Discovery(pd.DataFrame(rows), pd.DataFrame(rejected, columns=["path", "reason"]))


def grouped_split(frame: pd.DataFrame, val_fraction: float, seed: int) -> np.ndarray:
    """Pick validation rows, stratified by class and grouped by patient and content (:func:`split_groups`).

    Args:
        frame: Rows with ``label``, ``path``, ``patient_id`` and ``sha256``.
        val_fraction: Wanted fraction of rows in validation (0 < f < 1).
        seed: Seed of the fold assignment.

    Returns:
        Boolean mask, True for validation rows. No patient has rows on both sides.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    n_splits = max(2, round(1.0 / val_fraction))
    patients = split_groups(frame)
    if patients.nunique() < n_splits:
        raise DataError(f"too few patients ({patients.nunique()}) for val_fraction={val_fraction}")
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    _, val_index = next(splitter.split(frame, frame["label"], groups=patients))
    mask = np.zeros(len(frame), dtype=bool)
    mask[val_index] = True
    return mask


def _limit_per_class(frame: pd.DataFrame, limit: int, seed: int) -> pd.DataFrame:
    """Keep at most ``limit`` images per (split, class), taking whole groups (:func:`split_groups`) in random order."""
    rng = np.random.default_rng(seed)
    groups = split_groups(frame)
    kept = []
    for _, part in frame.groupby(["split", "label"], sort=True):
        keys = groups[part.index]
        patients = rng.permutation(np.asarray(keys.unique(), dtype=object))
        counts = keys.value_counts()
        chosen, total = [], 0
        for patient in patients:
            if total >= limit:
                break
            chosen.append(patient)
            total += counts[patient]
        kept.append(part[keys.isin(chosen)])
    return pd.concat(kept).sort_values("path").reset_index(drop=True)


def test_copies(frame: pd.DataFrame) -> pd.Series:
    """Which rows outside Kaggle's test folder are byte-identical to a test image (they would leak it)."""
    in_test = frame["source_split"] == "test"
    return ~in_test & frame["sha256"].isin(set(frame.loc[in_test, "sha256"]))


def _check_training_classes(frame: pd.DataFrame, data_dir: Path | None) -> None:
    """Refuse a class without training images (imbalanced-learn's oversampler died on it in aug_cnn)."""
    pool = frame[frame["split"] == "train"]
    for label, name in enumerate(CLASS_NAMES):
        if not (pool["label"] == label).any():
            folder = Path(data_dir or ".") / "train" / name
            raise DataError(
                f"no usable {name} images for training: the folder {folder} is empty or every file in it "
                "was rejected (see rejected_files.csv)"
            )


def _check_split_classes(frame: pd.DataFrame) -> None:
    """Refuse a training split left without a class by the split or the cap (a validation split may lack one)."""
    for label, name in enumerate(CLASS_NAMES):
        if not ((frame["split"] == "train") & (frame["label"] == label)).any():
            raise DataError(
                f"the train split has no {name} images: add images of that class, or change val_fraction "
                "or limit_per_class"
            )


def build_manifest(
    images: pd.DataFrame,
    val_fraction: float,
    seed: int,
    val_scheme: str = "grouped",
    limit_per_class: int = 0,
    data_dir: Path | None = None,
) -> pd.DataFrame:
    """Assign every image to train, val or test.

    ``grouped`` (default): Kaggle's test folder stays test; Kaggle's train and its tiny val folder
    are pooled and a patient-grouped, class-stratified validation split is carved from them.
    ``notebook``: the seed notebook's scheme, 100 random test images become val, without moving
    files (its patients may then also be in test; kept for comparison only).

    Args:
        images: Output of :func:`discover`.
        val_fraction: Fraction of training images for validation (``grouped``).
        seed: Seed of the split.
        val_scheme: ``grouped`` or ``notebook``.
        limit_per_class: Cap per split and class (whole patients); 0 = no cap.
        data_dir: The data folder, named in errors.

    Byte-identical files always share a side (:func:`split_groups`); a copy of a test image
    outside the test folder is left out (it would put the test image in training) and listed by
    :func:`duplicate_report`.

    Returns:
        The manifest, columns :data:`MANIFEST_COLUMNS`, sorted by path.

    Raises:
        DataError: No usable image, a class without training images (naming its folder), a split
            left without a class, or an impossible split.
    """
    if images.empty:
        raise DataError("no usable images were found")
    frame = images.copy()
    frame["split"] = np.where(frame["source_split"] == "test", "test", "train")
    leaks = test_copies(frame)
    if leaks.any():
        log.warning("left out %d file(s) identical to a test image (see %s)", leaks.sum(), DUPLICATES_FILE)
        frame = frame[~leaks].reset_index(drop=True)
    _check_training_classes(frame, data_dir)
    if val_scheme == "grouped":
        pool = frame.index[frame["split"] == "train"]
        mask = grouped_split(frame.loc[pool], val_fraction, seed)
        frame.loc[pool[mask], "split"] = "val"
    else:  # "notebook" (DataConfig checked the choice)
        test_rows = frame.index[frame["split"] == "test"]
        if len(test_rows) < 100:
            raise DataError("val_scheme=notebook needs a test folder with at least 100 images")
        chosen = np.random.default_rng(seed).choice(test_rows, size=100, replace=False)
        frame.loc[chosen, "split"] = "val"
    if limit_per_class > 0:
        frame = _limit_per_class(frame, limit_per_class, seed)
    _check_split_classes(frame)
    return frame[MANIFEST_COLUMNS].sort_values("path").reset_index(drop=True)


def duplicate_report(images: pd.DataFrame, manifest: pd.DataFrame) -> pd.DataFrame:
    """Every group of byte-identical files, with where each went (the ``duplicates.csv`` artifact).

    Args:
        images: Output of :func:`discover`.
        manifest: The manifest made from them.

    Returns:
        One row per file that has an identical twin: ``group`` (numbered from 1), ``path``,
        ``label_name``, ``split`` (its split, or ``excluded``) and ``note`` (why it was excluded).
    """
    columns = ["group", "path", "label_name", "split", "note"]
    copies = images[images["sha256"].duplicated(keep=False)]
    if copies.empty:
        return pd.DataFrame(columns=columns)
    split = copies["path"].map(manifest.set_index("path")["split"])
    leaked = test_copies(images)[copies.index]
    note = np.where(leaked, "copy of a test image: left out of training", "")
    note = np.where(split.isna() & ~leaked, "left out by limit_per_class", note)
    report = copies.assign(group=copies.groupby("sha256").ngroup() + 1, split=split.fillna("excluded"), note=note)
    return report[columns].sort_values(["group", "path"]).reset_index(drop=True)


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read a manifest CSV and check its columns and label contract.

    Raises:
        DataError: Columns are missing or a label disagrees with its label name.
    """
    frame = pd.read_csv(path, dtype={"patient_id": str, "path": str, "sha256": str})
    missing = set(MANIFEST_COLUMNS) - set(frame.columns)
    if missing:
        raise DataError(f"manifest {path} lacks column(s) {sorted(missing)}")
    check_manifest_paths(frame, path)
    expected = frame["label_name"].map({name: i for i, name in enumerate(CLASS_NAMES)})
    if expected.isna().any() or (expected != frame["label"]).any():
        raise DataError(f"manifest {path} breaks the label contract NORMAL=0, PNEUMONIA=1")
    return frame


def split_frame(manifest: pd.DataFrame, split: str) -> pd.DataFrame:
    """Rows of one split, in manifest order.

    Raises:
        DataError: The split is unknown or empty.
    """
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, got {split!r}")
    rows = manifest[manifest["split"] == split].reset_index(drop=True)
    if rows.empty:
        raise DataError(f"the manifest has no '{split}' images (the official test split may be absent)")
    return rows


def manifest_digest(manifest: pd.DataFrame) -> str:
    """Short digest of a manifest's content (paths, splits, labels, file hashes)."""
    text = manifest[["path", "split", "label", "sha256"]].to_csv(index=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Manifest:
    """A split manifest, the folder its paths are relative to, and how it was made."""

    frame: pd.DataFrame
    data_dir: Path
    # How it was made (seed, val_fraction, counts, ...), as in manifest_meta.json; may be empty.
    meta: dict[str, Any]
    # The files discovery excluded, with the reason; None for a manifest read from a file.
    rejected: pd.DataFrame | None = None
    # Groups of byte-identical files (see duplicate_report); None for a manifest read from a file.
    duplicates: pd.DataFrame | None = None

    @cached_property
    def digest(self) -> str:
        return manifest_digest(self.frame)

    def split(self, name: str) -> pd.DataFrame:
        """Rows of one split (see :func:`split_frame`)."""
        return split_frame(self.frame, name)

    def meta_json(self) -> dict[str, Any]:
        """The metadata to store beside the manifest: with it, the manifest can be read back alone."""
        return {**self.meta, "data_dir": str(self.data_dir), "digest": self.digest}


def check_manifest_paths(frame: pd.DataFrame, source: str | Path = "manifest") -> None:
    """Refuse manifest paths that could leave ``data_dir``: absolute, ``..``, or empty.

    Raises:
        DataError: Naming up to five offending rows.
    """
    bad = [
        (row, path)
        for row, path in enumerate(frame["path"].astype(str))
        if not path or path in (".", "nan") or Path(path).is_absolute() or ".." in Path(path).parts
    ]
    if bad:
        listed = "; ".join(f"row {row}: {path!r}" for row, path in bad[:5])
        raise DataError(f"manifest {source}: {len(bad)} path(s) are not relative paths inside data_dir ({listed})")


def read_checked(data_dir: Path, relative: str, sha256: str, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a manifest file, if they are still the ones the manifest recorded.

    The path must stay inside ``data_dir`` (see :func:`check_manifest_paths`; links inside it are
    followed, as the test data and many mirrors use them), name a regular file of at most
    ``max_bytes`` (checked before it is opened: a FIFO would block ``open``, ``/dev/zero`` never
    ends), and hash to ``sha256``.

    Raises:
        DataError: Any of these fails; the message says which.
    """
    if Path(relative).is_absolute() or ".." in Path(relative).parts:
        raise DataError(f"{relative}: not a relative path inside data_dir")
    path = data_dir / relative
    try:
        data = _read_regular(path, max_bytes)
    except DataError as error:
        raise DataError(f"{path}: {error}") from error
    if sha256 and hashlib.sha256(data).hexdigest() != sha256:
        raise DataError(f"{path}: content changed since the manifest was made (SHA-256 differs)")
    return data


def prepare_manifest(config: DataConfig) -> Manifest:
    """Find, validate and split the images now (never writing into the data folder).

    Args:
        config: ``data_dir``, ``val_fraction``, ``val_scheme``, ``limit_per_class`` and ``seed``.

    Returns:
        The manifest, with the excluded files in ``rejected``.
    """
    data_dir = resolve_data_dir(config.data_dir)
    found = discover(data_dir)
    frame = build_manifest(
        found.images, config.val_fraction, config.seed, config.val_scheme, config.limit_per_class, data_dir
    )
    duplicates = duplicate_report(found.images, frame)
    counts = frame.groupby(["split", "label_name"]).size()
    meta = {
        "val_fraction": config.val_fraction,
        "val_scheme": config.val_scheme,
        "seed": config.seed,
        "limit_per_class": config.limit_per_class,
        "counts": {f"{split}/{name}": int(n) for (split, name), n in counts.items()},
        "rejected": len(found.rejected),
        "duplicates": {
            "groups": int(duplicates["group"].nunique()),
            "files": len(duplicates),
            "excluded_test_copies": int((duplicates["note"] == "copy of a test image: left out of training").sum()),
        },
        "patients": {split: int(patient_key(rows).nunique()) for split, rows in frame.groupby("split", sort=False)},
    }
    manifest = Manifest(frame, data_dir, meta, found.rejected, duplicates)
    log.info("manifest %s: %s; %d file(s) rejected", manifest.digest, meta["counts"], meta["rejected"])
    return manifest


def site_manifest(site_dir: str) -> Manifest:
    """Discover a hospital's labelled sample, a folder holding ``NORMAL/`` and ``PNEUMONIA/``, as prepare does.

    The same checks as :func:`prepare_manifest` (every file hashed and decoded, unusable ones
    reported in ``rejected``, patient ids from the file names); the folder is only read. Its
    images form the manifest's ``test`` split: a local sample, never the training hospital's.

    Raises:
        DataError: The folder does not exist, lacks a class folder, or holds no usable image.
    """
    path = Path(site_dir).expanduser().resolve()
    if not site_dir or not path.is_dir():
        raise DataError(f"site_dir {site_dir!r} is not a folder; give a folder holding NORMAL/ and PNEUMONIA/")
    missing = [name for name in CLASS_NAMES if not (path / name).is_dir()]
    if missing:
        raise DataError(f"site_dir {path} lacks {', '.join(f'{name}/' for name in missing)}")
    found = discover(path, folders={"test": ""})
    if found.images.empty:
        raise DataError(f"site_dir {path} holds no usable image ({len(found.rejected)} file(s) rejected)")
    frame = found.images.assign(split="test")[MANIFEST_COLUMNS].sort_values("path").reset_index(drop=True)
    counts = frame.groupby("label_name").size()
    meta = {
        "layout": "site",
        "counts": {f"site/{name}": int(n) for name, n in counts.items()},
        "rejected": len(found.rejected),
        "patients": {"site": int(patient_key(frame).nunique())},
    }
    return Manifest(frame, path, meta, found.rejected)


def load_manifest(path: str | Path, data_dir: str = "") -> Manifest:
    """Read a manifest CSV, and the metadata file beside it when there is one.

    Args:
        path: The CSV.
        data_dir: The folder its paths are relative to; empty = the one its metadata names, else
            the usual search (see :func:`resolve_data_dir`).

    Raises:
        DataError: The file breaks the manifest format, or no data folder can be found.
    """
    path = Path(path)
    meta_path = path.with_name(MANIFEST_META_FILE)
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    stored_dir = meta.pop("data_dir", "")
    meta.pop("digest", None)  # recomputed from the rows
    return Manifest(read_manifest(path), resolve_data_dir(data_dir or stored_dir), meta)
