"""Model Registry: one registered name, ``champion`` on the best model that clears the floors, ``challenger`` otherwise.

Promotion is decided on validation figures recomputed for both models on the same validation
images (so a model evaluated on another manifest cannot win on an easier split): a candidate
becomes champion only if it clears absolute floors of sensitivity, specificity and ROC AUC at its
own threshold (even when there is no champion yet) and beats the champion's ROC AUC. Only aliases
are used; MLflow's stages are deprecated. :func:`register_evaluated` reads as the list of its
steps; :func:`register_version` is the one place a version is created, aliased and described.
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
import urllib.parse
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import mlflow
import numpy as np
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pneumo import manifests, metrics, plots, tracking
from pneumo.contract import Figures, ModelContract
from pneumo.errors import DataError, PneumoError
from pneumo.model_card import model_card
from pneumo.model_io import TrainedModel, load_trained_model, log_model

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"

# Labels and probabilities of pneumonia of a model on the validation split both models are judged on.
Scorer = Callable[[TrainedModel], tuple[np.ndarray, np.ndarray]]
Curve = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class Floors:
    """The least a model must show on validation, at its own threshold, to become champion."""

    sensitivity: float = 0.95
    specificity: float = 0.80
    roc_auc: float = 0.95

    def failures(self, figures: dict[str, float]) -> list[str]:
        """The figures below their floor, in words (an undefined figure fails)."""
        return [
            f"validation {name.replace('_', ' ')} {figures[name]:.3f} is below the floor {floor}"
            if math.isfinite(figures[name])
            else f"validation {name.replace('_', ' ')} is undefined"
            for name, floor in asdict(self).items()
            if not figures[name] >= floor
        ]


@dataclass
class Decision:
    """What registration did, as logged to the evaluation run."""

    registered_name: str
    version: str
    alias: str | None  # None: registered, but refused every alias by the floors
    reason: str
    candidate_val_roc_auc: float
    champion_version: str | None
    champion_val_roc_auc: float | None

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def model_uri(self) -> str:
        """``models:/<name>/<version>``: the version registered."""
        return f"models:/{self.registered_name}/{self.version}"


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


def registered_version(model_uri: str) -> str:
    """``name/version`` of the registered version a ``models:/`` URI names now; empty for any other URI."""
    if not model_uri.startswith("models:/"):
        return ""
    path = model_uri.removeprefix("models:/").strip("/")
    client = MlflowClient()
    if "@" in path:
        name, alias = path.split("@", 1)
        return f"{name}/{client.get_model_version_by_alias(name, alias).version}"
    name, _, version = path.rpartition("/")
    return f"{name}/{version}" if name and version.isdigit() else ""


def validation_figures(labels: np.ndarray, probabilities: np.ndarray, threshold: float) -> dict[str, float]:
    """Sensitivity, specificity (at ``threshold``) and ROC AUC: what the floors and the comparison read."""
    figures = metrics.binary_metrics(labels, probabilities, threshold)
    return {name: figures[name] for name in ("sensitivity", "specificity", "roc_auc")}


def decide(candidate: dict[str, float], champion_auc: float | None, floors: Floors) -> tuple[str | None, str]:
    """Alias for a new version, and why.

    Args:
        candidate: The new model's :func:`validation_figures`.
        champion_auc: The current champion's ROC AUC on the same images; None when there is none.
        floors: The least a champion must show.

    Returns:
        ``(alias, reason)``: ``None`` when a floor is not met (even with no champion yet),
        ``champion`` when the candidate is strictly better than the champion (or there is none),
        else ``challenger``.
    """
    failed = floors.failures(candidate)
    if failed:
        return None, "not promoted: " + "; ".join(failed)
    auc = candidate["roc_auc"]
    if champion_auc is None:
        return CHAMPION, f"validation ROC AUC {auc:.4f} clears the floors, and there was no champion yet"
    if auc > champion_auc:
        return CHAMPION, f"validation ROC AUC {auc:.4f} beats the champion's {champion_auc:.4f}"
    return CHALLENGER, f"validation ROC AUC {auc:.4f} does not beat the champion's {champion_auc:.4f}"


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
    """Refuse when validation images (by content hash) were in a model's training split, or that cannot be checked.

    Args:
        models: Label ("candidate", "champion v3") -> training run id.
        validation_hashes: SHA-256 of the validation images both models are judged on.

    Raises:
        DataError: Naming the model, its run and how many validation images it trained on, or why
            its training images cannot be checked (then nothing is registered either: a check
            that cannot be made must not pass silently).
    """
    hashes = list(validation_hashes)
    for label, run_id in models.items():
        try:
            overlap = manifests.training_overlap(run_id, hashes)
        except DataError as error:
            raise DataError(
                f"not registered: the {label}'s training images cannot be checked against the validation split "
                f"({error}); register models whose training run and manifest this tracking store holds"
            ) from error
        if overlap:
            raise DataError(
                f"not registered: {overlap} validation image(s) were in the training split of the {label} "
                f"(run {run_id}), so its validation figures are optimistic; evaluate with a manifest whose "
                "validation split neither model trained on"
            )


def _score_champion(
    name: str, champion: ModelVersion | None, score: Scorer
) -> tuple[ModelVersion | None, Curve | None]:
    """The champion and its validation curve, re-read if the alias moved while it was scored (another machine).

    The version read is scored (``models:/NAME/VERSION``, never the alias, which may have moved).
    """
    for _ in range(3):
        curve = score(load_trained_model(f"models:/{name}/{champion.version}")) if champion is not None else None
        latest = current_champion(name)
        if getattr(latest, "version", None) == getattr(champion, "version", None):
            return champion, curve
        log.warning("the %s alias moved while scoring; comparing again", CHAMPION)
        champion = latest
    return champion, score(load_trained_model(f"models:/{name}/{champion.version}")) if champion is not None else None


def register_version(
    model_uri: str,
    name: str,
    alias: str | None,
    status: str,
    contract: ModelContract,
    tags: dict[str, str],
    evaluation: Figures | None = None,
) -> str:
    """Register ``model_uri`` as a new version of ``name``, point ``alias`` at it (if any) and give it its model card.

    The card (:func:`pneumo.model_card.model_card`, written from ``contract``) is the version's
    description and the active run's artifact ``model_card_v<version>.md``.

    Returns:
        The new version number.
    """
    version = str(mlflow.register_model(model_uri, name, tags=tags).version)
    client = MlflowClient()
    if alias is not None:
        client.set_registered_model_alias(name, alias, version)
    code_version = (
        client.get_run(contract.run_id).data.tags.get("mlflow.source.git.commit", "") if contract.run_id else ""
    )
    card = model_card(contract, name, version, status, code_version, evaluation)
    client.update_model_version(name, version, description=card)
    mlflow.log_text(card, f"model_card_v{version}.md")
    log.info("registered %s version %s%s", name, version, f" as {alias}" if alias else " without an alias")
    return version


def _log_registration(decision: Decision, curves: dict[str, Curve], manifest_digest: str, n_images: int) -> None:
    """What the evaluation run records about a registration: tags, metrics, ``registration.json``, both ROC curves.

    The tags ``pneumo.registered_version`` and ``pneumo.registered_model_uri`` point the run at the
    version. (The run page's "Registered models" lists it through the evaluated model, which the
    run logs as its model input; the version's own run stays the training run.)
    """
    tracking.log_metrics({"registration_candidate_val_roc_auc": decision.candidate_val_roc_auc})
    if decision.champion_val_roc_auc is not None:
        tracking.log_metrics({"registration_champion_val_roc_auc": decision.champion_val_roc_auc})
    mlflow.set_tags(
        {
            "pneumo.registered_version": decision.version,
            "pneumo.registered_model_uri": decision.model_uri,
            "pneumo.alias": decision.alias or "none (below the floors)",
        }
    )
    tracking.log_json(
        {**decision.as_dict(), "manifest_digest": manifest_digest, "n_val_images": n_images}, "registration.json"
    )
    tracking.log_figure(
        plots.plot_registration(
            curves, f"Registration: validation ROC\n{decision.alias or 'no alias'}: {decision.reason}"
        ),
        "plots/registration_roc.png",
    )


def register_evaluated(
    trained: TrainedModel,
    name: str,
    score: Scorer,
    manifest_digest: str,
    validation_hashes: Iterable[str],
    floors: Floors,
    evaluation: Figures | None = None,
) -> Decision | None:
    """Register an evaluated model as a new version of ``name``, alias it as earned, and log why to the active run.

    The steps run under :func:`registry_lock`: read the champion; stop if this model already is
    it; refuse if either model trained on the validation images (:func:`check_no_training_overlap`);
    score the candidate and the champion on the same images; :func:`decide`; register; log.

    Args:
        trained: The evaluated model.
        name: Registered model name (e.g. ``pneumonia-classifier``).
        score: Predicts the validation split with a model.
        manifest_digest: Digest of the manifest whose validation split is used.
        validation_hashes: SHA-256 of those validation images.
        floors: The least a champion must show on them.
        evaluation: The evaluated split's figures for the model card, when not validation.

    Returns:
        The decision, or None when this model (same run) already is the champion.
    """
    with registry_lock(name):
        champion = current_champion(name)
        if champion is not None and trained.run_id and champion.run_id == trained.run_id:
            log.info("run %s already is %s@%s (version %s)", trained.run_id, name, CHAMPION, champion.version)
            mlflow.set_tag("pneumo.registration", f"already champion (version {champion.version})")
            return None
        runs = {"candidate": trained.run_id, **({f"champion v{champion.version}": champion.run_id} if champion else {})}
        check_no_training_overlap(runs, validation_hashes)
        labels, probabilities = score(trained)
        candidate = validation_figures(labels, probabilities, trained.contract.threshold)
        champion, champion_curve = _score_champion(name, champion, score)
        champion_auc = metrics.roc_auc(*champion_curve) if champion_curve is not None else None
        alias, reason = decide(candidate, champion_auc, floors)
        version = register_version(
            f"models:/{trained.model_id}" if trained.model_id else trained.uri,
            name,
            alias,
            f"{alias or 'no alias'}: {reason}.",
            trained.contract,
            tags={
                "val_roc_auc": f"{candidate['roc_auc']:.6f}",
                "manifest_digest": manifest_digest,
                "evaluation_run_id": mlflow.active_run().info.run_id,
            },
            evaluation=evaluation,
        )
        decision = Decision(
            name,
            version,
            alias,
            reason,
            float(candidate["roc_auc"]),
            str(champion.version) if champion is not None else None,
            None if champion_auc is None else float(champion_auc),
        )
        curves = {f"candidate ({(trained.run_id or trained.uri)[:8]})": (labels, probabilities)}
        if champion_curve is not None:
            curves[f"champion v{champion.version}"] = champion_curve
        _log_registration(decision, curves, manifest_digest, int(len(labels)))
        return decision


def register_site_version(model, contract: ModelContract, name: str, alias: str) -> str:
    """Log a site version (site calibration or adaptation) to the active run and register it under ``alias``.

    A new version of ``name``: the parent's version and its aliases stay untouched. The contract
    carries the site threshold, the lineage and the site figures.

    Returns:
        The new version number.
    """
    lineage, site = contract.lineage, contract.site
    info = log_model(model, contract, name="site_model")
    status = (
        f"{alias}: {lineage.method} of {lineage.parent_version or lineage.parent_uri} on a site sample of "
        f"{site.figures.n_images} images; threshold {contract.threshold:.4f} ({contract.threshold_rule})."
    )
    version = register_version(
        info.model_uri,
        name,
        alias,
        status,
        contract,
        tags={
            "pneumo.site_threshold": f"{contract.threshold:.6f}",
            "pneumo.site_target_sensitivity": str(site.target_sensitivity),
            "pneumo.derived_from": lineage.parent_version or lineage.parent_uri,
            "pneumo.site_manifest_digest": lineage.site_manifest_digest,
            "source_run_id": mlflow.active_run().info.run_id,
        },
    )
    mlflow.set_tags({"pneumo.site_version": version, "pneumo.site_alias": alias})
    return version
