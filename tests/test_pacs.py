"""score_pacs against a real Orthanc: DICOMweb in, one DICOM SR per image out, idempotent, per-instance failures.

The server is Debian's Orthanc with its DICOMweb plugin (:mod:`orthanc`), behind HTTP basic
authentication whose credentials reach score_pacs through the environment only. The images are
real X-rays from the shared test split, written as DICOM with generated UIDs and fake patients.
Each report is read back through QIDO-RS/WADO-RS and its score compared with the image-file route:
the same pixels as a lossless PNG through ``pneumo.predict.predict_files``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from mlflow.tracking import MlflowClient
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import (
    ComprehensiveSRStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

import xray_files as xf
from conftest import SHARED_DATA, require_real_data
from helpers import download, run_project
from orthanc import Orthanc, run_orthanc, self_signed_certificate, tls_front, upload
from pneumo import pacs
from pneumo.config import PacsConfig
from pneumo.errors import ConfigError, DataError
from pneumo.predict import predict_files
from pneumo.score_pacs import RESULT_COLUMNS, RESULTS_ARTIFACT, resolve_model, score_pacs

pytest_plugins = ["model_fixtures"]

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
REGISTERED = "pacs-test-classifier"
# Small enough to upload and decode quickly, large enough to be a radiograph at model resolution.
SIDE = 384
IN_RANGE, OUT_OF_RANGE = "20240220", "20230105"
# JPEG 2000 Part 2 multi-component (lossless): a syntax Orthanc stores and pneumo's decoder refuses.
REFUSED_SYNTAX = "1.2.840.10008.1.2.4.92"


def _gray(path: Path) -> np.ndarray:
    """The X-ray as 8-bit grayscale, reduced to about SIDE pixels, stretched to 0..255 (decoders keep it as is)."""
    with Image.open(path) as image:
        image = image.convert("L")
        image.thumbnail((SIDE, SIDE), Image.Resampling.LANCZOS)
        gray = np.asarray(image, dtype=np.float64)
    return np.round((gray - gray.min()) * 255.0 / (gray.max() - gray.min())).astype(np.uint8)


@dataclass
class Uploaded:
    """One instance put into the PACS and what score_pacs should make of it."""

    name: str
    study: str
    series: str
    sop: str
    modality: str
    expect: str  # "scored", "failed" or "ignored" (filtered out: never found)
    patient_id: str
    gray: np.ndarray  # the pixels, for the image-file route
    syntax: str = ""  # the transfer syntax it is stored in


def _dicom(gray: np.ndarray, item: Uploaded, number: int, study_date: str) -> bytes:
    """An uncompressed Part 10 file of ``gray`` as modality ``item.modality``, fake patient ``number``."""
    sop_class = {"DX": xf.DX_FOR_PRESENTATION, "CR": CR_IMAGE_STORAGE, "MR": MRImageStorage}
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.SOPClassUID = sop_class.get(item.modality, SecondaryCaptureImageStorage)
    dataset.SOPInstanceUID = item.sop
    dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    dataset.file_meta.MediaStorageSOPInstanceUID = item.sop
    dataset.PatientName = f"Fake^Patient{number}"
    dataset.PatientID = item.patient_id
    dataset.PatientBirthDate, dataset.PatientSex = "20180101", "O"
    dataset.StudyInstanceUID, dataset.SeriesInstanceUID = item.study, item.series
    dataset.StudyDate, dataset.StudyTime, dataset.StudyID = study_date, "101500", f"S{number}"
    dataset.AccessionNumber, dataset.ReferringPhysicianName = f"ACC{number:04d}", ""
    dataset.Modality, dataset.SeriesNumber, dataset.InstanceNumber = item.modality, 1, 1
    dataset.set_pixel_data(gray, photometric_interpretation="MONOCHROME2", bits_stored=8, generate_instance_uid=False)
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _resaved(data: bytes, syntax: str) -> bytes:
    """The same instance written in another uncompressed transfer syntax."""
    dataset = pydicom.dcmread(io.BytesIO(data))
    dataset.file_meta.TransferSyntaxUID = syntax
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _refused(data: bytes) -> bytes:
    """The instance relabelled as JPEG 2000 Part 2 multi-component, a syntax the decoder does not read."""
    dataset = pydicom.dcmread(io.BytesIO(data))
    dataset.PixelData = encapsulate([dataset.PixelData])
    dataset["PixelData"].VR = "OB"
    dataset.file_meta.TransferSyntaxUID = REFUSED_SYNTAX
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _jpeg_pixels(data: bytes) -> np.ndarray:
    """The pixels of a JPEG Baseline instance's codestream, fully decoded by Pillow."""
    dataset = pydicom.dcmread(io.BytesIO(data))
    (frame,) = generate_frames(dataset.PixelData, number_of_frames=1)
    with Image.open(io.BytesIO(frame)) as image:
        return np.asarray(image.convert("L"))


