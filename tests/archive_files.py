"""A small archive of real X-rays as a PACS export holds them, and a tiny logged model to score it with.

Shared by the ``predict`` and Spark tests: both score the same kind of folder, DICOM files with
known UIDs in several transfer syntaxes beside plain JPEGs, each made from a real X-ray.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

import xray_files
from conftest import require_real_data
from pneumo import model_io
from pneumo.contract import Figures, ModelContract
from pneumo.models import build_aug_cnn
from pneumo.preprocessing import InputSpec

# What an archive holds: uncompressed, lossless-compressed and deflated DICOM.
SYNTAXES = (ExplicitVRLittleEndian, RLELossless, JPEG2000Lossless, DeflatedExplicitVRLittleEndian)
# Side the X-rays are shrunk to: real pictures, decoded in milliseconds on a 2-core machine.
SIDE = 256


def log_tiny_model() -> str:
    """Log an untrained 32-pixel aug_cnn with a minimal contract in the active store; return its URI."""
    import mlflow

    contract = ModelContract(
        entry_point="aug_cnn",
        input_spec=InputSpec(32, 1),
        threshold=0.5,
        threshold_rule="fixed at 0.5 (untrained test model)",
        hyperparameters={},
        validation=Figures(on="none (untrained test model)", metrics={}),
    )
    with mlflow.start_run():
        return model_io.log_model(build_aug_cnn(32, 1), contract).model_uri


def real_xrays(count: int) -> list[Path]:
    """``count`` real X-rays from the test split, NORMAL and PNEUMONIA alternately."""
    root = require_real_data() / "test"
    classes = [sorted(p for p in (root / c).iterdir() if not p.name.startswith(".")) for c in ("NORMAL", "PNEUMONIA")]
    return [classes[i % 2][i // 2] for i in range(count)]


def small_gray(path: Path) -> np.ndarray:
    """The X-ray at ``path`` as 8-bit grayscale, its longer side shrunk to :data:`SIDE`."""
    image = Image.fromarray(xray_files.gray_pixels(path), mode="L")
    image.thumbnail((SIDE, SIDE))
    return np.asarray(image)


def with_uids(data: bytes, uids: dict[str, str]) -> bytes:
    """The DICOM file ``data`` with its Study, Series and SOP Instance UIDs set to ``uids``."""
    dataset = dcmread(io.BytesIO(data))
    for name, value in uids.items():
        setattr(dataset, name, value)
    dataset.file_meta.MediaStorageSOPInstanceUID = uids["SOPInstanceUID"]
    return xray_files.save(dataset)


def dicom_with_uids(gray: np.ndarray, uids: dict[str, str], syntax: str = ExplicitVRLittleEndian) -> bytes:
    """A DX DICOM file of ``gray`` (8 bits stored) carrying ``uids``, in transfer syntax ``syntax``."""
    data = xray_files.dicom(gray, bits_stored=8)
    if syntax != ExplicitVRLittleEndian:
        data = xray_files.compressed_dicom(data, syntax)
    # Set after compressing: pydicom's compress gives the instance a new SOP Instance UID.
    return with_uids(data, uids)


def new_uids(study: str) -> dict[str, str]:
    """UIDs of a new instance in a new series of ``study``."""
    return {"StudyInstanceUID": study, "SeriesInstanceUID": generate_uid(), "SOPInstanceUID": generate_uid()}


def write_archive(folder: Path, count: int) -> dict[str, dict[str, str]]:
    """Write ``count`` real X-rays into ``folder``: DICOM (every :data:`SYNTAXES`, and a JPEG in DICOM) and JPEG.

    Every third file is the X-ray's JPEG itself; the others are DICOM files in two studies, cycling
    through the syntaxes, one of them the JPEG's bytes wrapped as JPEG Baseline DICOM.

    Returns:
        File path (as text) -> its UIDs (empty strings for the JPEGs).
    """
    folder.mkdir(parents=True, exist_ok=True)
    studies = (generate_uid(), generate_uid())
    expected = {}
    for i, source in enumerate(real_xrays(count)):
        if i % 3 == 2:
            target = folder / f"{i:02d}-{source.name}"
            target.write_bytes(source.read_bytes())
            expected[str(target)] = dict.fromkeys(("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"), "")
            continue
        uids = new_uids(studies[i % 2])
        if i == 4:
            jpeg = xray_files.encode(Image.fromarray(small_gray(source), mode="L"), "JPEG", quality=90)
            data = with_uids(xray_files.jpeg_in_dicom(jpeg), uids)
        else:
            data = dicom_with_uids(small_gray(source), uids, SYNTAXES[i % len(SYNTAXES)])
        target = folder / f"{i:02d}.dcm"
        target.write_bytes(data)
        expected[str(target)] = uids
    return expected
