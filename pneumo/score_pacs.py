"""score_pacs: score a PACS's chest X-rays over DICOMweb and write one DICOM SR per image back to its study.

QIDO-RS finds the instances of the chosen modalities and study dates, WADO-RS fetches each in the
syntax it is stored in, the model scores it through the serving decode path
(:func:`pneumo.preprocessing.decode_image` with the model's input spec, then
:func:`pneumo.model_io.predict_probabilities`), and STOW-RS stores a Structured Report with the
finding (indeterminate where the model's input gate fails the image), the probability, the
threshold and the model version (:func:`pneumo.pacs.build_report`).
A rerun reads the reports already in each study and scores only the images that this model
version has not reported; one instance that fails (cannot be fetched, decoded or stored) is
recorded and the batch goes on. The MLflow run logs the counts, the timings, the model version and
``pacs_results.csv`` (UIDs and scores, no pixels, no patient names or ids).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from pydicom.uid import generate_uid

from pneumo import UNCERTAIN, model_io, pacs, serving
from pneumo.config import PacsConfig, RunConfigs
from pneumo.errors import ConfigError, DataError
from pneumo.pacs import InstanceRef, ModelIdentity
from pneumo.preprocessing import decode_image
from pneumo.progress import progress
from pneumo.tracking import log_dataframe, log_metrics, start_run

log = logging.getLogger(__name__)

RESULTS_ARTIFACT = "pacs_results.csv"
RESULT_COLUMNS = [
    "study_instance_uid",
    "series_instance_uid",
    "sop_instance_uid",
    "modality",
    "transfer_syntax",
    "status",
    "label",
    "probability",
    "threshold",
    "in_distribution",
    "ood_score",
    "report_sop_instance_uid",
    "error",
]
SCORED, SKIPPED, FAILED = "scored", "skipped", "failed"


def resolve_model(model_uri: str) -> ModelIdentity:
    """The registered name and version a model URI names, pinned: an alias is resolved once, here.

    ``models:/<name>@<alias>`` becomes ``models:/<name>/<version>`` (MlflowClient's
    ``get_model_version_by_alias``), so the alias moving mid-batch changes nothing; a run's model
    is "unregistered run <id>".

    Raises:
        ConfigError: The URI is of another form, or the alias or version does not exist.
    """
    if model_uri.startswith("models:/"):
        name, _, rest = model_uri.removeprefix("models:/").partition("@")
        try:
            if rest:
                version = MlflowClient().get_model_version_by_alias(name, rest).version
            else:
                name, _, version = name.rpartition("/")
                if not name or not version.isdigit():
                    raise ConfigError(f"model_uri {model_uri!r}: expected models:/<name>@<alias> or models:/<name>/<n>")
                MlflowClient().get_model_version(name, version)
        except MlflowException as error:
            raise ConfigError(f"model_uri {model_uri!r} cannot be resolved: {error.message}") from error
        return ModelIdentity(name, str(version), f"models:/{name}/{version}")
    if model_uri.startswith("runs:/"):
        run_id = model_uri.removeprefix("runs:/").split("/", 1)[0]
        if not run_id:
            raise ConfigError(f"model_uri {model_uri!r}: expected runs:/<run id>/<path>")
        return ModelIdentity("pneumo", f"unregistered run {run_id}", model_uri)
    raise ConfigError(
        f"model_uri {model_uri!r}: score_pacs names the model in every report, so it takes "
        "models:/<name>@<alias>, models:/<name>/<version> or runs:/<run id>/<path>"
    )


def _row(ref: InstanceRef, status: str, **values: Any) -> dict[str, Any]:
    row = {column: "" for column in RESULT_COLUMNS} | {"probability": np.nan, "threshold": np.nan, "ood_score": np.nan}
    row |= {
        "study_instance_uid": ref.study_uid,
        "series_instance_uid": ref.series_uid,
        "sop_instance_uid": ref.sop_uid,
        "modality": ref.modality,
        "status": status,
    }
    return row | values


def _chunks(items: Iterator[InstanceRef], size: int) -> Iterator[list[InstanceRef]]:
    chunk: list[InstanceRef] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class _Timer:
    """Seconds spent per phase, summed over the batch."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, phase: str, since: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - since


