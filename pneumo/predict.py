"""Batch prediction from the command line: image files or folders in, a CSV of labels out.

    python -m pneumo.predict FILES_OR_FOLDERS... --model-uri models:/pneumonia-classifier@champion \\
        [--output predictions.csv]

Each file is decoded and predicted exactly as the served model does it (same decoder, same
Keras model, same threshold), so the CSV matches what ``mlflow models serve`` answers. A file
that cannot be read gets an ``error`` instead of a label; the others are still predicted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from pneumo import model_io, serving
from pneumo.errors import ImageError
from pneumo.preprocessing import decode_file

log = logging.getLogger(__name__)

# Files taken from a folder; named files are always tried, whatever their suffix.
FOLDER_SUFFIXES = {".jpeg", ".jpg", ".png", ".dcm", ".dicom"}
COLUMNS = ["file", *model_io.OUTPUT_COLUMNS, "error"]


def collect_files(inputs: list[str]) -> list[Path]:
    """Expand folders (recursively, image and DICOM suffixes) and keep named files as given.

    Raises:
        FileNotFoundError: An input does not exist.
    """
    files: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            files += sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and p.suffix.lower() in FOLDER_SUFFIXES and not p.name.startswith(".")
            )
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{item} does not exist")
    return files


def predict_files(files: list[Path], model_uri: str, batch_size: int = 64) -> pd.DataFrame:
    """Label, probability of pneumonia and threshold for each file.

    Args:
        files: Image files (JPEG, PNG, DICOM).
        model_uri: ``runs:/<run>/model``, ``models:/<name>@<alias>`` or a model folder.
        batch_size: Files decoded and predicted together.

    Returns:
        Columns ``file``, ``label``, ``probability``, ``threshold``, ``error`` (empty when predicted).
    """
    trained = model_io.load_trained_model(model_uri)
    spec = trained.contract.input_spec
    parts = []
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        images, errors = [], []
        for path in chunk:
            try:
                images.append(decode_file(str(path), spec))
                errors.append("")
            except (ImageError, OSError) as error:
                errors.append(str(error))
                log.warning("%s: %s", path, error)
        good = [i for i, e in enumerate(errors) if not e]
        batch = np.stack(images) if images else np.zeros((0, spec.image_size, spec.image_size, spec.channels), np.uint8)
        labelled = serving.label_frame(model_io.predict_probabilities(trained.model, batch), trained.contract.threshold)
        part = pd.DataFrame(
            {
                "file": [str(p) for p in chunk],
                "label": "",
                "probability": np.nan,
                "threshold": trained.contract.threshold,
                "error": errors,
            }
        )
        part.loc[good, "label"] = labelled["label"].to_numpy()
        part.loc[good, "probability"] = labelled["probability"].to_numpy()
        parts.append(part)
    frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=COLUMNS)
    frame["probability"] = frame["probability"].astype(float)
    return frame[COLUMNS]


def main(argv: list[str] | None = None) -> int:
    """Command line: predict files/folders and write the CSV (to stdout without ``--output``).

    Returns:
        0 when every file was predicted, 1 when some could not be read (their rows name the error).
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = argparse.ArgumentParser(
        description="Classify chest X-ray files (JPEG, PNG, DICOM) with a logged pneumo model."
    )
    parser.add_argument(
        "inputs", nargs="+", metavar="FILES_OR_FOLDER", help="image files and/or folders (searched recursively)"
    )
    parser.add_argument(
        "--model-uri", required=True, help="runs:/<run id>/model, models:/pneumonia-classifier@champion, ..."
    )
    parser.add_argument("--output", default="", help="CSV file to write; default: standard output")
    parser.add_argument("--batch-size", type=int, default=64, help="images predicted per batch")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        files = collect_files(args.inputs)
    except FileNotFoundError as error:
        parser.error(str(error))
    if not files:
        parser.error(f"no image files ({', '.join(sorted(FOLDER_SUFFIXES))}) in {' '.join(args.inputs)}")
    frame = predict_files(files, args.model_uri, args.batch_size)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(args.output, index=False)
        log.info("wrote %d predictions to %s", len(frame), args.output)
    else:
        frame.to_csv(sys.stdout, index=False)
    failed = int((frame["error"] != "").sum())
    if failed:
        log.warning("%d of %d file(s) could not be read; see the 'error' column", failed, len(frame))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
