"""Entry point ``adapt``: make a model work on a hospital's own X-rays with a few hundred of its labelled images.

A model trained at one hospital ranks another hospital's images less well, and no threshold can
repair the ranking; a short fine-tune on the site's own labelled images can. ``adapt`` does it
honestly:

1. The site folder (``NORMAL/``, ``PNEUMONIA/``) is discovered and checked as ``prepare`` does,
   and decoded with the parent model's own input spec.
2. The sample is refused when it cannot support the target (a class missing, fewer patients per
   class than folds, too few pneumonia images to show ``site_sensitivity``).
3. **Cross-fitting**: patient-grouped, stratified K-fold. Each fold's model is fine-tuned on the
   other folds and scores the held-out one, so every site image gets an out-of-fold score from a
   model that never saw its patient. The site threshold is chosen on these scores, and the site
   figures (with patient-grouped bootstrap intervals) are computed on them, beside the parent's on
   the same images: a threshold fitted to the fine-tuned model's own training images does not
   transfer.
4. The final model is fine-tuned the same way on all site images, and carries the out-of-fold
   threshold, its lineage and the site figures in its contract. Registered as a new version under
   ``alias``; the parent version and its aliases are untouched.
5. Forgetting: the adapted model's ROC AUC on the parent's own validation split (the training
   hospital), when those images are at hand.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
from sklearn.metrics import roc_curve
from sklearn.model_selection import StratifiedGroupKFold

from pneumo import CLASS_NAMES, manifests, metrics, model_io, pipeline, plots, registry, tracking, training
from pneumo.augmentation import build_augmenter
from pneumo.config import AdaptConfig, AugmentConfig, DataConfig, RunConfigs, replace_fields
from pneumo.contract import Figures, Lineage, ModelContract, SiteFigures
from pneumo.data import Manifest, patient_key, site_manifest, split_groups
from pneumo.errors import ConfigError, DataError
from pneumo.model_io import TrainedModel

log = logging.getLogger(__name__)

# Site-image fractions of the learning curve (whole patients, stratified).
LEARNING_CURVE_FRACTIONS = (0.25, 0.5, 1.0)


@dataclass
class SiteSample:
    """The site's decoded images, their labels and patients, in manifest order."""

    images: np.ndarray
    labels: np.ndarray
    groups: np.ndarray  # patient of each image, united with identical files (pneumo.data.split_groups)

    def subset(self, index: np.ndarray) -> SiteSample:
        return SiteSample(self.images[index], self.labels[index], self.groups[index])


def check_sample(sample: SiteSample, config: AdaptConfig) -> None:
    """Refuse a sample that cannot support the target, naming the numbers.

    Raises:
        ConfigError: A class is missing, a class has fewer patients than folds, or there are too
            few pneumonia images to show ``site_sensitivity`` at 95% confidence
            (:func:`pneumo.metrics.positives_needed`).
    """
    for label, name in enumerate(CLASS_NAMES):
        patients = len(np.unique(sample.groups[sample.labels == label]))
        if patients == 0:
            raise ConfigError(f"adapt refused: the site sample has no {name} images; label some of both classes")
        if patients < config.folds:
            raise ConfigError(
                f"adapt refused: the site sample has {patients} {name} patient(s), fewer than folds={config.folds}; "
                "add patients or lower folds"
            )
    positives, needed = int(sample.labels.sum()), metrics.positives_needed(config.site_sensitivity)
    if positives < needed:
        raise ConfigError(
            f"adapt refused: the site sample has {positives} pneumonia images, but at least {needed} are needed to "
            f"show sensitivity >= {config.site_sensitivity} at 95% confidence (even catching every one of them); "
            "add labelled pneumonia images or lower site_sensitivity"
        )


