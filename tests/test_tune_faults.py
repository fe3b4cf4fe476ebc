"""Tuning under faults (issue 9 §5): a worker killed with SIGKILL, then restarted at once.

Before: the killed trial's nested MLflow run stayed RUNNING forever, and the restarted worker
(within the five-minute heartbeat grace period) counted the dead trial as holding a place, so
the study ended one trial short of n_trials.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from pneumo.tune_recovery import WORKER_ATTR

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


@pytest.mark.slow
def test_a_killed_worker_restarted_at_once_still_completes_the_study_and_closes_its_run(
    repo, tracking, small_data, tmp_path, python
):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    n_trials = 2
    params = {
        "data_dir": str(small_data),
        "cache_dir": "",
        "image_size": 32,
        "epochs": 1,
        "batch_size": 16,
        "width": 4,
        "val_fraction": 0.2,
        "storage": storage,
        "study_name": "faults",
        "n_trials": n_trials,
        "pruner": "none",
    }
    command = [python, "-m", "entrypoints.tune"] + [f"--{k}={v}" for k, v in params.items()]
    log = tmp_path / "first.log"
    with open(log, "w") as output:
        first = subprocess.Popen(command, cwd=repo, env=os.environ.copy(), stdout=output, stderr=subprocess.STDOUT)
    killed = None
    deadline = time.monotonic() + 300
    while killed is None and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.5)
        try:
            study = optuna.load_study(study_name="faults", storage=storage)
        except Exception:  # not created yet
            continue
        for trial in study.get_trials(states=(TrialState.RUNNING,)):
            if WORKER_ATTR in trial.user_attrs and "mlflow_run_id" in trial.user_attrs:
                os.kill(first.pid, signal.SIGKILL)  # mid-trial, no cleanup
                killed = trial
    first.wait(timeout=60)
    assert killed is not None, f"no running trial seen:\n{log.read_text()[-3000:]}"

    second = subprocess.run(command, cwd=repo, env=os.environ.copy(), capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]

    study = optuna.load_study(study_name="faults", storage=storage)
    states = {t.number: t.state for t in study.trials}
    assert states[killed.number] == TrialState.FAIL
    assert sum(state in FINISHED for state in states.values()) == n_trials, states
    client = MlflowClient()
    run = client.get_run(killed.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED" and run.data.tags["optuna.trial_state"] == "FAIL"
    experiment = client.get_experiment_by_name("pneumo-test")
    running = client.search_runs([experiment.experiment_id], filter_string="attributes.status = 'RUNNING'")
    assert not running, [r.info.run_name for r in running]
