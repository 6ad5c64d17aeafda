"""Batches sliced from the memory-mapped store with vectorised gathers, prefetched in a thread.

A batch holds B requests; each request is the samples sharing a `request_id` (one user, one
history, up to M targets). Pointwise loading is the M = 1 case: every sample its own request.
The history of a request is the store rows `[max(user_start, hist_end - max_len), hist_end)`,
copied for the whole batch by one C++ call (or gathered with one index matrix), which runs
without the GIL, so the prefetch thread overlaps the training step. Batch `i` of epoch `e` depends only
on (seed, e, i), so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from longrec.data.batch import Batch
from longrec.data.dataset import PreparedDataset
from longrec.data.lengths import LengthSampling, bucketed_batches, sample_lengths
from longrec.errors import UserError
from longrec.nn import row_kernels
from longrec.ops import dispatch

_SAMPLE_COLUMNS = {"user", "hist_end", "target_ts", "label", "request_id"}


@dataclass
class LoaderConfig:
    batch_size: int = 256  # requests per batch (= samples when pointwise)
    max_len: int = 200  # most recent behaviours kept per history
    layout: str = "pointwise"  # "pointwise" (M = 1) or "request" (all targets of a request)
    shuffle: bool = False
    seed: int = 0
    drop_last: bool = False
    pad_multiple: int = 8  # L is rounded up to this (kernel-friendly), never beyond max_len
    # batches prepared ahead in a background thread (0 = none); None: `default_prefetch()`
    prefetch: int | None = None
    rank: int = 0  # data-parallel shard of this process
    world_size: int = 1
    history_fields: tuple[str, ...] | None = None  # default: every store field
    history_ts: bool = True  # False: `Batch.history_ts` is zeros (models that never read it)
    lengths: LengthSampling = field(default_factory=LengthSampling)  # per-request training lengths
    bucket: bool = False  # group requests of similar length into batches (less padding)
    bucket_window: int = 50  # batches per sorting window
    token_store: str | None = None  # IAT: attach each request's earlier instance tokens
    max_tokens: int = 256
    # page-locked batches (in the prefetch thread): copies to a GPU overlap the step; CUDA only
    pin_memory: bool = False
    order: str = (
        "shuffle"  # shuffle | user_time (users shuffled, each user's requests in time order)
    )


class RequestIndex:
    """Where each request's samples are in a split: contiguous runs of equal request_id."""

    def __init__(self, cols: dict[str, np.ndarray], pointwise: bool):
        n = len(cols["label"])
        if pointwise:
            self.start = np.arange(n, dtype=np.int64)
            self.count = np.ones(n, dtype=np.int64)
            return
        rid = cols["request_id"]
        boundary = np.flatnonzero(rid[1:] != rid[:-1]) + 1
        self.start = np.concatenate(([0], boundary)).astype(np.int64)
        self.count = np.diff(np.concatenate((self.start, [n]))).astype(np.int64)
        first = np.repeat(self.start, self.count)
        if not (
            np.array_equal(cols["hist_end"], cols["hist_end"][first])
            and np.array_equal(cols["user"], cols["user"][first])
        ):
            raise UserError(
                "samples of one request differ in user or history; prepare the data again"
            )

    def __len__(self) -> int:
        return len(self.start)


def rows_per_epoch(cols: dict[str, np.ndarray], layout: str, world_size: int = 1) -> int:
    """Rows a training loader over these split columns yields per epoch and process, counted
    without building it (the trainer sizes its batch from this): samples in the pointwise
    layout, requests (runs of equal request_id, as `RequestIndex`) in the request layout,
    shared evenly between processes (`order=user_time` cuts to its smallest shard: a few less)."""
    n = len(cols["label"])
    if layout != "pointwise" and n > 0:
        rid = cols["request_id"]
        n = 1 + int(np.count_nonzero(rid[1:] != rid[:-1]))
    return n // world_size if world_size > 1 else n


