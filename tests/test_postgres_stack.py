"""End to end through a shared tracking server: PostgreSQL backend store, proxied artifacts.

``scripts/tracking_stack.sh`` starts PostgreSQL (as the ``postgres`` user when run as root) on a
throwaway data folder and free port, and ``mlflow server`` on it. Every step then runs as a
separate process whose only link to the stack is ``MLFLOW_TRACKING_URI=http://...`` (and the tune
workers' Optuna storage, a database of the same PostgreSQL): prepare, a tiny ``aug_cnn``, two
``tune`` workers at once, ``evaluate`` with ``register=true``, and ``mlflow models serve`` of
``models:/pneumonia-classifier@champion`` answering one real image.
"""

from __future__ import annotations

import base64
import glob
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from conftest import REPO, make_subset, require_real_data
from helpers import free_port, serve_model
from pneumo.experiment import DEFAULT_EXPERIMENT, EXPERIMENT_KIND, EXPERIMENT_KIND_TAG
from pneumo.model_io import IMAGE_COLUMN

pytestmark = pytest.mark.slow

STACK = REPO / "scripts" / "tracking_stack.sh"
N_TRIALS = 3
# Tiny on purpose: CI runs this on 2 cores. Every training step shares these.
TINY = ["--image_size", "32", "--width", "4", "--epochs", "1", "--batch_size", "16", "--cache_dir", ""]


def _postgres_bin() -> str | None:
    found = shutil.which("pg_config")
    if found:
        return subprocess.run([found, "--bindir"], capture_output=True, text=True).stdout.strip() or None
    folders = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name))
    return folders[-1] if folders else None


def _skip_reason() -> str | None:
    bin_dir = _postgres_bin()
    if not bin_dir or not Path(bin_dir, "pg_ctl").exists():
        return "PostgreSQL binaries (initdb, pg_ctl) not found: install PostgreSQL or set PG_BIN"
    if os.geteuid() == 0 and subprocess.run(["id", "postgres"], capture_output=True).returncode != 0:
        return "running as root, and there is no 'postgres' user to run PostgreSQL as"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return 'the PostgreSQL driver is missing: pip install -e ".[postgres]"'
    return None


@pytest.fixture(scope="module")
def stack():
    """The running stack: ``(client environment, Optuna storage URL)``; stopped and removed afterwards."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    require_real_data()  # before starting anything
    # Not pytest's tmp_path: its parents are private to root, and PostgreSQL runs as `postgres`.
    folder = Path(tempfile.mkdtemp(prefix="pneumo-stack-"))
    settings = {
        "STACK_DIR": str(folder),
        "PG_PORT": str(free_port()),
        "MLFLOW_PORT": str(free_port()),
        "MLFLOW_WORKERS": "1",
        "PG_BIN": _postgres_bin(),
    }
    stack_env = {**os.environ, **settings}
    try:
        started = subprocess.run(
            [str(STACK), "start"], env=stack_env, cwd=REPO, capture_output=True, text=True, timeout=400
        )
        assert started.returncode == 0, started.stdout + started.stderr
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env.update(
            MLFLOW_TRACKING_URI=f"http://127.0.0.1:{settings['MLFLOW_PORT']}",
            PYTHONPATH=str(REPO),
            TF_CPP_MIN_LOG_LEVEL="2",
        )
        yield env, f"postgresql://postgres@127.0.0.1:{settings['PG_PORT']}/optuna"
    finally:
        subprocess.run([str(STACK), "stop"], env=stack_env, cwd=REPO, capture_output=True, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)


def _entry_point(name: str, args: list[str], env: dict, log: Path, timeout: int = 400) -> None:
    with open(log, "w") as output:
        done = subprocess.run(
            [sys.executable, "-m", f"entrypoints.{name}", *args],
            cwd=REPO,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )
    assert done.returncode == 0, log.read_text()[-3000:]


def _runs(client: MlflowClient, experiment_id: str, entry_point: str) -> list:
    return client.search_runs([experiment_id], filter_string=f"tags.`pneumo.entry_point` = '{entry_point}'")


def test_prepare_train_tune_register_and_serve_through_a_postgresql_backed_server(stack, tmp_path, monkeypatch):
    env, optuna_storage = stack
    data_dir = make_subset(tmp_path / "data", 20)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])

    # 1. prepare, then a tiny aug_cnn, in the experiment `pneumo` (no experiment was chosen).
    prepare = ["--data_dir", str(data_dir), "--val_fraction", "0.25", "--cache_dir", ""]
    _entry_point("prepare", prepare, env, tmp_path / "p.log")
    experiment = client.get_experiment_by_name(DEFAULT_EXPERIMENT)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    (prepared,) = _runs(client, experiment.experiment_id, "prepare")
    manifest = ["--manifest", prepared.info.run_id]
    _entry_point("aug_cnn", manifest + TINY, env, tmp_path / "a.log")
    (trained,) = _runs(client, experiment.experiment_id, "aug_cnn")
    assert trained.info.run_name == "aug_cnn-32px-lr0.001-1ep"
    assert trained.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server

    # 2. Two tune workers at once on one study in PostgreSQL: exactly N_TRIALS finished trials.
    tune = manifest + TINY + ["--storage", optuna_storage, "--study_name", "e2e", "--n_trials", str(N_TRIALS)]
    tune += ["--pruner", "none"]
    logs = [tmp_path / f"tune{i}.log" for i in range(2)]
    workers = []
    for log in logs:
        with open(log, "w") as output:
            workers.append(
                subprocess.Popen(
                    [sys.executable, "-m", "entrypoints.tune", *tune],
                    cwd=REPO,
                    env=env,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                )
            )
    for worker, log in zip(workers, logs):
        assert worker.wait(timeout=600) == 0, log.read_text()[-3000:]
    study = optuna.load_study(study_name="e2e", storage=optuna_storage)
    states = [t.state for t in study.trials]
    assert states.count(TrialState.COMPLETE) + states.count(TrialState.PRUNED) == N_TRIALS, states
    assert len(_runs(client, experiment.experiment_id, "tune")) == 2
    assert len(_runs(client, experiment.experiment_id, "tune_trial")) == N_TRIALS

    # 3. evaluate with register=true: the first version becomes the champion.
    model_uri = f"runs:/{trained.info.run_id}/model"
    evaluate = manifest + ["--model_uri", model_uri, "--split", "val", "--register", "true", "--gallery_size", "2"]
    _entry_point("evaluate", evaluate, env, tmp_path / "e.log")
    champion = client.get_model_version_by_alias("pneumonia-classifier", "champion")
    assert champion.run_id == trained.info.run_id

    # 4. Serve the champion, resolved through the server, and ask about one real image.
    image = sorted((data_dir / "train" / "PNEUMONIA").iterdir())[0]
    body = {"dataframe_records": [{IMAGE_COLUMN: base64.b64encode(image.read_bytes()).decode()}]}
    with serve_model("models:/pneumonia-classifier@champion", env, tmp_path / "serve.log", 300) as server:
        answer = server.invoke(body)
    assert answer.status_code == 200, answer.text
    (prediction,) = answer.json()["predictions"]
    assert prediction["label"] in ("NORMAL", "PNEUMONIA") and 0 <= prediction["probability"] <= 1
