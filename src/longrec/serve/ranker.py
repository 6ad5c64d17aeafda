"""The ranker: a trained run answering "score these candidates for this user, now".

It reads the user's most recent behaviours from a history store, encodes the user side once
(`model.encode_user`, the same code as training), caches that state by (user, history version)
in an LRU bounded by bytes, and scores all candidates of the request together
(`model.score`). Raw ids come in; unknown items map to the "unseen" index, unknown users get an
empty history and are still scored. Concurrent requests are micro-batched (`micro_batch`, on by
default): one worker thread encodes the users of all queued requests in one forward instead of
many threads interleaving small forwards; with 16 concurrent clients on 2 cores that raised
throughput 1.1-2.3x over HTTP and 2.4-7.4x in-process (BENCHMARKS.md). The model runs on
`RankerConfig.device` (requests are built on the host and copied there) under its `precision`;
bf16 is kept only if a calibration request scores within `bf16_tolerance` of fp32.

    ranker = Ranker.from_run("runs/dare", history="lmdb:///data/history")
    scores = ranker.rank("user-42", ["item-1", "item-7"])
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from longrec.data.batch import Batch
from longrec.data.dataset import PreparedDataset
from longrec.data.schema import UNSEEN
from longrec.data.vocab import load_vocab
from longrec.errors import UserError
from longrec.ops import dispatch
from longrec.runtime import Runtime, resolve_device
from longrec.serve.batching import MicroBatcher, split_state
from longrec.serve.request_batch import RequestBatches
from longrec.train.run_dir import load_run


@dataclass
class RankerConfig:
    max_len: int | None = None  # history length at serving (default: the run's data.max_len)
    cache_bytes: int = 512 * 2**20  # LRU bound on cached user states
    max_candidates: int = 1000
    score_chunk: int = 1000  # candidates per score call
    device: str = "auto"  # auto | cpu | cuda | cuda:N (longrec/runtime.py)
    # auto | fp32 | bf16: bf16 (chosen, or what auto resolves to) scores under bfloat16
    # autocast only if it stays within `bf16_tolerance` of fp32
    precision: str = "auto"
    bf16_tolerance: float = 0.01  # max |p_bf16 - p_fp32| on a calibration request
    threads: int | None = None
    # auto | reference | native: C++ kernels or plain PyTorch (longrec/ops/dispatch.py)
    kernels: str = "auto"
    micro_batch: int = 8  # concurrent requests run as one forward (1 = off; see serve/batching)
    micro_batch_wait_ms: float = 0.0  # how long the batcher waits for more requests
    # a forward batches requests while their candidates x history slots sum to at most this
    micro_batch_max_work: int = 2_000_000


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    entries: int = 0
    bytes: int = 0


class StateCache:
    """LRU of user states keyed by (user, version, ...), bounded by the bytes of their tensors."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.stats = CacheStats()

    @staticmethod
    def size_of(state: dict) -> int:
        total = 0
        for v in state.values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
            elif hasattr(v, "__dict__"):
                total += StateCache.size_of(vars(v))
            elif isinstance(v, list | tuple):
                total += sum(StateCache.size_of({"x": x}) for x in v)
        return total

    def get(self, key) -> tuple[dict, int] | None:
        """(state, history slots it was encoded with) or None."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.stats.hits += 1
                state, length, _ = self._items[key]
                return state, length
            self.stats.misses += 1
            return None

    def put(self, key, state: dict, length: int) -> None:
        size = self.size_of(state)
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = (state, length, size)
            self.stats.bytes += size
            while self.stats.bytes > self.max_bytes and self._items:
                _, (_, _, old) = self._items.popitem(last=False)
                self.stats.bytes -= old
            self.stats.entries = len(self._items)


@dataclass
class _Request:
    user: str
    candidates: list[str]
    now: int
    target_types: list[str] | None
    timings: RankTimings
    # filled by `Ranker._prepare` in the caller's thread, before the request is batched
    fetched: tuple | None = None  # (events, version, side input, its token count)
    items: torch.Tensor | None = None  # candidate item indices


@dataclass
class _Miss:
    """A request whose user state is not cached: what encoding it needs."""

    index: int  # position in the micro-batch
    events: dict
    key: tuple  # its cache key
    extra: dict | None  # side sequences (IAT tokens)


@dataclass
class RankTimings:
    fetch_ms: float = 0.0
    encode_ms: float = 0.0
    score_ms: float = 0.0
    cache_hit: bool = False
    history_len: int = 0
    extra: dict = field(default_factory=dict)


class Ranker:
    def __init__(
        self,
        model,
        cfg_run,
        schema,
        dataset: PreparedDataset,
        history,
        config: RankerConfig | None = None,
    ):
        self.config = config or RankerConfig()
        self.runtime = Runtime.resolve(
            self.config.device, self.config.precision, ("--device", "--precision")
        )
        dispatch.set_kernels(
            dispatch.for_run(self.config.kernels, cfg_run.model.params, "--kernels")
        )
        self.model = model.to(self.runtime.device).eval()
        self.run_cfg, self.schema = cfg_run, schema
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        self.max_len = self.config.max_len or cfg_run.data.max_len
        self.history = history
        self.fields = model.history_fields() or tuple(schema.fields)
        self.item_vocab = load_vocab(dataset.root, "item")
        self.dataset_root = dataset.root
        self.item_tables_all = {k: torch.from_numpy(v) for k, v in dataset.item_tables.items()}
        self.item_tables = {
            k: v for k, v in self.item_tables_all.items() if k in schema.target_fields
        }
        self.batches = RequestBatches(schema, self.fields, self.item_tables)
        self.type_vocab = (
            load_vocab(dataset.root, "target_type")
            if "target_type" in schema.target_fields
            else None
        )
        self.tokens, self.user_index, self.max_tokens = None, None, 0
        if getattr(cfg_run.data, "token_store", None):  # IAT: instance tokens before `now`
            from longrec.data.token_store import TokenStore

            self.tokens = TokenStore.open(cfg_run.data.token_store)
            self.user_index = load_vocab(dataset.root, "user")
            self.max_tokens = cfg_run.data.max_tokens
        self.cache = StateCache(self.config.cache_bytes)
        self._uses_time = bool(getattr(model, "user_state_uses_request_time", False))
        self.bf16 = self.runtime.bf16 and self._bf16_within_tolerance()
        self.batcher = (
            MicroBatcher(
                self._rank_many,
                self.config.micro_batch,
                self.config.micro_batch_wait_ms,
                cost=lambda r: len(r.candidates) * self.max_len,
                max_cost=self.config.micro_batch_max_work,
            )
            if self.config.micro_batch > 1
            else None
        )

    def close(self) -> None:
        """Stop the micro-batching thread (requests still queued are answered first)."""
        if self.batcher is not None:
            self.batcher.close()

    @classmethod
    def from_run(
        cls,
        run: str | Path,
        history=None,
        data: str | Path | None = None,
        config: RankerConfig | None = None,
        create_history: bool = True,
    ) -> Ranker:
        device = resolve_device((config or RankerConfig()).device, "--device")
        model, cfg, schema = load_run(run, device=device)
        dataset = PreparedDataset(data or cfg.data.path)
        dataset.check_belongs(schema.fingerprint, schema.fields, str(run))
        if history is None or isinstance(history, str):
            from longrec.serve.history import open_history

            fields = [dataset.fields[f] for f in dataset.fields]
            fingerprint = dataset.fingerprint or schema.fingerprint
            if history is None:  # the run's own store: longrec may create it
                history = open_history(
                    f"lmdb://{Path(run) / 'history'}", fields, dataset=fingerprint
                )
            else:
                history = open_history(history, fields, dataset=fingerprint, create=create_history)
        return cls(model, cfg, schema, dataset, history, config)

    # -- request -> batch -------------------------------------------------------------------
    def item_indices(self, candidates: list[str]) -> torch.Tensor:
        get = self.item_vocab.get
        ids = np.fromiter((get(str(c), UNSEEN) for c in candidates), np.int64, len(candidates))
        return torch.from_numpy(ids)

    # -- ranking ----------------------------------------------------------------------------
    def rank(
        self,
        user: str,
        candidates: list[str],
        now: int | None = None,
        target_types: list[str] | None = None,
        timings: RankTimings | None = None,
    ) -> list[float]:
        """Click probabilities of `candidates` (raw item ids) for `user`, in candidate order."""
        request = self._request(user, candidates, now, target_types, timings)
        if request is None:
            return []
        if self.batcher is not None:
            self._prepare(request)
            return self.batcher.submit(request)
        return self._rank_one(request)

    async def rank_async(
        self,
        user: str,
        candidates: list[str],
        now: int | None = None,
        target_types: list[str] | None = None,
        timings: RankTimings | None = None,
    ) -> list[float]:
        """`rank` for an event loop: awaits the micro-batcher (or a worker thread when
        micro-batching is off) instead of blocking the loop or parking a thread per request."""
        request = self._request(user, candidates, now, target_types, timings)
        if request is None:
            return []
        if self.batcher is not None:
            self._prepare(request)
            return await asyncio.wrap_future(self.batcher.submit_future(request))
        return await asyncio.to_thread(self._rank_one, request)

    def _prepare(self, r: _Request) -> None:
        """The per-request work that needs no other request: the history read and the
        candidates' indices. Done by the caller (the event loop, or a request thread) while the
        batcher runs the previous forward, so it stays off the batcher's critical path."""
        t0 = time.perf_counter()
        events, version = self.history.recent(r.user, self.max_len)
        extra, n_tokens = self._instance_tokens(r.user, r.now)
        r.fetched = (events, version, extra, n_tokens)
        r.timings.fetch_ms = 1e3 * (time.perf_counter() - t0)
        r.timings.history_len = len(events["ts"]) if "ts" in events else 0
        r.items = self.item_indices(r.candidates)

    def _rank_one(self, request: _Request) -> list[float]:
        result = self._rank_many([request])[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def _request(
        self,
        user: str,
        candidates: list[str],
        now: int | None,
        target_types: list[str] | None,
        timings: RankTimings | None,
    ) -> _Request | None:
        if len(candidates) > self.config.max_candidates:
            raise UserError(
                f"{len(candidates)} candidates; at most {self.config.max_candidates} per request"
            )
        if target_types is not None and len(target_types) != len(candidates):
            raise UserError("target_types must have one entry per candidate")
        if not candidates:
            return None
        return _Request(
            str(user),
            [str(c) for c in candidates],
            int(time.time()) if now is None else int(now),
            None if target_types is None else [str(t) for t in target_types],
            timings or RankTimings(),
        )

    @torch.no_grad()
    def _rank_many(self, requests: list[_Request]) -> list[list[float] | BaseException]:
        """Scores of several requests (the micro-batcher's unit of work): cached users are
        scored on their cached state, the others are encoded together in one forward."""
        results: list[list[float] | BaseException | None] = [None] * len(requests)
        misses: list[_Miss] = []
        for i, r in enumerate(requests):
            try:
                if r.fetched is None:
                    self._prepare(r)
                events, version, extra, n_tokens = r.fetched
                key = (r.user, version, self.max_len, r.now if self._uses_time else None, n_tokens)
                cached = self.cache.get(key)
                if cached is None:
                    misses.append(_Miss(i, events, key, extra))
                    continue
                state, length = cached
                r.timings.cache_hit = True
                base = self.batches.history(events, r.now, length, extra)
                results[i] = self._score(state, base, [r])[0]
            except Exception as err:  # this request's error, not the batch's
                results[i] = err
        if len(misses) > 1:
            try:
                self._encode_and_score(requests, misses, results)
                misses = []
            except Exception:  # retry one by one: one bad request fails alone
                pass
        for miss in misses:
            try:
                self._encode_and_score(requests, [miss], results)
            except Exception as err:
                results[miss.index] = err
        return results  # type: ignore[return-value]

    def _instance_tokens(self, user: str, now: int) -> tuple[dict | None, int]:
        """IAT's side input: the user's instance tokens strictly before `now` as `Batch.extra`
        [1, T, D], and how many there are (a cache-key part: the user state changes only when a
        token enters); (None, 0) for models without a token store."""
        if self.tokens is None:
            return None, 0
        index = self.user_index.get(user)
        if index is None or index + 1 >= len(self.tokens.offsets):  # never seen: no tokens
            return {
                "tokens": torch.zeros(1, 1, self.tokens.dim),
                "token_label": torch.zeros(1, 1),
                "token_mask": torch.zeros(1, 1, dtype=torch.bool),
                "token_ts": torch.zeros(1, 1, dtype=torch.int64),
            }, 0
        extra = self.tokens.before(np.array([index]), np.array([now]), self.max_tokens)
        return extra, int(extra["token_mask"].sum())

    def _encode_and_score(
        self,
        requests: list[_Request],
        misses: list[_Miss],
        results: list,
    ) -> None:
        """Encode the users of `misses` in one forward (histories left-padded to the longest),
        cache each user's state, score their candidates, write their `results`."""
        t0 = time.perf_counter()
        length = max(self.batches.padded_length(m.events) for m in misses)
        reqs = [requests[m.index] for m in misses]
        base = self.batches.stack(
            [
                self.batches.history(m.events, r.now, length, m.extra)
                for m, r in zip(misses, reqs, strict=True)
            ]
        )
        base = self.runtime.put(base)
        with self.runtime.autocast(self.bf16):
            state = self.model.encode_user(base)
        if self.config.cache_bytes > 0:
            states = [state] if len(misses) == 1 else split_state(state, len(misses))
            for m, one in zip(misses, states or [], strict=False):
                self.cache.put(m.key, one, length)
        encode_ms = 1e3 * (time.perf_counter() - t0)
        scores = self._score(state, base, reqs)
        for m, r, s in zip(misses, reqs, scores, strict=True):
            r.timings.encode_ms = encode_ms
            r.timings.extra["batch"] = len(misses)
            results[m.index] = s

    def _score(self, state, base: Batch, requests: list[_Request]) -> list[list[float]]:
        """Probabilities of each request's candidates against its row of `state` / `base`."""
        t0 = time.perf_counter()
        items = [self.item_indices(r.candidates) if r.items is None else r.items for r in requests]
        types = None
        if self.type_vocab is not None and any(r.target_types for r in requests):
            types = [
                torch.tensor(
                    [self.type_vocab.get(t, UNSEEN) for t in r.target_types], dtype=torch.int64
                )
                if r.target_types is not None
                else torch.full((len(r.candidates),), UNSEEN, dtype=torch.int64)
                for r in requests
            ]
        now = torch.tensor([r.now for r in requests], dtype=torch.int64)
        # shorter requests padded at the end: item 0, type "unseen", target_mask False
        item_slots = pad_sequence(items, batch_first=True)
        type_slots = (
            None if types is None else pad_sequence(types, batch_first=True, padding_value=UNSEEN)
        )
        lengths = torch.tensor([len(x) for x in items])
        mask = torch.arange(item_slots.shape[1]) < lengths[:, None]
        chunk = self.config.score_chunk
        probs = []
        for lo in range(0, item_slots.shape[1], chunk):
            part = slice(lo, lo + chunk)
            batch = self.batches.with_targets(
                base,
                item_slots[:, part],
                None if type_slots is None else type_slots[:, part],
                now,
                mask[:, part],
            )
            with self.runtime.autocast(self.bf16):
                logits = self.model.score(state, self.runtime.put(batch))
            probs.append(torch.sigmoid(logits.float()))
        joined = torch.cat(probs, dim=1).cpu()
        score_ms = 1e3 * (time.perf_counter() - t0)
        out = []
        for row, (r, x) in enumerate(zip(requests, items, strict=True)):
            r.timings.score_ms = score_ms
            out.append(joined[row, : len(x)].tolist())
        return out

    def _bf16_within_tolerance(self) -> bool:
        """Score a synthetic request in fp32 and bf16; keep bf16 only if they agree."""
        n = min(self.max_len, 512)
        rng = np.random.default_rng(0)
        events = {
            f: rng.integers(
                2,
                max(3, self.schema.fields[f].vocab_size),
                size=(n, self.schema.fields[f].width) if self.schema.fields[f].width > 1 else n,
            )
            for f in self.fields
        }
        events["ts"] = np.sort(rng.integers(1_500_000_000, 1_600_000_000, n))
        base = self.batches.history(events, 1_600_000_001)
        items = torch.from_numpy(rng.integers(2, max(3, len(self.item_vocab)), (1, 64)))
        now = torch.tensor([1_600_000_001])
        batch = self.batches.with_targets(
            base, items, None, now, torch.ones(1, 64, dtype=torch.bool)
        )
        batch = self.runtime.put(batch)
        with torch.no_grad():
            ref = torch.sigmoid(self.model(batch).float())
            with self.runtime.autocast(True):
                low = torch.sigmoid(self.model(batch).float())
        self.bf16_max_error = float((ref - low).abs().max())
        return self.bf16_max_error <= self.config.bf16_tolerance