def _truncated(data: bytes) -> bytes:
    """The same instance claiming twice its rows: the pixel data no longer covers the frame."""
    dataset = pydicom.dcmread(io.BytesIO(data))
    dataset.Rows = dataset.Rows * 2
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Orthanc:
    with run_orthanc(tmp_path_factory.mktemp("orthanc")) as running:
        yield running


@pytest.fixture(scope="module")
def uploaded(server) -> list[Uploaded]:
    """Four studies: scored DX and CR in several syntaxes, failures, an MR and an OT, one out of the date range."""
    require_real_data()
    normal = sorted((SHARED_DATA / "test" / "NORMAL").iterdir())[:3]
    pneumonia = sorted((SHARED_DATA / "test" / "PNEUMONIA").iterdir())[:3]
    images = [_gray(path) for path in normal + pneumonia]
    studies = [generate_uid() for _ in range(4)]
    series = {key: generate_uid() for key in ("a-dx", "a-cr", "b-dx", "c-mr", "c-ot", "d-dx")}
    plan = [
        # name, study, series key, modality, image index, syntax, expect, date
        ("dx-explicit", 0, "a-dx", "DX", 0, ExplicitVRLittleEndian, "scored", IN_RANGE),
        ("dx-implicit", 0, "a-dx", "DX", 3, ImplicitVRLittleEndian, "scored", IN_RANGE),
        ("dx-jpeg-ls", 0, "a-dx", "DX", 1, JPEGLSLossless, "scored", IN_RANGE),
        ("dx-jpeg-2000", 0, "a-dx", "DX", 4, JPEG2000Lossless, "scored", IN_RANGE),
        ("cr-explicit", 0, "a-cr", "CR", 4, ExplicitVRLittleEndian, "scored", IN_RANGE),
        ("cr-rle", 0, "a-cr", "CR", 5, RLELossless, "scored", IN_RANGE),
        ("dx-explicit-2", 1, "b-dx", "DX", 1, ExplicitVRLittleEndian, "scored", IN_RANGE),
        ("dx-jpeg-lossless", 1, "b-dx", "DX", 2, JPEGLosslessSV1, "scored", IN_RANGE),
        ("dx-deflated", 1, "b-dx", "DX", 0, DeflatedExplicitVRLittleEndian, "scored", IN_RANGE),
        ("dx-jpeg-baseline", 1, "b-dx", "DX", 5, JPEGBaseline8Bit, "scored", IN_RANGE),
        ("dx-refused-syntax", 1, "b-dx", "DX", 3, REFUSED_SYNTAX, "failed", IN_RANGE),
        ("dx-truncated", 1, "b-dx", "DX", 2, "truncated", "failed", IN_RANGE),
        ("mr", 2, "c-mr", "MR", 2, ExplicitVRLittleEndian, "ignored", IN_RANGE),
        ("ot", 2, "c-ot", "OT", 5, ExplicitVRLittleEndian, "ignored", IN_RANGE),
        ("dx-too-old", 3, "d-dx", "DX", 1, ExplicitVRLittleEndian, "ignored", OUT_OF_RANGE),
    ]
    items, files = [], []
    for number, (name, study, key, modality, index, syntax, expect, date) in enumerate(plan):
        item = Uploaded(
            name, studies[study], series[key], generate_uid(), modality, expect, f"FAKE-{number:04d}", images[index]
        )
        data = _dicom(images[index], item, number, date)
        if syntax == "truncated":
            data = _truncated(data)
        elif syntax == REFUSED_SYNTAX:
            data = _refused(data)
        elif syntax == ImplicitVRLittleEndian:
            data = _resaved(data, syntax)
        elif syntax != ExplicitVRLittleEndian:
            data = xf.compressed_dicom(data, syntax)
        written = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        item.sop, item.syntax = (
            written.SOPInstanceUID,
            written.file_meta.TransferSyntaxUID.name,
        )  # encoders may renew it
        if syntax == JPEGBaseline8Bit:  # the pixels its JPEG decodes to, not the ones it was made from
            item.gray = _jpeg_pixels(data)
        items.append(item)
        files.append(data)
    upload(server, files)
    return items