def ranges_taker(
    lo: torch.Tensor, end: torch.Tensor, length: int
) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
    """(take, mask [B, L]): take(values) is [B, L, ...], rows [lo[b], end[b]) of `values` at the
    end of row b, zeros before (left-padded histories). With the C++ kernel (ops.dispatch), one
    copy per history (row_kernels.gather_ranges: 3-5x faster, and single-threaded, so that the
    prefetch thread does not compete with the training step's threads). Else dense batches
    gather a [B, L] index matrix; mostly-padding batches (long max_len, short histories)
    gather only the real behaviours and scatter them into zero-filled outputs."""

    n = end - lo
    b = len(n)
    mask = torch.arange(length)[None, :] >= (length - n)[:, None]
    total = int(n.sum())
    if dispatch.use_native("gather_ranges", index=(lo, end)):

        def take(arr: torch.Tensor) -> torch.Tensor:
            return row_kernels.gather_ranges(arr, lo, end, length)

    elif total >= 0.6 * b * length:
        idx = end[:, None] - length + torch.arange(length)[None, :]
        idx = torch.where(mask, idx, torch.zeros((), dtype=idx.dtype))

        def take(arr: torch.Tensor) -> torch.Tensor:
            vals = arr[idx]
            return vals * (mask if vals.dim() == 2 else mask[..., None])

    else:
        row_start = torch.repeat_interleave(lo - (torch.cumsum(n, 0) - n), n, output_size=total)
        src = torch.arange(total) + row_start

        def take(arr: torch.Tensor) -> torch.Tensor:
            vals = arr[src]
            shaped = mask if vals.dim() == 1 else mask[..., None].expand(b, length, *vals.shape[1:])
            return vals.new_zeros(shaped.shape).masked_scatter_(shaped, vals)

    return take, mask


