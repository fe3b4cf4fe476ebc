"""The Optuna study behind ``tune``: storage, sampler, pruner and the trial budget; free of TensorFlow.

``n_trials`` is the number of finished (complete or pruned) trials the *study* should hold.
Optuna's ``MaxTrialsCallback`` is not enough for that: by default it counts only complete
trials (pruned ones never fill the budget), and whatever states it counts it runs only after a
trial ends, so two workers can both start a trial for the last place. Here complete, pruned and
running trials count (stale running trials of dead workers are failed first, see
:func:`claimed`), and a trial whose number shows it was created after the study was already
full (two workers asking at the same instant) is dropped before training, recorded as failed.
The total is therefore exact.

Kept apart from :mod:`pneumo.tune` (the entry point, which trains) so that opening a storage, as
the gRPC proxy (:mod:`pneumo.optuna_proxy`) does, imports no TensorFlow.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import sqlalchemy
from optuna.exceptions import ExperimentalWarning
from optuna.trial import FrozenTrial, TrialState

from pneumo import tune_recovery
from pneumo.config import HIGHER_IS_BETTER, TuneConfig
from pneumo.errors import ConfigError

# Trials that hold a place in the study's n_trials budget.
_CLAIMING = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
# A worker killed without cleanup leaves a RUNNING trial; its heartbeat stops and after the
# grace period another worker marks it failed, so it no longer holds a place.
_HEARTBEAT_S = 60
_GRACE_S = 300


class SurplusTrial(RuntimeError):
    """A trial created after the study already held ``n_trials`` trials (a worker race)."""


class TrialSeededTPESampler(optuna.samplers.BaseSampler):
    """Optuna's TPE sampler with its random stream seeded per trial from ``(seed, trial number)``.

    ``TPESampler(seed=s)`` replays the same stream in every process, so a resumed study or a
    second worker would propose again the parameters of the first random start-up trials.
    Trial numbers are unique within a storage, so seeding from them keeps every draw new while
    the search stays reproducible for a given sequence of trials.

    Args:
        seed: Base seed (``DataConfig.seed``).
    """

    def __init__(self, seed: int):
        self._seed = seed
        self._tpe = self._make(0)

    def _make(self, number: int) -> optuna.samplers.TPESampler:
        trial_seed = int(np.random.SeedSequence([self._seed, number]).generate_state(1)[0])
        return optuna.samplers.TPESampler(seed=trial_seed)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._tpe = self._make(trial.number)
        self._tpe.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._tpe.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._tpe.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._tpe.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values):
        self._tpe.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._tpe.reseed_rng()


JOURNAL_PREFIX = "journal:"
GRPC_PREFIX = "grpc://"


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """Open the Optuna storage ``url`` names.

    - ``journal:PATH`` (``journal:outputs/optuna.log``, ``journal:///abs/path.log``): Optuna's
      ``JournalStorage`` on an append-only file, its choice for several worker processes on one
      machine. It has no heartbeats: a trial of a killed worker stays running.
    - ``grpc://HOST:PORT``: Optuna's gRPC storage proxy (``python -m pneumo.optuna_proxy``), for
      many workers on many machines in front of one database.
    - Anything else is a SQLAlchemy URL (``sqlite:///...``, ``postgresql://...``), opened as an
      RDB storage with heartbeats; the folder of a SQLite file is created.

    Raises:
        ConfigError: The URL cannot be parsed.
    """
    if url.startswith(JOURNAL_PREFIX):
        path = Path(url[len(JOURNAL_PREFIX) :].removeprefix("//")).expanduser()
        if not path.name:
            raise ConfigError(f"storage {url!r} names no journal file (e.g. journal:outputs/optuna.log)")
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    if url.startswith(GRPC_PREFIX):
        host, _, port = url[len(GRPC_PREFIX) :].rstrip("/").rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"storage {url!r} is not grpc://HOST:PORT")
        return optuna.storages.GrpcStorageProxy(host=host, port=int(port))
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError as error:
        raise ConfigError(f"storage {url!r} is not a database URL: {error}") from error
    engine_kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        # Parallel workers on one SQLite file wait for its lock instead of failing at once.
        engine_kwargs["connect_args"] = {"timeout": 60}

    def create() -> optuna.storages.RDBStorage:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url, engine_kwargs=engine_kwargs, heartbeat_interval=_HEARTBEAT_S, grace_period=_GRACE_S
            )

    for attempt in range(4):
        try:
            # The wrapper create_study would put around it: the study and claimed() share one object.
            return optuna.storages.get_storage(create())
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError):
            # Workers started together on a new database race to create its schema; the loser
            # finds it created on a later attempt.
            time.sleep(0.5 * (attempt + 1))
    return optuna.storages.get_storage(create())


def masked(url: str) -> str:
    """The storage URL with its password hidden (it is logged as an MLflow param)."""
    if url.startswith((JOURNAL_PREFIX, GRPC_PREFIX)):
        return url
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return url


def make_pruner(tune: TuneConfig) -> optuna.pruners.BasePruner:
    """The configured pruner (see ``TuneConfig.pruner``)."""
    if tune.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=tune.pruner_startup_trials, n_warmup_steps=tune.pruner_warmup_epochs
        )
    if tune.pruner == "threshold":
        bound = {"lower" if HIGHER_IS_BETTER[tune.objective] else "upper": tune.prune_threshold}
        return optuna.pruners.ThresholdPruner(**bound, n_warmup_steps=tune.pruner_warmup_epochs)
    return optuna.pruners.NopPruner()


def open_study(tune: TuneConfig, seed: int, storage: optuna.storages.BaseStorage) -> optuna.Study:
    """Create the study, or load it when it exists (resume, or join other workers).

    Args:
        tune: Study name, objective and pruner.
        seed: Base seed of the sampler.
        storage: The storage :func:`open_storage` opened; the caller keeps it for :func:`claimed`.

    Raises:
        ConfigError: The existing study optimises in the other direction (another objective).
    """
    direction = "maximize" if HIGHER_IS_BETTER[tune.objective] else "minimize"
    study = optuna.create_study(
        study_name=tune.study_name,
        storage=storage,
        direction=direction,
        sampler=TrialSeededTPESampler(seed),
        pruner=make_pruner(tune),
        load_if_exists=True,
    )
    if study.direction.name.lower() != direction:
        raise ConfigError(
            f"study {tune.study_name!r} in {masked(tune.storage)} is set to {study.direction.name.lower()}, "
            f"but objective {tune.objective!r} must {direction}; choose another study_name"
        )
    study.set_user_attr("objective", tune.objective)
    return study


def claimed(study: optuna.Study, storage: optuna.storages.BaseStorage, below: int | None = None) -> int:
    """Count the trials holding a place in the study: complete, pruned or running.

    Running trials of dead workers (no heartbeat for the grace period) are marked failed first.

    Args:
        study: The study.
        storage: Its storage, as opened by :func:`open_storage`.
        below: Count only trials numbered below this.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    tune_recovery.recover(study, storage)  # dead workers on this machine at once; close their MLflow runs
    trials = study.get_trials(deepcopy=False, states=_CLAIMING)
    return sum(1 for t in trials if below is None or t.number < below)


class StopWhenFull:
    """Optuna callback: stop this worker once the study holds ``n_trials`` trials."""

    def __init__(self, n_trials: int, storage: optuna.storages.BaseStorage):
        self.n_trials = n_trials
        self.storage = storage

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if claimed(study, self.storage) >= self.n_trials:
            study.stop()