@pytest.fixture
def pacs_env(models_store, server, monkeypatch, tmp_path):
    """The session's models in a registry entry of this module's own, runs in their own experiment, credentials set."""
    monkeypatch.setenv(pacs.ENV_USERNAME, server.username)
    monkeypatch.setenv(pacs.ENV_PASSWORD, server.password)
    for name in (pacs.ENV_TOKEN, pacs.ENV_CA_BUNDLE):
        monkeypatch.delenv(name, raising=False)
    experiment = "pneumo-pacs"
    if mlflow.get_experiment_by_name(experiment) is None:
        mlflow.create_experiment(experiment, artifact_location=(tmp_path / "artifacts").as_uri())
    mlflow.set_experiment(experiment)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", experiment)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    return models_store


def _register(run_id: str) -> str:
    """Register a run's model as the next version of REGISTERED and make it champion; returns the version."""
    version = mlflow.register_model(f"runs:/{run_id}/model", REGISTERED).version
    MlflowClient().set_registered_model_alias(REGISTERED, "champion", version)
    return str(version)


def _reader(server: Orthanc) -> DICOMwebClient:
    """A DICOMweb client of the test's own (not pneumo.pacs): what a PACS viewer would see."""
    session = requests.Session()
    session.auth = server.auth
    return DICOMwebClient(server.dicomweb, session=session)


def _reports(server: Orthanc, studies: set[str]) -> list[Dataset]:
    reader, found = _reader(server), []
    for study in sorted(studies):
        for result in reader.search_for_instances(study, search_filters={"Modality": "SR"}):
            series, sop = result["0020000E"]["Value"][0], result["00080018"]["Value"][0]
            found.append(reader.retrieve_instance(study, series, sop))
    return found


def _results(run_id: str, folder: Path) -> pd.DataFrame:
    return pd.read_csv(download(MlflowClient(), run_id, RESULTS_ARTIFACT, folder), dtype={"error": str})


def _file_route(items: list[Uploaded], model_uri: str, folder: Path) -> dict[str, float]:
    """Probabilities of the same pixels as lossless PNG files, through predict_files (the image-file route).

    PNG, not the original JPEG: decoding a JPEG, the decoder lets libjpeg scale it down while
    decoding (``draft``), so the JPEG file's pixels at model size are not the DICOM's.
    """
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for item in items:
        paths.append(folder / f"{item.name}.png")
        paths[-1].write_bytes(xf.reference_png(item.gray))
    frame = predict_files(paths, model_uri)
    assert (frame["error"] == "").all(), frame["error"].tolist()
    return dict(zip((item.sop for item in items), frame["probability"]))


def _sop(items: list[Uploaded], name: str) -> str:
    return next(item.sop for item in items if item.name == name)


def _texts(dataset: Dataset) -> list[str]:
    """Every TEXT value of an SR content tree."""
    found = []
    for item in dataset.get("ContentSequence", []):
        if item.ValueType == "TEXT":
            found.append(str(item.TextValue))
        found += _texts(item)
    return found


def _config(server: Orthanc, **changes) -> PacsConfig:
    return PacsConfig(dicomweb_url=server.dicomweb, model_uri=f"models:/{REGISTERED}@champion", **changes)


