"""A prepared dataset opened for reading: meta, memory-mapped store, samples, item tables."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import numpy as np

from longrec.data.samples import Columns, read_split
from longrec.data.schema import FORMAT_VERSION, FieldSpec
from longrec.data.store import SequenceStore
from longrec.errors import UserError


class PreparedDataset:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        meta_path = self.root / "meta.json"
        if not meta_path.exists():
            raise UserError(
                f"{self.root} is not a prepared dataset (no meta.json); run `longrec prepare`"
            )
        self.meta: dict = json.loads(meta_path.read_text())
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise UserError(
                f"{self.root}: dataset format {self.meta.get('format_version')} but this longrec reads "
                f"format {FORMAT_VERSION}; prepare it again"
            )
        self.fields: dict[str, FieldSpec] = {
            f["name"]: FieldSpec.from_json(f) for f in self.meta["fields"]
        }
        self._splits: dict[str, Columns] = {}

    @cached_property
    def store(self) -> SequenceStore:
        return SequenceStore.open(self.root)

    @property
    def n_users(self) -> int:
        return int(self.meta["n_users"])

    @property
    def target_fields(self) -> list[str]:
        return list(self.meta.get("target_fields", []))

    def vocab_size(self, name: str) -> int:
        if name == "user":
            return self.n_users
        if name in self.fields:
            return self.fields[name].vocab_size
        if name == "target_type":
            return int(self.meta.get("target_type_vocab", 0)) or _vocab_len(self.root, name)
        raise KeyError(name)

    def split(self, name: str) -> Columns:
        if name not in self._splits:
            path = self.root / "samples" / f"{name}.parquet"
            if not path.exists():
                raise UserError(f"{self.root} has no split '{name}'")
            self._splits[name] = read_split(self.root, name)
        return self._splits[name]

    @cached_property
    def item_tables(self) -> dict[str, np.ndarray]:
        return {p.stem: np.load(p) for p in sorted((self.root / "items").glob("*.npy"))}

    def truth(self, split: str) -> Columns | None:
        """Ground-truth relevant behaviours (synthetic data): sample, store_row, relevance."""
        path = self.root / "truth" / f"{split}.parquet"
        return _read_parquet(path) if path.exists() else None


def _read_parquet(path: Path) -> Columns:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    return {name: table[name].to_numpy() for name in table.column_names}


def _vocab_len(root: Path, name: str) -> int:
    import pyarrow.parquet as pq

    path = root / "vocab" / f"{name}.parquet"
    if not path.exists():
        raise KeyError(name)
    index = pq.read_table(path, columns=["index"])["index"].to_numpy()
    return int(index.max()) + 1 if len(index) else 2
