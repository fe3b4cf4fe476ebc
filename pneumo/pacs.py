"""PACS I/O: find and fetch images over DICOMweb, and write each score back as a DICOM Structured Report.

:mod:`pneumo.score_pacs` drives it; everything that speaks to a PACS, or reads and writes a report,
lives here:

- :func:`connect`: a ``dicomweb_client`` client whose HTTP session carries the credentials and CA
  bundle named by environment variables (:func:`dicomweb_session`); nothing secret is a parameter,
  so nothing secret is logged.
- :func:`find_instances`: QIDO-RS, series by modality and study date, then their instances.
- :func:`fetch_instance`: WADO-RS in the transfer syntax the instance is stored in
  (``transfer-syntax=*``), back to Part 10 bytes for :func:`pneumo.preprocessing.decode_image`.
- :func:`build_report` / :func:`read_report`: one Comprehensive SR (TID 1500 measurement report)
  per scored image, in the image's study, and the same facts read back (so a rerun knows what is
  already reported, :func:`reported_instances`).
- :func:`store_report`: STOW-RS.

Patient data: the report copies the patient and study modules of its source image (a PACS files it
by them), and stays in the PACS. No message here names a UID or a header value: failures are
described by :func:`describe_failure`, which keeps only the kind of error and an HTTP status.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import highdicom as hd
import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.sr.codedict import codes
from pydicom.uid import ComprehensiveSRStorage, generate_uid

from pneumo import UNCERTAIN
from pneumo.errors import ConfigError, DataError, ImageError

log = logging.getLogger(__name__)

# Credentials and trust, read from the environment only (README: PACS).
ENV_USERNAME = "PNEUMO_DICOMWEB_USERNAME"
ENV_PASSWORD = "PNEUMO_DICOMWEB_PASSWORD"
ENV_TOKEN = "PNEUMO_DICOMWEB_TOKEN"
ENV_CA_BUNDLE = "PNEUMO_DICOMWEB_CA_BUNDLE"

# What the report says, coded. SNOMED CT 233604007 is "Pneumonia"; the rest are in pydicom's tables.
PNEUMONIA = hd.sr.CodedConcept("233604007", "SCT", "Pneumonia")
PRESENT = codes.SCT.Present
ABSENT = codes.SCT.Absent
INDETERMINATE = codes.SCT.Indeterminate
# The coded finding of each served label (UNCERTAIN: the input gate said the image is not what the model was made for).
FINDINGS = {"PNEUMONIA": PRESENT, "NORMAL": ABSENT, UNCERTAIN: INDETERMINATE}
PROBABILITY = codes.DCM.Probability
THRESHOLD = codes.DCM.ThresholdValue
NO_UNITS = codes.UCUM.NoUnits
PLAIN_CHEST_XRAY = hd.sr.CodedConcept("399208008", "SCT", "Plain chest X-ray")
MANUFACTURER = "pneumo"
SERIES_DESCRIPTION = "pneumo second reader, not a diagnosis"
# Series number of the report series: far above what modalities use, so the series sorts last.
SR_SERIES_NUMBER = 9901
DISCLAIMER = (
    "Automated second reader (pneumo): a classifier's output for a clinician to weigh, not a diagnosis. "
    "It was not reviewed by a person; the finding depends on the operating threshold stated here."
)
UNCERTAIN_COMMENT = (
    "Not evaluated: the image does not look like a frontal chest X-ray of the kind this model was trained on "
    "(its input check failed: another body part or view, a rotated or inverted film, or not a radiograph). "
    "The probability stated is not to be relied on."
)
# WADO-RS media type asking for an instance in the transfer syntax it is stored in.
_STORED_SYNTAX = (("application/dicom", "*"),)
_SR_MODALITY = "SR"


@dataclass(frozen=True)
class InstanceRef:
    """Where one image is: its study, series and SOP instance, its SOP class and modality."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    modality: str


@dataclass(frozen=True)
class ModelIdentity:
    """The model named in a report: registered name and version, or an unregistered run.

    Attributes:
        name: Registered model name, or ``pneumo`` for a model logged by a run and never registered.
        version: Registered version number, or ``unregistered run <run id>``.
        uri: The URI the model was loaded from (pinned to the version, never an alias).
    """

    name: str
    version: str
    uri: str


@dataclass(frozen=True)
class Report:
    """What one of our reports says about one image (read back by :func:`read_report`)."""

    sop_uid: str
    model_name: str
    model_version: str
    probability: float
    threshold: float
    label: str  # the served label it records: NORMAL, PNEUMONIA or UNCERTAIN


