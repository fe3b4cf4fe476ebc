"""tune: Optuna trials as nested MLflow runs, pruning, resuming a study, parallel workers."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess

import mlflow
import optuna
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from helpers import artifacts, read_json, read_text, run_project
from pneumo.config import TuneConfig
from pneumo.errors import ConfigError
from pneumo.tune import log_study_summary, suggest
from pneumo.tuning import masked, open_storage, open_study

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def _children(client: MlflowClient, parent_id: str, entry_point: str = "tune_trial") -> list:
    experiment_id = client.get_run(parent_id).info.experiment_id
    return client.search_runs(
        [experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_id}' and tags.`pneumo.entry_point` = '{entry_point}'",
    )


def _base_params(small_data, storage: str) -> dict:
    return {
        "data_dir": str(small_data),
        "cache_dir": "",
        "image_size": 32,
        "epochs": 2,
        "batch_size": 16,
        "width": 4,
        "val_fraction": 0.2,
        "storage": storage,
        "study_name": "tiny",
    }


def _tune(repo, parameters: dict) -> str:
    return run_project(repo, "tune", parameters, "pneumo-test").run_id


@pytest.mark.slow
def test_trials_are_nested_runs_and_a_rerun_resumes_with_pruning_and_retraining(repo, tracking, small_data, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    client = MlflowClient()

    first = _tune(repo, {**_base_params(small_data, storage), "n_trials": 2, "pruner": "none"})
    parent = client.get_run(first)
    assert parent.info.status == "FINISHED" and parent.data.tags["pneumo.entry_point"] == "tune"
    trials = _children(client, first)
    assert len(trials) == 2
    for run in trials:
        assert run.info.status == "FINISHED" and run.data.tags["optuna.trial_state"] == "COMPLETE"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "auc/val")] == [0, 1]
        assert run.data.params["monitor"] == "val_auc" and run.data.params["epochs"] == "2"
        # The objective is the exact (sklearn) ROC AUC of the kept weights on the grouped validation split.
        assert run.data.metrics["objective_value"] == pytest.approx(run.data.metrics["val_roc_auc"])
    files = artifacts(client, first)
    for name in ("optimization_history", "param_importances", "parallel_coordinate", "slice", "intermediate_values"):
        assert f"plots/optuna_{name}.png" in files, name
    assert {"trials.csv", "best_params.json", "manifest.csv"} <= files
    best = read_json(client.download_artifacts(first, "best_params.json"))
    by_number = {int(r.data.tags["optuna.trial_number"]): r for r in trials}
    assert best["value"] == max(r.data.metrics["objective_value"] for r in trials)
    assert best["mlflow_run_id"] == by_number[best["trial_number"]].info.run_id
    assert float(parent.data.params["best_learning_rate"]) == pytest.approx(best["params"]["learning_rate"])

    # Same study again, now asking for 3 trials: one more trial runs, and a pruner that no AUC can
    # satisfy (floor above 1) stops it after its first epoch; then the best trial is retrained.
    second = _tune(
        repo,
        {
            **_base_params(small_data, storage),
            "n_trials": 3,
            "pruner": "threshold",
            "prune_threshold": 1.01,
            "pruner_warmup_epochs": 0,
            "retrain_best": "true",
        },
    )
    [pruned] = _children(client, second)
    assert pruned.data.tags["optuna.trial_number"] == "2"
    assert pruned.info.status == "FINISHED" and pruned.data.tags["optuna.trial_state"] == "PRUNED"
    assert [m.step for m in client.get_metric_history(pruned.info.run_id, "auc/val")] == [0]
    assert pruned.data.metrics["pruned_at_epoch"] == 0

    study = optuna.load_study(study_name="tiny", storage=storage)
    assert [(t.number, t.state) for t in study.trials] == [
        (0, TrialState.COMPLETE),
        (1, TrialState.COMPLETE),
        (2, TrialState.PRUNED),
    ]
    # A resumed seeded search draws new points instead of replaying the first invocation's.
    assert study.trials[2].params["learning_rate"] not in {t.params["learning_rate"] for t in study.trials[:2]}
    table = pd.read_csv(client.download_artifacts(second, "trials.csv"))
    assert table["state"].tolist() == ["COMPLETE", "COMPLETE", "PRUNED"]
    assert set(table["user_attrs_mlflow_run_id"]) == {r.info.run_id for r in trials} | {pruned.info.run_id}

    # The retrained model is an aug_cnn run nested under the tune run, with the best parameters.
    [retrained] = _children(client, second, entry_point="aug_cnn")
    assert retrained.data.tags["optuna.trial_number"] == str(best["trial_number"])
    assert float(retrained.data.params["learning_rate"]) == pytest.approx(best["params"]["learning_rate"])
    assert float(retrained.data.params["zoom"]) == pytest.approx(best["params"]["zoom"])
    model_uri = client.get_run(second).data.tags["pneumo.best_model_uri"]
    assert model_uri == f"runs:/{retrained.info.run_id}/model"
    assert mlflow.models.get_model_info(model_uri).signature is not None
    assert {"threshold.json", "manifest.csv", "plots/training_curves.png"} <= artifacts(client, retrained.info.run_id)
    # Same seed, data and parameters: the retrained model reproduces its trial (up to CPU
    # thread-scheduling noise, one or two swapped ranks among the 24 validation images).
    assert retrained.data.metrics["val_roc_auc"] == pytest.approx(
        by_number[best["trial_number"]].data.metrics["val_roc_auc"], abs=0.03
    )


@pytest.mark.slow
def test_two_workers_share_one_study_without_losing_or_repeating_trials(repo, tracking, small_data, tmp_path, python):
    # A journal file: Optuna's storage for several processes on one machine (README, Tuning storage).
    storage = f"journal:{tmp_path / 'optuna.log'}"
    n_trials = 4
    params = {**_base_params(small_data, storage), "n_trials": n_trials, "pruner": "none", "epochs": 1}
    command = [python, "-m", "entrypoints.tune"] + [f"--{k}={v}" for k, v in params.items()]
    logs = [tmp_path / f"worker{i}.log" for i in range(2)]
    with contextlib.ExitStack() as outputs:
        workers = [
            subprocess.Popen(
                command,
                cwd=repo,
                env=os.environ.copy(),
                stdout=outputs.enter_context(open(log, "w")),
                stderr=subprocess.STDOUT,
            )
            for log in logs
        ]
        for worker, log in zip(workers, logs):
            assert worker.wait(timeout=400) == 0, log.read_text()[-3000:]

    study = optuna.load_study(study_name="tiny", storage=open_storage(storage))
    finished = [t for t in study.trials if t.state in FINISHED]
    assert sorted(t.number for t in finished) == list(range(n_trials))
    assert len(study.trials) == len(finished)
    assert len({json.dumps(t.params, sort_keys=True) for t in finished}) == n_trials

    client = MlflowClient()
    experiment = client.get_experiment_by_name("pneumo-test")
    parents = client.search_runs([experiment.experiment_id], filter_string="tags.`pneumo.entry_point` = 'tune'")
    assert len(parents) == 2
    per_worker = [_children(client, p.info.run_id) for p in parents]
    # Both workers trained, and together they logged each trial exactly once.
    assert all(per_worker), [len(c) for c in per_worker]
    numbers = sorted(int(r.data.tags["optuna.trial_number"]) for runs in per_worker for r in runs)
    assert numbers == list(range(n_trials))
    assert {r.info.run_id for runs in per_worker for r in runs} == {t.user_attrs["mlflow_run_id"] for t in finished}
    assert sum(p.data.metrics["n_trials_this_worker"] for p in parents) == n_trials


# Trials are driven by hand (ask/tell) here; Optuna notes that heartbeats are meant for optimize().
@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_study_summary_handles_small_studies(tracking, tmp_path):
    tune = TuneConfig(storage=f"sqlite:///{tmp_path / 'optuna.db'}", study_name="small")
    study = open_study(tune, 3, open_storage(tune.storage))
    pruned = study.ask()
    suggest(pruned, tune)
    pruned.report(0.55, step=0)
    study.tell(pruned, state=TrialState.PRUNED)

    with mlflow.start_run() as run:
        assert log_study_summary(study, tune) is None  # nothing completed: no best, no crash
    client = MlflowClient()
    assert "plots/optuna_intermediate_values.png" in artifacts(client, run.info.run_id)
    assert "plots/optuna_optimization_history.png" not in artifacts(client, run.info.run_id)

    complete = study.ask()
    params = suggest(complete, tune)
    study.tell(complete, 0.8)
    with mlflow.start_run() as run:
        best = log_study_summary(study, tune)
    assert best.number == complete.number
    files = artifacts(client, run.info.run_id)
    assert {
        "plots/optuna_optimization_history.png",
        "plots/optuna_slice.png",
        "trials.csv",
        "best_params.json",
    } <= files
    # Importances need two completed trials: skipped with a note, not an error.
    assert "plots/optuna_param_importances.png" not in files
    assert "param_importances" in read_text(client.download_artifacts(run.info.run_id, "plots/skipped_plots.txt"))
    logged = client.get_run(run.info.run_id).data
    assert logged.metrics["best_value"] == 0.8 and logged.metrics["n_trials_pruned"] == 1
    assert float(logged.params["best_rotation"]) == pytest.approx(params["rotation"])


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_seeding_is_per_trial_and_studies_keep_their_direction(tmp_path):
    tune = TuneConfig(storage=f"sqlite:///{tmp_path / 'a.db'}", study_name="s")
    first, resumed = (open_study(tune, 5, open_storage(tune.storage)) for _ in range(2))
    a, b = suggest(first.ask(), tune), suggest(resumed.ask(), tune)
    assert a != b  # the second process continues the search instead of replaying it
    other = TuneConfig(storage=f"sqlite:///{tmp_path / 'b.db'}", study_name="s")
    elsewhere = open_study(other, 5, open_storage(other.storage))
    assert suggest(elsewhere.ask(), tune) == a  # trial 0 of a seeded study is reproducible

    with pytest.raises(ValueError, match="maximize"):
        open_study(
            TuneConfig(storage=tune.storage, study_name="s", objective="val_loss"), 5, open_storage(tune.storage)
        )
    assert "secret" not in masked("postgresql://optuna:secret@db.example.org/studies")


def _ask_and_tell(storage: str, value: float) -> None:
    study = open_study(TuneConfig(storage=storage, study_name="shared"), 1, open_storage(storage))
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    study.tell(trial, value)


def test_a_journal_file_holds_a_study_for_several_processes(tmp_path):
    storage = f"journal:{tmp_path / 'journal' / 'optuna.log'}"
    _ask_and_tell(storage, 0.5)
    _ask_and_tell(storage, 0.7)  # a second process opens the same file
    assert isinstance(open_storage(storage), optuna.storages.JournalStorage)
    study = optuna.load_study(study_name="shared", storage=open_storage(storage))
    assert [t.value for t in study.trials] == [0.5, 0.7] and masked(storage) == storage
    with pytest.raises(ConfigError, match="names no journal file"):
        open_storage("journal:")


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_workers_reach_one_database_through_optunas_grpc_proxy(tmp_path):
    from optuna.storages._grpc.server import make_server

    database = f"sqlite:///{tmp_path / 'optuna.db'}"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # What `python -m pneumo.optuna_proxy --storage DATABASE --port PORT` serves, stoppable here.
    server = make_server(optuna.storages.get_storage(open_storage(database)), "127.0.0.1", port)
    server.start()
    try:
        proxy = f"grpc://127.0.0.1:{port}"
        assert isinstance(open_storage(proxy), optuna.storages.GrpcStorageProxy)
        _ask_and_tell(proxy, 0.25)
        _ask_and_tell(proxy, 0.75)
    finally:
        server.stop(None)
    study = optuna.load_study(study_name="shared", storage=database)
    assert [t.value for t in study.trials] == [0.25, 0.75]
    with pytest.raises(ConfigError, match="grpc://HOST:PORT"):
        open_storage("grpc://no-port")
