"""Batch prediction from the command line: image files or folders in, a CSV of labels out.

    python -m pneumo.predict FILES_OR_FOLDERS... --model-uri models:/pneumonia-classifier@champion \\
        [--output predictions.csv [--resume]]

Each file is decoded and predicted exactly as the served model does it (same decoder, same
Keras model, same threshold), so the CSV matches what ``mlflow models serve`` answers. A file
that cannot be read gets an ``error`` instead of a label; the others are still predicted.

A DICOM file's Study, Series and SOP Instance UIDs are written beside its score (read from the
header, never from the pixels; empty for JPEG and PNG), so the answers can be joined back to the
archive. They go to the CSV only, never to a log line. Each batch is written and flushed as soon
as it is predicted, so a run that stops part-way leaves a CSV that ``--resume`` completes: the
files already in it are skipped and the others appended under the same header.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import numpy as np
import pandas as pd

from pneumo import model_io, serving
from pneumo.dicom import DEFLATED_SYNTAX
from pneumo.dicom import _quiet as quiet_pydicom  # the decoder's own silencer of pydicom
from pneumo.errors import ImageError
from pneumo.preprocessing import decode_image
from pneumo.progress import progress

log = logging.getLogger(__name__)

# Files taken from a folder; named files are always tried, whatever their suffix.
FOLDER_SUFFIXES = {".jpeg", ".jpg", ".png", ".dcm", ".dicom"}
UID_COLUMNS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
COLUMNS = ["file", *model_io.OUTPUT_COLUMNS, "error", *UID_COLUMNS]
# A DICOM UID (PS3.5 9.1): digits and dots, at most 64 characters. Anything else in a UID field is
# left out of the CSV rather than written where a spreadsheet might execute it.
_UID = re.compile(r"[0-9.]{1,64}")


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


def read_uids(path: Path, data: bytes, decoded: bool) -> dict[str, str]:
    """Study, Series and SOP Instance UIDs of a DICOM file, from its header; empty strings otherwise.

    The header is read with ``stop_before_pixels`` and only these tags; a UID that is missing or
    not a valid UID is left empty. pydicom inflates a Deflated dataset without a bound, so one is
    read only once the decoder (which bounds it) has decoded the file.

    Args:
        path: The file (for its file meta group: the transfer syntax).
        data: The file's bytes.
        decoded: Whether :func:`pneumo.preprocessing.decode_image` decoded them.
    """
    empty = dict.fromkeys(UID_COLUMNS, "")
    if len(data) < 132 or data[128:132] != b"DICM":
        return empty
    import pydicom
    from pydicom.filereader import read_file_meta_info

    # pydicom's warnings and log records quote header values; the UIDs go to the CSV, never to a log.
    with quiet_pydicom():
        try:
            if not decoded and str(read_file_meta_info(path).get("TransferSyntaxUID", "")) == DEFLATED_SYNTAX:
                return empty
            header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=list(UID_COLUMNS))
        except Exception:  # noqa: BLE001  (an unreadable header: the decoder's error names the problem)
            return empty
        values = {name: str(header.get(name, "") or "").strip() for name in UID_COLUMNS}
    return {name: value if _UID.fullmatch(value) else "" for name, value in values.items()}


def _score_chunk(chunk: list[Path], trained: model_io.TrainedModel) -> pd.DataFrame:
    """The CSV rows of one batch of files: decode each, predict the decodable ones together."""
    spec = trained.contract.input_spec
    images, errors, uids = [], [], []
    for path in chunk:
        data, error = b"", ""
        try:
            data = path.read_bytes()
            images.append(decode_image(data, spec))
        except (ImageError, OSError) as failure:
            error = str(failure)
            log.warning("%s: %s", path, failure)
        errors.append(error)
        uids.append(read_uids(path, data, decoded=not error))
    good = [i for i, e in enumerate(errors) if not e]
    side = spec.image_size
    batch = np.stack(images) if images else np.zeros((0, side, side, spec.channels), np.uint8)
    answers = serving.answer_frame(trained.contract, batch, model_io.predict_probabilities(trained.model, batch))
    part = pd.DataFrame(
        {
            "file": [str(p) for p in chunk],
            "label": "",
            "probability": np.nan,
            "threshold": serving.served_threshold(trained.contract),
            "in_distribution": pd.Series([None] * len(chunk), dtype=object),
            "ood_score": np.nan,
            "error": errors,
            **{name: [u[name] for u in uids] for name in UID_COLUMNS},
        }
    )
    for column in model_io.OUTPUT_COLUMNS:
        part.loc[good, column] = answers[column].to_numpy()
    part["probability"] = part["probability"].astype(float)
    part["ood_score"] = part["ood_score"].astype(float)
    return part[COLUMNS]


def score_batches(files: list[Path], trained: model_io.TrainedModel, batch_size: int = 64) -> Iterator[pd.DataFrame]:
    """CSV rows for ``files``, one frame per batch of ``batch_size``, with a progress bar on a terminal."""
    chunk: list[Path] = []
    for path in progress(files, total=len(files), desc="predict", unit="file"):
        chunk.append(path)
        if len(chunk) == batch_size:
            yield _score_chunk(chunk, trained)
            chunk = []
    if chunk:
        yield _score_chunk(chunk, trained)


def predict_files(files: list[Path], model_uri: str, batch_size: int = 64) -> pd.DataFrame:
    """Label, probability of pneumonia, threshold and DICOM UIDs for each file.

    Args:
        files: Image files (JPEG, PNG, DICOM).
        model_uri: ``runs:/<run>/model``, ``models:/<name>@<alias>`` or a model folder.
        batch_size: Files decoded and predicted together.

    Returns:
        Columns ``file``, ``label``, ``probability``, ``threshold``, ``in_distribution``,
        ``ood_score`` (as the server answers them), ``error`` (empty when
        predicted), ``StudyInstanceUID``, ``SeriesInstanceUID``, ``SOPInstanceUID`` (empty for
        files that are not DICOM).
    """
    trained = model_io.load_trained_model(model_uri)
    parts = list(score_batches(files, trained, batch_size))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=COLUMNS)


def read_scored(csv: Path) -> pd.DataFrame:
    """The rows of an earlier run's CSV, for ``--resume``; an incomplete last row is cut off the file.

    A run stopped mid-write (killed, out of memory, power) can leave a last line without its end;
    that row is removed from the file, so its file is predicted again.

    Raises:
        ValueError: The file is not a CSV this command wrote (other columns), so appending to it
            would mix two layouts.
    """
    text = csv.read_bytes()
    if text and not text.endswith(b"\n"):
        with open(csv, "r+b") as handle:
            handle.truncate(text.rfind(b"\n") + 1)
        log.info("removed the incomplete last row of %s (the earlier run stopped while writing it)", csv)
    if csv.stat().st_size == 0:
        return pd.DataFrame(columns=COLUMNS)
    frame = pd.read_csv(csv, dtype=str, keep_default_na=False)
    if list(frame.columns) != COLUMNS:
        raise ValueError(
            f"{csv} has other columns than this command writes ({', '.join(COLUMNS)}); "
            "resume only a CSV written by this version, or write to a new file"
        )
    return frame


def _write(frame: pd.DataFrame, out: TextIO, header: bool) -> None:
    """Append ``frame`` and push it to the disk: what is written survives a crash of the run."""
    frame.to_csv(out, header=header, index=False)
    out.flush()
    if out is not sys.stdout:
        os.fsync(out.fileno())


def main(argv: list[str] | None = None) -> int:
    """Command line: predict files/folders and write the CSV (to stdout without ``--output``).

    Returns:
        0 when every file was predicted, 1 when some could not be read (their rows name the error;
        with ``--resume``, rows of the earlier run count too).
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
    parser.add_argument(
        "--resume",
        action="store_true",
        help="skip the files already in --output and append the others (after a run that stopped part-way)",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images predicted per batch")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if args.resume and not args.output:
        parser.error("--resume needs --output: the CSV to complete")
    try:
        files = collect_files(args.inputs)
    except FileNotFoundError as error:
        parser.error(str(error))
    if not files:
        parser.error(f"no image files ({', '.join(sorted(FOLDER_SUFFIXES))}) in {' '.join(args.inputs)}")
    output = Path(args.output) if args.output else None
    scored = pd.DataFrame(columns=COLUMNS)
    if args.resume and output.exists():
        try:
            scored = read_scored(output)
        except ValueError as error:
            parser.error(str(error))
        done = set(scored["file"])
        todo = [path for path in files if str(path) not in done]
        log.info("resuming: %d of %d file(s) already in %s", len(files) - len(todo), len(files), output)
    else:
        todo = files
    failed = int((scored["error"] != "").sum())
    written = 0
    if todo:
        # Opened before the output, so that a model that cannot be loaded leaves an earlier CSV as it was.
        trained = model_io.load_trained_model(args.model_uri)
        header = output is None or not args.resume or not output.exists() or output.stat().st_size == 0
        if output is not None:
            output.parent.mkdir(parents=True, exist_ok=True)
        out = open(output, "a" if args.resume else "w", newline="") if output is not None else sys.stdout
        try:
            for part in score_batches(todo, trained, args.batch_size):
                _write(part, out, header)
                header = False
                written += len(part)
                failed += int((part["error"] != "").sum())
        finally:
            if out is not sys.stdout:
                out.close()
    if output is not None:
        log.info("wrote %d prediction(s) to %s", written, output)
    if failed:
        log.warning("%d file(s) could not be read; see the 'error' column", failed)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
