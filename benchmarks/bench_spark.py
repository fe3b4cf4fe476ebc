"""Throughput of batch scoring a folder: ``mlflow.pyfunc.spark_udf`` in local Spark against ``pneumo.predict``.

Scores the same N real X-rays (the test split's JPEGs, NORMAL and PNEUMONIA, copied into a
temporary folder) both ways, with the main job's network (default ``aug_cnn``: 128 px grayscale,
untrained weights: scoring cost does not depend on them) logged as bench_serve.py logs it:

- ``predict``: :func:`pneumo.predict.predict_files` in this process (model download and load
  included), and once as ``python -m pneumo.predict`` (TensorFlow's import included);
- Spark: a ``local[CORES]`` session (its start timed apart) reads the folder as ``binaryFile``,
  base64-encodes it in Spark and scores it with the UDF (``env_manager="local"``); each action
  starts Python workers that load the model.

Reports files per second, cold (Spark's first action, which starts its Python workers, and the
whole ``predict`` command) and warm (the median of the later runs), the Spark/predict throughput
ratios, and the largest difference between the two answers.

    python benchmarks/bench_spark.py [--files 64] [--repeats 3] [--cores 2] [--data_dir ../shared/data/chest_xray]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench_serve import REPO, log_default_model  # noqa: E402


def timed(action) -> tuple[float, object]:
    """Seconds ``action()`` took, and what it returned."""
    start = time.perf_counter()
    result = action()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--cores", type=int, default=2, help="Spark's local[N]")
    parser.add_argument(
        "--data_dir", default=os.environ.get("PNEUMO_SHARED_DATA", str(REPO.parent / "shared" / "data" / "chest_xray"))
    )
    args = parser.parse_args()

    import mlflow
    from pyspark.sql import SparkSession
    from pyspark.sql import functions as F

    from pneumo import model_io, predict

    with tempfile.TemporaryDirectory() as folder:
        archive = Path(folder) / "archive"
        archive.mkdir()
        for name in ("NORMAL", "PNEUMONIA"):
            found = sorted(p for p in (Path(args.data_dir) / "test" / name).iterdir() if not p.name.startswith("."))
            for path in found[: args.files // 2]:
                shutil.copyfile(path, archive / f"{name}-{path.name}")
        files = predict.collect_files([str(archive)])
        os.environ["MLFLOW_TRACKING_URI"], model_uri = log_default_model(Path(folder))

        predict_runs = []
        for _ in range(args.repeats):
            seconds, frame = timed(lambda: predict.predict_files(files, model_uri))
            predict_runs.append(seconds)
        command = [sys.executable, "-m", "pneumo.predict", str(archive), "--model-uri", model_uri]
        command_seconds, _ = timed(
            lambda: subprocess.run([*command, "--output", str(Path(folder) / "p.csv")], check=True, capture_output=True)
        )

        session_seconds, spark = timed(
            lambda: (
                SparkSession.builder.master(f"local[{args.cores}]")
                .config("spark.ui.enabled", "false")
                .config("spark.sql.shuffle.partitions", str(args.cores))
                .getOrCreate()
            )
        )
        spark.sparkContext.setLogLevel("ERROR")
        try:
            score = mlflow.pyfunc.spark_udf(spark, model_uri, env_manager="local")
            scored_frame = (
                spark.read.format("binaryFile")
                .load(str(archive))
                .withColumn(model_io.IMAGE_COLUMN, F.base64("content"))
                .select("path", score(model_io.IMAGE_COLUMN).alias("answer"))
                .select("path", "answer.*")
            )
            partitions = scored_frame.rdd.getNumPartitions()
            spark_runs = []
            for _ in range(args.repeats):
                seconds, scored = timed(scored_frame.toPandas)
                spark_runs.append(seconds)
        finally:
            spark.stop()

    scored["file"] = [unquote(urlparse(p).path) for p in scored.pop("path")]
    merged = frame.merge(scored, on="file", suffixes=("", "_spark"))
    predict_s, spark_cold_s = statistics.median(predict_runs), spark_runs[0]
    spark_warm_s = statistics.median(spark_runs[1:]) if len(spark_runs) > 1 else float("nan")
    report = {
        "files": len(files),
        "model": "default aug_cnn (128 px gray, untrained)",
        "spark_cores": args.cores,
        "spark_partitions": partitions,
        "predict_seconds": [round(s, 2) for s in predict_runs],
        "predict_files_per_s": round(len(files) / predict_s, 1),
        "predict_command_seconds": round(command_seconds, 2),
        "spark_session_start_seconds": round(session_seconds, 2),
        "spark_seconds": [round(s, 2) for s in spark_runs],
        "spark_cold_files_per_s": round(len(files) / spark_cold_s, 1),
        "spark_warm_files_per_s": round(len(files) / spark_warm_s, 1),
        # Warm: Python workers already started and the model loaded, against predict in process.
        "spark_over_predict_warm": round(predict_s / spark_warm_s, 2),
        # Cold: session start and first action, against the whole `python -m pneumo.predict` command.
        "spark_over_predict_cold": round(command_seconds / (session_seconds + spark_cold_s), 2),
        "answers_compared": len(merged),
        "max_probability_difference": float((merged["probability"] - merged["probability_spark"]).abs().max()),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
