"""Runs that end cleanly (issue 18 §4): SIGTERM and SIGINT end the run KILLED, a child follows its
`mlflow run` parent, and ``python -m pneumo.runs close-orphans`` closes the runs of SIGKILLed processes.

The stop tests run real entry points (``python -m entrypoints.aug_cnn`` with tiny settings, and
``prepare`` on the real data) in a temporary tracking store and signal them from outside.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO, SHARED_DATA, make_subset, require_real_data
from pneumo import runs
from pneumo.data import discover

# Tiny, and long enough (300 epochs of three batches) that a stop that fails shows as a hang.
TINY = {
    "image_size": 32,
    "width": 4,
    "limit_per_class": 12,
    "val_fraction": 0.3,
    "batch_size": 8,
    "epochs": 300,
    "patience": 300,
    "cache_dir": "",
}
# Hang guards, not timing assertions: far longer than any of these steps takes on a loaded machine.
STARTUP_SECONDS = 600
EXIT_SECONDS = 120


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return make_subset(tmp_path_factory.mktemp("signals"), 16)


def _arguments(data_dir: Path) -> list[str]:
    pairs = {"data_dir": str(data_dir), **TINY}
    return [part for name, value in pairs.items() for part in (f"--{name}", str(value))]


def _wait_for(condition, seconds: float, what: str, process: subprocess.Popen | None = None, log: Path | None = None):
    """Poll ``condition`` until it returns something truthy; fail naming ``what`` (and show the log)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if process is not None and process.poll() is not None:
            pytest.fail(f"exited with {process.returncode} before {what}:\n{log.read_text()[-3000:] if log else ''}")
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}:\n{log.read_text()[-3000:] if log else ''}")


def _training_run(pid: int | None = None):
    """The RUNNING run (of process ``pid``) once it has logged a training epoch, else None."""
    for run in mlflow.search_runs(search_all_experiments=True, output_format="list"):
        tags = run.data.tags
        if run.info.status == "RUNNING" and (pid is None or tags.get(runs.PID_TAG) == str(pid)):
            if "loss/train" in run.data.metrics:
                return run
    return None


def _status(run_id: str) -> str:
    return MlflowClient().get_run(run_id).info.status


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists() and "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()


def _start(command: list[str], log: Path, unset: tuple[str, ...] = ()) -> subprocess.Popen:
    env = {name: value for name, value in os.environ.items() if name not in unset}
    with open(log, "wb") as output:
        return subprocess.Popen(
            command, cwd=REPO, stdout=output, stderr=subprocess.STDOUT, env={**env, "TF_CPP_MIN_LOG_LEVEL": "2"}
        )


# --- in one process: the flag, the safe points, the cleanup ---------------------------------


def test_a_signal_stops_at_the_next_safe_point_and_ends_the_run_killed(tracking):
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(runs.Stopped) as stopped:
        with mlflow.start_run() as run, runs.guarded(run):
            os.kill(os.getpid(), signal.SIGTERM)
            assert runs.stop_requested() == signal.SIGTERM  # recorded, nothing raised yet
            runs.check()
            pytest.fail("check() let a requested stop pass")
    assert stopped.value.code == 128 + signal.SIGTERM
    finished = MlflowClient().get_run(run.info.run_id)
    assert finished.info.status == "KILLED"
    assert finished.data.tags[runs.PID_TAG] == str(os.getpid())
    assert finished.data.tags[runs.HOST_TAG] == socket.gethostname()
    assert signal.getsignal(signal.SIGTERM) is before, "the previous handler was not restored"
    assert runs.stop_requested() is None


def test_a_stop_after_the_last_safe_point_still_ends_the_run_killed(tracking):
    with pytest.raises(runs.Stopped) as stopped:
        with mlflow.start_run() as run, runs.guarded(run):
            os.kill(os.getpid(), signal.SIGINT)  # the work then ends normally
    assert stopped.value.code == 128 + signal.SIGINT
    assert _status(run.info.run_id) == "KILLED"


def test_the_same_signal_twice_stops_at_once(tracking):
    with pytest.raises(runs.Stopped) as stopped:
        with mlflow.start_run() as run, runs.guarded(run):
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)  # mlflow run's SIGTERM after a Ctrl-C: still only recorded
            assert runs.stop_requested() == signal.SIGINT
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C again: raised from the handler
            pytest.fail("a repeated SIGINT waited for a safe point")
    assert stopped.value.code == 128 + signal.SIGINT
    assert _status(run.info.run_id) == "KILLED"


def test_discovery_stops_between_files(tracking, tmp_path):
    root = make_subset(tmp_path, 8)
    with pytest.raises(runs.Stopped):
        with mlflow.start_run() as run, runs.guarded(run):
            os.kill(os.getpid(), signal.SIGTERM)
            discover(root)
            pytest.fail("discovery went on after a stop request")
    assert _status(run.info.run_id) == "KILLED"


