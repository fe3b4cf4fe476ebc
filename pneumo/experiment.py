"""Where runs land: the named experiment ``pneumo`` (not ``Default``).

:class:`PneumoExperimentProvider` is an MLflow default-experiment provider, registered in
``pyproject.toml`` under the entry-point group ``mlflow.default_experiment_provider``. MLflow asks
it only when the user chose no experiment: ``MLFLOW_EXPERIMENT_NAME``, ``MLFLOW_EXPERIMENT_ID``,
``mlflow.set_experiment`` and ``mlflow run --experiment-name/--experiment-id`` all win. It applies
in this project's folder (where the ``mlflow run .`` launcher creates the run before the entry
point starts), so other MLflow code in the same environment keeps MLflow's own default. An entry
point started directly (``python -m entrypoints.X``) calls :func:`use_default_experiment`.

Kept free of heavy imports: MLflow imports this module whenever it is imported itself.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_EXPERIMENT = "pneumo"


def use_default_experiment() -> None:
    """Make ``pneumo`` the active experiment of this process unless the user chose one.

    For an entry point started without ``mlflow run`` (``python -m entrypoints.X``); under
    ``mlflow run`` the launcher has already chosen (``MLFLOW_EXPERIMENT_ID``), through
    :class:`PneumoExperimentProvider` when the user did not.
    """
    import mlflow

    if os.environ.get("MLFLOW_EXPERIMENT_NAME") or os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return
    mlflow.set_experiment(experiment_id=default_experiment_id())


def _in_project_folder() -> bool:
    try:
        text = (Path.cwd() / "MLproject").read_text()
    except OSError:
        return False
    return any(line.strip() == "name: pneumo" for line in text.splitlines())


def default_experiment_id() -> str:
    """The id of the experiment ``pneumo`` in the current tracking store, created when missing."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    experiment = client.get_experiment_by_name(DEFAULT_EXPERIMENT)
    if experiment is None:
        try:
            return client.create_experiment(DEFAULT_EXPERIMENT)
        except MlflowException:  # another process (a parallel tune worker) created it first
            experiment = client.get_experiment_by_name(DEFAULT_EXPERIMENT)
            if experiment is None:
                raise
    return experiment.experiment_id


class PneumoExperimentProvider:
    """MLflow default-experiment provider: ``pneumo`` in this project's folder and in its entry points."""

    def in_context(self) -> bool:
        return _in_project_folder()

    def get_experiment_id(self) -> str:
        return default_experiment_id()
