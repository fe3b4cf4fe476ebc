"""Entry point ``prepare``: discover, validate and split the images into a logged manifest."""

from __future__ import annotations

from pneumo import tracking
from pneumo.config import DataConfig


def prepare(data: DataConfig) -> str:
    """Entry point ``prepare``: write and log the split manifest; returns the run id."""
    with tracking.start_run("prepare", data) as run:
        tracking.prepare_manifest(data)
        return run.info.run_id
