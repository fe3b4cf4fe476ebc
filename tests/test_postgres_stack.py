"""End to end through a shared, authenticated tracking server: PostgreSQL backend store, proxied artifacts.

``scripts/tracking_stack.sh`` starts PostgreSQL (as the ``postgres`` user when run as root, with
password authentication) on a throwaway data folder and free port, and ``mlflow server
--app-name basic-auth`` on it, with a PATH that leaves out /usr/sbin as a minimal CI's does.
Every step then runs as a separate process whose only link to the stack is
``MLFLOW_TRACKING_URI=http://...`` with a non-admin account in ``MLFLOW_TRACKING_USERNAME`` /
``MLFLOW_TRACKING_PASSWORD`` (and the tune workers' Optuna storage, a database of the same
PostgreSQL reached as the ``optuna`` role): prepare, a tiny ``aug_cnn``, two ``tune`` workers at
once, ``evaluate`` with ``register=true``, and ``mlflow models serve`` of
``models:/pneumonia-classifier@champion`` answering one real image. Then anonymous requests and a
reviewer holding READ try to change what the flow made, and are refused.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import glob
import os
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import optuna
import pytest
import requests
from mlflow.artifacts import download_artifacts
from mlflow.server import get_app_client
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from conftest import REPO, make_subset, require_real_data
from helpers import free_port, serve_model
from pneumo.experiment import DEFAULT_EXPERIMENT
from pneumo.model_io import IMAGE_COLUMN

pytestmark = pytest.mark.slow

STACK = REPO / "scripts" / "tracking_stack.sh"
N_TRIALS = 3
MODEL_NAME = "pneumonia-classifier"
# Tiny on purpose: CI runs this on 2 cores. Every training step shares these.
TINY = ["--image_size", "32", "--width", "4", "--epochs", "1", "--batch_size", "16", "--cache_dir", ""]
SECRET_FILES = ("postgres", "mlflow-db", "optuna", "mlflow-admin", "flask-secret-key", "mlflow.pgpass")


@dataclasses.dataclass
class Stack:
    """A running stack as a client sees it, plus the operator's view (its folder) for the checks."""

    folder: Path
    tracking_uri: str
    pg_port: int
    # Subprocess environment: the tracking URI and the account `trainer` (not an admin).
    env: dict[str, str]
    trainer: tuple[str, str]
    reviewer: tuple[str, str]
    admin: tuple[str, str]
    start_output: str

    @property
    def secrets(self) -> Path:
        return self.folder / "secrets"

    def secret(self, name: str) -> str:
        return (self.secrets / name).read_text().strip()

    @property
    def optuna_storage(self) -> str:
        return f"postgresql://optuna:{self.secret('optuna')}@127.0.0.1:{self.pg_port}/optuna"

    def call(self, method: str, path: str, auth: tuple[str, str] | None, **kwargs) -> requests.Response:
        """One plain HTTP request to the server, as any local user could send it."""
        return requests.request(method, f"{self.tracking_uri}{path}", auth=auth, timeout=30, **kwargs)


