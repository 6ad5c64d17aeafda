"""Bulk-load every user's behaviours from a prepared dataset into a history store.

The dataset's SequenceStore is CSR (rows of user u are offsets[u]:offsets[u+1], time-ordered),
so a batch of consecutive users is one contiguous block of rows: it is packed into records in
one vectorised step, cut into users by offsets, and written in one durable transaction (LMDB
write transaction / Redis MULTI/EXEC). Each user's history is *replaced* (its version goes up),
so loading again is idempotent for the data and still invalidates any cached user state. Users
are named by their raw id from `vocab/user.parquet`, as the ranker's requests name them.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from longrec.data.dataset import PreparedDataset
from longrec.data.files import read_parquet
from longrec.errors import DataError
from longrec.serve.history import HistoryStore, open_history


@dataclass
class LoadResult:
    users: int  # users written (every user with at least one behaviour)
    behaviours: int  # behaviours written
    dropped: int  # behaviours beyond max_per_user per user, not written
    seconds: float

    def __str__(self) -> str:
        rate = self.behaviours / max(self.seconds, 1e-9)
        text = f"{self.users:,} users, {self.behaviours:,} behaviours in {self.seconds:.2f} s ({rate:,.0f}/s)"
        return text + (
            f", {self.dropped:,} older than max_per_user dropped" if self.dropped else ""
        )


def raw_user_ids(root: Path, n_users: int) -> np.ndarray:
    """Raw user id (text) of every user index; None where the vocabulary has none (0, 1)."""
    path = root / "vocab" / "user.parquet"
    if not path.exists():
        raise DataError(path, "missing: the dataset has no user vocabulary")
    table = read_parquet(path, columns=["value", "index"])
    index = table["index"].to_numpy()
    values = np.array(table["value"].to_pylist(), dtype=object)
    keep = index >= 2
    index, values = index[keep], values[keep]
    if len(np.unique(index)) != len(index):
        raise DataError(path, "two raw user ids share one index")
    if len(index) and index.max() >= n_users:
        raise DataError(path, f"user index {index.max()} beyond the store's {n_users} users")
    out = np.full(n_users, None, dtype=object)
    out[index] = values
    return out


def load_history(
    dataset_dir: str | Path,
    url: str | HistoryStore,
    *,
    batch_users: int = 1_000,
    batch_rows: int | None = None,
    max_per_user: int | None = None,
    progress: bool | None = None,
) -> LoadResult:
    """Load all behaviours of the prepared dataset at `dataset_dir` into the store at `url` (a
    URL for `open_history`, or an open store with the dataset's fields).

    Writes one transaction per batch of at most `batch_users` users and about `batch_rows`
    behaviours (a longer single user is one batch; default: the store's `bulk_rows`, 2M for
    LMDB, whose readers never wait for a writer, 250K for Redis, where one EXEC blocks every
    client while it runs, ~25 ms at that size). `progress`: a bar on stderr (None = only
    when stderr is a terminal).
    """
    ds = PreparedDataset(dataset_dir)
    fields = list(ds.fields.values())
    seq = ds.store
    missing = [f.name for f in fields if f.name not in seq.fields]
    if missing:
        raise DataError(ds.root / "store", f"no array for field(s) {missing}")
    offsets = np.asarray(seq.offsets, dtype=np.int64)
    raw = raw_user_ids(ds.root, seq.n_users)
    lengths = np.diff(offsets)
    users = np.flatnonzero(lengths > 0)
    unnamed = users[[raw[u] is None for u in users]]
    if len(unnamed):
        raise DataError(
            ds.root / "vocab" / "user.parquet", f"no raw id for user index {unnamed[0]}"
        )

    store = (
        open_history(url, fields, max_per_user=max_per_user, dataset=ds.fingerprint)
        if isinstance(url, str)
        else url
    )
    batch_rows = batch_rows or store.bulk_rows
    start = time.perf_counter()
    written = 0
    bar = None
    if progress or (progress is None and sys.stderr.isatty()):
        from tqdm import tqdm

        bar = tqdm(
            total=int(lengths.sum()),
            unit="beh",
            unit_scale=True,
            desc="load history",
            file=sys.stderr,
        )
    try:
        for lo_u, hi_u in _batches(users, lengths, batch_users, batch_rows):
            batch_users_idx = users[lo_u:hi_u]
            first, last = int(batch_users_idx[0]), int(batch_users_idx[-1])
            lo, hi = int(offsets[first]), int(offsets[last + 1])
            block = np.empty(hi - lo, dtype=store.dtype)
            block["ts"] = seq.ts[lo:hi]
            for spec in store.fields:
                block[spec.name] = seq.fields[spec.name][lo:hi]
            items = [
                (raw[u], block[offsets[u] - lo : offsets[u + 1] - lo])
                for u in batch_users_idx.tolist()
            ]
            written += store.replace_many(items)
            if bar is not None:
                bar.update(hi - lo)
    finally:
        if bar is not None:
            bar.close()
        if isinstance(url, str):
            store.close()
    total = int(lengths.sum())
    return LoadResult(
        users=len(users),
        behaviours=written,
        dropped=total - written,
        seconds=time.perf_counter() - start,
    )


def _batches(users: np.ndarray, lengths: np.ndarray, batch_users: int, batch_rows: int):
    """(start, stop) positions into `users`: consecutive users, bounded in users and rows."""
    rows = np.cumsum(lengths[users])
    start = 0
    while start < len(users):
        base = rows[start - 1] if start else 0
        by_rows = int(np.searchsorted(rows, base + batch_rows, side="right"))
        stop = min(start + batch_users, max(by_rows, start + 1), len(users))
        yield start, stop
        start = stop
