"""SequenceStore: every user's behaviours exactly once, as CSR arrays on disk.

Behaviours of user u are rows `offsets[u]:offsets[u+1]` of every field array, sorted by
(user, ts) and stable for equal timestamps (file order). Samples never copy a history: they
point into the store with `hist_end` (exclusive), and the loader slices the most recent
`max_len` rows before it. Arrays are .npy files opened memory-mapped, so a 100M-behaviour store
costs no RAM until touched and is shared between loader workers by the page cache.

Layout (inside a prepared dataset):
    store/offsets.npy        int64 [n_users + 1]   (n_users = user vocabulary size)
    store/ts.npy             int64 [N]
    store/source_row.npy     int64 [N]             row of the behaviour in the source file
    store/<field>.npy        int32 [N] or [N, W]   vocabulary indices (0 = padding)
    items/<field>.npy        int32 [n_items] or [n_items, W]   item-side field of each item
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from longrec.data.files import load_npy
from longrec.data.schema import FieldSpec
from longrec.errors import DataError


@dataclass
class SequenceStore:
    offsets: np.ndarray
    ts: np.ndarray
    fields: dict[str, np.ndarray]
    source_row: np.ndarray | None = None

    @classmethod
    def open(cls, root: str | Path, mmap: bool = True) -> SequenceStore:
        root = Path(root) / "store"
        mode = "r" if mmap else None
        arrays = {p.stem: load_npy(p, mode) for p in sorted(root.glob("*.npy"))}
        for need in ("offsets", "ts"):
            if need not in arrays:
                raise DataError(root / f"{need}.npy", "missing (the dataset is incomplete)")
        offsets = np.asarray(arrays.pop("offsets"))
        rows = int(offsets[-1]) if offsets.ndim == 1 and len(offsets) else -1
        if rows < 0 or offsets[0] != 0:
            raise DataError(root / "offsets.npy", "not a store's row offsets")
        for name, array in arrays.items():
            if array.shape[0] != rows:
                raise DataError(
                    root / f"{name}.npy",
                    f"{array.shape[0]:,} rows where the store has {rows:,} (truncated, or from "
                    "another dataset)",
                )
        ts = arrays.pop("ts")
        source_row = arrays.pop("source_row", None)
        return cls(offsets=offsets, ts=ts, fields=arrays, source_row=source_row)

    @property
    def n_users(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_rows(self) -> int:
        return int(self.offsets[-1])

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def user_of_rows(self) -> np.ndarray:
        """User index of every row (int64 [N]); materialised, so call once."""
        return np.repeat(np.arange(self.n_users, dtype=np.int64), self.lengths())

    def history(self, user: int, end: int | None = None) -> dict[str, np.ndarray]:
        """One user's behaviours (rows before `end` if given): for inspection and serving."""
        lo, hi = int(self.offsets[user]), int(self.offsets[user + 1])
        if end is not None:
            hi = min(hi, end)
        out = {name: np.asarray(arr[lo:hi]) for name, arr in self.fields.items()}
        out["ts"] = np.asarray(self.ts[lo:hi])
        return out


def history_end(
    ts: np.ndarray, offsets: np.ndarray, user: np.ndarray, target_ts: np.ndarray
) -> np.ndarray:
    """First store row of each user at or after `target_ts`: the exclusive end of a history
    strictly earlier than the target. A binary search inside every user's (time-sorted) range,
    vectorised over targets: ~log2(longest history) passes, no array the size of the store."""
    lo = offsets[user].astype(np.int64)
    hi = offsets[np.asarray(user) + 1].astype(np.int64)
    target_ts = np.asarray(target_ts, dtype=np.int64)
    active = np.flatnonzero(lo < hi)
    while len(active):
        mid = (lo[active] + hi[active]) // 2
        right = np.asarray(ts[mid]) < target_ts[active]
        lo[active[right]] = mid[right] + 1
        hi[active[~right]] = mid[~right]
        active = active[lo[active] < hi[active]]
    return lo


class StoreWriter:
    """Fills the store's .npy files chunk by chunk (memory-mapped), so size is bounded by disk."""

    def __init__(self, root: Path, n_rows: int, specs: list[FieldSpec]):
        self.dir = root / "store"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.pos = 0
        self.n_rows = n_rows
        self.arrays: dict[str, np.ndarray] = {
            "ts": self._open("ts", np.int64, (n_rows,)),
            "source_row": self._open("source_row", np.int64, (n_rows,)),
        }
        for spec in specs:
            shape = (n_rows,) if spec.width == 1 else (n_rows, spec.width)
            self.arrays[spec.name] = self._open(spec.name, np.int32, shape)

    def _open(self, name: str, dtype, shape) -> np.ndarray:
        return np.lib.format.open_memmap(
            self.dir / f"{name}.npy", mode="w+", dtype=dtype, shape=shape
        )

    def append(self, chunk: dict[str, np.ndarray]) -> None:
        n = len(chunk["ts"])
        for name, arr in self.arrays.items():
            arr[self.pos : self.pos + n] = chunk[name]
        self.pos += n

    def close(self, offsets: np.ndarray) -> None:
        if self.pos != self.n_rows:
            raise RuntimeError(f"store writer got {self.pos} rows, expected {self.n_rows}")
        for arr in self.arrays.values():
            arr.flush()
        self.arrays.clear()
        np.save(self.dir / "offsets.npy", offsets.astype(np.int64))
