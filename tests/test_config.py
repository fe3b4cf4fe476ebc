"""Typed configs, the generated command line, and the generated MLproject file."""

from __future__ import annotations

import dataclasses
import inspect
import json
import subprocess
import sys
import typing

import pytest
import yaml

from conftest import REPO
from pneumo.cli import ENTRY_POINTS, entry_point_function, main, render_mlproject
from pneumo.config import (
    CNNConfig,
    CVConfig,
    DataConfig,
    DenseConfig,
    EvalConfig,
    ResNetConfig,
    TrainConfig,
    TuneConfig,
    build_parser,
    flatten,
    json_text,
    parse_configs,
    replace_across,
    replace_fields,
)
from pneumo.errors import ConfigError


def test_mlproject_is_current():
    assert (REPO / "MLproject").read_text() == render_mlproject(), "run: python -m pneumo.cli > MLproject"


def test_mlproject_lists_every_used_field_with_its_entry_point_default():
    spec = yaml.safe_load(render_mlproject())
    assert set(spec["entry_points"]) == set(ENTRY_POINTS)
    for name, entry_point in ENTRY_POINTS.items():
        config_types, defaults = entry_point.configs, entry_point.defaults
        parameters = spec["entry_points"][name]["parameters"]
        fields = [f for t in config_types for f in dataclasses.fields(t) if f.name not in entry_point.hidden]
        assert list(parameters) == [f.name for f in fields]
        command = spec["entry_points"][name]["command"]
        assert command.startswith(f"python -m entrypoints.{name} ")
        for f in fields:
            assert f"--{f.name} {{{f.name}}}" in command
            default = defaults.get(f.name, f.default)
            declared = parameters[f.name]["default"]
            assert str(declared).lower() == str(default).lower(), (name, f.name)


def test_issue_parameter_names_are_used():
    spec = yaml.safe_load(render_mlproject())["entry_points"]
    for name in ("baseline", "cv", "cnn"):
        assert {
            "data_dir",
            "manifest",
            "image_size",
            "channels",
            "batch_size",
            "epochs",
            "learning_rate",
            "seed",
        } <= set(spec[name]["parameters"])
    assert spec["cv"]["parameters"]["folds"]["default"] == 5


def test_notebook_defaults_for_the_notebook_models():
    spec = yaml.safe_load(render_mlproject())["entry_points"]
    for name in ("baseline", "cv", "cnn"):
        parameters = {k: v["default"] for k, v in spec[name]["parameters"].items()}
        assert (parameters["image_size"], parameters["channels"], parameters["batch_size"]) == (64, 3, 64)
        assert parameters["optimizer"] == "rmsprop"
    assert spec["cv"]["parameters"]["l2"]["default"] == 0.01


@pytest.mark.parametrize("name", list(ENTRY_POINTS))
def test_entry_point_x_is_the_function_x_and_takes_its_config_types(name):
    function = entry_point_function(name)
    config_types = ENTRY_POINTS[name].configs
    hints = typing.get_type_hints(function)
    parameters = list(inspect.signature(function).parameters)
    assert [hints[p] for p in parameters] == list(config_types)
    assert hints["return"] is str
    assert (REPO / "entrypoints" / f"{name}.py").is_file()
    assert (function.__module__, function.__name__) == (f"pneumo.{name}", name)


def test_parser_has_one_typed_flag_per_field():
    data, train, cv = parse_configs(
        "x",
        DataConfig,
        TrainConfig,
        CVConfig,
        defaults={"epochs": 20},
        argv=[
            "--image_size",
            "96",
            "--cosine_decay",
            "false",
            "--folds",
            "3",
            "--learning_rate",
            "0.01",
            "--manifest",
            "",
        ],
    )
    assert data.image_size == 96 and isinstance(data.image_size, int)
    assert train.cosine_decay is False and train.epochs == 20 and train.learning_rate == 0.01
    assert cv.folds == 3 and cv.l2 == 0.01 and data.manifest == ""


@pytest.mark.parametrize("text,value", [("true", True), ("1", True), ("Yes", True), ("false", False), ("0", False)])
def test_boolean_flags_accept_the_usual_spellings(text, value):
    (train,) = parse_configs("x", TrainConfig, argv=["--cosine_decay", text])
    assert train.cosine_decay is value


def test_parser_rejects_bad_values(capsys):
    with pytest.raises(SystemExit):
        parse_configs("x", TrainConfig, argv=["--cosine_decay", "maybe"])
    with pytest.raises(SystemExit):
        parse_configs("x", TrainConfig, argv=["--epochs", "many"])
    assert "invalid" in capsys.readouterr().err


