"""Batch scoring an archive with Spark: ``mlflow.pyfunc.spark_udf`` in a real local Spark session.

A folder of real X-rays (DICOM in several transfer syntaxes, and JPEGs) is read by Spark as
binary files, base64-encoded in Spark and scored by the logged pneumo model as a Spark UDF; every
answer must be the one ``python -m pneumo.predict`` gives for the same file. Spark needs a Java
runtime (``java`` on ``PATH`` or under ``$JAVA_HOME``; .ci/run installs Debian's); without one
this test skips, saying so.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

import mlflow
import numpy as np
import pandas as pd
import pytest

from archive_files import log_tiny_model, write_archive
from pneumo import model_io, predict

pytestmark = pytest.mark.slow


def java_runtime() -> str | None:
    """The ``java`` that pyspark will start: ``$JAVA_HOME/bin/java``, else the one on ``PATH``."""
    home = os.environ.get("JAVA_HOME")
    if home and Path(home, "bin", "java").is_file():
        return str(Path(home, "bin", "java"))
    return shutil.which("java")


@pytest.fixture
def spark():
    """A local Spark session on two cores, without its web UI; stopped afterwards."""
    if java_runtime() is None:
        pytest.skip("no Java runtime (java on PATH or $JAVA_HOME/bin/java): Spark needs one")
    from pyspark.sql import SparkSession

    session = (
        SparkSession.builder.master("local[2]")
        .appName("pneumo-test-spark-udf")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .getOrCreate()
    )
    yield session
    session.stop()


def test_spark_udf_answers_what_predict_answers_for_every_file(tracking, tmp_path, spark):
    from pyspark.sql import functions as F

    folder = tmp_path / "archive"
    files = write_archive(folder, 8)
    uri = log_tiny_model()
    csv = tmp_path / "predict.csv"
    assert predict.main([str(folder), "--model-uri", uri, "--output", str(csv)]) == 0
    expected = pd.read_csv(csv, keep_default_na=False).set_index("file")

    score = mlflow.pyfunc.spark_udf(spark, uri, env_manager="local")  # answer columns from the signature
    archive = spark.read.format("binaryFile").load(str(folder))
    scored = (
        archive.withColumn(model_io.IMAGE_COLUMN, F.base64("content"))
        .select("path", score(model_io.IMAGE_COLUMN).alias("answer"))
        .select("path", "answer.*")
        .toPandas()
    )

    scored["file"] = [unquote(urlparse(path).path) for path in scored.pop("path")]
    scored = scored.set_index("file")
    assert list(scored.columns) == [*model_io.OUTPUT_COLUMNS, *model_io.IDENTITY_COLUMNS]
    assert scored["model_run_id"].nunique() == 1 and scored["model_id"].iloc[0].startswith("m-")
    assert sorted(scored.index) == sorted(files) == sorted(expected.index)
    scored = scored.loc[expected.index]
    np.testing.assert_allclose(scored["probability"], expected["probability"], rtol=0, atol=1e-6)
    assert list(scored["label"]) == list(expected["label"])
    assert np.allclose(scored["threshold"], expected["threshold"])
    # An untrained model still tells images apart: equal answers are not one constant repeated.
    assert scored["probability"].nunique() == len(scored)
