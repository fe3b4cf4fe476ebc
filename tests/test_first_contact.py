"""What a newcomer meets first: offline re-runs from the kagglehub cache, environment files, where runs land."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import kagglehub
import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

import pneumo.data as data
from conftest import REPO
from pneumo import CLASS_NAMES, evaluate, prepare, tune
from pneumo.config import AugmentConfig, CNNConfig, DataConfig, EvalConfig, RunConfigs, TrainConfig, TuneConfig
from pneumo.experiment import (
    DEFAULT_EXPERIMENT,
    PneumoExperimentProvider,
    use_default_experiment,
)
from pneumo.progress import progress
from pneumo.tracking import _is_generated_name


def _fake_kagglehub_cache(cache: Path, complete: bool = True) -> Path:
    """Lay out the pinned dataset as kagglehub 1.x caches a finished download; returns the data folder."""
    owner, name = data.KAGGLE_DATASET.split("/")
    base = cache / "datasets" / owner / name
    root = base / "versions" / str(data.KAGGLE_VERSION) / "chest_xray"
    for split in ("train", "test"):
        for label in CLASS_NAMES:
            (root / split / label).mkdir(parents=True)
    (root.parent / "chest_xray" / "__MACOSX" / "train").mkdir(parents=True)  # the archive's macOS copy
    if complete:
        (base / f"{data.KAGGLE_VERSION}.complete").touch()
    return root


def test_the_dataset_version_is_pinned_in_kagglehubs_handle_syntax():
    from kagglehub.handle import parse_dataset_handle

    handle = parse_dataset_handle(data.KAGGLE_HANDLE)
    assert handle.is_versioned() and handle.version == data.KAGGLE_VERSION
    assert f"{handle.owner}/{handle.dataset}" == data.KAGGLE_DATASET


def test_a_cached_copy_is_used_offline_by_kagglehub_and_by_us(tmp_path, monkeypatch):
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path))
    # No network here (and none needed): with the version pinned, kagglehub answers from its cache.
    root = _fake_kagglehub_cache(tmp_path)
    assert Path(kagglehub.dataset_download(data.KAGGLE_HANDLE)) == root.parent
    assert data.cached_dataset() == root

    def no_download(*args, **kwargs):
        raise AssertionError("the cache must be read without kagglehub")

    monkeypatch.setattr(kagglehub, "dataset_download", no_download)
    assert data.download_dataset() == root
    monkeypatch.chdir(tmp_path)  # no ./data/chest_xray here
    monkeypatch.delenv("PNEUMO_DATA_DIR", raising=False)
    assert data.resolve_data_dir("") == root


def test_a_partial_download_is_not_taken_for_a_cached_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path))
    _fake_kagglehub_cache(tmp_path, complete=False)
    assert data.cached_dataset() is None


def _requirements(lines: list[str]) -> dict[str, str]:
    """``{name: full requirement line}``, names normalised."""
    found = {}
    for line in lines:
        name = re.split(r"[=<>;\[ ]", line, maxsplit=1)[0].lower().replace("_", "-")
        found[name] = re.sub(r"\s+", " ", line.replace('"', "'"))
    return found


def test_python_env_yaml_repeats_the_pins_and_markers_of_pyproject_and_is_the_projects_environment():
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    python_env = yaml.safe_load((REPO / "python_env.yaml").read_text())
    assert python_env["dependencies"] == dependencies and python_env["python"] == "3.11"
    assert yaml.safe_load((REPO / "MLproject").read_text())["python_env"] == "python_env.yaml"


@pytest.mark.slow
def test_python_env_yaml_resolves_against_the_package_index(tmp_path):
    """What `mlflow run . --env-manager uv` installs must resolve as one set (pip's resolver, no install)."""
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("\n".join(yaml.safe_load((REPO / "python_env.yaml").read_text())["dependencies"]))
    report = tmp_path / "report.json"
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet"]
    result = subprocess.run(
        [*command, "--report", str(report), "-r", str(requirements)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    resolved = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert {"keras", "mlflow", "opencv-python-headless", "pydicom"} <= resolved


def test_conda_yaml_repeats_the_pins_and_markers_of_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    conda = yaml.safe_load((REPO / "conda.yaml").read_text())
    pip_lines = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert _requirements(pip_lines) == _requirements(project)
    assert any("tensorflow-cpu==" in line and "platform_machine == 'x86_64'" in line for line in pip_lines)


def test_readme_install_and_test_commands_are_what_ci_runs():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    install = 'pip install -e ".[test]"'
    assert install in readme and f"python -m {install}" in ci
    assert "\npython -m pytest\n" in ci and "python -m pytest               # the test command" in readme


def test_the_gpu_note_says_to_remove_tensorflow_cpu_first():
    readme = (REPO / "README.md").read_text()
    assert "pip uninstall -y tensorflow-cpu" in readme
    assert readme.index("pip uninstall -y tensorflow-cpu") < readme.index('pip install "tensorflow[and-cuda]')


def _configs(entry_point: str) -> RunConfigs:
    """The RunConfigs each entry point builds, naming itself where it is not a training run."""
    data_config = DataConfig(limit_per_class=50)
    if entry_point == "prepare":
        return RunConfigs("prepare", DataConfig(), name=prepare.run_name(DataConfig()))
    if entry_point == "evaluate":
        config = EvalConfig(split="val", register=True)
        return RunConfigs("evaluate", DataConfig(), config, name=evaluate.run_name(config))
    train = TrainConfig(epochs=3, learning_rate=5e-4)
    configs = [data_config, train, AugmentConfig(), CNNConfig()]
    if entry_point == "tune":
        tune_config = TuneConfig(n_trials=7)
        return RunConfigs("tune", *configs, tune_config, name=tune.run_name(train, tune_config))
    return RunConfigs(entry_point, *configs)


@pytest.mark.parametrize(
    "entry_point, expected",
    [
        ("prepare", "prepare-val0.1"),
        ("aug_cnn", "aug_cnn-128px-lr0.0005-3ep-limit50"),
        ("tune", "tune-aug_cnn-7trials-3ep-limit50"),
        ("evaluate", "evaluate-val-latest-aug_cnn-register"),
    ],
)
def test_runs_are_named_after_what_they_are(entry_point, expected):
    assert _configs(entry_point).describe() == expected


def test_only_mlflows_made_up_names_are_replaced():
    # The made-up names come from MLflow's private word lists: review this hook on every upgrade.
    assert mlflow.__version__ == "3.17.2"
    assert _is_generated_name(None) and _is_generated_name("unequaled-grub-968")
    assert not _is_generated_name("my-baseline-1") and not _is_generated_name("aug_cnn-128px-lr0.001-16ep")


def test_runs_land_in_the_pneumo_experiment(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    mlflow.set_tracking_uri(uri)
    try:
        use_default_experiment()
        experiment = MlflowClient().get_experiment_by_name(DEFAULT_EXPERIMENT)
        assert mlflow.get_experiment_by_name(DEFAULT_EXPERIMENT).experiment_id == experiment.experiment_id
        with mlflow.start_run() as run:
            assert run.info.experiment_id == experiment.experiment_id
        # A chosen experiment wins.
        monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "mine")
        mlflow.set_experiment("mine")
        use_default_experiment()
        with mlflow.start_run() as run:
            assert run.info.experiment_id == mlflow.get_experiment_by_name("mine").experiment_id
    finally:
        mlflow.set_tracking_uri(None)


def test_the_experiment_provider_applies_in_this_project_only(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    assert PneumoExperimentProvider().in_context()
    monkeypatch.chdir(tmp_path)
    assert not PneumoExperimentProvider().in_context()
    entry_points = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]
    assert entry_points["mlflow.default_experiment_provider"] == {
        "pneumo": "pneumo.experiment:PneumoExperimentProvider"
    }


def test_progress_bars_only_on_a_terminal(capsys):
    assert list(progress(iter(range(5)), 5, "decoding")) == [0, 1, 2, 3, 4]
    assert capsys.readouterr().err == ""  # pytest's stderr is not a terminal


def test_the_served_model_pins_what_it_imports_and_one_tensorflow():
    from pneumo.model_io import pip_requirements

    names = [line.split("==")[0] for line in pip_requirements()]
    assert sum(name in ("tensorflow", "tensorflow-cpu") for name in names) == 1
    served = {"keras", "numpy", "pandas", "pillow", "pydicom", "opencv-python-headless", "mlflow"}
    codecs = {"pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle"}
    assert set(names) - {"tensorflow", "tensorflow-cpu"} == served | codecs
    assert all(re.fullmatch(r"[a-z-]+==[\w.]+", line) for line in pip_requirements())