class BatchLoader:
    """Iterates a split of a prepared dataset as `Batch`es."""

    def __init__(self, dataset: PreparedDataset, split: str, cfg: LoaderConfig):
        if cfg.layout not in ("pointwise", "request"):
            raise UserError(f"loader layout must be pointwise or request, got '{cfg.layout}'")
        if cfg.batch_size < 1 or cfg.max_len < 1:
            raise UserError("batch_size and max_len must be >= 1")
        self.dataset, self.split, self.cfg = dataset, split, cfg
        self.cols = dataset.split(split)
        self.requests = RequestIndex(self.cols, cfg.layout == "pointwise")
        store = dataset.store
        names = cfg.history_fields or tuple(store.fields)
        missing = [n for n in names if n not in store.fields]
        if missing:
            raise UserError(
                f"history fields {missing} not in the dataset (it has {list(store.fields)})"
            )
        # torch views of the memory-mapped arrays: no copy, pages load on first touch
        self._store = {n: _as_tensor(store.fields[n]) for n in names}
        self._ts = _as_tensor(store.ts)
        self._offsets = torch.from_numpy(np.asarray(store.offsets, dtype=np.int64))
        self._targets = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in self.cols.items()}
        self.tokens = None
        if cfg.token_store:
            from longrec.data.token_store import TokenStore

            self.tokens = TokenStore.open(cfg.token_store)
        cfg.lengths.check(cfg.max_len)
        first = self.requests.start
        # behaviours each request has before its target (its history, uncapped)
        self.available = (
            self.cols["hist_end"][first] - np.asarray(store.offsets)[self.cols["user"][first]]
        )
        self.epoch = 0

    def __len__(self) -> int:
        n = len(self._order(0))
        return n // self.cfg.batch_size if self.cfg.drop_last else -(-n // self.cfg.batch_size)

    @property
    def num_samples(self) -> int:
        return int(self.requests.count[self._order(0)].sum())

    def _order(self, epoch: int) -> np.ndarray:
        n = len(self.requests)
        rng = np.random.default_rng((self.cfg.seed, epoch))
        if self.cfg.order == "user_time":
            # users in random order, each user's requests consecutive and in time order (IAT's
            # user-order training); shards split by user so no user straddles two processes
            first = self.requests.start
            user, ts = self.cols["user"][first], self.cols["target_ts"][first]
            users = np.unique(user)
            rank_of = np.empty(users.max() + 1, dtype=np.int64)
            rank_of[users] = (
                rng.permutation(len(users)) if self.cfg.shuffle else np.arange(len(users))
            )
            order = np.lexsort((np.arange(n), ts, rank_of[user]))
            shard = rank_of[user[order]] % self.cfg.world_size
            # every rank must run the same number of steps (DDP): cut to the smallest shard
            smallest = np.bincount(shard, minlength=self.cfg.world_size).min()
            return order[shard == self.cfg.rank][:smallest]
        if self.cfg.order != "shuffle":
            raise UserError(f"loader order must be shuffle or user_time, got '{self.cfg.order}'")
        order = rng.permutation(n) if self.cfg.shuffle else np.arange(n)
        # equal shards (DDP needs the same number of steps on every rank): the remainder of
        # n / world_size requests is left out of this epoch, a different one each epoch
        per_rank = n // self.cfg.world_size if self.cfg.world_size > 1 else n
        return order[self.cfg.rank :: self.cfg.world_size][:per_rank]

    def caps(self, epoch: int) -> np.ndarray | None:
        """Per-request history length of this epoch (None: everyone gets max_len)."""
        if self.cfg.lengths.kind == "fixed":
            return None
        rng = np.random.default_rng((self.cfg.seed, epoch, 1))
        return sample_lengths(rng, len(self.requests), self.cfg.max_len, self.cfg.lengths)

    def batch_requests(self, epoch: int) -> list[np.ndarray]:
        order = self._order(epoch)
        bs = self.cfg.batch_size
        if self.cfg.bucket:
            caps = self.caps(epoch)
            cap = caps if caps is not None else self.cfg.max_len
            effective = np.minimum(self.available, cap)
            rng = np.random.default_rng((self.cfg.seed, epoch, 2))
            return bucketed_batches(
                order, effective, bs, self.cfg.bucket_window, rng, self.cfg.drop_last
            )
        stop = len(order) - len(order) % bs if self.cfg.drop_last else len(order)
        return [order[i : i + bs] for i in range(0, stop, bs)]

    def make_batch(self, requests: np.ndarray, caps: np.ndarray | None = None) -> Batch:
        """The batch of these requests; `caps` (per request) shortens histories to a suffix."""
        cfg = self.cfg
        start = torch.from_numpy(self.requests.start[requests])
        count = torch.from_numpy(self.requests.count[requests])
        m = int(count.max())
        cols = self._targets
        tgt = start[:, None] + torch.arange(m)[None, :]
        target_mask = torch.arange(m)[None, :] < count[:, None]
        tgt = torch.where(target_mask, tgt, start[:, None])
        first = start
        user = cols["user"][first].long()
        end = cols["hist_end"][first].long()
        cap = cfg.max_len if caps is None else torch.from_numpy(np.minimum(caps, cfg.max_len))
        lo = torch.maximum(self._offsets[user], end - cap)
        longest = int((end - lo).max()) if len(end) else 0
        length = min(cfg.max_len, _round_up(max(longest, 1), cfg.pad_multiple))
        history, history_ts, mask = self._gather_history(lo, end, length)
        target = {k: v[tgt] for k, v in cols.items() if k not in _SAMPLE_COLUMNS}
        label = torch.where(target_mask, cols["label"][tgt].float(), torch.zeros(()))
        sample_index = torch.where(target_mask, tgt, torch.full((), -1, dtype=tgt.dtype))
        return Batch(
            user=user,
            history=history,
            history_mask=mask,
            history_ts=history_ts,
            target=target,
            target_ts=cols["target_ts"][tgt].long(),
            label=label,
            target_mask=target_mask,
            sample_index=sample_index,
            history_end=end,
            extra=None
            if self.tokens is None
            else self.tokens.before(user.numpy(), cols["target_ts"][first].numpy(), cfg.max_tokens),
        )

    def _gather_history(self, lo: torch.Tensor, end: torch.Tensor, length: int):
        """Left-padded [B, L] history fields (`ranges_taker`)."""
        b = len(lo)
        take, mask = ranges_taker(lo, end, length)
        history = {name: take(arr) for name, arr in self._store.items()}
        if self.cfg.history_ts:
            return history, take(self._ts), mask
        # zeros without memory where the model never reads the timestamps
        return history, torch.zeros((), dtype=self._ts.dtype).expand(b, length), mask

    def iter_epoch(self, epoch: int | None = None, start_batch: int = 0) -> Iterator[Batch]:
        epoch = self.epoch if epoch is None else epoch
        chunks = self.batch_requests(epoch)[start_batch:]
        caps = self.caps(epoch)
        batches = (self.make_batch(r, None if caps is None else caps[r]) for r in chunks)
        if self.cfg.pin_memory:
            batches = (b.pin_memory() for b in batches)
        depth = self.cfg.prefetch
        if depth is None:
            depth = default_prefetch(self.cfg.world_size)
        if depth <= 0:
            yield from batches
            return
        yield from _prefetch(batches, depth)

    def __iter__(self) -> Iterator[Batch]:
        return self.iter_epoch()


def default_prefetch(world_size: int = 1) -> int:
    """2 where the machine has a core beyond those of the training processes' threads, else 0.
    Without a spare core the prefetch thread only takes one from the step's parallel regions:
    on 2 cores, DARE's steps ran 1.1-1.2x longer beside it than the batches cost to build in
    line (BENCHMARKS.md, the DARE speed goal's 2026-12-07 subsection)."""
    spare = (os.cpu_count() or 1) - torch.get_num_threads() * max(world_size, 1)
    return 2 if spare > 0 else 0


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple if multiple > 1 else n


def _as_tensor(arr: np.ndarray) -> torch.Tensor:
    """A torch view of a read-only memory map (torch warns about writability; it never writes)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr)


_DONE = object()


def _prefetch(gen: Iterator[Batch], depth: int) -> Iterator[Batch]:
    """Run `gen` in a daemon thread, `depth` items ahead; exceptions re-raise in the consumer."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work():
        try:
            for item in gen:
                if stop.is_set():
                    return
                q.put(item)
            q.put(_DONE)
        except BaseException as err:  # handed to the consumer
            q.put(err)

    thread = threading.Thread(target=work, daemon=True, name="longrec-prefetch")
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)