def test_close_orphans_closes_only_runs_whose_process_is_gone(tracking):
    client = MlflowClient()
    experiment_id = mlflow.get_experiment_by_name("pneumo-test").experiment_id
    finished = subprocess.Popen(["true"])
    finished.wait()  # its pid now names no process
    me = runs.process_tags()
    cases = {
        "dead": {**me, runs.PID_TAG: str(finished.pid)},
        "alive": me,
        "pid reused": {**me, runs.STARTED_TAG: "1"},  # this pid, but a process that started at another time
        "other host": {**me, runs.HOST_TAG: "elsewhere.invalid", runs.PID_TAG: str(finished.pid)},
        "untagged": {},
    }
    ids = {name: client.create_run(experiment_id, tags=tags).info.run_id for name, tags in cases.items()}
    closed = runs.close_orphans()
    assert sorted(closed) == sorted([ids["dead"], ids["pid reused"]])
    assert {name: _status(run_id) for name, run_id in ids.items()} == {
        "dead": "KILLED",
        "alive": "RUNNING",
        "pid reused": "KILLED",
        "other host": "RUNNING",
        "untagged": "RUNNING",
    }
    assert client.get_run(ids["dead"]).data.tags[runs.CLOSED_BY_TAG] == "close-orphans"
    # Every entry point closes its experiment's orphans when it starts.
    orphan = client.create_run(experiment_id, tags=cases["dead"]).info.run_id
    with mlflow.start_run(experiment_id=experiment_id) as run, runs.guarded(run):
        assert _status(orphan) == "KILLED"


# --- real entry points, signalled from outside -----------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_training_ends_the_run_killed_with_what_it_logged(tracking, tiny_data, tmp_path, signum):
    log = tmp_path / "aug_cnn.log"
    process = _start([sys.executable, "-m", "entrypoints.aug_cnn", *_arguments(tiny_data)], log)
    try:
        run = _wait_for(lambda: _training_run(process.pid), STARTUP_SECONDS, "a training epoch", process, log)
        process.send_signal(signum)
        assert process.wait(EXIT_SECONDS) == 128 + signum, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
    ended = MlflowClient().get_run(run.info.run_id)
    assert ended.info.status == "KILLED"
    assert "loss/train" in ended.data.metrics and ended.data.params["epochs"] == "300"  # what was logged stays
    text = log.read_text()
    assert f"stopped by {signal.Signals(signum).name}: run {run.info.run_id} ended KILLED" in text
    assert "Traceback" not in text


@pytest.mark.slow
def test_a_sigkilled_run_is_closed_killed_by_close_orphans(tracking, tiny_data, tmp_path):
    log = tmp_path / "aug_cnn.log"
    process = _start([sys.executable, "-m", "entrypoints.aug_cnn", *_arguments(tiny_data)], log)
    try:
        run = _wait_for(lambda: _training_run(process.pid), STARTUP_SECONDS, "a training epoch", process, log)
    finally:
        process.kill()
        process.wait()
    assert _status(run.info.run_id) == "RUNNING"  # nothing can end a run from inside a SIGKILL
    with mlflow.start_run(tags=runs.process_tags()) as live:  # a run whose process (this one) lives
        closing = subprocess.run(
            [sys.executable, "-m", "pneumo.runs", "close-orphans"], capture_output=True, text=True, timeout=300
        )
        assert closing.returncode == 0, closing.stderr[-3000:]
        assert f"closed 1 run(s) of dead processes on {socket.gethostname()}" in closing.stdout
        assert _status(live.info.run_id) == "RUNNING"
    assert _status(run.info.run_id) == "KILLED"


@pytest.mark.slow
def test_sigterm_to_the_mlflow_run_parent_takes_the_entry_point_down(tracking, tiny_data, tmp_path):
    log = tmp_path / "mlflow-run.log"
    parameters = [part for name, value in {"data_dir": tiny_data, **TINY}.items() for part in ("-P", f"{name}={value}")]
    mlflow_cli = str(Path(sys.executable).parent / "mlflow")
    command = [mlflow_cli, "run", str(REPO), "-e", "aug_cnn", "--env-manager", "local"]
    # The experiment is MLFLOW_EXPERIMENT_NAME's; the CLI refuses it together with MLFLOW_EXPERIMENT_ID.
    parent = _start([*command, *parameters], log, unset=("MLFLOW_EXPERIMENT_ID",))
    child = None
    try:
        run = _wait_for(_training_run, STARTUP_SECONDS, "a training epoch", parent, log)
        child = int(run.data.tags[runs.PID_TAG])
        assert child != parent.pid
        parent.send_signal(signal.SIGTERM)  # the parent only: before, the child trained on and ended FINISHED
        parent.wait(EXIT_SECONDS)
        _wait_for(lambda: not _alive(child), EXIT_SECONDS, "the entry point to follow its parent", log=log)
    finally:
        if parent.poll() is None:
            parent.kill()
        if child is not None and _alive(child):
            os.kill(child, signal.SIGKILL)
    assert _status(run.info.run_id) == "KILLED"
    assert f"stopped by SIGTERM: run {run.info.run_id} ended KILLED" in log.read_text()


@pytest.mark.slow
def test_a_stop_during_prepare_ends_the_run_killed(tracking, tmp_path):
    require_real_data()  # all of it: discovery then takes long enough to be interrupted
    log = tmp_path / "prepare.log"
    process = _start([sys.executable, "-m", "entrypoints.prepare", "--data_dir", str(SHARED_DATA)], log)

    def started():
        found = mlflow.search_runs(search_all_experiments=True, output_format="list")
        return next((r for r in found if r.data.tags.get(runs.PID_TAG) == str(process.pid)), None)

    try:
        run = _wait_for(started, STARTUP_SECONDS, "the prepare run", process, log)
        process.send_signal(signal.SIGTERM)
        assert process.wait(EXIT_SECONDS) == 128 + signal.SIGTERM, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
    assert _status(run.info.run_id) == "KILLED"
    assert "Traceback" not in log.read_text()
