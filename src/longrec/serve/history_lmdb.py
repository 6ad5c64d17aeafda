"""The LMDB history store: an embedded directory, the ranking server's default.

Layout (one LMDB environment = one directory holding `data.mdb` and `lock.mdb`; three named
databases inside it):

    meta    b"schema"                 -> JSON: format, fields [[name, width], ...], chunk
    users   user (UTF-8)              -> 24 bytes little-endian uint64: version, first, total
    chunks  user + b"\\x00" + uint64 BE c -> packed records c*chunk .. (c+1)*chunk - 1 of the user

Every behaviour a user ever had has a position (0, 1, 2, ... in append order); positions
`first .. total-1` are the visible ones (`count = total - first`, at most `max_per_user`).
Chunk c holds positions [c*chunk, (c+1)*chunk): all full chunks are immutable, only the user's
last (partial) chunk is rewritten by an append, so an append writes at most `chunk` records
(20 KB for Taobao's 20-byte records at chunk=1024) however long the history is. `recent(n)`
reads the last ceil(n/chunk)+1 chunks in one read transaction. Trimming to `max_per_user`
deletes chunks that lie wholly before `first`. The big-endian chunk number keeps one user's
chunks adjacent and in order in the B-tree.

Durability: every append is one write transaction that updates the chunks and the user's
(version, first, total) together, committed with fsync (`sync=True, metasync=True`), so a
returned append survives a kill -9 of the process and a power loss; a killed writer leaves the
previous committed state (LMDB is copy-on-write).

Size: the environment is opened with a large map (default 64 GB, `map_size_gb=`): address space
only, the data file grows with what is written (it is not preallocated on Linux). A full map
raises a clear error; reopen with a larger `map_size_gb`. Space freed by trimming or replacing is
reused by LMDB, the file never shrinks (`mdb_copy -c` compacts).

Concurrency: reads use their own read transaction (MVCC, never blocked by the writer), so many
threads may call `recent` while one appends; writes are serialised (a lock inside the process,
LMDB's writer lock across processes, so several server processes on one machine may share the
directory). LMDB forbids opening one environment twice in one process, so stores opened on the
same directory in one process share one environment (reference counted).
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Sequence
from pathlib import Path

import lmdb
import numpy as np

from longrec.data.schema import FieldSpec
from longrec.errors import UserError
from longrec.serve.history import (
    DEFAULT_CHUNK,
    DEFAULT_MAX_PER_USER,
    HistoryStore,
    check_schema,
    missing_store,
    schema_json,
)

HEAD = struct.Struct("<QQQ")  # version, first, total
CHUNK_NO = struct.Struct(">Q")
MAX_READERS = 1024
SCHEMA_KEY = b"schema"

_ENVS: dict[str, list] = {}  # realpath -> [environment, reference count]
_ENVS_LOCK = threading.Lock()


def _acquire_env(path: Path, map_size: int) -> lmdb.Environment:
    key = os.path.realpath(path)
    with _ENVS_LOCK:
        if key in _ENVS:
            _ENVS[key][1] += 1
            return _ENVS[key][0]
        try:
            path.mkdir(parents=True, exist_ok=True)
            env = lmdb.open(
                str(path),
                map_size=map_size,
                subdir=True,
                max_dbs=4,
                max_readers=MAX_READERS,
                lock=True,
                sync=True,
                metasync=True,
                readahead=False,
                meminit=False,
            )
        except (OSError, lmdb.Error) as err:
            raise UserError(f"cannot open LMDB history store {path}: {err}") from None
        env.reader_check()  # free reader slots left by killed processes
        _ENVS[key] = [env, 1]
        return env


def _release_env(env: lmdb.Environment) -> None:
    with _ENVS_LOCK:
        for key, entry in list(_ENVS.items()):
            if entry[0] is env:
                entry[1] -= 1
                if entry[1] == 0:
                    del _ENVS[key]
                    env.close()
                return


class LmdbHistoryStore(HistoryStore):
    bulk_rows = 2_000_000  # readers never wait for a writer: big transactions, few fsyncs

    def __init__(
        self,
        path: str | Path,
        fields: Sequence[FieldSpec],
        *,
        max_per_user: int = DEFAULT_MAX_PER_USER,
        chunk: int = DEFAULT_CHUNK,
        map_size_gb: int = 64,
        dataset: str | None = None,
        create: bool = True,
    ):
        self.path = Path(path)
        self.max_per_user = int(max_per_user)
        if not create and not (self.path / "data.mdb").is_file():
            raise missing_store(f"lmdb://{self.path}")
        self._env = _acquire_env(self.path, int(map_size_gb) << 30)
        self._closed = False
        self._wlock = threading.Lock()
        try:
            self._meta = self._env.open_db(b"meta")
            self._users = self._env.open_db(b"users")
            self._chunks = self._env.open_db(b"chunks")
            with self._env.begin(write=True, db=self._meta) as txn:
                stored = txn.get(SCHEMA_KEY)
                if stored is None:
                    stored = schema_json(fields, chunk, dataset).encode()
                    txn.put(SCHEMA_KEY, stored)
            layout, chunk = check_schema(bytes(stored), fields, f"lmdb://{self.path}", dataset)
        except BaseException:
            self.close()
            raise
        self._init_schema(fields, layout, chunk)

    def __repr__(self) -> str:
        return f"LmdbHistoryStore({str(self.path)!r}, fields={[f.name for f in self.fields]})"

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            _release_env(self._env)

    # --- backend operations ------------------------------------------------------------------
    def _ckey(self, user: bytes, c: int) -> bytes:
        return user + b"\x00" + CHUNK_NO.pack(c)

    def _head(self, txn: lmdb.Transaction, user: bytes) -> tuple[int, int, int]:
        raw = txn.get(user, db=self._users)
        return HEAD.unpack(raw) if raw is not None else (0, 0, 0)

    def _write_from(
        self, txn: lmdb.Transaction, user: bytes, pos: int, records: np.ndarray
    ) -> None:
        """Write `records` at positions pos, pos+1, ...; the chunk holding `pos` is extended."""
        size, chunk = self.record_size, self.chunk
        data = memoryview(records.tobytes())
        done = 0
        while done < len(records):
            c, inside = divmod(pos + done, chunk)
            take = min(chunk - inside, len(records) - done)
            piece = data[done * size : (done + take) * size]
            if inside:
                old = txn.get(self._ckey(user, c), db=self._chunks) or b""
                old = old[: inside * size].ljust(inside * size, b"\x00")
                value = old + piece
            else:
                value = piece
            txn.put(self._ckey(user, c), value, db=self._chunks)
            done += take

    def _delete_chunks(self, txn: lmdb.Transaction, user: bytes, lo: int, hi: int) -> None:
        for c in range(lo, hi):
            txn.delete(self._ckey(user, c), db=self._chunks)

    def _append(self, user: bytes, records: np.ndarray) -> int:
        try:
            with self._wlock, self._env.begin(write=True) as txn:
                version, first, total = self._head(txn, user)
                self._write_from(txn, user, total, records)
                new_total = total + len(records)
                new_first = max(first, new_total - self.max_per_user)
                self._delete_chunks(txn, user, first // self.chunk, new_first // self.chunk)
                txn.put(user, HEAD.pack(version + 1, new_first, new_total), db=self._users)
        except lmdb.MapFullError:
            raise self._full() from None
        return version + 1

    def _recent(self, user: bytes, n: int) -> tuple[bytes, int]:
        with self._env.begin(buffers=True) as txn:
            version, first, total = self._head(txn, user)
            n = min(n, total - first)
            if n <= 0:
                return b"", version
            start = total - n
            c0, c1 = start // self.chunk, (total - 1) // self.chunk
            parts = [txn.get(self._ckey(user, c), db=self._chunks) for c in range(c0, c1 + 1)]
            if any(p is None for p in parts):
                raise RuntimeError(
                    f"history store {self.path}: a chunk of user {user!r} is missing"
                )
            skip = (start - c0 * self.chunk) * self.record_size
            return b"".join(parts)[skip:], version

    def _version(self, user: bytes) -> int:
        with self._env.begin() as txn:
            return self._head(txn, user)[0]

    def _count(self, user: bytes) -> int:
        with self._env.begin() as txn:
            _, first, total = self._head(txn, user)
            return total - first

    def _replace_many(self, batch: list[tuple[bytes, np.ndarray]]) -> None:
        try:
            with self._wlock, self._env.begin(write=True) as txn:
                for user, records in batch:
                    version, first, total = self._head(txn, user)
                    if total > first:
                        last = (total - 1) // self.chunk + 1
                        self._delete_chunks(txn, user, first // self.chunk, last)
                    self._write_from(txn, user, 0, records)
                    txn.put(user, HEAD.pack(version + 1, 0, len(records)), db=self._users)
        except lmdb.MapFullError:
            raise self._full() from None

    def _full(self) -> UserError:
        size_gb = self._env.info()["map_size"] >> 30
        return UserError(
            f"LMDB history store {self.path} is full (map size {size_gb} GB); "
            f"reopen it with a larger map: lmdb://{self.path}?map_size_gb={2 * size_gb}"
        )

    def n_chunks(self, user: str) -> int:
        """Chunks physically stored for the user (for tests and inspection)."""
        prefix = user.encode() + b"\x00"
        with self._env.begin(db=self._chunks) as txn:
            cur = txn.cursor()
            n = 0
            if cur.set_range(prefix):
                for key in cur.iternext(values=False):
                    if not key.startswith(prefix):
                        break
                    n += 1
            return n