def fold_splits(sample: SiteSample, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Patient-grouped, class-stratified K-fold splits: ``(fit, held-out)`` indices; no patient on both sides."""
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(sample.labels)), sample.labels, groups=sample.groups))


def _top_layers(model: keras.Model) -> set[str]:
    """Names of the layers from the last spatial pooling on (aug_cnn: its last conv stage and the head)."""
    names = [layer.name for layer in model.layers]
    pools = [i for i, layer in enumerate(model.layers) if isinstance(layer, keras.layers.MaxPooling2D)]
    return set(names[pools[-1] + 1 :] if pools else names)


class Adapter:
    """Fine-tunes copies of the parent model on site images (and optionally rehearsal images).

    Args:
        parent: The model to adapt.
        config: Fine-tuning settings.
        seed: Base seed (each call offsets it, so folds differ but runs repeat).
        rehearsal: Original training images and labels mixed in against forgetting (may be empty).
    """

    def __init__(self, parent: TrainedModel, config: AdaptConfig, seed: int, rehearsal: pipeline.ImageSet | None):
        self.parent, self.config, self.seed, self.rehearsal = parent, config, seed, rehearsal
        self._folder = tempfile.TemporaryDirectory()
        self._path = Path(self._folder.name) / "parent.keras"
        parent.model.save(self._path)

    def fresh(self) -> keras.Model:
        """A new copy of the parent with its weights (loaded in safe mode, as every model is)."""
        return model_io.load_keras_model(self._path)

    def fit(self, sample: SiteSample, number: int) -> keras.Model:
        """A copy of the parent adapted to ``sample`` (call ``number`` seeds it)."""
        keras.utils.set_random_seed(self.seed * 100 + number)
        model = self.fresh()
        if self.config.method == "batchnorm":
            return _reestimate_batchnorm(model, sample.images, self.config.batch_size)
        images, labels = sample.images, sample.labels
        if self.rehearsal is not None and self.config.rehearsal > 0:
            count = min(len(self.rehearsal.labels), round(self.config.rehearsal * len(labels)))
            picks = np.random.default_rng(self.seed * 100 + number).choice(len(self.rehearsal.labels), count, False)
            images = np.concatenate([images, self.rehearsal.images[picks]])
            labels = np.concatenate([labels, self.rehearsal.labels[picks]])
        if self.config.train_layers == "top":
            top = _top_layers(model)
            for layer in model.layers:
                layer.trainable = layer.name in top
        augment = AugmentConfig(
            rotation=self.config.rotation,
            width_shift=self.config.shift,
            height_shift=self.config.shift,
            zoom=self.config.zoom,
            brightness_low=1.0,
            brightness_high=1.0,
            contrast=0.0,
            gamma=0.0,
        )
        batch_size = min(self.config.batch_size, len(labels))
        dataset, steps = pipeline.train_dataset(
            pipeline.Examples(images, labels.astype(np.int32)),
            batch_size,
            self.config.epochs,
            self.seed * 100 + number,
            balance=True,
            augmenter=build_augmenter(augment, self.seed + number),
        )
        model.compile(
            optimizer=keras.optimizers.Adam(self.config.learning_rate, use_ema=self.config.ema, ema_momentum=0.99),
            loss=keras.losses.BinaryCrossentropy(),
        )
        model.fit(dataset, epochs=self.config.epochs, steps_per_epoch=steps, shuffle=False, verbose=0)
        if self.config.ema:
            model.optimizer.finalize_variable_values(model.trainable_variables)
        return model

    def close(self) -> None:
        self._folder.cleanup()


def _reestimate_batchnorm(model: keras.Model, images: np.ndarray, batch_size: int) -> keras.Model:
    """Replace every BatchNorm layer's moving statistics by the site images' own (no labels, no weights changed)."""
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in norms:
        layer.moving_mean.assign(np.zeros(layer.moving_mean.shape, np.float32))
        layer.moving_variance.assign(np.ones(layer.moving_variance.shape, np.float32))
    # A cumulative average over passes in training mode: momentum 1 - 1/k after the k-th batch.
    for step, start in enumerate(range(0, len(images), batch_size), start=1):
        for layer in norms:
            layer.momentum = 1.0 - 1.0 / step
        model(images[start : start + batch_size].astype(np.float32), training=True)
    return model


def cross_fit(adapter: Adapter, sample: SiteSample, folds: int, seed: int) -> tuple[np.ndarray, list[keras.Model]]:
    """Out-of-fold probabilities of every site image, and the fold models.

    Each fold's model is adapted on the other folds only, so no patient scores with a model that saw it.
    """
    out_of_fold = np.full(len(sample.labels), np.nan)
    fold_models = []
    for number, (fit_index, held_out) in enumerate(fold_splits(sample, folds, seed), start=1):
        started = time.perf_counter()
        model = adapter.fit(sample.subset(fit_index), number)
        out_of_fold[held_out] = model_io.predict_probabilities(model, sample.images[held_out])
        fold_models.append(model)
        log.info(
            "fold %d/%d: %d images adapted, %d scored in %.0f s",
            number,
            folds,
            len(fit_index),
            len(held_out),
            time.perf_counter() - started,
        )
    return out_of_fold, fold_models


def averaged(models: list[keras.Model]) -> keras.Model:
    """One model answering the mean probability of ``models`` (served as one pyfunc)."""
    inputs = keras.Input(shape=models[0].input_shape[1:], name="image")
    outputs = []
    for number, model in enumerate(models):
        model.name = f"member_{number}"  # unique names inside one functional model
        outputs.append(model(inputs))
    return keras.Model(inputs, keras.layers.Average(name="pneumonia_mean")(outputs), name="adapted_ensemble")


def site_figures(labels, probabilities, threshold, groups, on: str, resamples: int) -> Figures:
    """Figures at ``threshold`` with patient-grouped bootstrap intervals."""
    return Figures(
        on=on,
        metrics=metrics.binary_metrics(labels, probabilities, threshold),
        intervals=metrics.bootstrap_intervals(labels, probabilities, threshold, groups, resamples),
        n_images=int(len(labels)),
        n_patients=int(len(np.unique(groups))),
    )


def _log_figures(prefix: str, figures: Figures) -> None:
    names = ("roc_auc", "sensitivity", "specificity", "ppv", "npv", "tp", "fp", "tn", "fn")
    tracking.log_metrics({f"{prefix}_{name}": figures.metrics[name] for name in names})
    for name, (_, low, high) in figures.intervals.items():
        tracking.log_metrics({f"{prefix}_{name}_ci_low": low, f"{prefix}_{name}_ci_high": high})


def learning_curve(adapter: Adapter, sample: SiteSample, config: AdaptConfig, seed: int) -> list[dict]:
    """Out-of-fold ROC AUC and specificity at ``site_sensitivity`` against the number of site images."""
    points = []
    rng = np.random.default_rng(seed)
    for fraction in LEARNING_CURVE_FRACTIONS:
        keep = np.zeros(len(sample.labels), bool)
        for label in (0, 1):  # whole patients of each class, in random order, up to the fraction
            patients = rng.permutation(np.unique(sample.groups[sample.labels == label]))
            keep |= np.isin(sample.groups, patients[: max(config.folds, round(fraction * len(patients)))])
        part = sample.subset(np.flatnonzero(keep))
        out_of_fold, _ = cross_fit(adapter, part, config.folds, seed)
        fpr, tpr, _ = roc_curve(part.labels, out_of_fold)
        point = {
            "fraction": fraction,
            "n_images": int(len(part.labels)),
            "n_pneumonia": int(part.labels.sum()),
            "oof_roc_auc": metrics.roc_auc(part.labels, out_of_fold),
            "oof_specificity_at_sensitivity": float(1 - fpr[np.argmax(tpr >= config.site_sensitivity)]),
        }
        tracking.log_metrics(
            {
                "learning_curve_oof_roc_auc": point["oof_roc_auc"],
                "learning_curve_oof_specificity": point["oof_specificity_at_sensitivity"],
            },
            step=point["n_images"],
        )
        points.append(point)
    return points


def _rehearsal_images(parent: TrainedModel, data: DataConfig, config: AdaptConfig) -> pipeline.ImageSet | None:
    """The parent's training images to mix in (a balanced random draw), or None when none are wanted."""
    if config.rehearsal <= 0:
        return None
    try:
        manifest = _parent_manifest(parent, data)
    except DataError as error:
        raise DataError(
            f"rehearsal needs the parent's training images ({error}); point data_dir at them "
            "(the Kaggle folder), or adapt without them with rehearsal=0"
        ) from error
    frame = manifest.split("train")
    per_class = max(8, round(config.rehearsal * 200))  # plenty for a few hundred site images
    picks = pd.concat(
        rows.sample(min(len(rows), per_class), random_state=data.seed) for _, rows in frame.groupby("label")
    )
    return pipeline.load_split(
        picks.reset_index(drop=True), manifest.data_dir, parent.contract.input_spec, data.cache_dir
    )


def _parent_manifest(parent: TrainedModel, data: DataConfig) -> Manifest:
    """The manifest the parent was trained with, its images in ``data.data_dir`` (or where it was made).

    Raises:
        DataError: The parent has no training run, or its images cannot be found.
    """
    if not parent.run_id:
        raise DataError("the parent model has no training run, so its training images are unknown")
    return manifests.resolve_manifest(replace_fields(data, manifest=parent.run_id))


def _forgetting(adapted: keras.Model, parent: TrainedModel, data: DataConfig, threshold: float) -> Figures | None:
    """The adapted model on the parent's validation split (the training hospital), beside the parent's own AUC."""
    try:
        manifest = _parent_manifest(parent, data)
        val = pipeline.load_split(manifest.split("val"), manifest.data_dir, parent.contract.input_spec, data.cache_dir)
    except DataError as error:
        log.warning("forgetting not measured: %s", error)
        mlflow.set_tag("pneumo.forgetting", f"not measured: {error}")
        return None
    adapted_scores = model_io.predict_probabilities(adapted, val.images)
    parent_auc = metrics.roc_auc(val.labels, model_io.predict_probabilities(parent.model, val.images))
    figures = Figures(
        on="validation split of the training hospital (patient-grouped), at the site threshold",
        metrics=metrics.binary_metrics(val.labels, adapted_scores, threshold),
        n_images=int(len(val.labels)),
        n_patients=int(patient_key(val.frame).nunique()),
    )
    tracking.log_metrics({"forgetting_val_roc_auc": figures.metrics["roc_auc"], "parent_val_roc_auc": parent_auc})
    mlflow.set_tag("pneumo.forgetting", "measured")
    return figures


def run_name(config: AdaptConfig) -> str:
    """``adapt-models:/pneumonia-classifier@champion-5folds``."""
    return f"adapt-{config.model_uri}-{config.folds}folds-{config.method}"


def adapt(data: DataConfig, config: AdaptConfig) -> str:
    """Entry point ``adapt``: fine-tune a model on a hospital's labelled sample, with out-of-fold threshold and figures.

    Args:
        data: Where the parent's training images are (for rehearsal and the forgetting check),
            the cache and the seed. The input spec is the parent model's, not ``data``'s.
        config: The model, the site folder, the target and the fine-tuning settings.

    Returns:
        The adapt run's id.

    Raises:
        ConfigError: The sample cannot support the target (see :func:`check_sample`).
        DataError: The site folder cannot be read.
    """
    parent = model_io.load_trained_model(config.model_uri)
    parent_version = registry.registered_version(config.model_uri)
    spec = parent.contract.input_spec
    with tracking.start_run(RunConfigs("adapt", data, config, name=run_name(config))) as run:
        started = time.perf_counter()
        mlflow.set_tags({"pneumo.parent_uri": config.model_uri, "pneumo.parent_version": parent_version})
        manifest = site_manifest(config.site_dir)
        manifests.log_manifest(manifest, context="site")
        images = pipeline.load_split(manifest.frame, manifest.data_dir, spec, data.cache_dir)
        sample = SiteSample(images.images, images.labels, split_groups(images.frame).to_numpy(str))
        check_sample(sample, config)
        tracking.log_metrics(
            {
                "n_site_images": len(sample.labels),
                "n_site_pneumonia": int(sample.labels.sum()),
                "n_site_patients": len(np.unique(sample.groups)),
            }
        )
        adapter = Adapter(parent, config, data.seed, _rehearsal_images(parent, data, config))
        try:
            parent_scores = model_io.predict_probabilities(parent.model, sample.images)
            out_of_fold, fold_models = cross_fit(adapter, sample, config.folds, data.seed)
            threshold = metrics.threshold_for_sensitivity(sample.labels, out_of_fold, config.site_sensitivity)
            resamples = config.bootstrap
            oof = site_figures(
                sample.labels,
                out_of_fold,
                threshold,
                sample.groups,
                f"the site sample, out of fold ({config.folds}-fold, patient-grouped cross-fitting)",
                resamples,
            )
            before = site_figures(
                sample.labels,
                parent_scores,
                parent.contract.threshold,
                sample.groups,
                "the site sample, the parent model at its own threshold",
                resamples,
            )
            _log_figures("site_oof", oof)
            _log_figures("parent_site", before)
            tracking.log_metrics({"site_threshold": threshold, "parent_threshold": parent.contract.threshold})
            fitted = training.log_calibration(
                sample.labels, out_of_fold, "the site sample's out-of-fold scores", data.seed, "site"
            )
            if parent.contract.input_gate is not None:
                passed = parent.contract.input_gate.judge(sample.images).passed
                tracking.log_summary({"site_ood_pass_rate": float(passed.mean())})
            final = adapter.fit(sample, 0)
            served = averaged([*fold_models, final]) if config.ensemble else final
            forgetting = _forgetting(served, parent, data, threshold)
            curve = learning_curve(adapter, sample, config, data.seed) if config.learning_curve else []
        finally:
            adapter.close()
        frame = images.frame[["path", "patient_id", "label"]].assign(
            fold_probability=out_of_fold, parent_probability=parent_scores
        )
        tracking.log_dataframe(frame, "site_predictions.csv")
        tracking.log_figure(
            plots.plot_registration(
                {
                    f"parent ({parent_version or 'unregistered'})": (sample.labels, parent_scores),
                    "adapted, out of fold": (sample.labels, out_of_fold),
                },
                f"Site sample ROC: before and after adaptation\n{len(sample.labels)} images",
            ),
            "plots/site_roc.png",
        )
        tracking.log_figure(
            plots.plot_scores_by_class(
                sample.labels,
                {"parent": parent_scores, "adapted (out of fold)": out_of_fold},
                {"parent": parent.contract.threshold, "adapted (out of fold)": threshold},
                "Site sample: scores by class",
            ),
            "plots/site_scores_by_class.png",
        )
        if curve:
            tracking.log_json(curve, "learning_curve.json")
            tracking.log_figure(plots.plot_learning_curve(curve, config.site_sensitivity), "plots/learning_curve.png")
        contract = _adapted_contract(parent, config, data, threshold, manifest, oof, before, forgetting, parent_version)
        contract = contract.derived(calibration=fitted)
        seconds = time.perf_counter() - started
        tracking.log_metrics({"adapt_seconds": seconds})
        note = (
            f"Adapted {config.model_uri} to {len(sample.labels)} site images: out-of-fold ROC AUC "
            f"{oof.metrics['roc_auc']:.4f} (parent {before.metrics['roc_auc']:.4f}); at the out-of-fold threshold "
            f"{threshold:.3f}: sensitivity {oof.metrics['sensitivity']:.3f}, "
            f"specificity {oof.metrics['specificity']:.3f}."
        )
        mlflow.set_tag("mlflow.note.content", note)
        log.info("%s (%.0f s)", note, seconds)
        if config.register:
            name = parent_version.split("/")[0] if parent_version else config.registered_name
            registry.register_site_version(served, contract, name, config.alias)
        else:
            model_io.log_model(served, contract, name="site_model")
        return run.info.run_id


def _adapted_contract(
    parent: TrainedModel,
    config: AdaptConfig,
    data: DataConfig,
    threshold: float,
    manifest: Manifest,
    oof: Figures,
    before: Figures,
    forgetting: Figures | None,
    parent_version: str,
) -> ModelContract:
    """The parent's contract with the site threshold, lineage, site figures and adapt's settings."""
    return parent.contract.derived(
        entry_point="adapt",
        threshold=float(threshold),
        threshold_rule=f"site out-of-fold sensitivity >= {config.site_sensitivity} ({config.folds}-fold cross-fitting)",
        hyperparameters={**parent.contract.hyperparameters, "adapt": dataclasses.asdict(config), "seed": data.seed},
        validation=forgetting
        or dataclasses.replace(
            parent.contract.validation,
            on=f"{parent.contract.validation.on}: the parent's figures, not re-measured after adaptation",
        ),
        run_id=mlflow.active_run().info.run_id,
        code_version=tracking.code_version(),
        lineage=Lineage(
            method="site adaptation",
            parent_uri=config.model_uri,
            parent_version=parent_version,
            parent_run_id=parent.run_id,
            site_manifest_digest=manifest.digest,
        ),
        site=SiteFigures(
            target_sensitivity=config.site_sensitivity,
            n_pneumonia=int(oof.metrics["tp"] + oof.metrics["fn"]),
            figures=oof,
            parent_figures=before,
            details={
                "folds": config.folds,
                "method": config.method,
                "parent_threshold": parent.contract.threshold,
                "forgetting_val_roc_auc": forgetting.metrics["roc_auc"] if forgetting else None,
            },
        ),
    )


__all__ = ["Adapter", "SiteSample", "adapt", "check_sample", "cross_fit", "fold_splits", "learning_curve"]
