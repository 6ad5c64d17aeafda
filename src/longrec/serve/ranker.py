"""The ranker: a trained run answering "score these candidates for this user, now".

It reads the user's most recent behaviours from a history store, encodes the user side once
(`model.encode_user`, the same code as training), caches that state by (user, history version)
in an LRU bounded by bytes, and scores all candidates of the request together
(`model.score`). Raw ids come in; unknown items map to the "unseen" index, unknown users get an
empty history and are still scored.

    ranker = Ranker.from_run("runs/dare", history="lmdb:///data/history")
    scores = ranker.rank("user-42", ["item-1", "item-7"])
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from longrec.data.batch import Batch
from longrec.data.dataset import PreparedDataset
from longrec.data.schema import UNSEEN
from longrec.data.vocab import load_vocab
from longrec.errors import UserError
from longrec.train.run_dir import load_run


@dataclass
class RankerConfig:
    max_len: int | None = None  # history length at serving (default: the run's data.max_len)
    cache_bytes: int = 512 * 2**20  # LRU bound on cached user states
    max_candidates: int = 1000
    score_chunk: int = 1000  # candidates per score call
    bf16: bool = False  # autocast scoring to bfloat16 if it stays within `bf16_tolerance`
    bf16_tolerance: float = 0.01  # max |p_bf16 - p_fp32| on a calibration request
    threads: int | None = None


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

    def get(self, key):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.stats.hits += 1
                return self._items[key][0]
            self.stats.misses += 1
            return None

    def put(self, key, state: dict) -> None:
        size = self.size_of(state)
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = (state, size)
            self.stats.bytes += size
            while self.stats.bytes > self.max_bytes and self._items:
                _, (_, old) = self._items.popitem(last=False)
                self.stats.bytes -= old
            self.stats.entries = len(self._items)


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
        self.model, self.run_cfg, self.schema = model.eval(), cfg_run, schema
        self.config = config or RankerConfig()
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
        self.type_vocab = (
            load_vocab(dataset.root, "target_type")
            if "target_type" in schema.target_fields
            else None
        )
        self.cache = StateCache(self.config.cache_bytes)
        self._uses_time = bool(getattr(model, "user_state_uses_request_time", False))
        self.bf16 = self.config.bf16 and self._bf16_within_tolerance()

    @classmethod
    def from_run(
        cls,
        run: str | Path,
        history=None,
        data: str | Path | None = None,
        config: RankerConfig | None = None,
    ) -> Ranker:
        model, cfg, schema = load_run(run)
        dataset = PreparedDataset(data or cfg.data.path)
        if history is None:
            from longrec.serve.history import open_history

            history = open_history(
                f"lmdb://{Path(run) / 'history'}", [dataset.fields[f] for f in dataset.fields]
            )
        elif isinstance(history, str):
            from longrec.serve.history import open_history

            history = open_history(history, [dataset.fields[f] for f in dataset.fields])
        return cls(model, cfg, schema, dataset, history, config)

    # -- request -> batch -------------------------------------------------------------------
    def item_indices(self, candidates: list[str]) -> torch.Tensor:
        get = self.item_vocab.get
        return torch.tensor([get(str(c), UNSEEN) for c in candidates], dtype=torch.int64)

    def _history_batch(self, events: dict[str, np.ndarray], now: int) -> Batch:
        n = len(events["ts"]) if "ts" in events else 0
        length = max(8, -(-n // 8) * 8)
        mask = torch.zeros(1, length, dtype=torch.bool)
        mask[0, length - n :] = True
        history = {}
        for f in self.fields:
            spec = self.schema.fields[f]
            shape = (1, length) if spec.width == 1 else (1, length, spec.width)
            t = torch.zeros(shape, dtype=torch.int32)
            if n:
                t[0, length - n :] = torch.from_numpy(
                    np.asarray(events[f], dtype=np.int32).reshape(n, *shape[2:])
                )
            history[f] = t
        ts = torch.zeros(1, length, dtype=torch.int64)
        if n:
            ts[0, length - n :] = torch.from_numpy(np.asarray(events["ts"], dtype=np.int64))
        empty = torch.zeros(1, 1, dtype=torch.int64)
        return Batch(
            user=torch.zeros(1, dtype=torch.int64),
            history=history,
            history_mask=mask,
            history_ts=ts,
            target={k: empty for k in self.schema.target_fields},
            target_ts=torch.full((1, 1), now, dtype=torch.int64),
            label=torch.zeros(1, 1),
            target_mask=torch.ones(1, 1, dtype=torch.bool),
        )

    def _with_targets(
        self, batch: Batch, items: torch.Tensor, types: torch.Tensor | None, now: int
    ) -> Batch:
        m = len(items)
        target = {}
        for name in self.schema.target_fields:
            if name == "item":
                target[name] = items.view(1, m)
            elif name == "target_type":
                target[name] = (types if types is not None else torch.full((m,), UNSEEN)).view(1, m)
            elif name in self.item_tables:
                table = self.item_tables[name]
                target[name] = table[items.clamp_max(len(table) - 1)].unsqueeze(0)
        return Batch(
            user=batch.user,
            history=batch.history,
            history_mask=batch.history_mask,
            history_ts=batch.history_ts,
            target=target,
            target_ts=torch.full((1, m), now, dtype=torch.int64),
            label=torch.zeros(1, m),
            target_mask=torch.ones(1, m, dtype=torch.bool),
        )

    # -- ranking ----------------------------------------------------------------------------
    @torch.no_grad()
    def rank(
        self,
        user: str,
        candidates: list[str],
        now: int | None = None,
        target_types: list[str] | None = None,
        timings: RankTimings | None = None,
    ) -> list[float]:
        """Click probabilities of `candidates` (raw item ids) for `user`, in candidate order."""
        if len(candidates) > self.config.max_candidates:
            raise UserError(
                f"{len(candidates)} candidates; at most {self.config.max_candidates} per request"
            )
        if not candidates:
            return []
        now = int(time.time()) if now is None else int(now)
        timings = timings or RankTimings()
        t0 = time.perf_counter()
        events, version = self.history.recent(str(user), self.max_len)
        t1 = time.perf_counter()
        key = (str(user), version, self.max_len, now if self._uses_time else None)
        base = self._history_batch(events, now)
        state = self.cache.get(key)
        timings.cache_hit = state is not None
        if state is None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
                state = self.model.encode_user(base)
            self.cache.put(key, state)
        t2 = time.perf_counter()
        items = self.item_indices(candidates)
        types = None
        if target_types is not None and self.type_vocab is not None:
            types = torch.tensor(
                [self.type_vocab.get(str(t), UNSEEN) for t in target_types], dtype=torch.int64
            )
        out = []
        chunk = self.config.score_chunk
        for i in range(0, len(items), chunk):
            b = self._with_targets(
                base, items[i : i + chunk], None if types is None else types[i : i + chunk], now
            )
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
                logits = self.model.score(state, b)
            out.append(torch.sigmoid(logits.float())[0])
        t3 = time.perf_counter()
        timings.fetch_ms, timings.encode_ms, timings.score_ms = (
            1e3 * (t1 - t0),
            1e3 * (t2 - t1),
            1e3 * (t3 - t2),
        )
        timings.history_len = int(base.history_mask.sum())
        return torch.cat(out).tolist()

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
        base = self._history_batch(events, 1_600_000_001)
        items = torch.from_numpy(rng.integers(2, max(3, len(self.item_vocab)), 64))
        batch = self._with_targets(base, items, None, 1_600_000_001)
        with torch.no_grad():
            ref = torch.sigmoid(self.model(batch).float())
            with torch.autocast("cpu", dtype=torch.bfloat16):
                low = torch.sigmoid(self.model(batch).float())
        self.bf16_max_error = float((ref - low).abs().max())
        return self.bf16_max_error <= self.config.bf16_tolerance