def test_parser_refuses_ambiguous_or_unknown_parameters():
    with pytest.raises(ValueError, match="defined twice"):
        build_parser("x", CVConfig, DenseConfig)  # both have l2
    with pytest.raises(ValueError, match="unknown parameters"):
        build_parser("x", DataConfig, defaults={"epochs": 3})


def test_flatten_json_and_replace():
    data, cv = DataConfig(seed=3), CVConfig(folds=4)
    flat = flatten(data, cv)
    assert flat["seed"] == 3 and flat["folds"] == 4 and len(flat) == len(dataclasses.fields(DataConfig)) + 2
    assert json.loads(json_text({"cv": dataclasses.asdict(cv), "bad": float("nan")})) == {
        "cv": {"folds": 4, "l2": 0.01},
        "bad": None,
    }
    changed = replace_fields(cv, folds=7)
    assert changed.folds == 7 and cv.folds == 4
    # A misspelt name (e.g. an Optuna parameter) must fail, not do nothing.
    with pytest.raises(ConfigError, match="not_a_field"):
        replace_fields(cv, folds=7, not_a_field=1)
    data, cv = replace_across({"seed": 1, "folds": 3}, data, cv)
    assert (data.seed, cv.folds) == (1, 3)
    with pytest.raises(ConfigError, match="flods"):
        replace_across({"flods": 3}, data, cv)


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: TrainConfig(balance="oversampel"), "balance"),
        (lambda: TrainConfig(monitor="auc"), "monitor"),
        (lambda: TrainConfig(optimizer="Adam"), "optimizer"),
        (lambda: TrainConfig(precision="float16"), "precision"),
        (lambda: DataConfig(channels=2), "channels"),
        (lambda: DataConfig(val_scheme="random"), "val_scheme"),
        (lambda: CNNConfig(normalization="none"), "normalization"),
        (lambda: ResNetConfig(pooling="max"), "pooling"),
        (lambda: EvalConfig(split="validation"), "split"),
        (lambda: TuneConfig(objective="auc"), "objective"),
        (lambda: TuneConfig(pruner="hyperband"), "pruner"),
        (lambda: TuneConfig(lr_low=1e-2, lr_high=1e-3), "lr_low"),
        (lambda: TuneConfig(search_batch_and_dropout=True, batch_sizes="16,big"), "batch_sizes"),
    ],
)
def test_configs_refuse_values_outside_their_choices(make, field):
    with pytest.raises(ConfigError, match=field):
        make()


def test_a_typo_in_a_choice_fails_at_parse_time_and_help_lists_the_choices(capsys):
    with pytest.raises(SystemExit) as exited:
        parse_configs("x", TrainConfig, argv=["--balance", "oversampel"])
    assert exited.value.code == 2
    assert "invalid choice: 'oversampel'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_configs("x", DataConfig, argv=["--channels", "2"])
    with pytest.raises(SystemExit):  # refused by the dataclass, reported like a parse error
        parse_configs("x", TuneConfig, argv=["--lr_low", "0.1", "--lr_high", "0.01"])
    assert "lr_low" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser("x", TrainConfig).parse_args(["--help"])
    out = capsys.readouterr().out
    assert "{oversample,class_weight,none}" in out and "{val_auc,val_loss}" in out
    (train,) = parse_configs("x", TrainConfig, argv=["--balance", "class_weight"])
    assert train.balance == "class_weight"
    (data,) = parse_configs("x", DataConfig, argv=["--channels", "3"])
    assert data.channels == 3 and isinstance(data.channels, int)


def test_help_describes_the_cv_entry_point(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main("cv", ["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "cross-validation" in out and "--folds" in out and "--l2" in out


def test_help_gives_each_parameter_its_comment_and_default_without_tensorflow(capsys):
    script = (
        "import sys\n"
        "from pneumo.cli import main\n"
        "try:\n"
        "    main('aug_cnn', ['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('TENSORFLOW' if 'tensorflow' in sys.modules else 'NO TENSORFLOW')\n"
    )
    text = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert text.rstrip().endswith("NO TENSORFLOW")  # --help stays fast
    flat = " ".join(text.split())
    assert "--learning_rate FLOAT (default: 0.001)" in flat
    assert "Sensitivity the operating threshold must reach on validation. (default: 0.97)" in flat
    assert "--equalize {none,hist,clahe,clahe-pneumo}" in flat
    # evaluate takes the model's own input spec: it does not offer flags it would ignore.
    with pytest.raises(SystemExit):
        main("evaluate", ["--help"])
    evaluate_help = capsys.readouterr().out
    assert "--model_uri" in evaluate_help and "--floor_specificity" in evaluate_help
    assert "--image_size" not in evaluate_help and "--equalize" not in evaluate_help
