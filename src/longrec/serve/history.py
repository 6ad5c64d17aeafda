"""History stores: every user's recent behaviours for online ranking, appended as they happen.

One interface, `HistoryStore`, two backends:

* LMDB (`lmdb:///abs/dir` or `lmdb://relative/dir`), the embedded default: a directory on the
  ranking server's disk, see `history_lmdb.py`;
* Redis (`redis://HOST:PORT[/DB]`), shared by several ranking servers, see `history_redis.py`.

A behaviour is one fixed-size packed record (`record_dtype`): `ts` as int64 followed by one int32
per field value (W int32 for a multi-valued field of width W), in the dataset's field order,
little-endian, no padding. Taobao's item, category, behavior: 8 + 3 * 4 = 20 bytes. The store
keeps its schema (field names and widths, the chunk size) in a metadata key and refuses to open
with other fields (`HistorySchemaError`).

Semantics shared by both backends (the tests run the same suite on both):

* `append(user, events)` adds behaviours after the user's existing ones, in the order given, and
  returns the user's new *version* (1 after the first append, +1 per append; it never goes back,
  so a ranker may cache user-side state keyed by (user, version)). Events are never re-sorted:
  callers send them in time order. An event sent late (older `ts` than one already stored) is
  still stored after it, so `recent` returns arrival order and its `ts` is then not monotonic;
  a caller that cares sorts each batch before appending and never sends an older batch later.
* `recent(user, n)` returns the most recent `min(n, count)` behaviours, oldest first (most recent
  last, the Batch's order), as {field: int32 [n] or [n, W], "ts": int64 [n]}, and the version
  they belong to (read in one snapshot: data and version always agree). An unknown user gives
  empty arrays and version 0.
* Durable: when `append` returns, the behaviours and the new version are on disk together (one
  LMDB write transaction with fsync; one Redis MULTI/EXEC, which the server makes durable before
  replying only when it runs with `appendonly yes` and `appendfsync always`).
* Bounded: a user keeps at most `max_per_user` behaviours (default 50,000); older ones are
  dropped (whole chunks of `chunk` records at a time physically, exactly `max_per_user` as seen
  through `recent` and `count`).
* Thread-safe: one store object may be shared by the server's threads (`recent` concurrently with
  `append`).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np

from longrec.data.schema import FieldSpec
from longrec.errors import UserError

TS = "ts"
DEFAULT_MAX_PER_USER = 50_000
DEFAULT_CHUNK = 1024
STORE_FORMAT = "longrec-history"
STORE_FORMAT_VERSION = 1
MAX_USER_BYTES = 256  # LMDB keys are at most 511 bytes; a user id is far shorter in practice

_INT32 = np.iinfo(np.int32)


class HistorySchemaError(UserError):
    """The store was created for other fields than the ones it is opened with."""


def record_dtype(fields: Sequence[FieldSpec] | Sequence[tuple[str, int]]) -> np.dtype:
    """The packed record of one behaviour: int64 ts, then int32 (or int32[W]) per field."""
    parts: list[tuple] = [(TS, "<i8")]
    for name, width in _name_widths(fields):
        parts.append((name, "<i4") if width == 1 else (name, "<i4", (width,)))
    return np.dtype(parts)


def _name_widths(fields: Sequence[FieldSpec] | Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
    out = []
    for f in fields:
        name, width = (f.name, f.width) if isinstance(f, FieldSpec) else (f[0], int(f[1]))
        if name == TS:
            raise ValueError("a field may not be called 'ts' (the timestamp is always stored)")
        if width < 1:
            raise ValueError(f"field '{name}' has width {width} < 1")
        out.append((name, int(width)))
    if len({n for n, _ in out}) != len(out):
        raise ValueError(f"duplicate field names in {[n for n, _ in out]}")
    return out


def schema_json(fields: Sequence[FieldSpec], chunk: int, dataset: str | None = None) -> str:
    """The metadata a store keeps about itself (compared on every open). `dataset` is the
    fingerprint of the vocabularies its ids come from (PreparedDataset.fingerprint)."""
    meta = {
        "format": STORE_FORMAT,
        "format_version": STORE_FORMAT_VERSION,
        "fields": [[name, width] for name, width in _name_widths(fields)],
        "chunk": int(chunk),
    }
    if dataset:
        meta["dataset"] = dataset
    return json.dumps(meta, sort_keys=True)


def missing_store(where: str) -> UserError:
    return UserError(
        f"{where}: no history store there; fill one with `longrec serve load-history`, or pass "
        "--create-history to start an empty one"
    )


def check_schema(
    stored: str | bytes, fields: Sequence[FieldSpec], where: str, dataset: str | None = None
) -> tuple[list[tuple[str, int]], int]:
    """The stored (field, width) layout and chunk size, if it holds the same fields as `fields`
    and ids of the same dataset (when both sides know their dataset's fingerprint).

    Field order may differ (the stored order is the record layout); names and widths may not.
    """
    try:
        meta = json.loads(stored)
        ok = meta.get("format") == STORE_FORMAT
    except (ValueError, AttributeError):
        ok = False
    if not ok:
        raise HistorySchemaError(f"{where} is not a longrec history store (unreadable metadata)")
    if meta.get("format_version") != STORE_FORMAT_VERSION:
        raise HistorySchemaError(
            f"{where}: history store format {meta.get('format_version')}, this longrec reads "
            f"format {STORE_FORMAT_VERSION}; load it again with `load_history`"
        )
    layout = [(str(n), int(w)) for n, w in meta["fields"]]
    wanted = _name_widths(fields)
    if sorted(layout) != sorted(wanted):
        raise HistorySchemaError(
            f"{where} holds fields {_describe(layout)} but was opened with {_describe(wanted)}; "
            "use a new store (or load this dataset's history into an empty one)"
        )
    theirs = meta.get("dataset")
    if dataset and theirs and theirs != dataset:
        raise HistorySchemaError(
            f"{where} holds histories of another dataset (vocabulary fingerprint {theirs[7:19]}, "
            f"wanted {dataset[7:19]}): its ids would be read as other items; use a new store"
        )
    return layout, int(meta["chunk"])


def _describe(layout: Iterable[tuple[str, int]]) -> str:
    return "[" + ", ".join(n if w == 1 else f"{n}[{w}]" for n, w in layout) + "]"


def check_user(user: str) -> bytes:
    if not isinstance(user, str):
        raise TypeError(f"user must be a str (the raw user id), got {type(user).__name__}")
    raw = user.encode("utf-8")
    if not raw or len(raw) > MAX_USER_BYTES or b"\x00" in raw:
        raise ValueError(
            f"user id must be 1 to {MAX_USER_BYTES} bytes of UTF-8 without NUL, got {user!r:.80}"
        )
    return raw


class HistoryStore(ABC):
    """Per-user behaviour histories: append in time order, read the most recent n.

    Backends implement `_append`, `_recent`, `_version`, `_count`, `_replace_many` and `close`
    on packed bytes; validation, packing and unpacking live here, so both store the same records.
    """

    fields: list[FieldSpec]
    max_per_user: int
    chunk: int
    dtype: np.dtype
    bulk_rows: int = 1_000_000  # behaviours per `replace_many` transaction in bulk loads

    def _init_schema(
        self, fields: Sequence[FieldSpec], layout: list[tuple[str, int]], chunk: int
    ) -> None:
        by_name = {f.name: f for f in fields}
        self.fields = [by_name[name] for name, _ in layout]
        self.dtype = record_dtype(layout)
        self.chunk = chunk

    @property
    def record_size(self) -> int:
        return self.dtype.itemsize

    # --- public API --------------------------------------------------------------------------
    def append(self, user: str, events: Mapping[str, Any]) -> int:
        """Append behaviours (fields of vocabulary indices [n] or [n, W], and int64 "ts"), in
        the order given, after the user's existing ones; return the user's new version.
        Durable once it returns. An empty batch changes nothing and returns the current version.
        """
        key = check_user(user)
        records = self.pack(events)
        if len(records) == 0:
            return self.version(user)
        if len(records) > self.max_per_user:
            records = records[-self.max_per_user :]
        return self._append(key, records)

    def recent(self, user: str, n: int) -> tuple[dict[str, np.ndarray], int]:
        """The user's most recent `n` behaviours (oldest first, most recent last) and the
        version they belong to, read in one snapshot. Unknown user: empty arrays, version 0."""
        key = check_user(user)
        n = max(0, min(int(n), self.max_per_user))
        data, version = self._recent(key, n)
        return self.unpack(data, n), version

    def version(self, user: str) -> int:
        """How many appends (and bulk loads) the user has had: 0 for an unknown user."""
        return self._version(check_user(user))

    def count(self, user: str) -> int:
        """How many behaviours `recent` can return for the user (at most `max_per_user`)."""
        return min(self._count(check_user(user)), self.max_per_user)

    def replace_many(self, histories: Iterable[tuple[str, np.ndarray]]) -> int:
        """Bulk load: replace each user's whole history by the given records (`self.dtype`, time
        order) in one durable transaction, bumping its version. Returns behaviours written.
        Used by `load_history`; an empty array deletes the user's behaviours."""
        batch = []
        for user, records in histories:
            if records.dtype != self.dtype:
                raise ValueError(f"records have dtype {records.dtype}, store needs {self.dtype}")
            batch.append((check_user(user), records[-self.max_per_user :]))
        if not batch:
            return 0
        self._replace_many(batch)
        return sum(len(r) for _, r in batch)

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> HistoryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- packing -----------------------------------------------------------------------------
    def pack(self, events: Mapping[str, Any]) -> np.ndarray:
        """Validate a batch of events and pack it into records (vectorised)."""
        names = [f.name for f in self.fields]
        missing = [n for n in [TS, *names] if n not in events]
        extra = [k for k in events if k != TS and k not in names]
        if missing or extra:
            raise ValueError(
                f"events must have exactly the fields {[TS, *names]}: "
                f"missing {missing}, unknown {extra}"
            )
        ts = _as_int(events[TS], TS)
        if ts.ndim != 1:
            raise ValueError(f"'ts' must have shape [n], got {ts.shape}")
        n = len(ts)
        out = np.empty(n, dtype=self.dtype)
        out[TS] = ts
        for spec in self.fields:
            arr = _as_int(events[spec.name], spec.name)
            if spec.width == 1 and arr.ndim == 2 and arr.shape[1] == 1:
                arr = arr[:, 0]
            want = (n,) if spec.width == 1 else (n, spec.width)
            if arr.shape != want:
                raise ValueError(
                    f"field '{spec.name}' must have shape {list(want)}, got {list(arr.shape)}"
                )
            if arr.size and (arr.min() < 0 or arr.max() > _INT32.max):
                raise ValueError(
                    f"field '{spec.name}' has values outside [0, 2**31): not vocabulary indices"
                )
            out[spec.name] = arr
        return out

    def unpack(
        self, data: bytes | bytearray | memoryview, n: int | None = None
    ) -> dict[str, np.ndarray]:
        """Records (the last `n` if given) as contiguous, writable arrays per field and "ts"."""
        size = self.record_size
        if len(data) % size:
            raise RuntimeError(
                f"corrupt history value: {len(data)} bytes is not a multiple of {size}"
            )
        records = np.frombuffer(data, dtype=self.dtype)
        if n is not None:
            records = records[len(records) - min(n, len(records)) :]
        return {name: records[name].copy() for name in (*(f.name for f in self.fields), TS)}

    # --- backend operations ------------------------------------------------------------------
    @abstractmethod
    def _append(self, user: bytes, records: np.ndarray) -> int: ...

    @abstractmethod
    def _recent(self, user: bytes, n: int) -> tuple[bytes, int]:
        """At least the last `n` records (fewer if the user has fewer), and the version."""

    @abstractmethod
    def _version(self, user: bytes) -> int: ...

    @abstractmethod
    def _count(self, user: bytes) -> int: ...

    @abstractmethod
    def _replace_many(self, batch: list[tuple[bytes, np.ndarray]]) -> None: ...


