"""Site-adaptation levers, measured out of fold on the site sample only.

Loads the parent model and decodes the site sample once, then for each lever and seed runs
adapt's own cross-fitting (:func:`pneumo.adapt.cross_fit`, patient-grouped stratified K-fold) and
records the out-of-fold ROC AUC and the out-of-fold specificity at the threshold chosen for
sensitivity >= 0.98 on those same out-of-fold scores (what adapt stores). Nothing here looks at
any other data: the levers are chosen on these figures alone.

    python benchmarks/adapt_levers.py --model_uri runs:/<aug_cnn run>/model \\
        --site_dir ../shared/data/chest_xray/test --seeds 42,1 [--levers default,top,...]

Results go to ``benchmarks/results/adapt/levers.jsonl`` (one line per lever and seed, with the
out-of-fold probabilities, so the table can be recomputed) and a table is printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Each lever: the AdaptConfig fields it changes from adapt's baseline settings.
LEVERS = {
    "default": {},
    "top": {"train_layers": "top"},
    "rehearsal": {"rehearsal": 0.5},
    "ema": {"ema": True},
    "aug_x2": {"rotation": 10.0, "shift": 0.1, "zoom": 0.2},
    "aug_none": {"rotation": 0.0, "shift": 0.0, "zoom": 0.0},
    "epochs4": {"epochs": 4},
    "epochs16": {"epochs": 16},
    "lr3e-4": {"learning_rate": 3e-4},
    "batchnorm": {"method": "batchnorm"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_uri", required=True)
    parser.add_argument("--site_dir", default=str(REPO.parent / "shared" / "data" / "chest_xray" / "test"))
    parser.add_argument("--data_dir", default=str(REPO.parent / "shared" / "data" / "chest_xray"))
    parser.add_argument("--seeds", default="42,1")
    parser.add_argument("--levers", default=",".join(LEVERS))
    parser.add_argument("--base", default="{}", help="JSON of AdaptConfig fields applied to every lever")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "adapt" / "levers.jsonl"))
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from sklearn.metrics import roc_auc_score

    from pneumo import metrics, model_io, pipeline
    from pneumo.adapt import Adapter, SiteSample, _rehearsal_images, cross_fit
    from pneumo.config import AdaptConfig, DataConfig
    from pneumo.data import patient_key, site_manifest

    parent = model_io.load_trained_model(args.model_uri)
    manifest = site_manifest(args.site_dir)
    images = pipeline.load_split(manifest.frame, manifest.data_dir, parent.contract.input_spec, "outputs/cache")
    sample = SiteSample(images.images, images.labels, patient_key(images.frame).to_numpy(str))
    parent_scores = model_io.predict_probabilities(parent.model, sample.images)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if out.is_file():
        done = {(r["lever"], r["seed"], r["base"]) for r in map(json.loads, out.read_text().splitlines())}
    print(f"parent ROC AUC on the site sample: {roc_auc_score(sample.labels, parent_scores):.4f}")
    for lever in args.levers.split(","):
        for seed in [int(s) for s in args.seeds.split(",")]:
            if (lever, seed, args.base) in done:
                continue
            config = dataclasses.replace(
                AdaptConfig(site_dir=args.site_dir), **{**json.loads(args.base), **LEVERS[lever]}
            )
            data = DataConfig(data_dir=args.data_dir, seed=seed, cache_dir="outputs/cache")
            started = time.perf_counter()
            adapter = Adapter(parent, config, seed, _rehearsal_images(parent, data, config))
            try:
                oof, _ = cross_fit(adapter, sample, config.folds, seed)
            finally:
                adapter.close()
            threshold = metrics.threshold_for_sensitivity(sample.labels, oof, 0.98)
            figures = metrics.binary_metrics(sample.labels, oof, threshold)
            record = {
                "lever": lever,
                "seed": seed,
                "base": args.base,
                "seconds": round(time.perf_counter() - started, 1),
                "oof_roc_auc": figures["roc_auc"],
                "oof_sensitivity": figures["sensitivity"],
                "oof_specificity": figures["specificity"],
                "threshold": threshold,
                "probabilities": [round(float(p), 6) for p in oof],
            }
            with open(out, "a") as handle:
                handle.write(json.dumps(record) + "\n")
            print({k: v for k, v in record.items() if k != "probabilities"}, flush=True)
    report(out, sample.labels)


def _sd(values) -> float:
    return float(values.std(ddof=1)) if len(values) > 1 else 0.0


def report(out: Path, labels) -> None:
    """Mean ± sd per lever, and the out-of-fold ensemble of each lever's seeds (their averaged scores)."""
    import numpy as np

    from pneumo import metrics

    records = [json.loads(line) for line in out.read_text().splitlines()]
    print(
        "| lever | seeds | OOF ROC AUC | OOF specificity at sensitivity >= 0.98 | s per cross-fit "
        "| seeds averaged: ROC AUC / specificity |"
    )
    print("|---|---|---|---|---|---|")
    for lever in dict.fromkeys(r["lever"] for r in records):
        rows = [r for r in records if r["lever"] == lever]
        auc = np.array([r["oof_roc_auc"] for r in rows])
        spec = np.array([r["oof_specificity"] for r in rows])
        mean = np.mean([r["probabilities"] for r in rows], axis=0)
        threshold = metrics.threshold_for_sensitivity(labels, mean, 0.98)
        averaged = metrics.binary_metrics(labels, mean, threshold)
        print(
            f"| {lever} | {len(rows)} | {auc.mean():.4f} ± {_sd(auc):.4f} | {spec.mean():.3f} ± {_sd(spec):.3f} | "
            f"{np.mean([r['seconds'] for r in rows]):.0f} | {averaged['roc_auc']:.4f} / {averaged['specificity']:.3f} |"
        )


if __name__ == "__main__":
    main()
