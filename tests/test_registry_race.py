"""Registration races (issue 9 §4): two real processes registering at once, and training overlap.

Two evaluations registering at the same moment both saw no champion and the worse model ended as
champion. Here the better model scores at once and the worse one slowly, so without
serialisation the worse one moves the alias last.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from pneumo import registry
from pneumo.data import MANIFEST_FILE
from pneumo.errors import DataError, PneumoError

NAME = "race-classifier"

WORKER = textwrap.dedent(
    """
    import sys, time
    import mlflow, numpy as np
    from pneumo import registry
    from pneumo.contract import Figures, ModelContract
    from pneumo.model_io import TrainedModel
    from pneumo.preprocessing import InputSpec

    run_id, quality, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
    client = mlflow.MlflowClient()

    def stand_in(uri, run):  # a model of that run, without weights: only its run and threshold are read
        contract = ModelContract("aug_cnn", InputSpec(32, 1), 0.5, "fixed", {}, Figures("none", {}), run_id=run)
        return TrainedModel(None, contract, uri)

    def load(uri):  # models:/NAME/VERSION -> the stand-in of that version's run
        return stand_in(uri, client.get_model_version("NAME", uri.rsplit("/", 1)[1]).run_id)

    registry.load_trained_model = load
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    GOOD = np.array([0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9])  # AUC 1.0
    BAD = np.array([0.6, 0.2, 0.8, 0.4, 0.1, 0.7, 0.3, 0.9])  # AUC 0.5

    def score(model):
        good = client.get_run(model.run_id).data.tags["quality"] == "good"
        if not good:
            time.sleep(3)  # the worse model is the slow one: it would move the alias last
        return labels, GOOD if good else BAD

    while time.time() < start:
        time.sleep(0.01)
    with mlflow.start_run(run_name="evaluate-" + quality):
        candidate = stand_in(f"runs:/{run_id}/model", run_id)
        # No floors: the race, not the floors, must keep the worse model from the champion alias.
        decision = registry.register_evaluated(candidate, "NAME", score, "d", ["v" * 64], registry.Floors(0, 0, 0))
    print(decision.alias, decision.version)
    """
).replace("NAME", NAME)


class _Constant(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input


@pytest.mark.slow
def test_two_processes_registering_at_once_leave_the_better_model_champion(tracking, tmp_path):
    runs = {}
    for quality in ("good", "bad"):
        with mlflow.start_run(tags={"quality": quality}) as run:
            mlflow.pyfunc.log_model(name="model", python_model=_Constant())
            mlflow.log_text(_manifest().to_csv(index=False), MANIFEST_FILE)  # trained on none of "v" * 64
            runs[quality] = run.info.run_id
    start = time.time() + 15  # both import pneumo first, then start together
    workers = {
        quality: subprocess.Popen(
            [sys.executable, "-c", WORKER, run_id, quality, str(start)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
            text=True,
        )
        for quality, run_id in runs.items()
    }
    outputs = {quality: worker.communicate(timeout=300) for quality, worker in workers.items()}
    for quality, worker in workers.items():
        assert worker.returncode == 0, outputs[quality][1][-3000:]
    client = MlflowClient()
    champion = client.get_model_version_by_alias(NAME, registry.CHAMPION)
    assert champion.run_id == runs["good"], {q: o[0] for q, o in outputs.items()}
    assert outputs["bad"][0].split()[0] == registry.CHALLENGER or champion.version != outputs["bad"][0].split()[1]


def _manifest() -> pd.DataFrame:
    """A manifest whose training split holds images a and b, and validation image c."""
    return pd.DataFrame(
        {
            "path": ["train/NORMAL/a.jpeg", "train/PNEUMONIA/b.jpeg", "train/NORMAL/c.jpeg"],
            "label_name": ["NORMAL", "PNEUMONIA", "NORMAL"],
            "label": [0, 1, 0],
            "patient_id": ["a", "b", "c"],
            "split": ["train", "train", "val"],
            "sha256": ["a" * 64, "b" * 64, "c" * 64],
            "width": 64,
            "height": 64,
            "mode": "L",
        }
    )


def test_registration_is_refused_when_validation_images_were_trained_on_or_that_cannot_be_checked(tracking):
    with mlflow.start_run() as run:
        mlflow.log_text(_manifest().to_csv(index=False), MANIFEST_FILE)
    with mlflow.start_run() as bare:  # a run that logged no manifest
        pass
    registry.check_no_training_overlap({"candidate": run.info.run_id}, ["c" * 64])  # no overlap: no error
    with pytest.raises(DataError, match=r"not registered: 1 validation image\(s\) were in the training split"):
        registry.check_no_training_overlap({"candidate": run.info.run_id}, ["b" * 64, "c" * 64])
    # A check that cannot be made fails loudly: an unknown run, or one without a manifest.
    with pytest.raises(DataError, match=r"champion v1's training images cannot be checked.*no training run"):
        registry.check_no_training_overlap({"candidate": run.info.run_id, "champion v1": None}, ["c" * 64])
    with pytest.raises(DataError, match=r"candidate's training images cannot be checked.*manifest of run"):
        registry.check_no_training_overlap({"candidate": bare.info.run_id}, ["c" * 64])


# --- the lock itself (issue 18 §5): beside the store, no links followed, the holder named --------


def test_the_lock_lives_beside_a_sqlite_store_and_names_its_holder(tracking, tmp_path):
    database = Path(tracking[len("sqlite:///") :])
    with registry.registry_lock(NAME):
        (lock,) = list(database.parent.glob(f".{database.name}.pneumo-registry-*.lock"))
        assert lock.read_text() == f"{os.getpid()} {socket.gethostname()}\n"
    assert lock.parent == database.parent  # not a predictable name in the shared temporary folder


def test_a_link_at_the_lock_path_is_refused_not_followed(tracking, tmp_path):
    lock = registry._lock_path(mlflow.get_registry_uri(), NAME)
    target = tmp_path / "someone-elses-file"
    target.write_text("precious")
    lock.symlink_to(target)
    with pytest.raises(PneumoError, match="is a symbolic link; not following it"):
        with registry.registry_lock(NAME):
            pytest.fail("the lock was taken through a link")
    assert target.read_text() == "precious"


def test_a_store_without_a_local_file_locks_in_a_private_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = tmp_path / "cache" / "pneumo" / "locks"
    folder.mkdir(parents=True, mode=0o755)
    folder.chmod(0o755)
    path = registry._lock_path("postgresql://mlflow@db.example/mlflow", NAME)
    assert path.parent == folder and stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert registry._lock_path("http://127.0.0.1:5000", NAME) != path  # one lock per registry


def test_a_waiting_process_says_who_holds_the_lock(tracking, caplog):
    held, release = threading.Event(), threading.Event()

    def hold():
        with registry.registry_lock(NAME):
            held.set()
            release.wait(60)

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(60)

    # flock locks belong to an open file, so a second open in this process waits like another process.
    def wait():
        with registry.registry_lock(NAME):
            pass

    waiter = threading.Thread(target=wait)
    with caplog.at_level(logging.WARNING, logger="pneumo.registry"):
        waiter.start()
        for _ in range(600):
            if "waiting for the registry lock" in caplog.text:
                break
            time.sleep(0.1)
        release.set()
        holder.join(60)
        waiter.join(60)
    assert f"waiting for the registry lock held by pid {os.getpid()} on host {socket.gethostname()}" in caplog.text
    assert not waiter.is_alive(), "the lock was not handed over"