@pytest.mark.slow
def test_score_pacs_round_trip_is_idempotent_and_rescored_by_a_new_version(pacs_env, server, uploaded, repo, tmp_path):
    expected = {item.sop: item for item in uploaded}
    to_score = [item for item in uploaded if item.expect == "scored"]
    to_fail = [item for item in uploaded if item.expect == "failed"]
    studies = {item.study for item in uploaded}
    first_version = _register(pacs_env.aug_cnn)

    # 1. First run: every in-range CR/DX image is scored and reported; failures recorded, the batch goes on.
    run_id = score_pacs(_config(server, study_date_from="20240101", batch_size=2))
    run = mlflow.get_run(run_id)
    metrics = run.data.metrics
    assert (metrics["n_found"], metrics["n_scored"], metrics["n_skipped"], metrics["n_failed"]) == (
        len(to_score) + len(to_fail),
        len(to_score),
        0,
        len(to_fail),
    )
    assert run.data.tags["pneumo.model_name"] == REGISTERED
    assert run.data.tags["pneumo.model_version"] == first_version
    assert {"seconds_search", "seconds_fetch_decode", "seconds_predict", "seconds_store"} <= set(metrics)
    results = _results(run_id, tmp_path / "first")
    assert list(results.columns) == RESULT_COLUMNS
    assert set(results["sop_instance_uid"]) == {item.sop for item in to_score + to_fail}  # no MR, OT, old study
    by_sop = results.set_index("sop_instance_uid")
    for item in to_fail:
        assert by_sop.loc[item.sop, "status"] == "failed"
    assert "is not accepted" in by_sop.loc[_sop(uploaded, "dx-refused-syntax"), "error"]
    assert "truncated" in by_sop.loc[_sop(uploaded, "dx-truncated"), "error"]
    # Fetched in the syntax each was stored in (WADO-RS transfer-syntax=*), not transcoded by the PACS.
    assert {i.sop: by_sop.loc[i.sop, "transfer_syntax"] for i in to_score} == {i.sop: i.syntax for i in to_score}
    assert len({i.syntax for i in to_score}) == 8
    # The shareable artifact carries UIDs and scores, never a patient's name or id, nor the password.
    text = (tmp_path / "first" / RESULTS_ARTIFACT).read_text()
    assert "Fake^Patient" not in text and "FAKE-" not in text and server.password not in text
    assert server.password not in str(run.data.params) + str(run.data.tags)

    # 2. The reports, read back as a viewer would: one per scored image, in its study, in a new series.
    reports = _reports(server, studies)
    assert len(reports) == len(to_score)
    file_route = _file_route(to_score, f"models:/{REGISTERED}/{first_version}", tmp_path / "png")
    for dataset in reports:
        assert dataset.SOPClassUID == ComprehensiveSRStorage and dataset.Modality == "SR"
        report = pacs.read_report(dataset)
        source = expected[report.sop_uid]
        assert dataset.StudyInstanceUID == source.study and dataset.SeriesInstanceUID != source.series
        assert dataset.PatientID == source.patient_id  # filed under the image's patient
        (evidence,) = dataset.CurrentRequestedProcedureEvidenceSequence
        (series,) = evidence.ReferencedSeriesSequence
        (instance,) = series.ReferencedSOPSequence
        assert (evidence.StudyInstanceUID, series.SeriesInstanceUID, instance.ReferencedSOPInstanceUID) == (
            source.study,
            source.series,
            source.sop,
        )
        assert (report.model_name, report.model_version) == (REGISTERED, first_version)
        # Lossless syntaxes score exactly like the file; JPEG Baseline's decoders may differ by a level.
        tolerance = 0.02 if source.name == "dx-jpeg-baseline" else 1e-6
        assert report.probability == pytest.approx(file_route[source.sop], abs=tolerance), source.name
        assert report.threshold == pytest.approx(by_sop.loc[source.sop, "threshold"], abs=1e-12)
        assert report.label == by_sop.loc[source.sop, "label"]
        if report.label != "UNCERTAIN":
            assert (report.label == "PNEUMONIA") == (report.probability >= report.threshold)
        assert by_sop.loc[source.sop, "report_sop_instance_uid"] == dataset.SOPInstanceUID
        assert pacs.DISCLAIMER in _texts(dataset) and "not a diagnosis" in dataset.SeriesDescription
        assert (dataset.VerificationFlag, dataset.PreliminaryFlag, dataset.CompletionFlag) == (
            "UNVERIFIED",
            "PRELIMINARY",
            "COMPLETE",
        )

    # 3. A rerun, through MLproject in a subprocess (credentials from the inherited environment): nothing twice.
    rerun = run_project(
        repo,
        "score_pacs",
        {"dicomweb_url": server.dicomweb, "model_uri": f"models:/{REGISTERED}@champion", "study_date_from": "20240101"},
        "pneumo-pacs",
    )
    metrics = mlflow.get_run(rerun.run_id).data.metrics
    assert (metrics["n_scored"], metrics["n_skipped"], metrics["n_failed"]) == (0, len(to_score), len(to_fail))
    assert len(_reports(server, studies)) == len(to_score)

    # 4. A new champion version scores every image again, next to the first version's reports.
    second_version = _register(pacs_env.cnn)
    metrics = mlflow.get_run(score_pacs(_config(server, study_date_from="20240101"))).data.metrics
    assert (metrics["n_scored"], metrics["n_skipped"], metrics["n_failed"]) == (len(to_score), 0, len(to_fail))
    versions = {}
    for dataset in _reports(server, studies):
        report = pacs.read_report(dataset)
        versions.setdefault(report.sop_uid, set()).add(report.model_version)
    assert versions == {item.sop: {first_version, second_version} for item in to_score}