@contextlib.contextmanager
def _as(account: tuple[str, str]) -> Iterator[None]:
    """MLflow's clients in this process send ``account``'s credentials while inside."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_USERNAME", account[0])
        patch.setenv("MLFLOW_TRACKING_PASSWORD", account[1])
        yield


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
        import flask_wtf  # noqa: F401
        import psycopg  # noqa: F401
    except ImportError:
        return 'the PostgreSQL driver or Flask-WTF is missing: pip install -e ".[postgres]"'
    return None


@pytest.fixture(scope="module")
def stack():
    """The running stack with the accounts ``trainer`` and ``reviewer`` (no grants); stopped and removed afterwards."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    require_real_data()  # before starting anything
    # Not pytest's tmp_path: its parents are private to root, and PostgreSQL runs as `postgres`.
    folder = Path(tempfile.mkdtemp(prefix="pneumo-stack-"))
    folder.chmod(0o755)
    settings = {
        "STACK_DIR": str(folder),
        "PG_PORT": str(free_port()),
        "MLFLOW_PORT": str(free_port()),
        "MLFLOW_WORKERS": "1",
        "PG_BIN": _postgres_bin(),
        # No /usr/sbin, as in a CI that once failed with "runuser: command not found".
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), "/usr/bin", "/bin"]),
    }
    stack_env = {**os.environ, **settings}
    try:
        started = subprocess.run(
            [str(STACK), "start"], env=stack_env, cwd=REPO, capture_output=True, text=True, timeout=400
        )
        assert started.returncode == 0, started.stdout + started.stderr
        tracking_uri = f"http://127.0.0.1:{settings['MLFLOW_PORT']}"
        admin = ("admin", (folder / "secrets" / "mlflow-admin").read_text().strip())
        trainer, reviewer = ("trainer", secrets.token_hex(16)), ("reviewer", secrets.token_hex(16))
        with _as(admin):
            accounts = get_app_client("basic-auth", tracking_uri=tracking_uri)
            for user, password in (trainer, reviewer):
                accounts.create_user(user, password)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PG"))}
        env.update(
            MLFLOW_TRACKING_URI=tracking_uri,
            MLFLOW_TRACKING_USERNAME=trainer[0],
            MLFLOW_TRACKING_PASSWORD=trainer[1],
            PYTHONPATH=str(REPO),
            TF_CPP_MIN_LOG_LEVEL="2",
        )
        yield Stack(
            folder=folder,
            tracking_uri=tracking_uri,
            pg_port=int(settings["PG_PORT"]),
            env=env,
            trainer=trainer,
            reviewer=reviewer,
            admin=admin,
            start_output=started.stdout + started.stderr,
        )
    finally:
        subprocess.run([str(STACK), "stop"], env=stack_env, cwd=REPO, capture_output=True, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)


def test_postgresql_wants_a_password_and_clients_are_not_superusers(stack):
    import psycopg

    where = {"host": "127.0.0.1", "port": stack.pg_port, "passfile": os.devnull, "connect_timeout": 10}
    for user, database in (("postgres", "postgres"), ("mlflow", "mlflow"), ("optuna", "optuna")):
        with pytest.raises(psycopg.OperationalError, match="no password supplied"):
            psycopg.connect(user=user, dbname=database, **where)
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(user=user, dbname=database, password="not-the-password", **where)
    # The optuna role reaches its own database only.
    with pytest.raises(psycopg.OperationalError, match="no pg_hba.conf entry"):
        psycopg.connect(user="optuna", dbname="mlflow", password=stack.secret("optuna"), **where)

    with psycopg.connect(user="mlflow", dbname="mlflow", password=stack.secret("mlflow-db"), **where) as db:
        roles = dict(db.execute("SELECT rolname, rolsuper OR rolcreaterole OR rolcreatedb FROM pg_roles").fetchall())
        owners = dict(
            db.execute("SELECT datname, pg_get_userbyid(datdba) FROM pg_database WHERE datname <> 'postgres'")
        )
    assert roles["mlflow"] is False and roles["optuna"] is False and roles["postgres"] is True
    assert owners == {
        "mlflow": "mlflow",
        "mlflow_auth": "mlflow",
        "optuna": "optuna",
        "template0": "postgres",
        "template1": "postgres",
    }


def test_secrets_are_private_and_in_no_log_or_command_line(stack):
    assert stat.S_IMODE(stack.secrets.stat().st_mode) == 0o700
    found = {path.name: stat.S_IMODE(path.stat().st_mode) for path in stack.secrets.iterdir()}
    assert found == dict.fromkeys(SECRET_FILES, 0o600)
    assert stat.S_IMODE((stack.folder / "basic_auth.ini").stat().st_mode) == 0o600
    assert not (stack.folder / ".initdb-pwfile").exists()

    pid = (stack.folder / "mlflow.pid").read_text().strip()
    # The server and its workers: the session that setsid started.
    command_lines = [
        Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace").replace("\0", " ")
        for p in subprocess.run(["pgrep", "-s", pid], capture_output=True, text=True).stdout.split()
    ]
    assert any("--app-name basic-auth" in line for line in command_lines), command_lines
    shown = [stack.start_output, *command_lines, (stack.folder / "basic_auth.ini").read_text()]
    shown += [path.read_text(errors="replace") for path in stack.folder.glob("*.log")]
    for name in SECRET_FILES[:-1]:
        assert not any(stack.secret(name) in text for text in shown), f"the secret {name} was shown"
    assert f"$(cat {stack.secrets / 'optuna'})" in stack.start_output  # the hint, not the password


