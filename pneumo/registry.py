"""Model Registry: one registered name, the ``champion`` alias on the best model, ``challenger`` otherwise.

Promotion is decided on validation ROC AUC, recomputed for both models on the same validation
images (so a model evaluated on another manifest cannot win on an easier split). Only aliases
are used; MLflow's stages are deprecated. :func:`register_evaluated` is the whole of it: the
lookup, both AUCs, the registration, and what the evaluation run logs about it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import math
import os
import re
import socket
import stat
import tempfile
import urllib.parse
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import mlflow
import numpy as np
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pneumo import metrics, model_io, plots, tracking
from pneumo.errors import DataError, PneumoError
from pneumo.model_io import TrainedModel

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"

# Labels and probabilities of pneumonia of a model on the validation split both models are judged on.
Scorer = Callable[[TrainedModel], tuple[np.ndarray, np.ndarray]]


@dataclass
class Decision:
    """What registration did, as logged to the evaluation run."""

    registered_name: str
    version: str
    alias: str
    reason: str
    candidate_val_roc_auc: float
    champion_version: str | None
    champion_val_roc_auc: float | None

    def as_dict(self) -> dict:
        return asdict(self)


def current_champion(name: str) -> ModelVersion | None:
    """The version holding the ``champion`` alias of ``name``, or None (no model or no alias)."""
    client = MlflowClient()
    try:
        registered = client.get_registered_model(name)
    except MlflowException as error:
        if error.get_http_status_code() == 404:
            return None
        raise
    version = registered.aliases.get(CHAMPION)
    return client.get_model_version(name, version) if version is not None else None


def decide(candidate_auc: float, champion_auc: float | None) -> tuple[str, str]:
    """Alias for a new version, and why.

    Args:
        candidate_auc: Validation ROC AUC of the new model.
        champion_auc: The current champion's, on the same images; None when there is none.

    Returns:
        ``(alias, reason)``: ``champion`` only when the candidate is strictly better (or there is
        no champion yet), else ``challenger``.
    """
    if not math.isfinite(candidate_auc):
        return CHALLENGER, "the candidate's validation ROC AUC is undefined"
    if champion_auc is None:
        return CHAMPION, "there was no champion yet"
    if candidate_auc > champion_auc:
        return CHAMPION, f"validation ROC AUC {candidate_auc:.4f} beats the champion's {champion_auc:.4f}"
    return CHALLENGER, f"validation ROC AUC {candidate_auc:.4f} does not beat the champion's {champion_auc:.4f}"


def _lock_path(registry_uri: str, name: str) -> Path:
    """Where the registration lock of ``name`` in this registry lives: beside the store, else in a private folder.

    A SQLite store keeps it beside its database file and a local file store beside its folder
    (everyone who can write the store can take the lock); any other store (a tracking server,
    PostgreSQL) uses ``~/.cache/pneumo/locks``, made 0700. Never a predictable name in a shared
    temporary folder, where another user could hold it or plant a link.
    """
    key = hashlib.sha256(f"{registry_uri}|{name}".encode()).hexdigest()[:16]
    local = None
    if registry_uri.startswith("sqlite:///"):
        database = registry_uri[len("sqlite:///") :].split("?", 1)[0]
        local = Path(database) if database and database != ":memory:" else None
    elif registry_uri.startswith("file:") or "://" not in registry_uri:
        local = Path(urllib.parse.urlparse(registry_uri).path if registry_uri.startswith("file:") else registry_uri)
    if local is not None and local.parent.is_dir():
        return local.parent / f".{local.name}.pneumo-registry-{key}.lock"
    folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pneumo" / "locks"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    status = os.lstat(folder)
    if not stat.S_ISDIR(status.st_mode) or status.st_uid != os.getuid():
        raise PneumoError(f"the lock folder {folder} is not a folder of this user; remove it")
    if status.st_mode & 0o077:
        os.chmod(folder, 0o700)
    return folder / f"registry-{key}.lock"


def _holder(text: bytes) -> tuple[str, str]:
    """Pid and host written in a lock file, each only when it looks like one (the file is not trusted)."""
    fields = text.decode("ascii", "replace").split() + ["", ""]
    pid = fields[0] if fields[0].isdigit() else "unknown"
    host = fields[1] if re.fullmatch(r"[A-Za-z0-9.-]{1,64}", fields[1]) else "unknown"
    return pid, host


@contextlib.contextmanager
def registry_lock(name: str) -> Iterator[None]:
    """Hold an exclusive lock on the registration decision for ``name`` (this registry, this machine).

    Two evaluations registering at once both saw no champion, and the worse model ended as
    champion. The lock serialises read-compare-move between processes on one machine (a file lock
    placed by :func:`_lock_path`); across machines, :func:`register_evaluated` still re-reads the
    alias right before moving it. The file is opened without following links, and the holder
    writes its host and pid into it, so a waiting process says whom it waits for.

    Raises:
        PneumoError: The lock path is a link, or cannot be opened.
    """
    path = _lock_path(mlflow.get_registry_uri(), name)
    flags = os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT | flags, 0o644)
        except PermissionError:  # another user's lock beside a shared store: lockable, not writable
            descriptor = os.open(path, os.O_RDONLY | flags)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise PneumoError(f"the registry lock {path} is a symbolic link; not following it (remove it)") from error
        raise PneumoError(f"cannot open the registry lock {path} ({error.strerror})") from error
    writable = os.access(path, os.W_OK, follow_symlinks=False)
    with os.fdopen(descriptor, "r+b" if writable else "rb") as handle:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise PneumoError(f"the registry lock {path} is not a regular file (remove it)")
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid, host = _holder(handle.read(200))
            log.warning("waiting for the registry lock held by pid %s on host %s (%s)", pid, host, path)
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        try:
            if writable:  # whom the next waiter waits for
                handle.seek(0)
                handle.truncate()
                handle.write(f"{os.getpid()} {socket.gethostname()}\n".encode())
                handle.flush()
            yield
        finally:
            fcntl.flock(descriptor, fcntl.LOCK_UN)


def check_no_training_overlap(models: dict[str, str | None], validation_hashes: Iterable[str]) -> None:
    """Refuse when validation images (by content hash) were in a model's training split.

    Args:
        models: Label ("candidate", "champion v3") -> training run id (None: unknown, not checked).
        validation_hashes: SHA-256 of the validation images both models are judged on.

    Raises:
        DataError: Naming the model, its run and how many validation images it trained on.
    """
    hashes = set(validation_hashes)
    for label, run_id in models.items():
        if not run_id:
            continue
        try:
            trained_on = tracking.run_manifest_frame(run_id)
        except Exception as error:  # another tracking server, or a run without a manifest
            log.warning("cannot check %s (run %s) for training overlap: %s", label, run_id, error)
            continue
        overlap = int(trained_on.loc[trained_on["split"] == "train", "sha256"].isin(hashes).sum())
        if overlap:
            raise DataError(
                f"not registered: {overlap} validation image(s) were in the training split of the {label} "
                f"(run {run_id}), so its validation ROC AUC is optimistic; evaluate with a manifest whose "
                "validation split neither model trained on"
            )


def register_evaluated(
    trained: TrainedModel,
    name: str,
    score: Scorer,
    manifest_digest: str,
    validation_hashes: Iterable[str] | None = None,
) -> Decision | None:
    """Register under :func:`registry_lock`; see :func:`_register_evaluated` for the arguments.

    ``validation_hashes`` (the validation images' SHA-256), when given, are checked against both
    models' training splits first (:func:`check_no_training_overlap`).
    """
    with registry_lock(name):
        return _register_evaluated(trained, name, score, manifest_digest, validation_hashes)


def _register_evaluated(
    trained: TrainedModel,
    name: str,
    score: Scorer,
    manifest_digest: str,
    validation_hashes: Iterable[str] | None = None,
) -> Decision | None:
    """Register an evaluated model as a new version of ``name`` and set its alias; log why to the active run.

    The candidate's and the current champion's validation ROC AUC are both computed by ``score``
    (on the same images); ``champion`` moves only to a strictly better model (see :func:`decide`).
    The run logs ``registration.json``, the two AUCs as metrics, tags ``pneumo.registered_version``
    and ``pneumo.alias``, and both ROC curves.

    Args:
        trained: The evaluated model.
        name: Registered model name (e.g. ``pneumonia-classifier``).
        score: Predicts the validation split with a model.
        manifest_digest: Digest of the manifest whose validation split is used.

    Returns:
        The decision, or None when this model (same run) already is the champion.
    """
    champion = current_champion(name)
    if champion is not None and trained.run_id and champion.run_id == trained.run_id:
        log.info(
            "run %s already is %s@%s (version %s); nothing registered", trained.run_id, name, CHAMPION, champion.version
        )
        mlflow.set_tag("pneumo.registration", f"already champion (version {champion.version})")
        return None
    if validation_hashes is not None:
        runs = {"candidate": trained.run_id}
        if champion is not None:
            runs[f"champion v{champion.version}"] = champion.run_id
        check_no_training_overlap(runs, validation_hashes)
    labels, probabilities = score(trained)
    candidate_auc = metrics.roc_auc(labels, probabilities)
    candidate_label = f"candidate ({trained.run_id[:8] if trained.run_id else trained.uri})"
    curves = {candidate_label: (labels, probabilities)}
    champion_auc = None
    for _ in range(3):  # the alias may move while we score (another machine): compare with what holds it
        curves = {candidate_label: (labels, probabilities)}
        champion_auc = None
        if champion is not None:
            # The version read, not the alias: its AUC must come from the version recorded.
            champion_curve = score(model_io.load_trained_model(f"models:/{name}/{champion.version}"))
            champion_auc = metrics.roc_auc(*champion_curve)
            curves[f"champion v{champion.version}"] = champion_curve
        latest = current_champion(name)
        if getattr(latest, "version", None) == getattr(champion, "version", None):
            break
        log.warning("the %s alias moved while scoring; comparing again", CHAMPION)
        champion = latest
    decision = _register_version(
        f"models:/{trained.model_id}" if trained.model_id else trained.uri,
        name,
        candidate_auc,
        champion,
        champion_auc,
        tags={
            "val_roc_auc": f"{candidate_auc:.6f}",
            "manifest_digest": manifest_digest,
            "evaluation_run_id": mlflow.active_run().info.run_id,
        },
    )
    tracking.log_metrics({"registration_candidate_val_roc_auc": candidate_auc})
    if champion_auc is not None:
        tracking.log_metrics({"registration_champion_val_roc_auc": champion_auc})
    mlflow.set_tags({"pneumo.registered_version": decision.version, "pneumo.alias": decision.alias})
    tracking.log_json(
        {**decision.as_dict(), "manifest_digest": manifest_digest, "n_val_images": int(len(labels))},
        "registration.json",
    )
    tracking.log_figure(
        plots.plot_registration(curves, f"Registration: validation ROC ({decision.alias}: {decision.reason})"),
        "plots/registration_roc.png",
    )
    return decision


def _register_version(
    model_uri: str,
    name: str,
    candidate_auc: float,
    champion: ModelVersion | None,
    champion_auc: float | None,
    tags: dict[str, str],
) -> Decision:
    """Register ``model_uri`` as a new version of ``name`` and point an alias at it.

    Args:
        model_uri: The evaluated model.
        name: Registered model name (e.g. ``pneumonia-classifier``).
        candidate_auc: The new model's validation ROC AUC.
        champion: The current champion version, if any.
        champion_auc: Its validation ROC AUC on the same images (None without a champion).
        tags: Tags for the new version (evaluation run, manifest digest, ...).

    Returns:
        The decision, including the new version number.
    """
    alias, reason = decide(candidate_auc, champion_auc if champion is not None else None)
    version = mlflow.register_model(model_uri, name, tags=tags)
    client = MlflowClient()
    client.set_registered_model_alias(name, alias, version.version)
    client.update_model_version(name, version.version, description=f"{alias}: {reason}.")
    log.info("registered %s version %s as %s: %s", name, version.version, alias, reason)
    return Decision(
        registered_name=name,
        version=str(version.version),
        alias=alias,
        reason=reason,
        candidate_val_roc_auc=float(candidate_auc),
        champion_version=str(champion.version) if champion is not None else None,
        champion_val_roc_auc=None if champion_auc is None else float(champion_auc),
    )


def register_site_version(trained: TrainedModel, name: str, alias: str, details: dict, example_file: Path) -> str:
    """Register the evaluated model again, carrying a site's own threshold, under ``alias``.

    The Keras weights are the evaluated model's; only ``threshold`` in ``model_config.json`` (and a
    ``site_calibration`` record) differ. The model is logged to the active (evaluation) run and
    registered as a new version, so the evaluated version and its aliases stay untouched.

    Args:
        trained: The evaluated model.
        name: Registered model name.
        alias: Alias for the new version (e.g. ``site``).
        details: The calibration: ``threshold``, target, sample, counts and intervals.
        example_file: An image file for the logged input example.

    Returns:
        The new version number.
    """
    config = {**trained.config, "threshold": float(details["threshold"]), "site_calibration": details}
    with tempfile.TemporaryDirectory() as folder:
        keras_path = Path(folder) / "model.keras"
        trained.model.save(keras_path)
        info = model_io.log_model(keras_path, config, example_file, name="site_model")
    version = mlflow.register_model(
        info.model_uri,
        name,
        tags={
            "pneumo.site_threshold": f"{details['threshold']:.6f}",
            "pneumo.site_target_sensitivity": str(details["target_sensitivity"]),
            "pneumo.calibrated_from": trained.uri,
            "evaluation_run_id": mlflow.active_run().info.run_id,
        },
    )
    client = MlflowClient()
    client.set_registered_model_alias(name, alias, version.version)
    client.update_model_version(
        name,
        version.version,
        description=(
            f"{alias}: {trained.uri} with the threshold {details['threshold']:.4f} chosen for sensitivity "
            f">= {details['target_sensitivity']} on {details['sample']} ({details['n_pneumonia']} pneumonia "
            f"of {details['n_images']} images)."
        ),
    )
    mlflow.set_tags({"pneumo.site_version": str(version.version), "pneumo.site_alias": alias})
    tracking.log_json(
        {**details, "registered_name": name, "version": str(version.version), "alias": alias}, "site_calibration.json"
    )
    log.info(
        "registered %s version %s as %s with site threshold %.4f", name, version.version, alias, details["threshold"]
    )
    return str(version.version)