class _Session(requests.Session):
    """A session that verifies the PACS against ``ca_bundle`` even where ``REQUESTS_CA_BUNDLE`` names another.

    requests lets ``REQUESTS_CA_BUNDLE`` override a session's own ``verify`` at every request; the
    PACS's bundle is the more specific setting, so it is put back after requests merges the
    environment (``merge_environment_settings`` is requests' public hook for exactly this).
    """

    def __init__(self, ca_bundle: str | None):
        super().__init__()
        self._ca_bundle = ca_bundle

    def merge_environment_settings(self, url, proxies, stream, verify, cert):
        settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
        if self._ca_bundle:
            settings["verify"] = self._ca_bundle
        return settings


def dicomweb_session(environ: Mapping[str, str] | None = None) -> requests.Session:
    """An HTTP session with the PACS credentials and CA bundle that the environment names.

    ``PNEUMO_DICOMWEB_TOKEN`` (an OAuth bearer token) or ``PNEUMO_DICOMWEB_USERNAME`` with
    ``PNEUMO_DICOMWEB_PASSWORD`` (HTTP basic); neither means no authentication. TLS is verified
    against ``PNEUMO_DICOMWEB_CA_BUNDLE`` when set, else ``REQUESTS_CA_BUNDLE``, else the system's.

    Raises:
        ConfigError: A username without password (or the reverse), both a token and a username, or
            a CA bundle that is not a file. The message names the variables, never their values.
    """
    env = os.environ if environ is None else environ
    username, password, token = env.get(ENV_USERNAME, ""), env.get(ENV_PASSWORD, ""), env.get(ENV_TOKEN, "")
    ca_bundle = env.get(ENV_CA_BUNDLE, "")
    if bool(username) != bool(password):
        raise ConfigError(f"set both {ENV_USERNAME} and {ENV_PASSWORD}, or neither")
    if token and username:
        raise ConfigError(f"set either {ENV_TOKEN} or {ENV_USERNAME}/{ENV_PASSWORD}, not both")
    if ca_bundle and not os.path.isfile(ca_bundle):
        raise ConfigError(f"{ENV_CA_BUNDLE} does not name a readable file")
    session = _Session(ca_bundle or None)
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    elif username:
        session.auth = (username, password)
    return session


def check_url(url: str) -> None:
    """Refuse a DICOMweb base URL that is not ``http(s)://host[:port][/path]`` or that carries credentials.

    Raises:
        ConfigError: Naming what is wrong (credentials belong in the environment: they would be
            logged with the parameter).
    """
    if not url:
        raise ConfigError("dicomweb_url is required (e.g. https://pacs.example.org/dicom-web)")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError("dicomweb_url must be an http:// or https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(
            f"dicomweb_url must not carry credentials (they would be logged): use {ENV_USERNAME}/{ENV_PASSWORD} "
            f"or {ENV_TOKEN}"
        )
    if parts.query or parts.fragment:
        raise ConfigError("dicomweb_url must not have a query or fragment")


def connect(url: str, timeout: float, environ: Mapping[str, str] | None = None) -> DICOMwebClient:
    """A DICOMweb client for the service at ``url``, authenticated from the environment.

    dicomweb-client logs every request's UIDs at INFO level and names the instance in its own
    error lines (a failed STOW-RS); UIDs identify patients' studies, so its logger is silenced
    below CRITICAL, and score_pacs reports the same failures without them.
    """
    check_url(url)
    logging.getLogger("dicomweb_client").setLevel(logging.CRITICAL)
    return DICOMwebClient(url.rstrip("/"), session=dicomweb_session(environ), timeout=timeout)


def describe_failure(error: BaseException) -> str:
    """A one-line account of a failure that names no UID, header value or URL (they identify patients)."""
    if isinstance(error, (ImageError, ConfigError)):
        return str(error)  # written never to quote a header value
    if isinstance(error, requests.HTTPError):
        status = error.response.status_code if error.response is not None else "?"
        reason = error.response.reason if error.response is not None else ""
        return f"the PACS answered HTTP {status} {reason}".rstrip()
    if isinstance(error, requests.exceptions.SSLError):
        return f"the PACS's TLS certificate cannot be verified (is {ENV_CA_BUNDLE} or REQUESTS_CA_BUNDLE its CA?)"
    if isinstance(error, requests.Timeout):
        return "the PACS did not answer in time"
    if isinstance(error, requests.ConnectionError):
        return "the PACS cannot be reached"
    if isinstance(error, InvalidDicomError):
        return "the PACS sent data that is not a DICOM instance"
    return f"{type(error).__name__} (details withheld: they may name the instance)"


def _value(result: dict, keyword: str) -> str:
    """One attribute of a QIDO-RS JSON result, as text ('' when absent)."""
    values = result.get(f"{pydicom.datadict.tag_for_keyword(keyword):08X}", {}).get("Value") or [""]
    return str(values[0])


