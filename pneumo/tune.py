"""Entry point ``tune``: Optuna search over the learning rate and augmentation ranges of ``aug_cnn``.

The ``tune`` run is the MLflow parent; every Optuna trial is a nested run trained by the one
training loop (:func:`pneumo.training.train_model`) on images decoded once per process. The
study (storage, sampler, pruner, the exact ``n_trials`` budget) is :mod:`pneumo.tuning`'s: it
lives in an Optuna storage (SQLite by default, for one worker; a journal file for several workers
on one machine; a database URL or Optuna's gRPC proxy for workers on several machines), so an
interrupted search resumes and parallel workers share one study.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
from typing import Any

import keras
import mlflow
import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState
from optuna_integration import KerasPruningCallback
from sklearn.metrics import log_loss

from pneumo import metrics, models, plots, tracking, tune_recovery
from pneumo.config import (
    AugmentConfig,
    CNNConfig,
    DataConfig,
    RunConfigs,
    TrainConfig,
    TuneConfig,
    replace_across,
    replace_fields,
)
from pneumo.training import TrainingData, load_training_data, train_model
from pneumo.tune_recovery import RUN_ID_ATTR, STATE_TAG
from pneumo.tuning import StopWhenFull, SurplusTrial, claimed, masked, open_storage, open_study

log = logging.getLogger(__name__)

TRIAL_ENTRY_POINT = "tune_trial"
NUMBER_TAG = "optuna.trial_number"
STUDY_TAG = "optuna.study_name"


class _PruneOnDivergence(keras.callbacks.Callback):
    """Stop a trial whose training loss is no longer finite, as pruned.

    A learning rate that makes the loss explode is an unpromising region of the search space,
    not a crash: recording it as pruned lets TPE learn to avoid it and lets the study go on.
    """

    def on_epoch_end(self, epoch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise optuna.TrialPruned(f"training loss diverged ({float(loss)}) in epoch {epoch}")


def suggest(trial: optuna.Trial, tune: TuneConfig) -> dict[str, Any]:
    """Draw one point of the search space; names are the config fields they set.

    Args:
        trial: The Optuna trial.
        tune: Search bounds.

    Returns:
        ``{field name: value}`` for ``TrainConfig``, ``AugmentConfig`` and ``CNNConfig`` fields.
    """
    params: dict[str, Any] = {
        "learning_rate": trial.suggest_float("learning_rate", tune.lr_low, tune.lr_high, log=True),
        "rotation": trial.suggest_float("rotation", 0.0, tune.rotation_max),
        "width_shift": trial.suggest_float("width_shift", 0.0, tune.shift_max),
        "height_shift": trial.suggest_float("height_shift", 0.0, tune.shift_max),
        "zoom": trial.suggest_float("zoom", 0.0, tune.zoom_max),
        "brightness_low": trial.suggest_float("brightness_low", 1.0 - tune.brightness_max, 1.0),
        "brightness_high": trial.suggest_float("brightness_high", 1.0, 1.0 + tune.brightness_max),
        "contrast": trial.suggest_float("contrast", 0.0, tune.contrast_max),
        "gamma": trial.suggest_float("gamma", 0.0, tune.gamma_max),
    }
    if tune.search_batch_and_dropout:
        params["batch_size"] = trial.suggest_categorical("batch_size", tune.batch_size_choices())
        params["dropout"] = trial.suggest_float("dropout", 0.0, tune.dropout_max)
    return params


def trial_configs(
    train: TrainConfig, augment: AugmentConfig, cnn: CNNConfig, tune: TuneConfig, params: dict[str, Any]
) -> tuple[TrainConfig, AugmentConfig, CNNConfig]:
    """The configs one trial trains with: the base configs with the drawn parameters applied.

    Early stopping and checkpointing follow the objective, so the weights a trial keeps are the
    ones its value is measured on.

    Raises:
        ConfigError: A parameter name is a field of none of the configs.
    """
    train, augment, cnn = replace_across(params, train, augment, cnn)
    return replace_fields(train, monitor=tune.objective), augment, cnn


def objective_value(
    objective: str, labels: np.ndarray, probabilities: np.ndarray, val_metrics: dict[str, float]
) -> float:
    """The trial's value on the validation split: exact ROC AUC, or binary cross-entropy."""
    if objective == "val_auc":
        return float(val_metrics["val_roc_auc"])
    return float(log_loss(labels, probabilities, labels=[0, 1]))


