"""How samples are cut from histories: dare, leave_one_out, time_split, impressions.

Every function here is vectorised over users and samples. A sample is a target with a label and
a pointer `hist_end` into the store: its history is the user's rows before `hist_end`, which are
all strictly earlier in time than the target (behaviours sharing the target's timestamp are
excluded, so a history can never contain its own target or anything simultaneous with it).
Positives and the negatives drawn for them form one request (shared `request_id`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from longrec.data.schema import FIRST_INDEX
from longrec.errors import UserError

SPLITS = ("train", "valid", "test")
PROTOCOLS = ("dare", "leave_one_out", "time_split", "impressions")


@dataclass
class ProtocolConfig:
    """Every number of every protocol (defaults: DARE's public-data protocol)."""

    name: str = "dare"
    min_len: int = 210  # dare: keep users with at least this many behaviours
    max_len: int = 200  # default history length of the loader (recorded in meta.json)
    train_targets: int = 19  # dare: train positives per user
    train_stride: int = 5  # dare: positions T-2, T-7, ... (1-indexed)
    train_offset: int = 2  # dare: the newest train target is T - train_offset
    negatives: int | None = None  # per positive; None = 2 for dare, 1 otherwise
    neg_sampling: str | None = None  # "popularity" | "uniform"; None = popularity for dare
    min_history: int = 1  # drop targets with fewer history behaviours (counted in meta)
    valid_quantile: float = 0.8  # time_split / impressions: time cuts as quantiles
    test_quantile: float = 0.9
    valid_cut_ts: int | None = None  # explicit cuts override the quantiles
    test_cut_ts: int | None = None
    train_fraction: float = 1.0  # time_split: subsample train targets
    seed: int = 0

    def resolved(self) -> ProtocolConfig:
        if self.name not in PROTOCOLS:
            raise UserError(f"unknown protocol '{self.name}'; choose one of {', '.join(PROTOCOLS)}")
        negatives = (
            self.negatives if self.negatives is not None else (2 if self.name == "dare" else 1)
        )
        sampling = self.neg_sampling or ("popularity" if self.name == "dare" else "uniform")
        if sampling not in ("popularity", "uniform"):
            raise UserError(f"--neg-sampling must be popularity or uniform, got '{sampling}'")
        if negatives < 0 or self.min_history < 0 or self.max_len < 1:
            raise UserError("--negatives, --min-history must be >= 0 and --max-len >= 1")
        if not 0 < self.train_fraction <= 1:
            raise UserError("--train-fraction must be in (0, 1]")
        if self.name == "dare" and (
            self.train_offset < 2 or self.train_stride < 1 or self.train_targets < 0
        ):
            # otherwise train targets coincide with the valid (T-1) or test (T) target, or repeat
            raise UserError(
                "dare needs --train-offset >= 2, --train-stride >= 1 and --train-targets >= 0"
            )
        if not 0 < self.valid_quantile <= self.test_quantile < 1:
            raise UserError("need 0 < --valid-quantile <= --test-quantile < 1")
        return replace(self, negatives=negatives, neg_sampling=sampling)


@dataclass
class Positives:
    """Target rows of the store chosen by a protocol, with their split (0/1/2)."""

    rows: np.ndarray  # int64 store row of each positive target
    split: np.ndarray  # int8 index into SPLITS


def dare_positives(offsets: np.ndarray, cfg: ProtocolConfig) -> Positives:
    lengths = np.diff(offsets)
    users = np.flatnonzero(lengths >= cfg.min_len)
    start, total = offsets[users], lengths[users]
    back_train = cfg.train_offset + cfg.train_stride * np.arange(cfg.train_targets)  # T - i
    back = np.concatenate((back_train, [1, 0]))  # valid = T-1, test = T (0 back = newest)
    split = np.concatenate((np.zeros(cfg.train_targets), [1, 2])).astype(np.int8)
    pos = total[:, None] - 1 - back[None, :]  # 0-based position within the user
    rows = start[:, None] + pos
    keep = pos >= 0
    return Positives(rows[keep].astype(np.int64), np.broadcast_to(split, pos.shape)[keep])


def leave_one_out_positives(offsets: np.ndarray) -> Positives:
    """Every behaviour of users with at least 3 is a target; the last two are valid and test."""
    lengths = np.diff(offsets)
    user_len = np.repeat(lengths, lengths)
    pos = np.arange(offsets[-1], dtype=np.int64) - np.repeat(offsets[:-1], lengths)
    keep = user_len >= 3
    rows, pos, n = np.flatnonzero(keep).astype(np.int64), pos[keep], user_len[keep]
    split = np.where(pos == n - 1, 2, np.where(pos == n - 2, 1, 0)).astype(np.int8)
    return Positives(rows, split)


def time_cuts(ts: np.ndarray, cfg: ProtocolConfig) -> tuple[int, int]:
    valid_cut = cfg.valid_cut_ts
    test_cut = cfg.test_cut_ts
    if valid_cut is None:
        valid_cut = int(np.quantile(ts, cfg.valid_quantile))
    if test_cut is None:
        test_cut = int(np.quantile(ts, cfg.test_quantile))
    if valid_cut > test_cut:
        raise UserError(f"validation cut {valid_cut} is after the test cut {test_cut}")
    return int(valid_cut), int(test_cut)


def split_by_time(ts: np.ndarray, valid_cut: int, test_cut: int) -> np.ndarray:
    return np.where(ts >= test_cut, 2, np.where(ts >= valid_cut, 1, 0)).astype(np.int8)


def time_split_positives(
    ts: np.ndarray, cfg: ProtocolConfig, rng: np.random.Generator
) -> tuple[Positives, tuple[int, int]]:
    cuts = time_cuts(np.asarray(ts), cfg)
    rows = np.arange(len(ts), dtype=np.int64)
    split = split_by_time(np.asarray(ts), *cuts)
    if cfg.train_fraction < 1:
        keep = (split != 0) | (rng.random(len(rows)) < cfg.train_fraction)
        rows, split = rows[keep], split[keep]
    return Positives(rows, split), cuts


class NegativeSampler:
    """Draws items a user never interacted with, by popularity or uniformly; vectorised rejection."""

    def __init__(self, user_of_row: np.ndarray, item: np.ndarray, n_items: int, mode: str):
        self.n_items = int(n_items)
        # sorted (user, item) keys; duplicates are harmless for the membership test, and an
        # in-place sort avoids np.unique's copies (and its slow path on 100M keys)
        self.seen = user_of_row.astype(np.int64) * self.n_items
        self.seen += item
        self.seen.sort()
        if mode == "popularity":
            counts = np.bincount(item, minlength=self.n_items).astype(np.float64)
        else:
            counts = np.ones(self.n_items)
        counts[:FIRST_INDEX] = 0.0  # never padding or the unseen bucket
        if counts.sum() == 0:
            raise UserError("no items to draw negatives from")
        self.cdf = np.cumsum(counts) / counts.sum()

    def _draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        idx = np.searchsorted(self.cdf, rng.random(n), side="right")
        return np.minimum(idx, self.n_items - 1)

    def sample(
        self, rng: np.random.Generator, users: np.ndarray, max_rounds: int = 200
    ) -> np.ndarray:
        users = users.astype(np.int64)
        out = self._draw(rng, len(users))
        todo = np.arange(len(users))
        for _ in range(max_rounds):
            keys = users[todo] * self.n_items + out[todo]
            pos = np.searchsorted(self.seen, keys)
            clash = (pos < len(self.seen)) & (
                self.seen[np.minimum(pos, len(self.seen) - 1)] == keys
            )
            todo = todo[clash]
            if len(todo) == 0:
                return out
            out[todo] = self._draw(rng, len(todo))
        # Rejection keeps failing only for users who saw most of the probability mass: draw the
        # rest exactly from the same distribution restricted to each user's unseen items.
        weights = np.diff(self.cdf, prepend=0.0)
        for user in np.unique(users[todo]):
            lo, hi = np.searchsorted(self.seen, [user * self.n_items, (user + 1) * self.n_items])
            mine = weights.copy()
            mine[self.seen[lo:hi] - user * self.n_items] = 0.0
            if mine.sum() <= 0:
                raise UserError(
                    f"could not find unseen negative items for user index {user}: it has "
                    "interacted with every item that can be drawn; lower --negatives"
                )
            rows = todo[users[todo] == user]
            out[rows] = rng.choice(self.n_items, size=len(rows), p=mine / mine.sum())
        return out