def _date_range(date_from: str, date_to: str) -> str | None:
    """DICOM range matching for StudyDate (``from-to``, either end open); None for no bound."""
    return f"{date_from}-{date_to}" if date_from or date_to else None


def find_instances(
    client: DICOMwebClient, modalities: list[str], date_from: str = "", date_to: str = ""
) -> list[InstanceRef]:
    """Every instance of the series of these modalities whose study date is in range (QIDO-RS).

    Series are searched by modality (a matching key every QIDO-RS service supports), one query per
    modality, then their instances. The modality of each series is checked here again, so a service
    that ignores a filter cannot bring in another modality; reports (SR) are never candidates.

    Raises:
        requests.RequestException: The PACS refused or did not answer a search.
    """
    found: dict[str, InstanceRef] = {}
    for modality in modalities:
        filters = {"Modality": modality}
        dates = _date_range(date_from, date_to)
        if dates:
            filters["StudyDate"] = dates
        for series in client.search_for_series(search_filters=filters, get_remaining=True):
            if _value(series, "Modality") != modality:
                continue
            study_uid, series_uid = _value(series, "StudyInstanceUID"), _value(series, "SeriesInstanceUID")
            for instance in client.search_for_instances(study_uid, series_uid, get_remaining=True):
                sop_uid = _value(instance, "SOPInstanceUID")
                found[sop_uid] = InstanceRef(study_uid, series_uid, sop_uid, _value(instance, "SOPClassUID"), modality)
    return sorted(found.values(), key=lambda ref: (ref.study_uid, ref.series_uid, ref.sop_uid))


def fetch_instance(client: DICOMwebClient, ref: InstanceRef) -> tuple[bytes, Dataset]:
    """An instance in its stored transfer syntax (WADO-RS ``transfer-syntax=*``).

    Returns:
        The Part 10 file bytes (what the image-file route and the server decode) and its header
        without pixel data (the report copies the patient and study from it).
    """
    dataset = client.retrieve_instance(ref.study_uid, ref.series_uid, ref.sop_uid, media_types=_STORED_SYNTAX)
    buffer = io.BytesIO()
    # The dataset as the PACS sent it, file meta included: same elements, same transfer syntax.
    dataset.save_as(buffer, enforce_file_format=True)
    header = Dataset({element.tag: element for element in dataset if element.tag < 0x7FE00000})
    header.file_meta = dataset.file_meta
    return buffer.getvalue(), header


def transfer_syntax(header: Dataset) -> str:
    """The name of the header's transfer syntax (e.g. ``JPEG Baseline (Process 1)``), else its UID."""
    uid = header.file_meta.get("TransferSyntaxUID", None) if hasattr(header, "file_meta") else None
    return uid.name if uid is not None else ""


# Patient and study attributes a report must copy; absent ones become empty (Type 2), as the SR needs them.
_TYPE2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


def build_report(
    header: Dataset,
    ref: InstanceRef,
    model: ModelIdentity,
    probability: float,
    threshold: float,
    label: str,
    series_uid: str,
    instance_number: int,
) -> hd.sr.ComprehensiveSR:
    """One Comprehensive SR with the score of one image, in that image's study.

    The content is a TID 1500 measurement report, observed by a device (the model), holding one
    TID 1501 measurement group: finding "Pneumonia" with a qualitative evaluation present or absent
    at the threshold, or indeterminate when the input gate said the image is not what the model
    was made for (then a second comment says so), the probability and the threshold as numbers,
    the model as algorithm name and version, the source image, and a comment that this is a second
    reader's output and not a diagnosis. The evidence sequence references the image's study,
    series and SOP instance. The document is marked complete, preliminary and unverified: nobody
    has signed it.

    Args:
        header: The source image's header (patient and study modules are copied from it).
        ref: The source image.
        model: The model that scored it.
        probability: Probability of pneumonia (as served: calibrated).
        threshold: The model's operating threshold, on the same scale.
        label: The served label (:func:`pneumo.serving.answer_frame`): NORMAL, PNEUMONIA or UNCERTAIN.
        series_uid: The report series (new, in the image's study).
        instance_number: The report's number in that series.
    """
    evidence = Dataset({element.tag: element for element in header})
    for keyword in _TYPE2_COPIED:
        if keyword not in evidence:
            setattr(evidence, keyword, "")
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="pneumonia score"),
        finding_type=PNEUMONIA,
        algorithm_id=hd.sr.AlgorithmIdentification(
            name=model.name, version=model.version, parameters=[f"model_uri={model.uri}"], manufacturer=MANUFACTURER
        ),
        measurements=[
            hd.sr.Measurement(name=PROBABILITY, value=float(probability), unit=NO_UNITS),
            hd.sr.Measurement(name=THRESHOLD, value=float(threshold), unit=NO_UNITS),
        ],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=PNEUMONIA, value=FINDINGS[label])],
        source_images=[hd.sr.SourceImageForMeasurementGroup(ref.sop_class_uid, ref.sop_uid)],
    )
    # TID 1501 admits TEXT qualitative evaluations; highdicom's constructor takes coded ones only.
    comments = [DISCLAIMER] + ([UNCERTAIN_COMMENT] if label == UNCERTAIN else [])
    for comment in comments:
        group[0].ContentSequence.append(
            hd.sr.TextContentItem(
                name=codes.DCM.Comment, value=comment, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
            )
        )
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=generate_uid(entropy_srcs=[MANUFACTURER, model.name, model.version]),
        name="pneumo second reader",
        manufacturer_name=MANUFACTURER,
        model_name=model.name,
        serial_number=model.version,
    )
    content = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(
                observer_type=codes.cid270.Device, observer_identifying_attributes=device
            )
        ),
        procedure_reported=PLAIN_CHEST_XRAY,
        imaging_measurements=[group],
    )
    return hd.sr.ComprehensiveSR(
        evidence=[evidence],
        content=content[0],
        series_instance_uid=series_uid,
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        manufacturer_model_name="pneumo second reader",
        series_description=SERIES_DESCRIPTION,
        is_complete=True,
        is_final=False,
        is_verified=False,
    )


