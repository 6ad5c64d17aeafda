"""The Redis history store: one history shared by several ranking servers.

Layout (PREFIX defaults to `longrec:`; `{user}` is the raw user id in braces, a Redis Cluster
hash tag that keeps one user's keys in one slot so its transactions stay single-slot):

    PREFIX meta            string  JSON: format, fields [[name, width], ...], chunk
    PREFIX {user}:c        list    full chunks, each exactly `chunk` packed records, oldest first
    PREFIX {user}:t        string  the newest records (fewer than `chunk` after a roll), packed
    PREFIX {user}:v        string  the user's version (INCR)

A user's behaviours, oldest first, are the list's chunks followed by the tail string.

* `append` is one MULTI/EXEC: APPEND the packed records to the tail, INCR the version. Redis
  appends to a string in place, so an append sends and writes only its own records. When the
  tail reaches `chunk` records, a second transaction (WATCH on the tail) *rolls* it: full chunks
  are RPUSHed to the list, the remainder stays in the tail and the list is LTRIMmed to
  ceil(max_per_user / chunk) chunks. A roll moves data without changing it (the version stays);
  if it loses a race or the process dies before it, the tail is simply longer until the next one.
* `recent(n)` is one MULTI/EXEC round trip: GET the version, GETRANGE the last n records of the
  tail and LRANGE the last ceil(n / chunk) chunks; 10,000 behaviours come back as ~11 values,
  not 10,000 replies to parse.
* Bounded: at most ceil(max_per_user / chunk) chunks plus the tail are kept; `recent` and
  `count` show exactly the last `max_per_user` behaviours.

Durability: Redis acknowledges EXEC before its data is on disk unless the server runs with
`appendonly yes` and `appendfsync always` (then it fsyncs the AOF before it replies). Run the
server that way (`redis-server --appendonly yes --appendfsync always`, or in redis.conf); the
store warns when it can read the server's config and finds otherwise. Appends are sent without
client-side retries: a retried MULTI/EXEC whose first attempt did reach the server would append
twice, so a connection error surfaces to the caller, who may resend (at-least-once).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

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

ROLL_ATTEMPTS = 5


class RedisHistoryStore(HistoryStore):
    bulk_rows = 250_000  # one EXEC blocks every client while it runs: keep it ~25 ms

    def __init__(
        self,
        *,
        host: str,
        port: int,
        fields: Sequence[FieldSpec],
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        ssl: bool = False,
        max_per_user: int = DEFAULT_MAX_PER_USER,
        chunk: int = DEFAULT_CHUNK,
        prefix: str = "longrec:",
        socket_timeout: float = 10.0,
        dataset: str | None = None,
        create: bool = True,
    ):
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.where = f"redis://{host}:{port}/{db}"
        self.max_per_user = int(max_per_user)
        self.prefix = prefix.encode()
        common = dict(
            host=host,
            port=port,
            db=db,
            username=username,
            password=password,
            ssl=ssl,
            socket_connect_timeout=5,
            socket_timeout=socket_timeout,
        )
        self._redis = redis.Redis(**common)  # reads: redis-py's default retries
        self._writer = redis.Redis(**common, retry=Retry(NoBackoff(), 0))  # appends: none
        try:
            self._writer.ping()  # no retries: an unreachable server fails at once
            meta = self.prefix + b"meta"
            if not create and not self._redis.exists(meta):
                raise missing_store(f"{self.where} (key {meta.decode()})")
            stored = schema_json(fields, chunk, dataset).encode()
            self._redis.set(meta, stored, nx=True)
            stored = self._redis.get(meta)
            where = f"{self.where} (key {meta.decode()})"
            layout, chunk = check_schema(stored, fields, where, dataset)
        except (redis.ConnectionError, redis.TimeoutError) as err:
            self.close()
            raise UserError(f"cannot connect to Redis at {self.where}: {err}") from None
        except redis.RedisError as err:
            self.close()
            raise UserError(f"Redis at {self.where} refused the history store: {err}") from None
        except BaseException:
            self.close()
            raise
        self._init_schema(fields, layout, chunk)
        self.keep_chunks = math.ceil(self.max_per_user / self.chunk)
        self.durable = self._check_durability()

    def __repr__(self) -> str:
        return f"RedisHistoryStore({self.where!r}, fields={[f.name for f in self.fields]})"

    def _check_durability(self) -> bool | None:
        import redis

        try:
            config = self._redis.config_get("append*")
        except redis.RedisError:  # CONFIG may be disabled (managed Redis): cannot tell
            return None
        config = {_text(k): _text(v) for k, v in config.items()}
        durable = config.get("appendonly") == "yes" and config.get("appendfsync") == "always"
        if not durable:
            warnings.warn(
                f"Redis at {self.where} runs with appendonly={config.get('appendonly')} "
                f"appendfsync={config.get('appendfsync')}: acknowledged history appends can be "
                "lost if it dies; run it with --appendonly yes --appendfsync always",
                RuntimeWarning,
                stacklevel=3,
            )
        return durable

    def close(self) -> None:
        for client in (getattr(self, "_redis", None), getattr(self, "_writer", None)):
            if client is not None:
                client.close()

    # --- backend operations ------------------------------------------------------------------
    def _keys(self, user: bytes) -> tuple[bytes, bytes, bytes]:
        base = self.prefix + b"{" + user + b"}:"
        return base + b"c", base + b"t", base + b"v"

    def _append(self, user: bytes, records: np.ndarray) -> int:
        _, tail, ver = self._keys(user)
        pipe = self._writer.pipeline(transaction=True)
        pipe.append(tail, records.tobytes())
        pipe.incr(ver)
        tail_bytes, version = pipe.execute()
        if tail_bytes >= self.chunk * self.record_size:
            self._roll(user)
        return int(version)

    def _roll(self, user: bytes) -> None:
        """Move the tail's full chunks to the list (same data, same version), trim the list."""
        import redis

        chunks, tail, _ = self._keys(user)
        step = self.chunk * self.record_size
        with self._writer.pipeline(transaction=True) as pipe:
            for _ in range(ROLL_ATTEMPTS):
                try:
                    pipe.watch(tail)
                    data = pipe.get(tail) or b""
                    cut = len(data) // step * step
                    if cut == 0:
                        pipe.unwatch()
                        return
                    pipe.multi()
                    pipe.rpush(chunks, *(data[i : i + step] for i in range(0, cut, step)))
                    pipe.set(tail, data[cut:])
                    pipe.ltrim(chunks, -self.keep_chunks, -1)
                    pipe.execute()
                    return
                except redis.WatchError:
                    continue  # another append landed in between: try again with the new tail
                except redis.RedisError:
                    return  # the append itself is acknowledged; the next one rolls the tail

    def _recent(self, user: bytes, n: int) -> tuple[bytes, int]:
        chunks, tail, ver = self._keys(user)
        if n <= 0:  # GETRANGE -0 / LRANGE -0 would mean "everything"
            return b"", self._version(user)
        pipe = self._redis.pipeline(transaction=True)
        pipe.get(ver)
        pipe.getrange(tail, -n * self.record_size, -1)
        pipe.lrange(chunks, -math.ceil(n / self.chunk), -1)
        version, tail_bytes, full = pipe.execute()
        return b"".join([*full, tail_bytes]), int(version or 0)

    def _version(self, user: bytes) -> int:
        return int(self._redis.get(self._keys(user)[2]) or 0)

    def _count(self, user: bytes) -> int:
        chunks, tail, _ = self._keys(user)
        pipe = self._redis.pipeline(transaction=True)
        pipe.llen(chunks)
        pipe.strlen(tail)
        n_chunks, tail_bytes = pipe.execute()
        return n_chunks * self.chunk + tail_bytes // self.record_size

    def _replace_many(self, batch: list[tuple[bytes, np.ndarray]]) -> None:
        """One MULTI/EXEC for the batch. Redis runs it atomically, so other clients wait while
        it executes (~0.1 s per million behaviours): keep bulk batches moderate on a live server."""
        step = self.chunk * self.record_size
        pipe = self._writer.pipeline(transaction=True)
        for user, records in batch:
            chunks, tail, ver = self._keys(user)
            data = records.tobytes()
            cut = len(data) // step * step
            pipe.delete(chunks, tail)
            if cut:
                pipe.rpush(chunks, *(data[i : i + step] for i in range(0, cut, step)))
            if cut < len(data):
                pipe.set(tail, data[cut:])
            pipe.incr(ver)
        pipe.execute()

    def physical(self, user: str) -> tuple[int, int]:
        """(chunks in the list, records in the tail) as stored, for tests and inspection."""
        chunks, tail, _ = self._keys(user.encode())
        return self._redis.llen(chunks), self._redis.strlen(tail) // self.record_size


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