def test_anonymous_requests_are_refused_and_accounts_must_exist(stack):
    stranger = ("stranger", "not-a-password-of-anyone")
    requests_that_create = [
        ("/api/2.0/mlflow/experiments/create", {"name": "anonymous"}),
        ("/api/2.0/mlflow/registered-models/create", {"name": MODEL_NAME}),
        ("/api/2.0/mlflow/model-versions/create", {"name": MODEL_NAME, "source": "file:///tmp/crafted"}),
    ]
    for path, body in requests_that_create:
        for auth in (None, stranger, (stack.admin[0], "wrong-admin-password")):
            answer = stack.call("POST", path, auth, json=body)
            assert answer.status_code == 401, (path, auth and auth[0], answer.text)
    # No self-service accounts or promotions: only the admin makes accounts and admins.
    account = {"username": "intruder", "password": "long-enough-password"}
    assert stack.call("GET", "/signup", None).status_code == 401
    assert stack.call("POST", "/api/2.0/mlflow/users/create", None, json=account).status_code == 401
    assert stack.call("POST", "/api/2.0/mlflow/users/create", stack.trainer, json=account).status_code == 403
    promote = {"username": stack.trainer[0], "is_admin": True}
    assert stack.call("PATCH", "/api/2.0/mlflow/users/update-admin", stack.trainer, json=promote).status_code == 403
    assert stack.call("GET", "/health", None).status_code == 200  # the health check stays open
    admin = stack.call("GET", "/api/2.0/mlflow/experiments/search", stack.admin, params={"max_results": 10})
    assert admin.status_code == 200
    assert [e["name"] for e in admin.json()["experiments"]] == ["Default"]  # nothing was created


def _runs(client: MlflowClient, experiment_id: str, entry_point: str) -> list:
    return client.search_runs([experiment_id], filter_string=f"tags.`pneumo.entry_point` = '{entry_point}'")


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


def test_prepare_train_tune_register_and_serve_through_an_authenticated_server(stack, tmp_path, monkeypatch):
    env = stack.env
    data_dir = make_subset(tmp_path / "data", 20)
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(name, env[name])
    client = MlflowClient(tracking_uri=stack.tracking_uri)

    # 1. prepare, then a tiny aug_cnn, in the experiment `pneumo` (no experiment was chosen).
    prepare = ["--data_dir", str(data_dir), "--val_fraction", "0.25", "--cache_dir", ""]
    _entry_point("prepare", prepare, env, tmp_path / "p.log")
    experiment = client.get_experiment_by_name(DEFAULT_EXPERIMENT)
    (prepared,) = _runs(client, experiment.experiment_id, "prepare")
    manifest = ["--manifest", prepared.info.run_id]
    _entry_point("aug_cnn", manifest + TINY, env, tmp_path / "a.log")
    (trained,) = _runs(client, experiment.experiment_id, "aug_cnn")
    assert trained.info.run_name == "aug_cnn-32px-lr0.001-1ep"
    assert trained.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server

    # 2. Two tune workers at once on one study in PostgreSQL: exactly N_TRIALS finished trials.
    tune = manifest + TINY + ["--storage", stack.optuna_storage, "--study_name", "e2e", "--n_trials", str(N_TRIALS)]
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
    study = optuna.load_study(study_name="e2e", storage=stack.optuna_storage)
    states = [t.state for t in study.trials]
    assert states.count(TrialState.COMPLETE) + states.count(TrialState.PRUNED) == N_TRIALS, states
    assert len(_runs(client, experiment.experiment_id, "tune")) == 2
    assert len(_runs(client, experiment.experiment_id, "tune_trial")) == N_TRIALS

    # 3. The admin owns the registered model and lets `trainer` register into it (EDIT), then
    # evaluate with register=true: the first version becomes the champion.
    with _as(stack.admin):
        MlflowClient(tracking_uri=stack.tracking_uri).create_registered_model(MODEL_NAME)
        accounts = get_app_client("basic-auth", tracking_uri=stack.tracking_uri)
        accounts.grant_user_permission(stack.trainer[0], "registered_model", MODEL_NAME, "EDIT")
    model_uri = f"runs:/{trained.info.run_id}/model"
    # A one-epoch 32-px model cannot clear the promotion floors (tested elsewhere): none here.
    floors = ["--floor_sensitivity", "0", "--floor_specificity", "0", "--floor_roc_auc", "0"]
    evaluate = manifest + ["--model_uri", model_uri, "--split", "val", "--register", "true", *floors]
    _entry_point("evaluate", evaluate, env, tmp_path / "e.log")
    champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert champion.run_id == trained.info.run_id

    # 4. Serve the champion, resolved through the server, and ask about one real image.
    image = sorted((data_dir / "train" / "PNEUMONIA").iterdir())[0]
    body = {"dataframe_records": [{IMAGE_COLUMN: base64.b64encode(image.read_bytes()).decode()}]}
    with serve_model(f"models:/{MODEL_NAME}@champion", env, tmp_path / "serve.log", 300) as server:
        answer = server.invoke(body)
    assert answer.status_code == 200, answer.text
    (prediction,) = answer.json()["predictions"]
    assert prediction["label"] in ("NORMAL", "PNEUMONIA") and 0 <= prediction["probability"] <= 1

    # 5. What the flow made, as others reach it.
    (evaluated,) = _runs(client, experiment.experiment_id, "evaluate")
    _check_permissions(stack, experiment.experiment_id, evaluated, champion.version, tmp_path / "fetched")
    assert client.get_run(evaluated.info.run_id).info.lifecycle_stage == "active"
    assert client.get_model_version_by_alias(MODEL_NAME, "champion").version == champion.version


