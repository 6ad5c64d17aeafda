"""A prepared dataset opened for reading: meta, memory-mapped store, samples, item tables."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import numpy as np

from longrec.data.files import load_npy, read_parquet
from longrec.data.samples import Columns, read_split
from longrec.data.schema import FORMAT_VERSION, FieldSpec
from longrec.data.store import SequenceStore
from longrec.errors import DataError, UserError


class PreparedDataset:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        meta_path = self.root / "meta.json"
        if not meta_path.exists():
            raise UserError(
                f"{self.root} is not a prepared dataset (no meta.json); run `longrec prepare`"
            )
        try:
            self.meta: dict = json.loads(meta_path.read_text())
            fields = self.meta["fields"]
        except (ValueError, KeyError, TypeError, OSError) as err:
            raise DataError(
                meta_path, f"not a dataset description ({type(err).__name__})"
            ) from None
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise UserError(
                f"{self.root}: dataset format {self.meta.get('format_version')} but this longrec reads "
                f"format {FORMAT_VERSION}; prepare it again"
            )
        self.fields: dict[str, FieldSpec] = {f["name"]: FieldSpec.from_json(f) for f in fields}
        self._splits: dict[str, Columns] = {}

    @cached_property
    def store(self) -> SequenceStore:
        return SequenceStore.open(self.root)

    @property
    def fingerprint(self) -> str | None:
        """The vocabularies' digest (`compute_fingerprint`); None for datasets prepared before
        it existed."""
        return self.meta.get("fingerprint")

    def check_belongs(self, fingerprint: str | None, fields: dict, owner: str) -> None:
        """UserError unless this dataset is the one `owner` (a run) was built on: the same
        fingerprint, or, where either side predates fingerprints, the same vocabulary sizes."""
        mine = self.fingerprint
        if fingerprint and mine:
            if fingerprint != mine:
                raise UserError(
                    f"{self.root} is not the dataset {owner} was trained on (vocabulary "
                    f"fingerprint {mine[7:19]} vs {fingerprint[7:19]}): its ids would map to "
                    "other users, items and categories"
                )
            return
        for name, spec in fields.items():
            if name in self.fields and self.fields[name].vocab_size != spec.vocab_size:
                raise UserError(
                    f"{self.root} is not the dataset {owner} was trained on (field {name}: "
                    f"{self.fields[name].vocab_size:,} ids, the run has {spec.vocab_size:,})"
                )

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
        return {p.stem: load_npy(p) for p in sorted((self.root / "items").glob("*.npy"))}

    def truth(self, split: str) -> Columns | None:
        """Ground-truth relevant behaviours (synthetic data): sample, store_row, relevance."""
        path = self.root / "truth" / f"{split}.parquet"
        return _read_parquet(path) if path.exists() else None


def compute_fingerprint(root: Path, meta: dict) -> str:
    """A digest of what makes a dataset's ids mean what they mean: every vocabulary (raw value
    at each index) and the field layout. Two datasets share it only if a model trained on one
    reads the other's ids as the same users, items and categories."""
    import hashlib

    h = hashlib.sha256()
    layout = {k: meta.get(k) for k in ("fields", "target_fields", "n_users")}
    h.update(json.dumps(layout, sort_keys=True).encode())
    for path in sorted((Path(root) / "vocab").glob("*.parquet")):
        table = read_parquet(path, columns=["value", "index"])
        index = table["index"].to_numpy()
        order = np.argsort(index, kind="stable")
        values = table["value"].to_pylist()
        h.update(path.name.encode() + b"\0" + index[order].astype("<i8").tobytes())
        h.update("\0".join(str(values[i]) for i in order).encode())
    return "sha256:" + h.hexdigest()


def _read_parquet(path: Path) -> Columns:
    table = read_parquet(path)
    return {name: table[name].to_numpy() for name in table.column_names}


def _vocab_len(root: Path, name: str) -> int:

    path = root / "vocab" / f"{name}.parquet"
    if not path.exists():
        raise KeyError(name)
    index = read_parquet(path, columns=["index"])["index"].to_numpy()
    return int(index.max()) + 1 if len(index) else 2