@pytest.mark.slow
def test_credentials_are_required_and_never_echoed(pacs_env, server, uploaded, monkeypatch):
    monkeypatch.setenv(pacs.ENV_PASSWORD, "not-the-password")
    config = PacsConfig(dicomweb_url=server.dicomweb, model_uri=pacs_env.model_uri(pacs_env.aug_cnn))
    studies = {item.study for item in uploaded}
    before = len(_reports(server, studies))
    with pytest.raises(DataError, match="HTTP 401") as refused:
        score_pacs(config)
    assert "not-the-password" not in str(refused.value)
    assert len(_reports(server, studies)) == before  # nothing written


@pytest.mark.slow
def test_tls_is_verified_against_the_pacs_ca_bundle(server, uploaded, tmp_path, monkeypatch):
    server_pem, certificate = self_signed_certificate()
    (tmp_path / "server.pem").write_bytes(server_pem)
    bundle = tmp_path / "pacs-ca.pem"
    bundle.write_bytes(certificate)
    # A process-wide bundle that does not know the PACS (certifi's public CAs): the PACS's own must win.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", requests.certs.where())
    credentials = {pacs.ENV_USERNAME: server.username, pacs.ENV_PASSWORD: server.password}
    with tls_front(server, tmp_path / "server.pem") as url:
        with pytest.raises(requests.exceptions.SSLError) as refused:
            pacs.find_instances(pacs.connect(f"{url}/dicom-web", 10, credentials), ["CR"])
        assert "certificate cannot be verified" in pacs.describe_failure(refused.value)
        trusted = pacs.connect(f"{url}/dicom-web", 10, credentials | {pacs.ENV_CA_BUNDLE: str(bundle)})
        found = {ref.sop_uid for ref in pacs.find_instances(trusted, ["CR"], "20240101")}
    assert found == {item.sop for item in uploaded if item.modality == "CR" and item.expect != "ignored"}


