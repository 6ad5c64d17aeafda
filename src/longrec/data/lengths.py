"""Length-extrapolative training (docs/models.md, "STCA"): train on short suffixes, serve the
full history.

Each request gets, per epoch, a training length L = L_min + s (L_max - L_min), s ~ Beta(a, b),
rounded up to a multiple of 8 (kernel-friendly), and keeps its most recent L behaviours (suffix
beats random subsets and prefixes in the paper). b = a (L_max - L_avg) / (L_avg - L_min) puts
the mean at L_avg; a < 1 gives the U-shaped distribution the paper found best (many short
sequences, a few near full length).

Bucketing: with lengths that vary per request, a batch padded to its longest member wastes
most of its slots. Requests are grouped, inside windows of a few dozen batches, by effective
length (min(L, the history they have)), so every batch holds similar lengths; batch order is
shuffled afterwards, and everything is a function of (seed, epoch), so resume stays exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from longrec.errors import UserError


@dataclass
class LengthSampling:
    kind: str = "fixed"  # fixed (every request max_len) | beta
    min_len: int = 8
    mean_len: int | None = None  # None = midpoint of [min_len, max_len]
    alpha: float = 0.5
    multiple: int = 8

    def check(self, max_len: int) -> None:
        if self.kind not in ("fixed", "beta"):
            raise UserError(f"length sampling must be fixed or beta, got '{self.kind}'")
        if self.kind == "beta":
            mean = self.mean_len if self.mean_len is not None else (self.min_len + max_len) / 2
            if not 0 < self.min_len < mean < max_len:
                raise UserError(
                    f"beta lengths need 0 < min_len < mean_len < max_len, got {self.min_len}, {mean}, {max_len}"
                )
            if self.alpha <= 0:
                raise UserError("beta alpha must be > 0")


def sample_lengths(
    rng: np.random.Generator, n: int, max_len: int, cfg: LengthSampling
) -> np.ndarray:
    """Per-request training lengths (int64 [n]) in [min_len, max_len], multiples of `multiple`."""
    if cfg.kind == "fixed":
        return np.full(n, max_len, dtype=np.int64)
    lo, hi = cfg.min_len, max_len
    mean = cfg.mean_len if cfg.mean_len is not None else (lo + hi) / 2
    beta = cfg.alpha * (hi - mean) / (mean - lo)
    s = rng.beta(cfg.alpha, beta, size=n)
    length = lo + s * (hi - lo)
    m = max(1, cfg.multiple)
    return np.clip(np.ceil(length / m).astype(np.int64) * m, m, max_len)


def bucketed_batches(
    order: np.ndarray,
    effective: np.ndarray,
    batch_size: int,
    window: int,
    rng: np.random.Generator,
    drop_last: bool,
) -> list[np.ndarray]:
    """Batches of similar effective length: sort each window of `window` batches by length,
    cut, then shuffle the batches of all windows."""
    span = max(1, window) * batch_size
    batches: list[np.ndarray] = []
    for start in range(0, len(order), span):
        chunk = order[start : start + span]
        chunk = chunk[np.argsort(effective[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    if drop_last:
        batches = [b for b in batches if len(b) == batch_size]
    rng.shuffle(batches)
    return batches