def read_report(dataset: Dataset) -> Report | None:
    """What one of our reports says, or None for any other document (another vendor's SR, a note).

    Ours: a Comprehensive SR by :data:`MANUFACTURER` whose measurement group has the finding
    Pneumonia, one source image, the algorithm name and version, the probability and threshold.
    """
    if dataset.get("Manufacturer", "") != MANUFACTURER or dataset.get("SOPClassUID", "") != ComprehensiveSRStorage:
        return None
    try:
        report = hd.sr.ComprehensiveSR.from_dataset(dataset)
        content = report.content
        if not isinstance(content, hd.sr.MeasurementReport):
            return None
        groups = content.get_image_measurement_groups(finding_type=PNEUMONIA)
        if len(groups) != 1 or len(groups[0].source_images) != 1:
            return None
        group = groups[0]

        def text(code) -> str:
            items = hd.sr.utils.find_content_items(group[0], name=code, value_type=hd.sr.ValueTypeValues.TEXT)
            return str(items[0].TextValue) if items else ""

        (probability,) = group.get_measurements(name=PROBABILITY)
        (threshold,) = group.get_measurements(name=THRESHOLD)
        (evaluation,) = group.get_qualitative_evaluations(name=PNEUMONIA)
        name, version = text(codes.DCM.AlgorithmName), text(codes.DCM.AlgorithmVersion)
        if not name or not version:
            return None
        return Report(
            sop_uid=str(group.source_images[0].referenced_sop_instance_uid),
            model_name=name,
            model_version=version,
            probability=float(probability.value),
            threshold=float(threshold.value),
            label=next((label for label, code in FINDINGS.items() if evaluation.value == code), ""),
        )
    except (AttributeError, KeyError, TypeError, ValueError):  # not the structure we write
        return None


def reported_instances(client: DICOMwebClient, study_uid: str, model: ModelIdentity) -> set[str]:
    """SOP Instance UIDs of the study's images that already have a report by this model version.

    Reads every SR of the study (QIDO-RS by modality, then WADO-RS): reports are small, and their
    content, not a search key, says which image and which model version they are about.

    Raises:
        requests.RequestException: The PACS refused or did not answer.
    """
    done = set()
    for result in client.search_for_instances(study_uid, search_filters={"Modality": _SR_MODALITY}, get_remaining=True):
        series_uid, sop_uid = _value(result, "SeriesInstanceUID"), _value(result, "SOPInstanceUID")
        if _value(result, "SOPClassUID") != ComprehensiveSRStorage:
            continue  # another kind of document: not one of ours
        report = read_report(client.retrieve_instance(study_uid, series_uid, sop_uid, media_types=_STORED_SYNTAX))
        if report is not None and (report.model_name, report.model_version) == (model.name, model.version):
            done.add(report.sop_uid)
    return done


def store_report(client: DICOMwebClient, report: Dataset) -> None:
    """Store one report through STOW-RS.

    Raises:
        DataError: The PACS answered but did not store it (a failed or missing SOP in the answer).
        requests.RequestException: The PACS refused the request or did not answer.
    """
    answer = client.store_instances([report], study_instance_uid=report.StudyInstanceUID)
    stored = {str(item.ReferencedSOPInstanceUID) for item in answer.get("ReferencedSOPSequence", [])}
    if answer.get("FailedSOPSequence") or str(report.SOPInstanceUID) not in stored:
        raise DataError("the PACS did not store the report (STOW-RS answered with a failure)")
