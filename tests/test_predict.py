"""``python -m pneumo.predict`` over an archive folder: UIDs beside each score, errors per file, resume.

The folder holds real X-rays as a PACS export does (DICOM in several transfer syntaxes with known
UIDs, beside JPEGs). A resumed run must score only what the earlier run left: the rows it kept
carry a sentinel probability no model gives, which must survive.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

import xray_files
from archive_files import dicom_with_uids, log_tiny_model, new_uids, real_xrays, small_gray, write_archive
from pneumo import CLASS_NAMES, predict

NO_UIDS = dict.fromkeys(predict.UID_COLUMNS, "")
SENTINEL = 2.0  # a probability no model answers: a row that still has it was not predicted again


def read_csv(path) -> pd.DataFrame:
    """The CSV as predict wrote it, indexed by file (empty fields stay empty strings)."""
    frame = pd.read_csv(
        path, keep_default_na=False, na_values={"probability": [""]}, dtype=dict.fromkeys(predict.UID_COLUMNS, str)
    )
    assert list(frame.columns) == predict.COLUMNS
    return frame.set_index("file")


@pytest.mark.slow
def test_dicom_files_get_their_uids_and_a_corrupt_file_its_error(tracking, tmp_path, caplog, capsys):
    caplog.set_level(logging.INFO)
    folder = tmp_path / "archive"
    expected = write_archive(folder, 8)
    # A DICOM file cut off inside its pixel data: its header (and UIDs) are whole, its pixels are not.
    cut_uids = new_uids(generate_uid())
    whole = dicom_with_uids(small_gray(real_xrays(9)[-1]), cut_uids)
    (folder / "cut.dcm").write_bytes(whole[: len(whole) - 5000])
    (folder / "notes.png").write_text("not an image")
    uri = log_tiny_model()
    csv = tmp_path / "out" / "predictions.csv"

    assert predict.main([str(folder), "--model-uri", uri, "--output", str(csv), "--batch-size", "3"]) == 1

    frame = read_csv(csv)
    assert sorted(frame.index) == sorted([*expected, str(folder / "cut.dcm"), str(folder / "notes.png")])
    for file, uids in expected.items():
        row = frame.loc[file]
        assert row[list(predict.UID_COLUMNS)].to_dict() == uids, file
        assert row["error"] == "" and row["label"] in CLASS_NAMES and 0.0 <= row["probability"] <= 1.0
        assert row["label"] == CLASS_NAMES[int(row["probability"] >= row["threshold"])]
    cut = frame.loc[str(folder / "cut.dcm")]
    assert cut[list(predict.UID_COLUMNS)].to_dict() == cut_uids
    assert cut["label"] == "" and "pixel data" in cut["error"]
    notes = frame.loc[str(folder / "notes.png")]
    assert notes[list(predict.UID_COLUMNS)].to_dict() == NO_UIDS and "not a recognised image" in notes["error"]
    logged = caplog.text + capsys.readouterr().err
    assert "cut.dcm" in logged  # the failures are logged...
    for uids in [*expected.values(), cut_uids]:
        for uid in filter(None, uids.values()):
            assert uid not in logged  # ...but never an identifier


@pytest.mark.slow
def test_resume_after_a_crash_scores_only_the_files_left(tracking, tmp_path, monkeypatch):
    folder = tmp_path / "archive"
    expected = write_archive(folder, 8)
    uri = log_tiny_model()
    reference = tmp_path / "reference.csv"
    assert predict.main([str(folder), "--model-uri", uri, "--output", str(reference)]) == 0
    reference_frame = read_csv(reference)

    # The run dies while predicting its third batch: the two batches before it are on disk.
    score_chunk, batches = predict._score_chunk, []

    def dies_at_the_third_batch(chunk, trained):
        batches.append(chunk)
        if len(batches) == 3:
            raise RuntimeError("power cut")
        return score_chunk(chunk, trained)

    monkeypatch.setattr(predict, "_score_chunk", dies_at_the_third_batch)
    csv = tmp_path / "predictions.csv"
    with pytest.raises(RuntimeError, match="power cut"):
        predict.main([str(folder), "--model-uri", uri, "--output", str(csv), "--batch-size", "2"])
    monkeypatch.setattr(predict, "_score_chunk", score_chunk)
    crashed = read_csv(csv)
    assert len(crashed) == 4 and set(crashed.index) == {str(p) for chunk in batches[:2] for p in chunk}

    # Mark what the first run scored, and leave half a row behind as a write cut short would.
    crashed["probability"] = SENTINEL
    crashed.reset_index().to_csv(csv, index=False)
    half_row = f"{sorted(set(expected) - set(crashed.index))[0]},NORM"
    with open(csv, "a") as handle:
        handle.write(half_row)

    assert predict.main([str(folder), "--model-uri", uri, "--output", str(csv), "--resume", "--batch-size", "3"]) == 0

    assert csv.read_text().count("file,label,") == 1  # one header
    resumed = read_csv(csv)
    assert sorted(resumed.index) == sorted(expected)  # every file once, the half row replaced
    kept = resumed["probability"] == SENTINEL
    assert set(resumed.index[kept]) == set(crashed.index)
    np.testing.assert_allclose(
        resumed.loc[~kept, "probability"], reference_frame.loc[resumed.index[~kept], "probability"], rtol=0, atol=1e-6
    )
    for file, uids in expected.items():
        assert resumed.loc[file, list(predict.UID_COLUMNS)].to_dict() == uids


def test_resume_refuses_a_csv_of_other_columns_and_needs_an_output(tmp_path, capsys):
    image = tmp_path / "a.png"
    image.write_bytes(xray_files.tiny_png(8))
    old = tmp_path / "old.csv"
    old.write_text("file,label,probability,threshold,error\nx.png,NORMAL,0.1,0.5,\n")
    for argv, message in (
        ([str(image), "--model-uri", "runs:/none/model", "--output", str(old), "--resume"], "other columns"),
        ([str(image), "--model-uri", "runs:/none/model", "--resume"], "--resume needs --output"),
    ):
        with pytest.raises(SystemExit) as stopped:
            predict.main(argv)
        assert stopped.value.code == 2 and message in capsys.readouterr().err
    assert old.read_text().endswith("x.png,NORMAL,0.1,0.5,\n")  # left as it was


def test_uids_come_from_the_header_only_and_only_when_they_are_uids(tmp_path, caplog):
    gray = small_gray(real_xrays(1)[0])
    uids = new_uids(generate_uid())
    whole = dicom_with_uids(gray, uids)
    path = tmp_path / "x.dcm"
    path.write_bytes(whole[:-1000])
    assert predict.read_uids(path, path.read_bytes(), decoded=False) == uids  # no pixel is needed
    forged = dicom_with_uids(gray, {**uids, "SeriesInstanceUID": "=HYPERLINK(1)"})
    caplog.clear()
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        assert predict.read_uids(path, forged, decoded=True) == {**uids, "SeriesInstanceUID": ""}
    assert not warned and "HYPERLINK" not in caplog.text  # pydicom's complaint quotes the value: silenced
    assert predict.read_uids(path, xray_files.tiny_png(8), decoded=True) == NO_UIDS
    # pydicom would inflate a Deflated dataset without a bound: only a decoded one (bounded) is read.
    deflated = dicom_with_uids(gray, uids, DeflatedExplicitVRLittleEndian)
    path.write_bytes(deflated)
    assert predict.read_uids(path, deflated, decoded=False) == NO_UIDS
    assert predict.read_uids(path, deflated, decoded=True) == uids


def test_a_model_that_cannot_be_loaded_leaves_the_earlier_csv_as_it_was(tracking, tmp_path):
    image = tmp_path / "a.png"
    image.write_bytes(xray_files.tiny_png(8))
    csv = tmp_path / "predictions.csv"
    earlier = ",".join(predict.COLUMNS) + "\nx.png,NORMAL,0.1,0.5,,,,\n"
    csv.write_text(earlier)
    for resume in ([], ["--resume"]):
        with pytest.raises(MlflowException):
            predict.main([str(image), "--model-uri", "runs:/0123456789abcdef/model", "--output", str(csv), *resume])
        assert csv.read_text() == earlier