class Objective:
    """One Optuna trial: a nested MLflow run training ``aug_cnn`` with the drawn parameters.

    Args:
        data: Data settings (shared by every trial).
        train: Base optimisation settings.
        augment: Base augmentation (the searched ranges are replaced per trial).
        cnn: Base network settings.
        tune: Search settings.
        images: The decoded training and validation images, shared by all trials.
        storage: The study's storage (for the budget count).
    """

    def __init__(
        self,
        data: DataConfig,
        train: TrainConfig,
        augment: AugmentConfig,
        cnn: CNNConfig,
        tune: TuneConfig,
        images: TrainingData,
        storage: optuna.storages.BaseStorage,
    ):
        self.data, self.train, self.augment, self.cnn, self.tune = data, train, augment, cnn, tune
        self.images = images
        self.storage = storage
        self.run_ids: list[str] = []

    def __call__(self, trial: optuna.Trial) -> float:
        if claimed(trial.study, self.storage, below=trial.number) >= self.tune.n_trials:
            trial.study.stop()
            raise SurplusTrial(f"trial {trial.number} was created after the study reached {self.tune.n_trials} trials")
        params = suggest(trial, self.tune)
        train, augment, cnn = trial_configs(self.train, self.augment, self.cnn, self.tune, params)
        pruned: optuna.TrialPruned | None = None
        configs = RunConfigs(TRIAL_ENTRY_POINT, self.data, train, augment, cnn)
        with tracking.start_run(configs, nested=True, run_name=f"trial-{trial.number}") as run:
            self.run_ids.append(run.info.run_id)
            trial.set_user_attr(RUN_ID_ATTR, run.info.run_id)
            tune_recovery.mark_worker(trial)
            mlflow.set_tags({STUDY_TAG: self.tune.study_name, NUMBER_TAG: str(trial.number)})
            # Each trial builds a new graph; without this Keras keeps every earlier model alive.
            keras.backend.clear_session()
            try:
                result = train_model(
                    configs,
                    lambda: models.build_aug_cnn(self.data.image_size, self.data.channels, cnn),
                    self.images,
                    extra_callbacks=[_PruneOnDivergence(), KerasPruningCallback(trial, self.tune.objective)],
                    tuning_trial=True,
                )
            except optuna.TrialPruned as error:
                # Ended inside the run, so the nested run finishes cleanly and reads as pruned.
                pruned = error
                mlflow.set_tags({STATE_TAG: TrialState.PRUNED.name, "optuna.pruned_reason": str(error)})
                last = _last_report(trial)
                if last is not None:
                    tracking.log_metrics({"pruned_at_epoch": last[0], "objective_value": last[1]})
            else:
                value = objective_value(
                    self.tune.objective, self.images.val.labels, result.val_probabilities, result.val_metrics
                )
                headline, details = metrics.split_headline(result.val_metrics, "val")
                tracking.log_metrics({**headline, "threshold": result.threshold, "objective_value": value})
                tracking.log_summary(details)
                mlflow.set_tag(STATE_TAG, TrialState.COMPLETE.name)
        if pruned is not None:
            raise pruned
        return value


def _last_report(trial: optuna.Trial) -> tuple[int, float] | None:
    """The last ``(epoch, value)`` the trial reported to the pruner, if any."""
    for frozen in trial.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if frozen.number == trial.number and frozen.last_step is not None:
            return frozen.last_step, frozen.intermediate_values[frozen.last_step]
    return None


def log_study_plots(study: optuna.Study) -> list[str]:
    """Log Optuna's plots of the study to the active run as ``plots/optuna_*.png``.

    Returns:
        One line per plot the study cannot support yet, saying why (never fatal).
    """
    figures, skipped = plots.plot_study(study)
    for name, figure in figures.items():
        tracking.log_figure(figure, f"plots/optuna_{name}.png")
    for line in skipped:
        log.info("plot skipped: %s", line)
    return skipped


def log_study_summary(study: optuna.Study, tune: TuneConfig) -> FrozenTrial | None:
    """Log the study as it stands to the active (parent) run.

    Logs trial counts, ``trials.csv`` (every trial with params, values, states and its MLflow
    run id), the plots, and for the best completed trial ``best_<param>`` params, ``best_value``
    and ``best_params.json``.

    Returns:
        The best completed trial, or None when no trial has completed.
    """
    trials = study.get_trials(deepcopy=False)
    counts = {state: sum(t.state == state for t in trials) for state in TrialState}
    tracking.log_metrics(
        {
            "n_trials_complete": counts[TrialState.COMPLETE],
            "n_trials_pruned": counts[TrialState.PRUNED],
            "n_trials_failed": counts[TrialState.FAIL],
            "n_trials_running": counts[TrialState.RUNNING],
        }
    )
    if trials:
        tracking.log_dataframe(study.trials_dataframe(), "trials.csv")
    skipped = log_study_plots(study)
    if skipped:
        mlflow.log_text("\n".join(skipped) + "\n", "plots/skipped_plots.txt")
    if not counts[TrialState.COMPLETE]:
        log.warning("study %s has no completed trial yet: no best parameters", tune.study_name)
        return None
    best = study.best_trial
    mlflow.log_params({f"best_{name}": value for name, value in best.params.items()})
    tracking.log_metrics({"best_value": best.value, "best_trial_number": best.number})
    mlflow.set_tag("optuna.best_trial_run_id", best.user_attrs.get(RUN_ID_ATTR, ""))
    tracking.log_json(
        {
            "study_name": tune.study_name,
            "objective": tune.objective,
            "direction": study.direction.name.lower(),
            "value": best.value,
            "trial_number": best.number,
            "params": best.params,
            "mlflow_run_id": best.user_attrs.get(RUN_ID_ATTR),
        },
        "best_params.json",
    )
    return best


