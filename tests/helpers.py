"""Helpers shared by the test modules: tracking stores, project runs, artifacts, folder snapshots.

Image files are built by :mod:`xray_files`; fixtures live in ``conftest.py`` and ``model_fixtures.py``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
from mlflow.tracking import MlflowClient

from pneumo.pipeline import ImageSet

# The served answer's columns, spelled out: the label and its scores, the input gate's verdict,
# then which model answered (a test of pneumo.model_io's constants, not a copy of them).
ANSWER_COLUMNS = [
    *("label", "probability", "threshold", "in_distribution", "ood_score"),
    *("model_id", "model_run_id", "code_version"),
]


def use_tracking_store(patch: pytest.MonkeyPatch, root: Path, experiment: str) -> str:
    """Point MLflow, here and in subprocesses, at a new SQLite store under ``root`` with one experiment.

    The experiment's artifacts live under ``root/artifacts``. No experiment is made active: the
    ``MLFLOW_EXPERIMENT_*`` variables are removed (and restored by ``patch`` afterwards).

    Returns:
        The experiment's id.
    """
    uri = f"sqlite:///{root / 'mlflow.db'}"
    patch.setenv("MLFLOW_TRACKING_URI", uri)
    patch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    # mlflow.set_experiment exports MLFLOW_EXPERIMENT_ID; registering it here makes the patch remove it again.
    patch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    mlflow.set_tracking_uri(uri)
    return mlflow.create_experiment(experiment, artifact_location=(root / "artifacts").as_uri())


def run_project(repo: Path, entry_point: str, parameters: dict, experiment: str, synchronous: bool = True):
    """Run an entry point through MLproject, exactly as ``mlflow run . -e X --env-manager local`` does.

    Returns:
        MLflow's submitted run (``run_id``; ``wait()`` when not synchronous).
    """
    return mlflow.projects.run(
        str(repo),
        entry_point=entry_point,
        parameters=parameters,
        env_manager="local",
        experiment_name=experiment,
        synchronous=synchronous,
    )


def artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    """Every artifact file of a run (paths relative to its artifact root), folders expanded."""
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def download(client: MlflowClient, run_id: str, path: str, folder: Path) -> Path:
    """Download one artifact of a run into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(run_id, path, str(folder)))


def read_json(path: str | Path) -> Any:
    with open(path) as handle:
        return json.load(handle)


def read_text(path: str | Path) -> str:
    with open(path) as handle:
        return handle.read()


def tree_state(root: Path) -> dict[str, tuple]:
    """What "nothing under ``root`` changed" means: every entry's kind, content and times, and every listing.

    Links are followed for the content and the target's mtime, and their own mtime is kept too.
    """
    state: dict[str, tuple] = {}
    for path in sorted(root.rglob("*")):
        link, target = path.lstat(), path.stat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        state[path.relative_to(root).as_posix()] = (path.is_symlink(), digest, link.st_mtime_ns, target.st_mtime_ns)
    for folder in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        state[f"{folder}/ (listing)"] = tuple(sorted(os.listdir(folder)))
    return state


def cached_set(n_normal: int, n_pneumonia: int, side: int = 32) -> ImageSet:
    """A decoded set of random grayscale images, normal ones first."""
    labels = np.array([0] * n_normal + [1] * n_pneumonia, dtype=np.int32)
    images = np.random.default_rng(0).integers(0, 255, (len(labels), side, side, 1), dtype=np.uint8)
    return ImageSet(images, labels, pd.DataFrame({"label": labels}))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_answering(
    process: subprocess.Popen, answers: Callable[[], bool], log: Path, seconds: float, name: str
) -> None:
    """Poll ``answers`` until it is true; fail the test, with the log's tail, if ``process`` exits or time runs out."""
    deadline = time.monotonic() + seconds
    while True:
        if process.poll() is not None:
            pytest.fail(f"{name} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if answers():
                return
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{name} did not answer in {seconds} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)


def stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM the process group a test started (``start_new_session=True``), SIGKILL it after 30 s.

    The whole group: a server's leader may have exited and left its workers running.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


class Server:
    """A running scoring server and its log."""

    def __init__(self, url: str, process: subprocess.Popen, log: Path):
        self.url, self.process, self.log = url, process, log

    def invoke(self, body: dict | str | bytes, content_type: str = "application/json") -> requests.Response:
        if isinstance(body, dict):
            return requests.post(f"{self.url}/invocations", json=body, timeout=60)
        return requests.post(f"{self.url}/invocations", data=body, headers={"Content-Type": content_type}, timeout=60)


@contextlib.contextmanager
def serve_model(model_uri: str, env: dict[str, str], log: Path, startup_seconds: float) -> Iterator[Server]:
    """Run ``mlflow models serve -m MODEL_URI --env-manager local`` on a free port until /ping answers; stop it after.

    Args:
        model_uri: What to serve (``models:/name@alias`` resolves through ``env``'s tracking URI).
        env: The server's environment.
        log: File receiving its output (its tail is shown when it fails to start).
        startup_seconds: How long it may take to answer /ping.
    """
    port = free_port()
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local"]
            + ["--host", "127.0.0.1", "--port", str(port)],
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:

        def ping() -> bool:
            return requests.get(f"{url}/ping", timeout=2).status_code == 200

        wait_until_answering(process, ping, log, startup_seconds, "mlflow models serve")
        yield Server(url, process, log)
    finally:
        # The CLI starts uvicorn as a child: stop the whole process group started here.
        stop_process_group(process)
