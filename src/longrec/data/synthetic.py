"""Synthetic long-sequence data with known ground truth (`longrec synth`).

Generates behaviour logs of any size (users with heavy-tailed histories over several years,
three domains, two category systems), an ad impression log whose click probabilities come from
planted long- and short-range structure, and the ground truth of which behaviours drive each
impression. The process, its equations and the output format are in docs/synthetic.md.

Everything is vectorised numpy and streamed in chunks of users, so memory stays bounded; output
is written to a temporary folder beside OUT and renamed into place at the end. The same config
(seed included) gives byte-identical data files.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from longrec.data.synthetic_behaviours import make_behaviours
from longrec.data.synthetic_impressions import make_impressions
from longrec.data.synthetic_world import DOMAINS, World, history_lengths, make_world
from longrec.data.synthetic_write import ChunkWriter, summarize, write_tables
from longrec.errors import UserError
from longrec.faults import fault_point
from longrec.outputs import check_replaceable, replace_dir, temp_path, write_marker, writer_lock

FORMAT = "longrec-synth/1"


@dataclass
class SynthConfig:
    """All parameters of the generator; the manifest records them, so a run can be redone."""

    # --- scale
    users: int = 2000
    """Number of users (ids 1..users, in file order)."""
    mean_len: float = 500.0
    """Mean history length; lengths are a clipped lognormal solved to have this mean."""
    max_len: int = 50_000
    """Longest history: the heavy tail is cut here (the lifelong-sequence regime)."""
    min_len: int = 5
    """Shortest history, so every user has something before a request."""
    length_sigma: float = 1.2
    """Lognormal shape of history lengths: larger = heavier tail."""
    seed: int = 0
    """Master seed; world, lengths and every chunk get their own derived stream."""

    # --- taxonomy and items
    n_l1: int = 8
    """Top-level categories."""
    l2_per_l1: int = 8
    """Children per l1 (so n_l1 * l2_per_l1 l2 categories)."""
    leaves_per_l2: int = 12
    """Leaves per l2; the default tree has 8 * 8 * 12 = 768 leaves."""
    category_zipf: float = 0.8
    """Zipf exponent of leaf popularity (over a random order of leaves)."""
    content_cats_per_leaf: float = 2.5
    """Mean raw content categories per leaf: the content system is finer than the unified one."""
    content_category_base: int = 100_000
    """Content raw category ids start here, a range disjoint from the unified ids."""
    ad_items: int = 50_000
    """Items in each of the two ad domains."""
    content_items: int = 100_000
    """Items in the content domain."""
    zipf: float = 1.0
    """Zipf exponent of item popularity within a domain."""
    item_quality_sd: float = 0.3
    """Std of a per-item click-logit offset: item-level signal a model can learn from ids."""
    domain_weights: tuple[float, float, float] = (0.2, 0.15, 0.65)
    """Share of sessions in ads_moments, ads_channels, content; also the ad request split."""

    # --- behaviours
    years: float = 3.0
    """Length of the calendar window; each user is active over a random part of it."""
    start_ts: int = 1_577_836_800
    """Window start (2020-01-01 UTC)."""
    span_min: float = 0.4
    """A user's active span is years * U(span_min, 1)."""
    session_len: float = 8.0
    """Mean behaviours per session (geometric)."""
    gap_seconds: float = 45.0
    """Mean gap between behaviours inside a session."""
    walk_l1: float = 0.15
    """Per session: probability the short-term interest jumps to another l1 branch."""
    walk_l2: float = 0.3
    """Otherwise: probability it moves to another l2 within the l1."""
    walk_leaf: float = 0.4
    """Otherwise: probability it moves to another leaf within the l2."""
    session_drift: float = 0.2
    """Per short-term behaviour: probability it uses a sibling leaf of the session's focus."""
    short_term_share: float = 0.6
    """Share of non-long-term behaviours that follow the session's short-term interest."""
    lt_interests: float = 3.0
    """Mean long-term interests per user (1 + Poisson), capped at max_interests."""
    max_interests: int = 6
    """Cap on long-term interests per user."""
    lt_per_interest: float = 5.0
    """Behaviours per long-term interest for a mean-length user (scales as sqrt(len/mean))."""
    lt_max_share: float = 0.25
    """Cap on the share of a user's behaviours that are long-term interest behaviours."""
    conversion_prob: tuple[float, float, float] = (0.02, 0.06, 0.2)
    """P(conversion) of an ad behaviour, by source (noise, short-term, long-term)."""
    like_prob: tuple[float, float, float] = (0.04, 0.12, 0.3)
    """P(like) of a content behaviour, by source (noise, short-term, long-term)."""

    # --- impressions
    requests_per_user: float = 4.0
    """Mean ad requests per user (Poisson)."""
    candidates_per_request: int = 5
    """Ads shown per request; they share request_id, user and ts."""
    request_start: float = 0.5
    """Requests follow a behaviour drawn from the last (1 - request_start) of the history."""
    request_delay_seconds: float = 600.0
    """Mean delay from that behaviour to the request."""
    candidate_mix: tuple[float, float, float] = (0.35, 0.25, 0.4)
    """Candidate leaf from: a long-term interest, a recent behaviour, item popularity."""
    recent_window: int = 20
    """'Recent' candidates take the leaf of one of this many last behaviours."""
    target_types: tuple[str, ...] = ("click", "activation", "purchase")
    """Advertising target types (names written to the impressions file)."""
    target_weights: tuple[float, ...] = (0.4, 0.3, 0.3)
    """Share of candidates of each target type."""
    target_tau_days: tuple[float, ...] = (1.0, 7.0, 30.0)
    """Decay time constant of relevance, per target type."""
    target_floor: tuple[float, ...] = (0.05, 0.5, 0.85)
    """Relevance an arbitrarily old behaviour keeps, per target type (long-term memory)."""
    target_bias: tuple[float, ...] = (-2.8, -3.2, -3.4)
    """Click logit with no relevant behaviour, per target type (before the calibrated offset)."""
    positive_rate: float | None = 0.2
    """Overall positive rate to calibrate to: a common logit offset is solved on a pilot sample,
    because relevance sums grow with history length. None = use target_bias as is."""
    calibration_rows: int = 1_000_000
    """Behaviours in the pilot sample used to calibrate the offset (its own random stream)."""
    relevance_gain: float = 1.6
    """Logit gain of log(1 + S), S = the truth rows' relevance pooled by `relevance_pool`."""
    relevance_pool: str = "sum"
    """How the truth rows' relevances make S: 'sum' (a count-like intensity, which softmax
    attention normalises away) or 'max' (the single most relevant behaviour, which attention
    or a search can find wherever it sits in the history)."""
    branch_weight: float = 0.3
    """Relevance factor of a behaviour in another leaf of the candidate's l2 (same leaf: 1)."""
    behavior_weights: tuple[float, float, float, float] = (1.0, 2.0, 0.5, 1.0)
    """Relevance factor of click, conversion, view, like."""
    truth_top_k: int = 50
    """Only the k most relevant behaviours of an impression count (and are in the truth)."""
    eval_recent: int = 50
    """Window for the manifest's 'last N behaviours only' diagnostic AUC."""

    # --- output
    format: str = "csv"
    """'csv' (Taobao layout, no header) or 'parquet' for behaviours and impressions."""
    chunk_rows: int = 2_000_000
    """Behaviours generated and written per chunk; bounds memory. Changing it changes the
    random realisation (each chunk has its own stream), not the distribution."""

    def validate(self) -> None:
        """Raise UserError with one clear line for the first bad parameter."""
        n_leaf = self.n_l1 * self.l2_per_l1 * self.leaves_per_l2
        checks: list[tuple[bool, str]] = [
            (self.users >= 1, f"--users must be at least 1 (got {self.users})"),
            (self.min_len >= 1, f"min_len must be at least 1 (got {self.min_len})"),
            (self.max_len >= self.min_len, f"--max-len must be >= {self.min_len}"),
            (
                self.min_len <= self.mean_len <= self.max_len,
                f"--mean-len must be between --min-len {self.min_len} and --max-len {self.max_len} "
                f"(got {self.mean_len})",
            ),
            (self.length_sigma > 0, "length_sigma must be > 0"),
            (self.seed >= 0, f"--seed must be >= 0 (got {self.seed})"),
            (
                min(self.n_l1, self.l2_per_l1, self.leaves_per_l2) >= 1,
                "taxonomy sizes must be >= 1",
            ),
            (
                self.content_category_base > 1 + self.n_l1 + self.n_l1 * self.l2_per_l1 + n_leaf,
                "content_category_base must exceed every unified category id",
            ),
            (
                min(self.ad_items, self.content_items) >= n_leaf,
                f"--items and --content-items must be >= the number of leaves ({n_leaf})",
            ),
            (self.years > 0 and self.years <= 100, "--years must be in (0, 100]"),
            (0 < self.span_min <= 1, "span_min must be in (0, 1]"),
            (self.session_len >= 1, "session_len must be >= 1"),
            (self.requests_per_user >= 0, "--requests-per-user must be >= 0"),
            (self.candidates_per_request >= 1, "--candidates must be >= 1"),
            (0 <= self.request_start < 1, "request_start must be in [0, 1)"),
            (len(self.domain_weights) == len(DOMAINS), "domain_weights needs 3 values"),
            (min(self.domain_weights) >= 0 and sum(self.domain_weights[:2]) > 0, "bad weights"),
            (len(self.target_types) >= 1, "at least one target type is needed"),
            (len(set(self.target_types)) == len(self.target_types), "duplicate target types"),
            (
                len(self.target_types)
                == len(self.target_weights)
                == len(self.target_tau_days)
                == len(self.target_floor)
                == len(self.target_bias),
                "target_weights/tau_days/floor/bias need one value per target type",
            ),
            (min(self.target_floor) > 0, "target_floor must be > 0 (relevance stays positive)"),
            (self.truth_top_k >= 1, "truth_top_k must be >= 1"),
            (
                self.relevance_pool in ("sum", "max"),
                f"relevance_pool must be sum or max, not {self.relevance_pool!r}",
            ),
            (self.max_interests >= 1, "max_interests must be >= 1"),
            (
                self.format in ("csv", "parquet"),
                f"--format must be csv or parquet, not {self.format!r}",
            ),
            (self.chunk_rows >= 1, "chunk_rows must be >= 1"),
            (
                self.positive_rate is None or 0 < self.positive_rate < 1,
                "positive_rate must be in (0, 1)",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _chunks(lengths: np.ndarray, chunk_rows: int) -> list[tuple[int, int]]:
    """Consecutive user ranges of about chunk_rows behaviours (at least one user each)."""
    cum = np.cumsum(lengths)
    bounds, start, done = [], 0, 0
    while start < lengths.size:
        end = int(np.searchsorted(cum, done + chunk_rows, side="left")) + 1
        end = min(max(end, start + 1), lengths.size, start + (1 << 20))
        bounds.append((start, end))
        done = int(cum[end - 1])
        start = end
    return bounds


def calibrate_offset(config: SynthConfig, world: World, lengths: np.ndarray) -> float:
    """The logit offset giving `positive_rate` on a pilot sample of users.

    Lengths are i.i.d., so the first users (up to `calibration_rows` behaviours, at least 50
    users) are a fair sample; they are generated again from a separate stream and discarded.
    """
    if config.positive_rate is None or config.requests_per_user == 0:
        return 0.0
    n = int(np.searchsorted(np.cumsum(lengths), config.calibration_rows, side="right"))
    pilot = lengths[: min(max(n, 50), lengths.size)]
    rng = np.random.default_rng([config.seed, 3])
    beh = make_behaviours(config, world, pilot, rng)
    z = make_impressions(config, world, beh, pilot, rng).logit.astype(np.float64)
    if z.size == 0:
        return 0.0
    lo, hi = -30.0, 30.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if np.mean(1.0 / (1.0 + np.exp(-(z + mid)))) < config.positive_rate:
            lo = mid
        else:
            hi = mid
    return round((lo + hi) / 2, 6)


def generate(
    config: SynthConfig, out: Path, overwrite: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Generate a synthetic dataset into folder `out`; return its manifest."""

    config.validate()
    out = Path(out)
    check_replaceable(out, "synth", overwrite)
    with writer_lock(out):
        check_replaceable(out, "synth", overwrite)  # it may have appeared meanwhile
        return _generate_locked(config, out, progress)


def _generate_locked(config: SynthConfig, out: Path, progress: bool) -> dict[str, Any]:
    from tqdm.auto import tqdm

    began = time.perf_counter()
    tmp = temp_path(out, "synth-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    writer: ChunkWriter | None = None
    try:
        world = make_world(config, np.random.default_rng([config.seed, 0]))
        lengths = history_lengths(
            config.users,
            config.mean_len,
            config.length_sigma,
            config.min_len,
            config.max_len,
            np.random.default_rng([config.seed, 1]),
        )
        offset = calibrate_offset(config, world, lengths)
        total_rows = int(lengths.sum())
        writer = ChunkWriter(tmp, config, world)
        pending: Future | None = None
        row0 = imp0 = req0 = 0
        with (
            ThreadPoolExecutor(max_workers=1) as pool,
            tqdm(
                total=total_rows,
                unit="rows",
                unit_scale=True,
                desc="synth",
                disable=not progress,
            ) as bar,
        ):
            for index, (u0, u1) in enumerate(_chunks(lengths, config.chunk_rows)):
                rng = np.random.default_rng([config.seed, 2, index])
                chunk_len = lengths[u0:u1]
                beh = make_behaviours(config, world, chunk_len, rng)
                imp = make_impressions(config, world, beh, chunk_len, rng, offset)
                writer.collect(imp)
                tables = (beh, imp, u0 + 1, row0, imp0, req0)
                if pending is not None:
                    bar.update(pending.result())
                pending = pool.submit(write_tables, writer, *tables)
                row0 += beh.rows
                imp0 += imp.n
                req0 += imp.n_requests
                del beh, imp
            if pending is not None:
                bar.update(pending.result())
        writer.close()
        stats = summarize(config, world, lengths, writer)
        stats["generation_seconds"] = round(time.perf_counter() - began, 2)
        manifest = {
            "format": FORMAT,
            "seed": config.seed,
            "config": config.to_json(),
            "files": writer.files,
            "behavior_columns": ["user", "item", "category", "behavior", "ts", "domain"],
            "target_types": list(config.target_types),
            "domains": list(DOMAINS),
            "stats": stats,
            "logit_offset": offset,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        write_marker(tmp, "synth")
        fault_point("synth-before-rename")
        replace_dir(tmp, out)
    except BaseException:
        if writer is not None:
            with contextlib.suppress(Exception):  # the original error is the one to report
                writer.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