def _as_int(values: Any, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.size and arr.dtype.kind not in "iu":
        raise ValueError(f"'{name}' must hold integers, got dtype {arr.dtype}")
    return arr


# --- URLs ------------------------------------------------------------------------------------
def open_history(
    url: str,
    fields: Sequence[FieldSpec],
    *,
    max_per_user: int | None = None,
    chunk: int | None = None,
    **options: Any,
) -> HistoryStore:
    """Open (creating if needed) the history store at `url` for records of `fields`.

    `lmdb:///abs/dir`, `lmdb://relative/dir` (a directory; created) or `redis://HOST:PORT[/DB]`
    (also `rediss://` and `redis://:password@HOST:PORT/DB`). URL query parameters set options:
    `max_per_user=N` (both), `chunk=N` (records per chunk, used only when the store is created),
    `map_size_gb=N` (LMDB), `prefix=STR` (Redis key prefix, default `longrec:`). Keyword
    arguments win over the URL; `dataset` (a fingerprint) is recorded in a new store and must
    match an existing one's; `create=False` refuses a store that does not exist yet.
    """
    if not isinstance(url, str) or "://" not in url:
        raise UserError(
            f"history store URL {url!r} is not lmdb:///abs/dir, lmdb://relative/dir or "
            "redis://HOST:PORT[/DB]"
        )
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    known = {"max_per_user", "chunk"} | ({"map_size_gb"} if scheme == "lmdb" else {"prefix"})
    unknown = sorted(set(query) - known)
    if unknown:
        raise UserError(
            f"history store URL {url!r}: unknown option(s) {unknown}; known: {sorted(known)}"
        )
    opts: dict[str, Any] = {}
    for key in ("max_per_user", "chunk", "map_size_gb"):
        if key in query:
            try:
                opts[key] = int(query[key])
            except ValueError:
                raise UserError(f"history store URL {url!r}: {key} must be an integer") from None
    if "prefix" in query:
        opts["prefix"] = query["prefix"]
    if max_per_user is not None:
        opts["max_per_user"] = max_per_user
    if chunk is not None:
        opts["chunk"] = chunk
    opts.update(options)
    if opts.get("max_per_user", 1) < 1 or opts.get("chunk", 1) < 1:
        raise UserError(f"history store URL {url!r}: max_per_user and chunk must be >= 1")
    if scheme == "lmdb":
        path = unquote(parts.netloc + parts.path)
        if not path:
            raise UserError(f"history store URL {url!r} has no path: lmdb:///abs/dir or lmdb://dir")
        from longrec.serve.history_lmdb import LmdbHistoryStore

        return LmdbHistoryStore(Path(path), fields, **opts)
    if scheme in ("redis", "rediss"):
        try:
            host, port = parts.hostname, parts.port
        except ValueError:
            raise UserError(f"history store URL {url!r}: bad port") from None
        if not host:
            raise UserError(f"history store URL {url!r} has no host: redis://HOST:PORT[/DB]")
        db_text = parts.path.strip("/") or "0"
        if not db_text.isdigit():
            raise UserError(f"history store URL {url!r}: the database must be a number (/0)")
        from longrec.serve.history_redis import RedisHistoryStore

        return RedisHistoryStore(
            host=host,
            port=port or 6379,
            db=int(db_text),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            ssl=scheme == "rediss",
            fields=fields,
            **opts,
        )
    raise UserError(
        f"history store URL {url!r}: unknown scheme '{parts.scheme}' (use lmdb:// or redis://)"
    )