def retrain(
    data: DataConfig,
    train: TrainConfig,
    augment: AugmentConfig,
    cnn: CNNConfig,
    tune: TuneConfig,
    best: FrozenTrial,
    parent_run_id: str,
    manifest_logged: bool,
) -> str:
    """Train ``aug_cnn`` with the best parameters in a nested run logged like an ``aug_cnn`` run.

    The nested run carries the effective configuration as its params, so its params describe
    its model (the parent's params are the search's base configuration). It logs the manifest
    it trains on, as ``aug_cnn`` does: the parent's (the trials') when ``manifest_logged``.

    Returns:
        The nested run's id; its model is ``runs:/<id>/model``.
    """
    train_b, augment_b, cnn_b = trial_configs(train, augment, cnn, tune, best.params)
    if manifest_logged:  # the parent logged the trials' manifest: reuse it, no second discovery
        data = replace_fields(data, manifest=parent_run_id)
    configs = RunConfigs("aug_cnn", data, train_b, augment_b, cnn_b)
    with tracking.start_run(configs, nested=True, run_name=f"best-trial-{best.number}") as run:
        mlflow.set_tags({STUDY_TAG: tune.study_name, NUMBER_TAG: str(best.number), "pneumo.tuned_by": parent_run_id})
        keras.backend.clear_session()
        result = train_model(configs, lambda: models.build_aug_cnn(data.image_size, data.channels, cnn_b))
        mlflow.set_tag(
            "mlflow.note.content",
            f"aug_cnn retrained with the best parameters of Optuna study {tune.study_name!r} "
            f"(trial {best.number}). {result.summary()}",
        )
        return run.info.run_id


def run_name(train: TrainConfig, tune_config: TuneConfig) -> str:
    """``tune-aug_cnn-30trials-12ep``: the study, its size and each trial's epochs."""
    return f"tune-{tune_config.study_name}-{tune_config.n_trials}trials-{train.epochs}ep"


def tune(data: DataConfig, train: TrainConfig, augment: AugmentConfig, cnn: CNNConfig, tune_config: TuneConfig) -> str:
    """Entry point ``tune``: Optuna search over learning rate and augmentation, trials as nested runs.

    Args:
        data: Data settings; the images are decoded once and shared by all trials.
        train: Base optimisation settings (``learning_rate`` and, optionally, ``batch_size`` are
            searched; ``epochs`` and the rest apply to every trial).
        augment: Base augmentation (every range but ``flip`` is searched).
        cnn: Network settings (``dropout`` optionally searched).
        tune_config: Study, search space, pruner and storage settings.

    Returns:
        The id of the parent MLflow run.
    """
    logged_tune = dataclasses.replace(tune_config, storage=masked(tune_config.storage))
    name = run_name(train, tune_config)
    with tracking.start_run(RunConfigs("tune", data, train, augment, cnn, logged_tune, name=name)) as parent:
        storage = open_storage(tune_config.storage)
        study = open_study(tune_config, data.seed, storage)
        mlflow.set_tags(
            {
                STUDY_TAG: tune_config.study_name,
                "optuna.storage": masked(tune_config.storage),
                "optuna.objective": tune_config.objective,
            }
        )
        remaining = tune_config.n_trials - claimed(study, storage)
        runner = None
        if remaining > 0:
            runner = Objective(data, train, augment, cnn, tune_config, load_training_data(data), storage)
            log.info(
                "study %s: running up to %d trial(s) towards %d",
                tune_config.study_name,
                remaining,
                tune_config.n_trials,
            )
            study.optimize(
                runner,
                n_trials=remaining,
                timeout=tune_config.timeout or None,
                catch=(SurplusTrial,),
                callbacks=[StopWhenFull(tune_config.n_trials, storage)],
                gc_after_trial=True,
                # tqdm redraws with carriage returns: a bar for terminals, Optuna's log lines otherwise.
                show_progress_bar=sys.stderr.isatty(),
            )
        else:
            log.info("study %s already holds %d trial(s); nothing to run", tune_config.study_name, tune_config.n_trials)
        tracking.log_metrics({"n_trials_this_worker": len(runner.run_ids) if runner else 0})
        best = log_study_summary(study, tune_config)
        note = f"Optuna study {tune_config.study_name!r} ({tune_config.objective}): "
        if best is None:
            note += "no completed trial yet."
        else:
            note += f"best value {best.value:.4f} in trial {best.number} with " + json.dumps(
                {k: round(v, 6) if isinstance(v, float) else v for k, v in best.params.items()}
            )
            if tune_config.retrain_best:
                run_id = retrain(data, train, augment, cnn, tune_config, best, parent.info.run_id, runner is not None)
                mlflow.set_tag("pneumo.best_model_uri", f"runs:/{run_id}/model")
                note += f" Retrained model: runs:/{run_id}/model."
        mlflow.set_tag("mlflow.note.content", note)
        return parent.info.run_id