def test_session_takes_credentials_and_ca_bundle_from_the_environment(tmp_path, monkeypatch):
    bundle, other = tmp_path / "pacs-ca.pem", tmp_path / "other-ca.pem"
    bundle.write_text("pem"), other.write_text("pem")
    session = pacs.dicomweb_session({pacs.ENV_USERNAME: "reader", pacs.ENV_PASSWORD: "secret"})
    assert session.auth == ("reader", "secret") and "Authorization" not in session.headers
    session = pacs.dicomweb_session({pacs.ENV_TOKEN: "abc.def", pacs.ENV_CA_BUNDLE: str(bundle)})
    assert session.headers["Authorization"] == "Bearer abc.def" and session.auth is None
    # requests would let REQUESTS_CA_BUNDLE override the session's own bundle; the PACS's wins.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(other))
    assert session.merge_environment_settings("https://pacs.example.org", {}, None, None, None)["verify"] == str(bundle)
    plain = pacs.dicomweb_session({})
    assert plain.merge_environment_settings("https://pacs.example.org", {}, None, None, None)["verify"] == str(other)
    for environ, named in [
        ({pacs.ENV_USERNAME: "reader"}, pacs.ENV_PASSWORD),
        ({pacs.ENV_TOKEN: "t", pacs.ENV_USERNAME: "u", pacs.ENV_PASSWORD: "p-secret"}, pacs.ENV_TOKEN),
        ({pacs.ENV_CA_BUNDLE: str(tmp_path / "missing.pem")}, pacs.ENV_CA_BUNDLE),
    ]:
        with pytest.raises(ConfigError, match=named) as refused:
            pacs.dicomweb_session(environ)
        assert "p-secret" not in str(refused.value) and "missing.pem" not in str(refused.value)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"dicomweb_url": ""}, "dicomweb_url is required"),
        ({"dicomweb_url": "ftp://pacs/dicom-web"}, "http:// or https://"),
        ({"dicomweb_url": "https://reader:secret@pacs/dicom-web"}, "must not carry credentials"),
        ({"study_date_from": "2024-01-01"}, "YYYYMMDD"),
        ({"study_date_from": "20240301", "study_date_to": "20240101"}, "after"),
        ({"modalities": "DX,SR"}, "must not include SR"),
        ({"modalities": "dx"}, "modality codes"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_pacs_config_refuses_unusable_parameters(changes, message):
    with pytest.raises(ConfigError, match=message) as refused:
        PacsConfig(**({"dicomweb_url": "https://pacs.example.org/dicom-web"} | changes))
    assert "secret" not in str(refused.value)


def test_model_uri_is_resolved_to_a_version_or_an_unregistered_run(tracking):
    model = resolve_model("runs:/0123abcd/model")
    assert (model.name, model.version, model.uri) == ("pneumo", "unregistered run 0123abcd", "runs:/0123abcd/model")
    with pytest.raises(ConfigError, match="cannot be resolved"):
        resolve_model("models:/no-such-model@champion")
    with pytest.raises(ConfigError, match="takes models:/<name>@<alias>"):
        resolve_model("/some/folder/model")


def test_report_says_finding_score_threshold_model_and_source(tmp_path):
    gray = xf.noise(64, 48)
    item = Uploaded("dx", generate_uid(), generate_uid(), generate_uid(), "DX", "scored", "FAKE-0001", gray)
    header = pydicom.dcmread(io.BytesIO(_dicom(gray, item, 1, IN_RANGE)), stop_before_pixels=True)
    del header.StudyID  # a Type 2 attribute some modalities leave out: copied as empty
    ref = pacs.InstanceRef(item.study, item.series, item.sop, xf.DX_FOR_PRESENTATION, "DX")
    model = pacs.ModelIdentity(REGISTERED, "7", f"models:/{REGISTERED}/7")
    series = generate_uid()
    for probability, label in [(0.8125, "PNEUMONIA"), (0.25, "NORMAL"), (0.9, "UNCERTAIN")]:
        written = pacs.build_report(header, ref, model, probability, 0.5, label, series, 3)
        buffer = io.BytesIO()
        written.save_as(buffer, enforce_file_format=True)
        dataset = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
        assert pacs.read_report(dataset) == pacs.Report(item.sop, REGISTERED, "7", probability, 0.5, label)
        assert (dataset.StudyInstanceUID, dataset.SeriesInstanceUID, dataset.InstanceNumber) == (item.study, series, 3)
        assert (dataset.PatientID, dataset.StudyID) == ("FAKE-0001", "")
        assert pacs.DISCLAIMER in _texts(dataset)
        # An image the input gate failed is reported as not evaluated, whatever its score.
        assert (pacs.UNCERTAIN_COMMENT in _texts(dataset)) == (label == "UNCERTAIN")
    # Another vendor's report, or one by another device, is not ours: never taken as already scored.
    dataset.Manufacturer = "another vendor"
    assert pacs.read_report(dataset) is None
