"""Ablation of the generalisation levers: train ``aug_cnn`` variants over seeds, score val and test.

Each (variant, seed) is a real ``python -m entrypoints.aug_cnn`` run in a subprocess, timed end
to end, in one tracking store. Its logged model is then scored on the validation split it was
selected on and on the test split (measurement only: nothing here feeds back into a default).
Per run it appends one JSON line to ``results.jsonl`` and saves the raw scores (plus a few
test-time-augmented views) to ``scores/<variant>-<seed>.npz`` for the post-hoc analysis in
``benchmarks/ablation_report.py``.

    python benchmarks/ablation.py --variant clahe --seeds 42,1,2 -- --equalize clahe
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def score_run(run_id: str, cache_dir: str) -> dict:
    """Probabilities of the run's model on its validation and test images, plus fixed views of them."""
    import numpy as np

    from pneumo import manifests, model_io, pipeline
    from pneumo.augmentation import tta_views
    from pneumo.config import DataConfig

    trained = model_io.load_trained_model(f"runs:/{run_id}/model")
    manifest = manifests.resolve_manifest(DataConfig(manifest=run_id))
    out = {"threshold": trained.contract.threshold}
    for split in ("val", "test"):
        images = pipeline.load_split(manifest.split(split), manifest.data_dir, trained.contract.input_spec, cache_dir)
        out[f"{split}_labels"] = images.labels
        out[f"{split}_patients"] = images.frame["patient_id"].to_numpy(str)
        out[f"{split}_paths"] = images.frame["path"].to_numpy(str)
        out[f"{split}_probabilities"] = model_io.predict_probabilities(trained.model, images.images)
        out[f"{split}_tta"] = np.stack(
            [model_io.predict_probabilities(trained.model, v) for v in tta_views(images.images)[1:]]
        )
        if split == "val":
            out["val_stress"] = np.stack(
                [model_io.predict_probabilities(trained.model, v) for v in stress_views(images.images)]
            )
    return out


STRESS_VIEWS = ("gamma 0.6", "gamma 1.6", "blur", "low contrast", "zoom out", "noise")


def stress_views(images):
    """The validation images as another detector might render them: an acquisition-shift proxy.

    Built from training-hospital images only, so it can steer choices without the test split.
    """
    import numpy as np
    from PIL import Image, ImageFilter

    x = images.astype(np.float32)
    rng = np.random.default_rng(0)
    blurred = np.stack(
        [np.asarray(Image.fromarray(i[..., 0]).filter(ImageFilter.GaussianBlur(1.5)))[..., None] for i in images]
    ).astype(np.float32)
    side = images.shape[1]
    inner = round(side * 0.85)
    pad = (side - inner) // 2
    zoomed = np.zeros_like(x)
    for k, i in enumerate(images):
        small = np.asarray(Image.fromarray(i[..., 0]).resize((inner, inner), Image.Resampling.BILINEAR))
        zoomed[k, pad : pad + inner, pad : pad + inner, 0] = small
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    views = [
        255.0 * (x / 255.0) ** 0.6,
        255.0 * (x / 255.0) ** 1.6,
        blurred,
        mean + 0.6 * (x - mean),
        zoomed,
        x + rng.normal(0, 8.0, x.shape),
    ]
    return [np.clip(np.round(v), 0, 255).astype(np.uint8) for v in views]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", required=True)
    parser.add_argument("--seeds", default="42,1,2")
    parser.add_argument("--data_dir", default=str(REPO.parent / "shared" / "data" / "chest_xray"))
    parser.add_argument("--out", default=str(REPO / "outputs" / "ablation"))
    parser.add_argument("--rescore", action="store_true", help="score every run of results.jsonl again")
    parser.add_argument("extra", nargs="*", help="entry-point arguments of the variant, e.g. --equalize clahe")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    (out / "scores").mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{out / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import mlflow
    import numpy as np
    from sklearn.metrics import roc_auc_score, roc_curve

    from pneumo import tracking

    mlflow.set_tracking_uri(uri)
    cache = str(out / "cache")
    if args.rescore:
        with open(out / "results.jsonl") as handle:
            for line in handle:
                record = json.loads(line)
                np.savez(
                    out / "scores" / f"{record['variant']}-{record['seed']}.npz", **score_run(record["run_id"], cache)
                )
        return
    for seed in [int(s) for s in args.seeds.split(",")]:
        tag = f"{args.variant}-{seed}"
        if (out / "scores" / f"{tag}.npz").is_file():
            print("done already:", tag)
            continue
        command = [
            sys.executable,
            "-m",
            "entrypoints.aug_cnn",
            "--data_dir",
            args.data_dir,
            "--cache_dir",
            cache,
            "--seed",
            str(seed),
            *args.extra,
        ]
        started = time.perf_counter()
        with open(out / f"{tag}.log", "w") as log_file:
            subprocess.run(
                command,
                cwd=REPO,
                env={**os.environ, "PYTHONPATH": str(REPO)},
                check=True,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        wall = time.perf_counter() - started
        # The newest aug_cnn run: an evaluate run started meanwhile in the same store must not be taken.
        run = mlflow.search_runs(
            search_all_experiments=True,
            filter_string="tags.`pneumo.entry_point` = 'aug_cnn' and attributes.status = 'FINISHED'",
            order_by=["start_time DESC"],
            max_results=1,
            output_format="list",
        )[0]
        scores = score_run(run.info.run_id, cache)
        np.savez(out / "scores" / f"{tag}.npz", **scores)
        labels, probabilities, threshold = scores["test_labels"], scores["test_probabilities"], scores["threshold"]
        fpr, tpr, _ = roc_curve(labels, probabilities)
        predicted = probabilities >= threshold
        record = {
            "variant": args.variant,
            "seed": seed,
            "args": args.extra,
            "run_id": run.info.run_id,
            "wall_seconds": round(wall, 1),
            "epochs_run": tracking.read_summary(run.info.run_id).get("epochs_run"),
            "val_roc_auc": roc_auc_score(scores["val_labels"], scores["val_probabilities"]),
            "threshold": threshold,
            "test_roc_auc": roc_auc_score(labels, probabilities),
            "test_sensitivity": float(predicted[labels == 1].mean()),
            "test_specificity": float((~predicted[labels == 0]).mean()),
            "test_best_specificity_at_0.98": float(1 - fpr[np.argmax(tpr >= 0.98)]),
        }
        with open(out / "results.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
