"""Entry point ``prepare``: discover, validate and split the images into a logged manifest."""

from __future__ import annotations

from pneumo import data as data_lib
from pneumo import manifests, tracking
from pneumo.config import DataConfig, RunConfigs


def run_name(data: DataConfig) -> str:
    """``prepare-val0.1``: the validation fraction is what tells prepare runs apart."""
    return f"prepare-val{data.val_fraction:g}"


def prepare(data: DataConfig) -> str:
    """Entry point ``prepare``: write and log the split manifest; returns the run id."""
    with tracking.start_run(RunConfigs("prepare", data, name=run_name(data))) as run:
        manifests.log_manifest(data_lib.prepare_manifest(data), context="prepare")
        return run.info.run_id
