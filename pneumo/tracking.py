"""MLflow plumbing shared by the entry points: runs, tags, metrics and artifacts.

Manifests in MLflow (logging one, fetching the one a run logged) are :mod:`pneumo.manifests`' work.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import matplotlib.pyplot as plt
import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient
from mlflow.utils import name_utils

from pneumo.config import RunConfigs, json_text
from pneumo.runs import guarded

log = logging.getLogger(__name__)
ENTRY_POINT_TAG = "pneumo.entry_point"
# The artifact holding a run's single figures that are not headline metrics (see log_summary).
SUMMARY_TABLE = "summary.json"


def _is_generated_name(name: str | None) -> bool:
    """Whether ``name`` is empty or one MLflow made up (``unequaled-grub-968``), not one the user chose.

    MLflow has no public way to tell its made-up names apart, so this reads its word lists
    (``mlflow.utils.name_utils``, private); a test pinned to MLflow's version fails when they move.
    """
    if not name:
        return True
    parts = name.split("-")
    return (
        len(parts) == 3
        and parts[0] in name_utils._GENERATOR_PREDICATES
        and parts[1] in name_utils._GENERATOR_NOUNS
        and parts[2].isdigit()
    )


def _system_metrics(nested: bool) -> bool | None:
    """System metrics (CPU, memory, GPU where present) for top-level runs, unless the user set the variable."""
    if nested:
        return False
    return None if "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING" in os.environ else True


@contextlib.contextmanager
def start_run(configs: RunConfigs, nested: bool = False, run_name: str | None = None) -> Iterator[mlflow.ActiveRun]:
    """Start (or, under ``mlflow run``, resume) a run; log every config field and the entry-point tag.

    The code version is MLflow's own tag ``mlflow.source.git.commit``, set when the run is started
    from the checkout (``mlflow run`` or ``python -m entrypoints.X``). Top-level runs log MLflow's
    system metrics (``system/...``) unless ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING`` says otherwise.

    Args:
        configs: The run's configs: every field is logged as a param; the entry point is stored in
            the ``pneumo.entry_point`` tag.
        nested: Start a child run of the active run.
        run_name: Display name; defaults to :meth:`RunConfigs.describe` (also replacing the random name
            ``mlflow run`` gives, but not one the user chose with ``--run-name``).
    """
    client = MlflowClient()
    if run_name is None:
        resumed = os.environ.get("MLFLOW_RUN_ID") if not nested and mlflow.active_run() is None else None
        current = client.get_run(resumed).info.run_name if resumed else None
        run_name = configs.describe() if _is_generated_name(current) else current
    with (
        mlflow.start_run(nested=nested, run_name=run_name, log_system_metrics=_system_metrics(nested)) as run,
        guarded(run, nested),  # SIGTERM/SIGINT end the run KILLED (pneumo.runs)
    ):
        mlflow.set_tag(ENTRY_POINT_TAG, configs.entry_point)
        # Under `mlflow run` the entry point's parameters are already logged, shell-quoted (""
        # as "''"), and MLflow refuses to change a param: log only the others.
        logged = client.get_run(run.info.run_id).data.params
        mlflow.log_params({k: v for k, v in configs.params().items() if k not in logged})
        yield run


def code_version() -> str:
    """The git commit the active run's code came from (MLflow's ``mlflow.source.git.commit``), or empty."""
    return mlflow.active_run().data.tags.get("mlflow.source.git.commit", "")


def log_figure(figure: plt.Figure, artifact_file: str) -> None:
    """Log a matplotlib figure as a PNG artifact and close it."""
    mlflow.log_figure(figure, artifact_file)
    plt.close(figure)


def log_json(payload: Any, artifact_file: str) -> None:
    """Log a JSON-serialisable object as an artifact."""
    mlflow.log_text(json_text(payload), artifact_file)


def log_dataframe(frame: pd.DataFrame, artifact_file: str) -> None:
    """Log a DataFrame as a CSV artifact."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / Path(artifact_file).name
        frame.to_csv(path, index=False)
        mlflow.log_artifact(str(path), str(Path(artifact_file).parent) if "/" in artifact_file else None)


def log_summary(figures: dict[str, Any]) -> None:
    """Add single figures of the run (counts, sizes, timings, interval bounds, figures at 0.5) to its summary table.

    The table is the artifact :data:`SUMMARY_TABLE` (``mlflow.log_table``: one row per figure,
    columns ``figure`` and ``value``, appended to by each call), shown as a table on the run's
    artifacts tab. Only the headline figures users sort and compare runs on stay metrics: the run
    page draws one chart per metric, and dozens of single-value bar charts buried its curves.
    Undefined values are kept (NaN, stored as JSON null), as :func:`log_metrics` keeps them.
    """
    frame = pd.DataFrame({"figure": list(figures), "value": [float(value) for value in figures.values()]})
    mlflow.log_table(frame, SUMMARY_TABLE)


def read_summary(run_id: str) -> dict[str, float]:
    """A run's summary table (:func:`log_summary`) as ``{figure: value}``; empty when the run has none."""
    client = MlflowClient()
    if not any(item.path == SUMMARY_TABLE for item in client.list_artifacts(run_id)):
        return {}
    frame = client.load_table(client.get_run(run_id).info.experiment_id, SUMMARY_TABLE, run_ids=[run_id])
    return {str(name): float(value) for name, value in zip(frame["figure"], frame["value"].astype(float))}


def log_metrics(metrics: dict[str, Any], step: int | None = None) -> None:
    """Log metrics as floats, NaN included.

    The one policy for undefined values: they are logged, not dropped, because "NPV undefined at
    0.5 (nothing predicted normal)" or "training loss became NaN" is a finding.
    """
    mlflow.log_metrics({name: float(value) for name, value in metrics.items()}, step=step)
