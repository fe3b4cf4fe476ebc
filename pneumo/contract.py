"""The model contract: everything stored with a logged model that says how to use it and what it is.

Every pneumo model carries one :class:`ModelContract` as ``model_config.json`` beside its Keras
file. It is the single description that training writes and that evaluation, registration, site
adaptation, serving and PACS scoring read: how file bytes become the model's input
(:class:`~pneumo.preprocessing.InputSpec`), the operating threshold and how it was chosen, the
label contract, every hyperparameter, the validation figures, where the model came from, and,
for a hospital's own version, its site figures.

The file is versioned (:data:`CONTRACT_VERSION`). :func:`read_contract` upgrades older files
(version 1 is the untyped dict every model logged before the contract existed) and refuses, with a
message saying what to do, a file it cannot understand: a newer version, or one that lacks what a
model needs. New facts enter as new optional fields with a default, so an older file still reads.
This module is the only place that reads or writes the file.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from pneumo import CLASS_NAMES
from pneumo.calibration import Calibration
from pneumo.config import json_text
from pneumo.errors import ConfigError
from pneumo.ood import Gaussian, InputGate
from pneumo.preprocessing import InputSpec

# Version 3 added the input gate and the calibration: a pneumo that predates them must refuse such a
# model rather than serve it without its out-of-distribution check.
CONTRACT_VERSION = 3
CONTRACT_FILE = "model_config.json"
# An interval: (point estimate, lower bound, upper bound); the bounds are NaN where undefined.
Interval = tuple[float, float, float]


@dataclass(frozen=True)
class Figures:
    """A model's figures on one set of images, at its operating threshold.

    Attributes:
        on: Which images, in words free of local paths (``validation split (patient-grouped)``,
            ``site sample, out of fold``).
        metrics: Figures at the operating threshold, named as :func:`pneumo.metrics.binary_metrics`
            names them (``roc_auc``, ``sensitivity``, ``specificity``, ``ppv``, ``tp``, ...).
        intervals: 95% patient-grouped bootstrap intervals of ``roc_auc``, ``sensitivity`` and
            ``specificity`` (see :func:`pneumo.metrics.bootstrap_intervals`); empty when not computed.
        n_images: Images the figures rest on.
        n_patients: Distinct patients among them (0 when unknown).
    """

    on: str
    metrics: dict[str, float]
    intervals: dict[str, Interval] = field(default_factory=dict)
    n_images: int = 0
    n_patients: int = 0


@dataclass(frozen=True)
class Lineage:
    """Where a derived model (a site version) came from.

    Attributes:
        method: ``site calibration`` (same weights, a site threshold) or ``site adaptation``
            (weights fine-tuned on the site's images).
        parent_uri: The model it was derived from (``models:/pneumonia-classifier@champion``).
        parent_version: That model's registered name and version (``pneumonia-classifier/3``), or
            empty when it was not a registered version.
        parent_run_id: The parent's training run.
        site_manifest_digest: Digest of the site sample's manifest (:func:`pneumo.data.manifest_digest`).
    """

    method: str
    parent_uri: str
    parent_version: str
    parent_run_id: str | None
    site_manifest_digest: str


@dataclass(frozen=True)
class SiteFigures:
    """How a site version was fitted to a hospital's labelled sample, and how it did there.

    Attributes:
        target_sensitivity: The sensitivity the site threshold was chosen to reach.
        n_pneumonia: Pneumonia images in the sample (enough for the target: see
            :func:`pneumo.metrics.positives_needed`).
        figures: The site version's figures on the sample (out of fold for an adapted model).
        parent_figures: The parent model's figures on the same images, at its own threshold.
        details: Further numbers of the method (folds, the parent's threshold, forgetting on the
            training hospital's validation split, ...).
    """

    target_sensitivity: float
    n_pneumonia: int
    figures: Figures
    parent_figures: Figures | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelContract:
    """What travels with every logged pneumo model (``model_config.json``).

    Attributes:
        entry_point: The entry point that trained it (``aug_cnn``, ``resnet``, ``adapt``, ...).
        input_spec: How file bytes become its input; used wherever it predicts.
        threshold: Operating threshold: pneumonia when ``probability >= threshold``.
        threshold_rule: How the threshold was chosen, in words.
        class_names: The label contract; index 1 is pneumonia.
        hyperparameters: ``{config name: fields}`` of the run that made it (:meth:`RunConfigs.as_dict`).
        validation: Its figures on the training hospital's validation split.
        run_id: The MLflow run that logged it.
        code_version: The git commit of the code that trained it (MLflow's ``mlflow.source.git.commit``
            of that run; empty when it did not run from a git checkout).
        cross_validation: ``cv``'s fold summary, for models refitted after cross-validation.
        lineage: For a site version, where it came from.
        site: For a site version, how it was fitted to the site and how it did there.
        input_gate: What the images it was made for look like (:mod:`pneumo.ood`); ``None`` for a
            model logged before the gate existed, whose answers then say nothing about their input.
        calibration: The map from its raw score to the probability it serves (:mod:`pneumo.calibration`);
            ``None`` serves the raw score.
        version: The contract's format version.
    """

    entry_point: str
    input_spec: InputSpec
    threshold: float
    threshold_rule: str
    hyperparameters: dict[str, dict[str, Any]]
    validation: Figures
    run_id: str | None = None
    code_version: str = ""
    class_names: tuple[str, ...] = CLASS_NAMES
    cross_validation: dict[str, float] | None = None
    lineage: Lineage | None = None
    site: SiteFigures | None = None
    input_gate: InputGate | None = None
    calibration: Calibration | None = None
    version: int = CONTRACT_VERSION

    def __post_init__(self) -> None:
        if tuple(self.class_names) != CLASS_NAMES:
            raise ConfigError(f"model classes {list(self.class_names)} break the label contract {list(CLASS_NAMES)}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"model threshold {self.threshold} is not a probability")

    def derived(self, **changes: Any) -> ModelContract:
        """A copy with some fields changed, for a model derived from this one (a site version)."""
        return dataclasses.replace(self, **changes)


def contract_text(contract: ModelContract) -> str:
    """The contract as the text of ``model_config.json``."""
    return json_text(dataclasses.asdict(contract))


def _number(value: Any) -> float:
    return math.nan if value is None else float(value)


def _figures(payload: dict[str, Any]) -> Figures:
    return Figures(
        on=str(payload["on"]),
        metrics={k: _number(v) for k, v in payload.get("metrics", {}).items()},
        intervals={k: tuple(_number(x) for x in v) for k, v in payload.get("intervals", {}).items()},
        n_images=int(payload.get("n_images", 0)),
        n_patients=int(payload.get("n_patients", 0)),
    )


def _gaussian(payload: dict[str, Any]) -> Gaussian:
    return Gaussian(
        mean=tuple(map(float, payload["mean"])),
        scale=tuple(map(float, payload["scale"])),
        directions=tuple(tuple(map(float, row)) for row in payload["directions"]),
        variances=tuple(map(float, payload["variances"])),
        residual_scale=float(payload["residual_scale"]),
    )


def _gate(payload: dict[str, Any]) -> InputGate:
    return InputGate(
        layout=_gaussian(payload["layout"]),
        texture=_gaussian(payload["texture"]),
        layout_limit=float(payload["layout_limit"]),
        texture_limit=float(payload["texture_limit"]),
        validation_pass_rate=float(payload["validation_pass_rate"]),
        n_fitted=int(payload["n_fitted"]),
        n_calibrated=int(payload["n_calibrated"]),
    )


def _calibration(payload: dict[str, Any]) -> Calibration:
    return Calibration(
        slope=float(payload["slope"]),
        intercept=float(payload["intercept"]),
        fitted_on=str(payload["fitted_on"]),
        n_images=int(payload["n_images"]),
        ece_before=_number(payload["ece_before"]),
        ece_after=_number(payload["ece_after"]),
    )


def _from_v1(payload: dict[str, Any]) -> dict[str, Any]:
    """A version-1 file (the untyped dict logged before the contract) in the current shape.

    Version 1 held ``image_size``, ``channels``, optionally ``crop`` and ``equalize``, ``threshold``,
    ``class_names``, ``val_metrics``, ``run_id``, ``config`` and ``entry_point``, plus
    ``cross_validation`` (cv) or ``site_calibration`` (a site threshold) extras. Its CLAHE was
    pneumo's own implementation, so that is what its spec names.
    """
    equalize = payload.get("equalize", "none")
    site = payload.get("site_calibration")
    target = payload.get("config", {}).get("train", {}).get("target_sensitivity")
    return {
        "entry_point": payload.get("entry_point", "unknown"),
        "input_spec": {
            "image_size": payload["image_size"],
            "channels": payload["channels"],
            "crop": payload.get("crop", 0.0),
            "equalize": "clahe-pneumo" if equalize == "clahe" else equalize,
        },
        "threshold": payload["threshold"],
        "threshold_rule": (
            f"site sample sensitivity >= {site['target_sensitivity']}"
            if site
            else f"validation sensitivity >= {target}"
            if target is not None
            else "validation split"
        ),
        "hyperparameters": payload.get("config", {}),
        "validation": {
            "on": "validation split of the training hospital (patient-grouped)",
            # val_<name> (threshold-free) and val_<name>_at_threshold, as binary_metrics names them.
            "metrics": {
                key.removeprefix("val_").removesuffix("_at_threshold"): value
                for key, value in payload.get("val_metrics", {}).items()
                if not key.endswith("_at_0.5")
            },
        },
        "run_id": payload.get("run_id"),
        "class_names": payload.get("class_names", list(CLASS_NAMES)),
        "cross_validation": payload.get("cross_validation"),
    }


def parse_contract(payload: Any) -> ModelContract:
    """The contract in a parsed ``model_config.json``, upgraded from older versions.

    Raises:
        ConfigError: The file is not a contract this version of pneumo understands: not an object,
            a newer version, or lacking a field a model needs. The message names it.
    """
    if not isinstance(payload, dict):
        raise ConfigError(f"{CONTRACT_FILE} is not a JSON object; this is not a pneumo model")
    version = payload.get("version", 1)
    if not isinstance(version, int) or version < 1:
        raise ConfigError(f"{CONTRACT_FILE} has an unreadable version {version!r}")
    if version > CONTRACT_VERSION:
        raise ConfigError(
            f"{CONTRACT_FILE} is version {version}, newer than this pneumo reads (up to {CONTRACT_VERSION}); "
            "install the pneumo version that logged the model"
        )
    try:
        fields = _from_v1(payload) if version == 1 else dict(payload)
        spec = fields["input_spec"]
        lineage, site = fields.get("lineage"), fields.get("site")
        return ModelContract(
            entry_point=str(fields["entry_point"]),
            input_spec=InputSpec(
                int(spec["image_size"]), int(spec["channels"]), float(spec.get("crop", 0.0)), spec["equalize"]
            ),
            threshold=float(fields["threshold"]),
            threshold_rule=str(fields["threshold_rule"]),
            hyperparameters=dict(fields.get("hyperparameters", {})),
            validation=_figures(fields["validation"]),
            run_id=fields.get("run_id"),
            code_version=str(fields.get("code_version", "")),
            class_names=tuple(fields.get("class_names", CLASS_NAMES)),
            cross_validation=fields.get("cross_validation"),
            lineage=Lineage(**lineage) if lineage else None,
            site=(
                SiteFigures(
                    target_sensitivity=float(site["target_sensitivity"]),
                    n_pneumonia=int(site["n_pneumonia"]),
                    figures=_figures(site["figures"]),
                    parent_figures=_figures(site["parent_figures"]) if site.get("parent_figures") else None,
                    details=dict(site.get("details", {})),
                )
                if site
                else None
            ),
            input_gate=_gate(fields["input_gate"]) if fields.get("input_gate") else None,
            calibration=_calibration(fields["calibration"]) if fields.get("calibration") else None,
        )
    except ConfigError:
        raise
    except KeyError as error:
        raise ConfigError(
            f"{CONTRACT_FILE} (version {version}) lacks {error.args[0]!r}; the model cannot be used"
        ) from None
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{CONTRACT_FILE} (version {version}) is malformed: {error}") from None


def read_contract(text: str) -> ModelContract:
    """The contract in the text of a ``model_config.json`` (see :func:`parse_contract`)."""
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{CONTRACT_FILE} is not valid JSON ({error.msg}); this is not a pneumo model") from None
    return parse_contract(payload)
