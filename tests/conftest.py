"""Shared fixtures: the repository, the bundled real data, a prepared Taobao dataset, the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
TAOBAO_SAMPLE = REPO_ROOT / "examples" / "data" / "taobao" / "UserBehavior_head.csv"
MOVIELENS_DIR = REPO_ROOT / "examples" / "data" / "movielens" / "ml-latest-small"


@pytest.fixture(autouse=True)
def _kernels_setting_restored():
    """The Trainer, the ranker and `longrec eval` set the process-wide kernels setting
    (longrec.ops.dispatch); no test leaves its setting to the next."""
    from longrec.ops import dispatch

    with dispatch.using(dispatch.KERNELS[0]):  # auto, the default
        yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add overhead, and oversubscribe a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def taobao_sample() -> Path:
    """The bundled head of Taobao UserBehavior.csv (its last line, 84,476, is truncated)."""
    assert TAOBAO_SAMPLE.is_file(), TAOBAO_SAMPLE
    return TAOBAO_SAMPLE


@pytest.fixture(scope="session")
def movielens_dir() -> Path:
    """The bundled MovieLens ml-latest-small folder (ratings.csv, movies.csv)."""
    assert (MOVIELENS_DIR / "ratings.csv").is_file(), MOVIELENS_DIR
    return MOVIELENS_DIR


@pytest.fixture(scope="session")
def prepared_taobao(tmp_path_factory: pytest.TempPathFactory, taobao_sample: Path) -> Path:
    """DARE's Taobao protocol on the bundled sample: pv only, users with >= 50, bad rows skipped."""
    from longrec.data.prepare import PrepareConfig, prepare
    from longrec.data.protocols import ProtocolConfig
    from longrec.data.sources import SourceOptions

    out = tmp_path_factory.mktemp("prepared") / "taobao"
    prepare(
        PrepareConfig(
            source="taobao",
            input=taobao_sample,
            out=out,
            protocol=ProtocolConfig(name="dare", min_len=50),
            source_options=SourceOptions(on_bad_rows="skip"),
            behaviors=("pv",),
            quiet=True,
        )
    )
    return out


def run_longrec_cli(*args: str | os.PathLike, cwd: Path | None = None):
    """`python -m longrec ARGS` in a subprocess, as a user runs it."""
    env = dict(os.environ, COLUMNS="200", NO_COLOR="1", TERM="dumb")
    return subprocess.run(
        [sys.executable, "-m", "longrec", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="session")
def run_cli() -> Callable[..., subprocess.CompletedProcess]:
    return run_longrec_cli


@pytest.fixture(scope="session")
def check_samples() -> Callable[..., dict[str, dict]]:
    return check_prepared_samples


def check_prepared_samples(root: Path, *, requests: str = "one_positive") -> dict[str, dict]:
    """Check the invariants every prepared (behaviour-protocol) dataset must satisfy.

    For every sample of every split: the history (store rows [user_start, hist_end)) lies inside
    the user's rows, every behaviour in it is strictly earlier than the target, and it holds every
    strictly earlier behaviour (hist_end is the user's first row at or after the target time).
    Negatives are never items of the user's whole history. With `requests="one_positive"`, every
    request has exactly one positive and all its rows share user, hist_end and target time.
    Returns the splits (numpy columns) for further checks.
    """
    from longrec.data.samples import read_split
    from longrec.data.store import SequenceStore

    store = SequenceStore.open(root)
    offsets = store.offsets
    ts = np.asarray(store.ts)
    item = np.asarray(store.fields["item"])
    # the store itself is sorted by (user, ts): the vectorised checks below rely on it
    user_of_row = store.user_of_rows()
    same_user = user_of_row[1:] == user_of_row[:-1]
    assert (ts[1:][same_user] >= ts[:-1][same_user]).all()
    seen = set(zip(user_of_row.tolist(), item.tolist(), strict=True))
    out = {}
    for split in ("train", "valid", "test"):
        cols = read_split(root, split)
        out[split] = cols
        if len(cols["label"]) == 0:
            continue
        user, hist_end, target_ts = cols["user"], cols["hist_end"], cols["target_ts"]
        start, stop = offsets[user], offsets[user + 1]
        assert (hist_end >= start).all() and (hist_end <= stop).all()
        has_history = hist_end > start
        last = np.maximum(hist_end - 1, 0)
        assert (ts[last][has_history] < target_ts[has_history]).all(), "history reaches target"
        not_all = hist_end < stop
        assert (ts[np.minimum(hist_end, len(ts) - 1)][not_all] >= target_ts[not_all]).all(), (
            "history misses an earlier behaviour"
        )
        negatives = cols["label"] == 0
        for u, it in zip(user[negatives].tolist(), cols["item"][negatives].tolist(), strict=True):
            assert (u, it) not in seen, f"negative item {it} is in user {u}'s history"
        assert (cols["item"] >= 2).all(), "padding or unseen index as a target"
        if requests == "one_positive":
            rid = cols["request_id"]
            uniq, first, counts = np.unique(rid, return_index=True, return_counts=True)
            positives = np.bincount(np.searchsorted(uniq, rid), weights=cols["label"])
            assert (positives == 1).all(), "a request without exactly one positive"
            group = np.searchsorted(uniq, rid)
            for name in ("user", "hist_end", "target_ts"):
                assert (cols[name] == cols[name][first][group]).all(), f"{name} differs in request"
            assert len(np.unique(counts)) == 1, "requests of unequal size"
    return out