def score_pacs(config: PacsConfig) -> str:
    """Score a PACS's chest X-rays over DICOMweb and store one DICOM SR per image in its study.

    Args:
        config: The DICOMweb service, the model, the modality and study-date filters.

    Returns:
        The MLflow run id.

    Raises:
        ConfigError: The model URI cannot be resolved, or the credentials in the environment are
            inconsistent.
        DataError: The PACS cannot be searched at all (unreachable, or refusing the credentials).
    """
    model = resolve_model(config.model_uri)
    trained = model_io.load_trained_model(model.uri)
    spec, threshold = trained.contract.input_spec, serving.served_threshold(trained.contract)
    client = pacs.connect(config.dicomweb_url, config.timeout)
    timer, rows = _Timer(), []
    started = time.perf_counter()
    with start_run(RunConfigs("score_pacs", config, name=f"score_pacs-{config.model_uri}")) as run:
        mlflow.set_tags({"pneumo.model_name": model.name, "pneumo.model_version": model.version})
        mlflow.set_tag("pneumo.model_uri_resolved", model.uri)
        since = time.perf_counter()
        try:
            found = pacs.find_instances(client, config.modality_list(), config.study_date_from, config.study_date_to)
        except Exception as error:  # noqa: BLE001  (nothing can be scored; said without UIDs)
            raise DataError(
                f"cannot search the PACS at {config.dicomweb_url}: {pacs.describe_failure(error)}"
            ) from error
        pending = []
        for study_uid, group in itertools.groupby(found, key=lambda ref: ref.study_uid):  # found is sorted by study
            in_study = list(group)
            try:
                reported = pacs.reported_instances(client, study_uid, model)
            except Exception as error:  # noqa: BLE001  (scoring now could report an image twice)
                reason = f"the study's existing reports cannot be read: {pacs.describe_failure(error)}"
                rows += [_row(ref, FAILED, error=reason) for ref in in_study]
                continue
            rows += [_row(ref, SKIPPED) for ref in in_study if ref.sop_uid in reported]
            pending += [ref for ref in in_study if ref.sop_uid not in reported]
        timer.add("search", since)
        log.info(
            "%d instance(s) found, %d already reported by %s version %s, %d to score",
            len(found),
            sum(row["status"] == SKIPPED for row in rows),
            model.name,
            model.version,
            len(pending),
        )
        report_series: dict[str, tuple[str, list[int]]] = {}  # study -> (new SR series, next instance number)
        done = 0
        for chunk in _chunks(progress(iter(pending), len(pending), "scoring", unit="instance"), config.batch_size):
            decoded = []
            for ref in chunk:
                since = time.perf_counter()
                try:
                    data, header = pacs.fetch_instance(client, ref)
                    image = decode_image(data, spec)
                    decoded.append((ref, header, image))
                except Exception as error:  # noqa: BLE001  (one instance's failure, recorded; the batch goes on)
                    rows.append(_row(ref, FAILED, error=pacs.describe_failure(error)))
                    log.warning("instance %d of %d failed: %s", done + 1, len(pending), pacs.describe_failure(error))
                timer.add("fetch_decode", since)
                done += 1
            if not decoded:
                continue
            since = time.perf_counter()
            batch = np.stack([image for _, _, image in decoded])
            probabilities = model_io.predict_probabilities(trained.model, batch)
            answers = serving.answer_frame(trained.contract, batch, probabilities)
            timer.add("predict", since)
            for (ref, header, _), answer in zip(decoded, answers.itertuples(index=False)):
                since = time.perf_counter()
                series_uid, counter = report_series.setdefault(ref.study_uid, (generate_uid(), [0]))
                counter[0] += 1
                values = {
                    "transfer_syntax": pacs.transfer_syntax(header),
                    "probability": float(answer.probability),
                    "threshold": threshold,
                    "in_distribution": answer.in_distribution,
                    "ood_score": answer.ood_score,
                }
                try:
                    report = pacs.build_report(
                        header, ref, model, float(answer.probability), threshold, answer.label, series_uid, counter[0]
                    )
                    pacs.store_report(client, report)
                    rows.append(
                        _row(ref, SCORED, label=answer.label, report_sop_instance_uid=report.SOPInstanceUID, **values)
                    )
                except Exception as error:  # noqa: BLE001  (recorded; the batch goes on)
                    rows.append(_row(ref, FAILED, error=f"report not stored: {pacs.describe_failure(error)}", **values))
                    log.warning("the report of one instance was not stored: %s", pacs.describe_failure(error))
                timer.add("store", since)
        timer.add("total", started)
        results = pd.DataFrame(rows, columns=RESULT_COLUMNS)
        counts = results["status"].value_counts()
        log_metrics(
            {
                "n_found": len(found),
                "n_scored": int(counts.get(SCORED, 0)),
                "n_skipped": int(counts.get(SKIPPED, 0)),
                "n_failed": int(counts.get(FAILED, 0)),
                "n_uncertain": int((results["label"] == UNCERTAIN).sum()),
            }
            | {f"seconds_{phase}": seconds for phase, seconds in timer.seconds.items()}
        )
        log_dataframe(results, RESULTS_ARTIFACT)
        log.info(
            "scored %d, skipped %d (already reported), failed %d; results in the run's %s",
            counts.get(SCORED, 0),
            counts.get(SKIPPED, 0),
            counts.get(FAILED, 0),
            RESULTS_ARTIFACT,
        )
        return run.info.run_id
