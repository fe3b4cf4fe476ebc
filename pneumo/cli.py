"""The entry points: their functions, parameters and defaults, the command line, and MLproject.

:data:`ENTRY_POINTS` is the single registry: the scripts in ``entrypoints/`` call :func:`main`
with their name, and ``python -m pneumo.cli`` renders the MLproject file from the same data,
so parameter names and defaults cannot drift between ``python entrypoints/X.py`` and
``mlflow run . -e X`` (a test checks that MLproject is current).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

from pneumo.config import (
    AdaptConfig,
    AugmentConfig,
    CNNConfig,
    CVConfig,
    DataConfig,
    DenseConfig,
    EvalConfig,
    PacsConfig,
    ResNetConfig,
    TrainConfig,
    TuneConfig,
    field_type,
    parse_configs,
)
from pneumo.errors import PneumoError
from pneumo.experiment import use_default_experiment

# The notebook's settings for its own models: 64x64 RGB, RMSprop, batch 64, up to 50 epochs.
_NOTEBOOK = {
    "image_size": 64,
    "channels": 3,
    "batch_size": 64,
    "epochs": 50,
    "optimizer": "rmsprop",
    "learning_rate": 1e-3,
    "patience": 8,
    "monitor": "val_loss",
    "cosine_decay": False,
}


# Input-spec fields: a trained model's own spec wins, so entry points that take a model hide them.
_MODEL_INPUT = frozenset({"image_size", "channels", "crop", "equalize"})


@dataclass(frozen=True)
class EntryPoint:
    """An entry point's parameters: config types in call order, defaults replacing theirs, and a description.

    Attributes:
        description: The one line ``--help`` starts with (kept here, so ``--help`` imports no TensorFlow).
        configs: Config types, in the order the function takes them.
        defaults: Defaults replacing the dataclasses' for this entry point.
        hidden: Fields it does not use: neither flags nor MLproject parameters.
    """

    description: str
    configs: tuple[type, ...]
    defaults: dict[str, Any] = field(default_factory=dict)
    hidden: frozenset[str] = frozenset()


# Entry point X is the function X of module pneumo.X (e.g. pneumo.resnet.resnet).
ENTRY_POINTS: dict[str, EntryPoint] = {
    "prepare": EntryPoint(
        "Discover, validate and split the images into a logged manifest (no file is touched).",
        (DataConfig,),
        hidden=_MODEL_INPUT,
    ),
    "baseline": EntryPoint(
        "The notebook's dense network on oversampled training data.",
        (DataConfig, TrainConfig, DenseConfig),
        dict(_NOTEBOOK),
    ),
    "cv": EntryPoint(
        "Patient-grouped, stratified k-fold cross-validation of the L2 dense net in SciKeras.",
        (DataConfig, TrainConfig, CVConfig),
        {**_NOTEBOOK, "epochs": 20},
    ),
    "cnn": EntryPoint("The notebook's 3-block CNN without augmentation.", (DataConfig, TrainConfig), dict(_NOTEBOOK)),
    "aug_cnn": EntryPoint(
        "The main job: a CNN on class-balanced, augmented batches, with a threshold chosen on validation.",
        (DataConfig, TrainConfig, AugmentConfig, CNNConfig),
    ),
    "resnet": EntryPoint(
        "ResNet50 features, a trained head, optional fine-tuning of its last block.",
        (DataConfig, TrainConfig, ResNetConfig),
        {"image_size": 160, "channels": 3, "epochs": 15, "learning_rate": 1e-3},
    ),
    "evaluate": EntryPoint(
        "Clinical metrics, figures and a Grad-CAM gallery for a model; optional registration or site calibration.",
        (DataConfig, EvalConfig),
        hidden=_MODEL_INPUT,
    ),
    "tune": EntryPoint(
        "Optuna search of aug_cnn's learning rate and augmentation ranges, trials as nested runs.",
        (DataConfig, TrainConfig, AugmentConfig, CNNConfig, TuneConfig),
    ),
    "adapt": EntryPoint(
        "Fine-tune a model on a hospital's labelled images, with an out-of-fold threshold and figures.",
        (DataConfig, AdaptConfig),
        hidden=_MODEL_INPUT,
    ),
    "score_pacs": EntryPoint(
        "Score a PACS's CR/DX images over DICOMweb and store one DICOM SR per image in its study.",
        (PacsConfig,),
    ),
}


def entry_point_function(name: str) -> Callable[..., Any]:
    """The function of entry point ``name``: ``pneumo.<name>.<name>``.

    Imported only when asked for: rendering MLproject must not import TensorFlow, which the entry
    points' modules do.
    """
    return getattr(importlib.import_module(f"pneumo.{name}"), name)


def main(name: str, argv: list[str] | None = None) -> Any:
    """Run entry point ``name`` with parameters from the command line.

    The project's own errors (missing data, no network for a download, an unusable parameter)
    end the process with exit status 1 and their one-line message; any other error keeps its
    traceback.

    Args:
        name: A key of :data:`ENTRY_POINTS`.
        argv: Arguments (``None`` = ``sys.argv``).

    Runs land in the experiment ``pneumo`` unless one is chosen (:mod:`pneumo.experiment`).

    Returns:
        What the entry point's function returns (usually its MLflow run id).
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    entry_point = ENTRY_POINTS[name]
    configs = parse_configs(
        entry_point.description,
        *entry_point.configs,
        defaults=entry_point.defaults,
        argv=argv,
        hidden=entry_point.hidden,
    )
    function = entry_point_function(name)  # after parsing: --help needs no TensorFlow
    use_default_experiment()
    try:
        return function(*configs)
    except PneumoError as error:  # DataError, ConfigError and the decoder's ImageError
        sys.exit(f"error: {error}")


def _mlproject_type(kind: type) -> str:
    # MLproject's "float" carries integers too; booleans travel as text ("true"/"false").
    return {int: "float", float: "float", bool: "string", str: "string"}[kind]


def render_mlproject() -> str:
    """The MLproject file's text, generated from :data:`ENTRY_POINTS`."""
    lines = [
        "# Generated by `python -m pneumo.cli > MLproject` from pneumo/cli.py; edit there, not here.",
        "name: pneumo",
        "",
        "python_env: python_env.yaml",
        "",
        "entry_points:",
    ]
    for name, entry_point in ENTRY_POINTS.items():
        lines += [f"  {name}:", "    parameters:"]
        flags = []
        for config_type in entry_point.configs:
            for f in dataclasses.fields(config_type):
                if f.name in entry_point.hidden:
                    continue
                default = entry_point.defaults.get(f.name, f.default)
                kind = field_type(config_type, f)
                if kind is str:
                    text = '"' + str(default).replace('"', '\\"') + '"'
                else:
                    text = str(default).lower() if kind is bool else str(default)
                lines.append(f"      {f.name}: {{type: {_mlproject_type(kind)}, default: {text}}}")
                flags.append(f"--{f.name} {{{f.name}}}")
        lines.append(f'    command: "python -m entrypoints.{name} {" ".join(flags)}"')
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render_mlproject())