def _check_permissions(stack: Stack, experiment_id: str, evaluated, champion_version: str, folder: Path) -> None:
    """Anonymous requests get 401; an account with READ reads but gets 403 on every write."""
    run_id = evaluated.info.run_id
    predictions = evaluated.info.artifact_uri.removeprefix("mlflow-artifacts:/") + "/predictions.csv"
    writes = [
        ("POST", "/api/2.0/mlflow/runs/create", {"experiment_id": experiment_id}),
        ("POST", "/api/2.0/mlflow/runs/set-tag", {"run_id": run_id, "key": "verdict", "value": "forged"}),
        ("POST", "/api/2.0/mlflow/runs/delete", {"run_id": run_id}),
        ("POST", "/api/2.0/mlflow/registered-models/alias", {"name": MODEL_NAME, "alias": "champion", "version": "1"}),
        ("DELETE", "/api/2.0/mlflow/registered-models/alias", {"name": MODEL_NAME, "alias": "champion"}),
        ("POST", "/api/2.0/mlflow/model-versions/create", {"name": MODEL_NAME, "source": f"runs:/{run_id}/model"}),
    ]
    reads = [
        ("GET", "/api/2.0/mlflow/runs/get", {"run_id": run_id}),
        ("GET", f"/api/2.0/mlflow-artifacts/artifacts/{predictions}", None),
        ("GET", "/api/2.0/mlflow/registered-models/alias", {"name": MODEL_NAME, "alias": "champion"}),
    ]
    for method, path, body in writes + reads:
        answer = stack.call(method, path, None, **({"params": body} if method == "GET" else {"json": body}))
        assert answer.status_code == 401, (method, path, answer.text)

    # `reviewer` exists but holds no grant: the default (NO_PERMISSIONS) lets it read nothing here.
    for method, path, params in reads:
        assert stack.call(method, path, stack.reviewer, params=params).status_code == 403, path

    # READ on the registered model and on the experiment holding its runs' artifacts: what a
    # scoring service needs to fetch the champion.
    accounts = get_app_client("basic-auth", tracking_uri=stack.tracking_uri)
    with _as(stack.admin):
        accounts.grant_user_permission(stack.reviewer[0], "registered_model", MODEL_NAME, "READ")
        accounts.grant_user_permission(stack.reviewer[0], "experiment", experiment_id, "READ")
    folder.mkdir()
    with _as(stack.reviewer):
        model = download_artifacts(
            f"models:/{MODEL_NAME}@champion", dst_path=str(folder), tracking_uri=stack.tracking_uri
        )
    assert (Path(model) / "MLmodel").is_file()
    for method, path, params in reads:
        answer = stack.call(method, path, stack.reviewer, params=params)
        assert answer.status_code == 200, (path, answer.text)
    assert answer.json()["model_version"]["version"] == champion_version
    for method, path, body in writes:
        answer = stack.call(method, path, stack.reviewer, json=body)
        assert answer.status_code == 403, (method, path, answer.text)

    # `trainer` holds EDIT on the registered model, which is what moving an alias takes.
    moved = stack.call("POST", writes[3][1], stack.trainer, json={**writes[3][2], "version": champion_version})
    assert moved.status_code == 200, moved.text
