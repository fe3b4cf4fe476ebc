"""Benchmark the main job: the default ``aug_cnn`` run, end to end, as a user starts it.

Runs ``python -m entrypoints.aug_cnn`` in a subprocess with a throw-away tracking store, then
prints wall time, training throughput, peak memory and the validation figures it logged.

    python benchmarks/bench_aug_cnn.py --data_dir ../shared/data/chest_xray [-- extra entry-point args]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow

from pneumo import tracking

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=str(REPO.parent / "shared" / "data" / "chest_xray"))
    parser.add_argument("extra", nargs="*", help="more entry-point arguments, e.g. --epochs 4")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        uri = f"sqlite:///{folder}/mlflow.db"
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "TF_CPP_MIN_LOG_LEVEL": "2"}
        command = [
            sys.executable,
            "-m",
            "entrypoints.aug_cnn",
            "--data_dir",
            args.data_dir,
            "--cache_dir",
            str(Path(folder) / "cache"),
            *args.extra,
        ]
        started = time.perf_counter()
        subprocess.run(command, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - started
        peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        mlflow.set_tracking_uri(uri)
        run = mlflow.search_runs(search_all_experiments=True, max_results=1, output_format="list")[0]
    metrics = {**run.data.metrics, **tracking.read_summary(run.info.run_id)}
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
        "wall_seconds": round(wall, 1),
        "fit_seconds": round(metrics["fit_seconds"], 1),
        "epochs_run": int(metrics["epochs_run"]),
        "train_images_per_second": round(metrics["train_images_per_second"], 1),
        "peak_memory_mib": round(peak_mib),
        "dtype_policy": run.data.params.get("dtype_policy"),
        "val_roc_auc": round(metrics["val_roc_auc"], 4),
        "threshold": round(metrics["threshold"], 4),
        "val_sensitivity_at_threshold": round(metrics["val_sensitivity_at_threshold"], 4),
        "val_specificity_at_threshold": round(metrics["val_specificity_at_threshold"], 4),
        "val_accuracy_at_0.5": round(metrics["val_accuracy_at_0.5"], 4),
    }
    width = max(map(len, report))
    for key, value in report.items():
        print(f"{key:<{width}}  {value}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
