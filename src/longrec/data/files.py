"""Reading a prepared dataset's files so that a truncated, corrupted or missing one is named.

A dataset on disk can be damaged after longrec wrote it (a copy cut short, a full disk, a file
from another dataset dropped in); the error must say which file and why in one line, not end
in a numpy or Arrow traceback.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from longrec.errors import DataError


def _reason(err: BaseException) -> str:
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return text[:160]


def load_npy(path: Path, mmap_mode: str | None = None) -> np.ndarray:
    """np.load without pickles; DataError naming the file if it is missing or unreadable."""
    if not path.is_file():
        raise DataError(path, "missing (the dataset is incomplete; prepare it again)")
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise DataError(path, f"truncated or not a .npy array ({_reason(err)})") from None


def read_parquet(path: Path, columns: list[str] | None = None) -> pa.Table:
    """pq.read_table; DataError naming the file if it is missing, unreadable or lacks a column."""
    if not path.is_file():
        raise DataError(path, "missing (the dataset is incomplete; prepare it again)")
    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError, ValueError) as err:
        raise DataError(path, f"truncated or not a parquet file ({_reason(err)})") from None
