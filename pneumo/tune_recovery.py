"""Tuning under faults: trials of dead workers are failed at once, and their MLflow runs closed.

A worker killed with SIGKILL leaves its Optuna trial RUNNING and its nested MLflow run RUNNING.
Optuna's heartbeat marks the trial failed only after the grace period (five minutes), and the
MLflow run stayed RUNNING forever. A worker restarted within the grace period counted the dead
trial as holding a place, so the study ended one trial short of ``n_trials``.

Here every trial records the worker that runs it (host, process id, process start time). Before
counting, a worker fails the RUNNING trials of workers *on its own machine* that no longer exist
(so a restart redoes them at once), and closes, as ``KILLED``, the MLflow run of every failed
trial that is still RUNNING, with the dead worker's own (parent) ``tune`` run. Workers on other
machines still rely on Optuna's heartbeat (failed after its grace period, then closed the same way).
"""

from __future__ import annotations

import logging
import os
import socket

import optuna
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from pneumo.runs import process_alive, start_time

log = logging.getLogger(__name__)

WORKER_ATTR = "pneumo_worker"
# The trial's user attribute naming its MLflow run, and the run tag holding the trial's state.
RUN_ID_ATTR = "mlflow_run_id"
STATE_TAG = "optuna.trial_state"
# MLflow runs this process already closed (each is closed once).
_closed: set[str] = set()


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": start_time(os.getpid())}


def mark_worker(trial: optuna.Trial) -> None:
    """Record which worker process runs ``trial``."""
    trial.set_user_attr(WORKER_ATTR, _me())


def _alive(worker: dict) -> bool:
    try:
        pid = int(worker["pid"])
    except (KeyError, TypeError, ValueError):
        return True  # unknown: leave it to the heartbeat
    return process_alive(pid, worker.get("started"))


def fail_dead_local_trials(study: optuna.Study, storage: optuna.storages.BaseStorage) -> int:
    """Fail RUNNING trials whose worker ran on this machine and is gone. Returns how many.

    Args:
        study: The study.
        storage: Its storage (the study's own is private to Optuna; the opener keeps this one).
    """
    host = socket.gethostname()
    failed = 0
    study_id = storage.get_study_id_from_name(study.study_name)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get(WORKER_ATTR)
        if not isinstance(worker, dict) or worker.get("host") != host or _alive(worker):
            continue
        try:
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
            if storage.set_trial_state_values(trial_id, TrialState.FAIL):
                failed += 1
                log.warning("trial %d: its worker (pid %s) is gone; marked failed", trial.number, worker.get("pid"))
        except RuntimeError:  # another worker finished or failed it first
            continue
    return failed


def close_orphaned_runs(study: optuna.Study) -> int:
    """End, as KILLED, the MLflow runs of failed trials that are still RUNNING. Returns how many."""
    client = MlflowClient()
    closed = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        run_id = trial.user_attrs.get(RUN_ID_ATTR)
        if not run_id or run_id in _closed:
            continue
        try:
            run = client.get_run(run_id)
            if run.info.status != "FINISHED" and STATE_TAG not in run.data.tags:
                # The run may already be KILLED by pneumo.runs.close_orphans; the trial's state is ours to say.
                client.set_tag(run_id, STATE_TAG, TrialState.FAIL.name)
            if run.info.status == "RUNNING":
                client.set_terminated(run_id, "KILLED")
                closed += 1
                log.warning("trial %d failed; its MLflow run %s is ended as KILLED", trial.number, run_id)
                # Its worker is dead (no heartbeat, or no process): so is the worker's own tune run.
                parent = run.data.tags.get("mlflow.parentRunId")
                if parent and client.get_run(parent).info.status == "RUNNING":
                    client.set_terminated(parent, "KILLED")
                    log.warning("the dead worker's tune run %s is ended as KILLED", parent)
            _closed.add(run_id)
        except Exception as error:  # another tracking server, a deleted run: not ours to fix
            log.info("cannot close MLflow run %s of failed trial %d: %s", run_id, trial.number, error)
            _closed.add(run_id)
    return closed


def recover(study: optuna.Study, storage: optuna.storages.BaseStorage) -> None:
    """Both of the above; called by :func:`pneumo.tuning.claimed` before it counts."""
    fail_dead_local_trials(study, storage)
    close_orphaned_runs(study)
