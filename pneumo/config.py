"""Typed hyperparameters for every entry point.

Each entry point is described by a handful of dataclasses. The command-line parser is built
from their fields (so MLproject parameter names, argparse flags and MLflow params can never
drift apart), every field is logged as an MLflow param, and the whole set is saved with the
model in ``model_config.json``.

A field with a fixed set of values is typed ``Literal[...]``: the dataclass refuses any other
value when it is created, and the generated parser offers exactly those choices, so a typo fails
at parse time and ``--help`` lists them.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import re
import typing
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from pneumo.errors import ConfigError
from pneumo.preprocessing import Equalizer, InputSpec

T = TypeVar("T")

# Validation metrics that steer early stopping, checkpoints and tuning, and whether higher is better.
Monitor = Literal["val_auc", "val_loss"]
HIGHER_IS_BETTER: dict[str, bool] = {"val_auc": True, "val_loss": False}


def choices(kind: Any) -> tuple[Any, ...] | None:
    """The allowed values of a ``Literal[...]`` field type, or None for any other type."""
    return typing.get_args(kind) if typing.get_origin(kind) is Literal else None


class _Checked:
    """Base of the config dataclasses: ``Literal`` fields must hold one of their values."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            allowed = choices(hints[f.name])
            value = getattr(self, f.name)
            if allowed is not None and value not in allowed:
                raise ConfigError(f"{f.name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


@dataclass
class DataConfig(_Checked):
    """Where the images are and how they are turned into model inputs."""

    # Folder in the Kaggle layout {train,val,test}/{NORMAL,PNEUMONIA}. Empty: $PNEUMO_DATA_DIR,
    # then ./data/chest_xray, then a kagglehub download.
    data_dir: str = ""
    # Split manifest: a CSV path, or the id of a run that logged one (prepare, training,
    # evaluate). Empty: prepare one now.
    manifest: str = ""
    # Side of the square model input in pixels; the notebook's 64 threw away detail.
    image_size: int = 128
    # 1 = grayscale (X-rays carry no colour), 3 = RGB (needed by ImageNet backbones).
    channels: Literal[1, 3] = 1
    # Fraction of training patients held out for validation (model and threshold selection).
    val_fraction: float = 0.1
    # "grouped": validation carved from train, stratified and grouped by patient.
    # "notebook": the seed notebook's 100 random test images (without moving any file).
    val_scheme: Literal["grouped", "notebook"] = "grouped"
    # Cap on images per class and split (whole patients are kept together); 0 = all.
    # For smoke runs and tests only.
    limit_per_class: int = 0
    # Fraction of each side cut away before resizing: burned-in markers and collimator edges are
    # shortcuts that do not transfer between hospitals.
    crop: float = 0.0
    # Intensity equalisation after resizing: "none", "hist" (global histogram equalisation), or
    # contrast-limited adaptive histogram equalisation, which evens out detector response between
    # hospitals: "clahe-pneumo" (pneumo's own; the default, better on validation over 3 seeds) or
    # "clahe" (OpenCV's; see README, Generalisation).
    equalize: Equalizer = "clahe-pneumo"
    # Folder for the decoded-image cache (.npz per manifest and input spec); empty = no disk cache.
    cache_dir: str = "outputs/cache"
    # Put patient X-rays into MLflow artifacts: the augmentation grid and evaluate's error gallery.
    # Off: the grid shows synthetic chests and no gallery is drawn, so no artifact holds patient
    # pixels (README, "Patient data: what holds it").
    patient_images: bool = False
    # Seed for the split, the sampling, the augmentation and the weights.
    seed: int = 42

    def __post_init__(self) -> None:
        super().__post_init__()
        try:  # the spec checks its own fields (crop's range), once
            _ = self.input_spec
        except ValueError as error:
            raise ConfigError(str(error)) from error

    @property
    def input_spec(self) -> InputSpec:
        """How this run's files become model inputs (saved with the model)."""
        return InputSpec(self.image_size, self.channels, self.crop, self.equalize)


@dataclass
class AugmentConfig(_Checked):
    """Training-time augmentation ranges (searched by `tune`). Never applied at prediction."""

    # Maximum rotation in degrees (notebook: 15).
    rotation: float = 10.0
    # Maximum horizontal / vertical shift as a fraction of the side (notebook: 0.2).
    width_shift: float = 0.1
    height_shift: float = 0.1
    # Maximum zoom in or out as a fraction (notebook: 0.2).
    zoom: float = 0.15
    # Multiplicative brightness range (notebook: [1, 1.5]). With per-image normalisation it acts
    # through saturation at 255 only; gamma below changes the non-linear intensity response.
    brightness_low: float = 0.9
    brightness_high: float = 1.3
    # Maximum contrast change as a fraction (Keras RandomContrast factor).
    contrast: float = 0.2
    # Maximum deviation of a random gamma from 1 (0 disables): mimics other exposure curves.
    gamma: float = 0.3
    # Horizontal flips. Off: a chest X-ray has a fixed orientation (heart on the left).
    flip: bool = False
    # Largest blend towards a Gaussian blur (sigma 1.5 px), 0 disables: softer detectors.
    blur: float = 0.0
    # Largest standard deviation of additive noise, as a fraction of full scale; 0 disables.
    noise: float = 0.0


@dataclass
class TrainConfig(_Checked):
    """Optimisation settings shared by the Keras training entry points."""

    batch_size: int = 32
    # Upper bound; early stopping usually ends sooner.
    epochs: int = 16
    learning_rate: float = 1e-3
    optimizer: Literal["adam", "adamw", "rmsprop", "sgd"] = "adam"
    # Epochs without improvement of `monitor` before stopping (best weights restored).
    patience: int = 5
    # Validation ROC AUC (maximised) or loss (minimised).
    monitor: Monitor = "val_auc"
    # "oversample": imbalanced-learn's RandomOverSampler; "class_weight": weighted loss; "none".
    balance: Literal["oversample", "class_weight", "none"] = "oversample"
    # "auto": bfloat16 compute where the CPU/GPU supports it, else float32; or force one.
    precision: Literal["auto", "float32", "mixed_bfloat16"] = "auto"
    # Sensitivity the operating threshold must reach on validation.
    target_sensitivity: float = 0.97
    # Cosine decay of the learning rate over the planned epochs.
    cosine_decay: bool = True
    # Label smoothing of the cross-entropy (0 = none): keeps scores off 0 and 1, so the threshold
    # chosen on validation sits where scores are still spread out rather than saturated.
    label_smoothing: float = 0.1
    # Validate, checkpoint and serve an exponential moving average of the weights (momentum 0.99).
    ema: bool = True
    # Several accelerators: "auto" mirrors the model on every visible GPU when there are two or
    # more (batch_size is then per GPU, the global batch scaled), "mirrored" forces it, "none" never.
    distribute: Literal["auto", "mirrored", "none"] = "auto"


@dataclass
class DenseConfig(_Checked):
    """The notebook's dense baseline (flattened pixels, Dense 32 -> 8 -> 1)."""

    # L2 factor on the first Dense layer (the notebook's "L2 baseline" used 0.01).
    l2: float = 0.0


@dataclass
class CVConfig(_Checked):
    """K-fold cross-validation of the L2 dense baseline through SciKeras."""

    # Folds of the training split, grouped by patient and stratified by class.
    folds: int = 5
    # L2 factor on the first Dense layer (the notebook's cross-validated model used 0.01).
    l2: float = 0.01


@dataclass
class CNNConfig(_Checked):
    """Convolutional network settings."""

    # Channels of the first block; each later block doubles it (aug_cnn).
    width: int = 24
    # Dropout before the classifier.
    dropout: float = 0.3
    # "per_image": zero mean, unit variance per image (robust to exposure); "rescale": /255.
    normalization: Literal["per_image", "rescale"] = "per_image"


@dataclass
class ResNetConfig(_Checked):
    """Frozen ImageNet ResNet50 with a small head, optionally fine-tuned."""

    # "imagenet" (downloaded by Keras), "none" (random init) or a path to a weights file.
    weights: str = "imagenet"
    # Global average pooling or flattening of the last feature map.
    pooling: Literal["avg", "flatten"] = "avg"
    dropout: float = 0.3
    # Epochs of a second stage that unfreezes the last block (BatchNorm stays frozen); 0 = off.
    fine_tune_epochs: int = 0
    fine_tune_learning_rate: float = 1e-5


@dataclass
class EvalConfig(_Checked):
    """Evaluation and registration of a trained model."""

    # runs:/<id>/model or models:/<name>@<alias>; empty = the model of the newest finished
    # aug_cnn run in the active experiment. Its image_size and channels override DataConfig's.
    model_uri: str = ""
    # Split of the manifest to evaluate.
    split: Literal["test", "val", "train"] = "test"
    # Decision threshold; a negative value means the one chosen on validation and stored with the model.
    threshold: float = -1.0
    # Register the model; it becomes "champion" only if it clears the floors below and its validation
    # ROC AUC beats the current champion's on this manifest's validation split, else "challenger".
    register: bool = False
    registered_name: str = "pneumonia-classifier"
    # Promotion floors on the validation split at the model's own threshold: below any of them the
    # model is registered without an alias, even when there is no champion yet.
    floor_sensitivity: float = 0.95
    floor_specificity: float = 0.80
    floor_roc_auc: float = 0.95
    # Most confident false negatives, and false positives, shown in the Grad-CAM error gallery.
    gallery_size: int = 4
    # Average each image's probability over the fixed test-time views (7 forward passes per image).
    tta: bool = False
    # Patient-grouped bootstrap resamples behind the 95% confidence intervals (0 = none).
    bootstrap: int = 2000
    # Site calibration: take the evaluated split (e.g. a hospital's labelled local folder given as
    # data_dir) as the local sample, choose the threshold reaching site_sensitivity on it, and
    # register a new version carrying that threshold under alias site_alias (the evaluated
    # version is left untouched). Refused when the sample has too few pneumonia images.
    calibrate: bool = False
    site_sensitivity: float = 0.98
    site_alias: str = "site"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.site_sensitivity < 1.0:
            raise ConfigError(f"site_sensitivity must be in (0, 1), got {self.site_sensitivity}")
        if self.bootstrap < 0:
            raise ConfigError(f"bootstrap must not be negative, got {self.bootstrap}")


@dataclass
class TuneConfig(_Checked):
    """Optuna search over the learning rate and the augmentation ranges of ``aug_cnn``."""

    # Finished (complete or pruned) trials the study should hold in total, counted over every
    # invocation and worker: a resumed or parallel worker runs only the trials still missing.
    n_trials: int = 20
    # Seconds after which this worker starts no new trial; 0 = no limit.
    timeout: int = 0
    study_name: str = "aug_cnn"
    # Optuna storage (resumed when the study exists): a SQLAlchemy URL (sqlite:///file.db for one
    # worker; postgresql://user:pw@host/db for workers on several machines, the password masked
    # in MLflow), journal:FILE (several workers on one machine) or grpc://HOST:PORT (Optuna's
    # storage proxy, python -m pneumo.optuna_proxy).
    storage: str = "sqlite:///outputs/optuna.db"
    # Validation ROC AUC (maximised) or cross-entropy (minimised). Also each trial's early-stopping
    # and checkpoint monitor.
    objective: Monitor = "val_auc"
    # Learning rate, searched log-uniformly between these.
    lr_low: float = 1e-4
    lr_high: float = 3e-3
    # Augmentation ranges, each searched from 0 up to its maximum; brightness searches the gain
    # bounds in [1 - brightness_max, 1] and [1, 1 + brightness_max]. Flips are never searched.
    rotation_max: float = 20.0
    shift_max: float = 0.2
    zoom_max: float = 0.25
    brightness_max: float = 0.5
    contrast_max: float = 0.4
    gamma_max: float = 0.5
    # Also search the batch size (one of batch_sizes, comma-separated) and dropout (0..dropout_max).
    search_batch_and_dropout: bool = False
    batch_sizes: str = "16,32,64"
    dropout_max: float = 0.5
    # "median": stop a trial whose per-epoch value is worse than the median of earlier trials at
    # that epoch; "threshold": stop it when worse than prune_threshold (a floor for val_auc, a
    # ceiling for val_loss); "none". A diverging loss (NaN/inf) always stops a trial as pruned.
    pruner: Literal["median", "threshold", "none"] = "median"
    # Trials that must finish before the median pruner acts; epochs every trial runs unpruned.
    pruner_startup_trials: int = 3
    pruner_warmup_epochs: int = 2
    prune_threshold: float = 0.6
    # Retrain with the best parameters in a nested run logged exactly like an aug_cnn run (model
    # included).
    retrain_best: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_trials < 1:
            raise ConfigError(f"n_trials must be at least 1, got {self.n_trials}")
        if not 0 < self.lr_low <= self.lr_high:
            raise ConfigError(f"need 0 < lr_low <= lr_high, got {self.lr_low} and {self.lr_high}")
        if not 0 <= self.brightness_max < 1:
            raise ConfigError(f"brightness_max must be in [0, 1), got {self.brightness_max}")
        maxima = ("rotation_max", "shift_max", "zoom_max", "contrast_max", "gamma_max", "dropout_max")
        negative = [name for name in maxima if getattr(self, name) < 0]
        if negative:
            raise ConfigError(f"search bounds must not be negative: {negative}")
        if not 0 <= self.dropout_max < 1:
            raise ConfigError(f"dropout_max must be in [0, 1), got {self.dropout_max}")
        if self.search_batch_and_dropout:
            self.batch_size_choices()

    def batch_size_choices(self) -> list[int]:
        """The candidate batch sizes of ``batch_sizes`` (comma-separated positive integers)."""
        try:
            sizes = sorted({int(part) for part in self.batch_sizes.split(",") if part.strip()})
        except ValueError:
            sizes = []
        if not sizes or sizes[0] < 1:
            raise ConfigError(f"batch_sizes must be comma-separated positive integers, got {self.batch_sizes!r}")
        return sizes


@dataclass
class AdaptConfig(_Checked):
    """Site adaptation: fine-tune a registered model on a hospital's own labelled images (``adapt``)."""

    # The model to adapt (its input spec, weights and threshold are the starting point).
    model_uri: str = "models:/pneumonia-classifier@champion"
    # The hospital's labelled sample: a folder holding NORMAL/ and PNEUMONIA/ (only read). Any
    # format and size the decoder accepts (JPEG, PNG, DICOM).
    site_dir: str = ""
    # Sensitivity the site threshold must reach, chosen on out-of-fold scores of the sample.
    site_sensitivity: float = 0.98
    # Patient-grouped, stratified folds of the cross-fitting that scores every site image out of fold.
    folds: int = 5
    # "fine_tune": train the weights on the site's labels; "batchnorm": only re-estimate the
    # BatchNorm statistics on the site's images (no labels touch the weights; a baseline).
    method: Literal["fine_tune", "batchnorm"] = "fine_tune"
    # Fine-tuning: epochs over the (class-balanced) site images, Adam learning rate, batch size.
    epochs: int = 8
    learning_rate: float = 1e-4
    batch_size: int = 16
    # Which layers train: "all", or "top" (the last convolutional stage and the classifier only).
    train_layers: Literal["all", "top"] = "all"
    # Augmentation of the site images while fine-tuning: rotation (degrees), shift and zoom (fractions).
    rotation: float = 5.0
    shift: float = 0.05
    zoom: float = 0.1
    # Share of original training images mixed into every epoch against forgetting, relative to the
    # number of site images (0.5: half as many); they come from the parent's own training split
    # (data_dir). 0.5 won the out-of-fold lever study (README, "Make it work at your hospital").
    rehearsal: float = 0.5
    # Fine-tune with an exponential moving average of the weights (momentum 0.99).
    ema: bool = False
    # Serve the average of the fold models and the final model (folds + 1 forward passes per image).
    ensemble: bool = False
    # Also log out-of-fold ROC AUC and specificity against the number of site images (25, 50, 100%).
    learning_curve: bool = False
    # Patient-grouped bootstrap resamples behind the 95% intervals.
    bootstrap: int = 2000
    # Register the adapted model as a new version of registered_name under alias; the parent and
    # its aliases stay untouched.
    register: bool = True
    alias: str = "site"
    registered_name: str = "pneumonia-classifier"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.site_sensitivity < 1.0:
            raise ConfigError(f"site_sensitivity must be in (0, 1), got {self.site_sensitivity}")
        if self.folds < 2:
            raise ConfigError(f"folds must be at least 2, got {self.folds}")
        if self.epochs < 1 or self.batch_size < 1 or self.learning_rate <= 0:
            raise ConfigError("epochs and batch_size must be at least 1 and learning_rate positive")
        if self.rehearsal < 0:
            raise ConfigError(f"rehearsal must not be negative, got {self.rehearsal}")


def config_name(config: Any) -> str:
    """The name a config goes by in ``model_config.json``: ``TrainConfig`` -> ``train``."""
    return type(config).__name__.removesuffix("Config").lower()


class RunConfigs:
    """Every config of one run, built once by its entry point.

    :func:`pneumo.tracking.start_run` logs them as params, the training loop reads ``data``,
    ``train`` and ``augment`` from them, and the logged model saves them by :func:`config_name`.

    Args:
        entry_point: The run's entry point (tag ``pneumo.entry_point``; titles; the model config).
        *configs: Its config dataclasses, at most one of each type.
        name: The run's name, given by entry points that are not training runs (their own
            :func:`run_name`); None: the training description of :meth:`describe`.
    """

    def __init__(self, entry_point: str, *configs: Any, name: str | None = None):
        self.entry_point = entry_point
        self.configs = configs
        self.name = name
        self._by_type = {type(config): config for config in configs}
        if len(self._by_type) != len(configs):
            raise ValueError(f"more than one config of a type in {[type(c).__name__ for c in configs]}")

    def get(self, kind: type[T]) -> T | None:
        """The config of type ``kind``, or None when the run has none."""
        return self._by_type.get(kind)

    @property
    def data(self) -> DataConfig:
        return self._by_type[DataConfig]

    @property
    def train(self) -> TrainConfig:
        return self._by_type[TrainConfig]

    @property
    def augment(self) -> AugmentConfig | None:
        """The augmentation ranges; None for a run that trains without augmentation."""
        return self.get(AugmentConfig)

    def params(self) -> dict[str, Any]:
        """Every field, flat, as MLflow params."""
        return flatten(*self.configs)

    def describe(self) -> str:
        """A run name that says what the run is: the given ``name``, else ``aug_cnn-128px-lr0.001-16ep``.

        Training runs are described by their input size, learning rate and epochs (and folds for
        ``cv``); a smoke run's ``limit_per_class`` is always appended.
        """
        params = self.params()
        if self.name is not None:
            parts = [self.name]
        else:
            parts = [
                self.entry_point,
                f"{params['image_size']}px",
                f"lr{params['learning_rate']:g}",
                f"{params['epochs']}ep",
            ]
            parts += [f"{params['folds']}folds"] if "folds" in params else []
        if params.get("limit_per_class"):
            parts.append(f"limit{params['limit_per_class']}")
        return "-".join(str(part) for part in parts)

    def as_dict(self) -> dict[str, dict[str, Any]]:
        """``{config name: fields}``, as saved with the model."""
        return {config_name(config): dataclasses.asdict(config) for config in self.configs}


def _parse_bool(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "y", "on"):
        return True
    if lowered in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def field_type(owner: type, f: dataclasses.Field) -> type:
    """The Python type of a field's values: ``int`` for ``Literal[1, 3]``, ``str`` for ``Literal["a"]``."""
    kind = typing.get_type_hints(owner)[f.name]
    allowed = choices(kind)
    return type(allowed[0]) if allowed else kind


def field_comments(config_type: type) -> dict[str, str]:
    """Each field's description: the comment lines right above it in the dataclass, joined into one line.

    The comments are the fields' documentation (see the module docstring), so ``--help`` shows
    exactly what a reader of this file sees; a field without a comment gets an empty string.
    """
    comments: dict[str, str] = {}
    pending: list[str] = []
    for line in inspect.getsource(config_type).splitlines():
        text = line.strip()
        if text.startswith("#"):
            pending.append(text.lstrip("#").strip())
            continue
        match = re.match(r"(\w+)\s*:", text)
        if match and not text.startswith(("def ", "class ", "return")):
            comments.setdefault(match.group(1), " ".join(pending))
        pending = []
    return comments


def build_parser(
    description: str,
    *config_types: type,
    defaults: dict[str, Any] | None = None,
    hidden: frozenset[str] = frozenset(),
) -> argparse.ArgumentParser:
    """Build an argparse parser with one ``--name`` flag per dataclass field.

    Args:
        description: Text shown by ``--help``.
        *config_types: Dataclass types whose fields become flags. Field names must be unique.
        defaults: Per-entry-point defaults that replace the dataclass defaults.
        hidden: Fields the entry point does not use: no flag, the default stays.

    Returns:
        The parser; each flag's help is its field's comment and its default.
    """
    parser = argparse.ArgumentParser(description=description)
    seen: set[str] = set()
    for config_type in config_types:
        group = parser.add_argument_group(config_type.__name__)
        comments = field_comments(config_type)
        for f in dataclasses.fields(config_type):
            if f.name in seen:
                raise ValueError(f"parameter {f.name!r} is defined twice")
            seen.add(f.name)
            if f.name in hidden:
                continue
            kind = field_type(config_type, f)
            allowed = choices(typing.get_type_hints(config_type)[f.name])
            default = (defaults or {}).get(f.name, f.default)
            shown = str(default).lower() if kind is bool else repr(default) if kind is str else default
            group.add_argument(
                f"--{f.name}",
                type=_parse_bool if kind is bool else kind,
                default=default,
                choices=allowed,
                metavar=None if allowed else kind.__name__.upper(),
                # argparse formats help with %: literal percent signs in comments are doubled.
                help=f"{comments[f.name]} (default: {shown})".replace("%", "%%").strip(),
            )
    unknown = set(defaults or {}) - seen
    if unknown:
        raise ValueError(f"defaults for unknown parameters {sorted(unknown)}")
    return parser


def parse_configs(
    description: str,
    *config_types: type,
    defaults: dict[str, Any] | None = None,
    argv: list[str] | None = None,
    hidden: frozenset[str] = frozenset(),
) -> list[Any]:
    """Parse the command line into one instance of each dataclass type.

    Args:
        description: Text shown by ``--help``.
        *config_types: Dataclass types to fill.
        defaults: Per-entry-point defaults that replace the dataclass defaults.
        argv: Arguments; ``None`` reads ``sys.argv``.

    Returns:
        Instances in the order of ``config_types``. A value the dataclass refuses (e.g. an
        impossible range) is a parse error, like a value that is not one of the choices.
    """
    parser = build_parser(description, *config_types, defaults=defaults, hidden=hidden)
    namespace = vars(parser.parse_args(argv))
    try:
        return [
            config_type(**{f.name: namespace[f.name] for f in dataclasses.fields(config_type) if f.name in namespace})
            for config_type in config_types
        ]
    except ConfigError as error:
        parser.error(str(error))


def flatten(*configs: Any) -> dict[str, Any]:
    """Merge dataclass instances into one flat ``{field: value}`` dict (for MLflow params)."""
    merged: dict[str, Any] = {}
    for config in configs:
        merged.update(dataclasses.asdict(config))
    return merged


def json_text(payload: Any) -> str:
    """Strict JSON text: NaN and infinities (undefined ratios) become ``null``, numpy scalars plain numbers."""

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        if hasattr(value, "item") and not isinstance(value, (str, bytes)):
            value = value.item()  # numpy scalar
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return value

    return json.dumps(clean(payload), indent=2, allow_nan=False)


def replace_fields(config: Any, **changes: Any) -> Any:
    """Return a copy of a dataclass with the given fields changed.

    Raises:
        ConfigError: A name is not a field of ``config`` (a misspelt name would otherwise do nothing).
    """
    unknown = set(changes) - {f.name for f in dataclasses.fields(config)}
    if unknown:
        raise ConfigError(f"{type(config).__name__} has no field(s) {sorted(unknown)}")
    return dataclasses.replace(config, **changes)


def replace_across(changes: dict[str, Any], *configs: Any) -> tuple[Any, ...]:
    """Copies of several dataclasses, each with the changes that name one of its fields.

    Raises:
        ConfigError: A name is a field of none of them.
    """
    names = [{f.name for f in dataclasses.fields(config)} for config in configs]
    unknown = set(changes) - set().union(*names)
    if unknown:
        raise ConfigError(f"no field(s) {sorted(unknown)} in {[type(c).__name__ for c in configs]}")
    return tuple(
        replace_fields(config, **{k: v for k, v in changes.items() if k in own}) for config, own in zip(configs, names)
    )


__all__ = [
    "AdaptConfig",
    "AugmentConfig",
    "CNNConfig",
    "CVConfig",
    "DataConfig",
    "DenseConfig",
    "EvalConfig",
    "ResNetConfig",
    "RunConfigs",
    "TrainConfig",
    "TuneConfig",
    "build_parser",
    "flatten",
    "parse_configs",
    "replace_across",
    "replace_fields",
    "json_text",
]


@dataclass
class PacsConfig(_Checked):
    """Where the PACS is, which images to score with which model (credentials: environment only)."""

    # DICOMweb base URL (QIDO-RS, WADO-RS and STOW-RS under it), e.g. https://pacs.example.org/dicom-web.
    # Never with credentials in it: PNEUMO_DICOMWEB_USERNAME/PASSWORD or PNEUMO_DICOMWEB_TOKEN.
    dicomweb_url: str = ""
    # runs:/<id>/model, models:/<name>@<alias> or models:/<name>/<version>; an alias is resolved to
    # its version once, at the start, and that version scores the whole batch.
    model_uri: str = "models:/pneumonia-classifier@champion"
    # Comma-separated modalities of the series to score (CR computed radiography, DX digital X-ray).
    modalities: str = "CR,DX"
    # Study date range, YYYYMMDD, inclusive; empty = open at that end.
    study_date_from: str = ""
    study_date_to: str = ""
    # Images decoded and predicted together.
    batch_size: int = 16
    # Seconds each DICOMweb request may take.
    timeout: float = 60.0

    def __post_init__(self) -> None:
        super().__post_init__()
        from pneumo.pacs import check_url  # pneumo.pacs imports highdicom: only when a PacsConfig is made

        check_url(self.dicomweb_url)
        for name in ("study_date_from", "study_date_to"):
            value = getattr(self, name)
            if value and not (len(value) == 8 and value.isdigit()):
                raise ConfigError(f"{name} must be a date as YYYYMMDD or empty")
        if self.study_date_from and self.study_date_to and self.study_date_from > self.study_date_to:
            raise ConfigError("study_date_from is after study_date_to")
        modalities = self.modality_list()
        if not modalities or any(not (m.isalpha() and m.isupper() and len(m) <= 16) for m in modalities):
            raise ConfigError("modalities must be comma-separated DICOM modality codes, e.g. CR,DX")
        if "SR" in modalities:
            raise ConfigError("modalities must not include SR: reports are written, not scored")
        if self.batch_size < 1 or self.timeout <= 0:
            raise ConfigError("batch_size must be at least 1 and timeout positive")

    def modality_list(self) -> list[str]:
        """The modalities as a list, in the order given, without repeats."""
        return list(dict.fromkeys(part.strip() for part in self.modalities.split(",") if part.strip()))


__all__.append("PacsConfig")
