"""Progress bars for long first-time work (hashing and decoding thousands of images), on terminals only."""

from __future__ import annotations

import sys
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], total: int, desc: str, unit: str = "image") -> Iterator[T]:
    """``items`` with a tqdm bar on stderr when stderr is a terminal; unchanged otherwise (logs, CI, MLflow runs)."""
    if not sys.stderr.isatty():
        yield from items
        return
    from tqdm.auto import tqdm

    with tqdm(items, total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True) as bar:
        yield from bar
