"""Protocol properties: no leakage, exactly the samples each protocol defines, clean negatives,
seeded determinism. Random stores with many equal timestamps, directly and through `prepare`."""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from longrec.data.prepare import PrepareConfig, _behavior_samples, prepare
from longrec.data.protocols import NegativeSampler, ProtocolConfig, time_cuts
from longrec.data.samples import SampleSet
from longrec.data.schema import FieldSpec
from longrec.data.sources import SourceOptions, parse_column_map
from longrec.data.store import SequenceStore
from longrec.errors import UserError

SPLITS = ("train", "valid", "test")
N_ITEMS = 2 + 30 + 20  # 0 padding, 1 unseen, 30 items for users, 20 for two filler users

# one user's behaviours: (ts, item), timestamps from a tiny range so that many are equal
behaviours = st.lists(st.tuples(st.integers(0, 12), st.integers(2, 31)), min_size=0, max_size=30)
logs = st.lists(behaviours, min_size=1, max_size=8)


def make_store(users: list[list[tuple[int, int]]]) -> SequenceStore:
    """A CSR store like prepare's: users 0 (padding) and 1 (unseen) are empty, then `users`, then
    two filler users of 10 distinct items each, so that popularity negatives always exist."""
    users = [*users, [(5, i) for i in range(32, 42)], [(5, i) for i in range(42, 52)]]
    lengths = [0, 0] + [len(u) for u in users]
    rows = [sorted(u, key=lambda b: b[0]) for u in users]  # stable: file order for equal ts
    ts = np.array([b[0] for u in rows for b in u], dtype=np.int64) + 1_500_000_000
    item = np.array([b[1] for u in rows for b in u], dtype=np.int32)
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
    return SequenceStore(offsets=offsets, ts=ts, fields={"item": item})


def run(store: SequenceStore, cfg: ProtocolConfig) -> tuple[SampleSet, dict, ProtocolConfig]:
    cfg = cfg.resolved()
    notes: dict = {}
    specs = [FieldSpec("item", N_ITEMS)]
    samples = _behavior_samples(store, specs, cfg, notes)
    return samples, notes, cfg


def check_leakage_and_requests(store: SequenceStore, samples: SampleSet, negatives: int):
    """Per sample: the history [user_start, hist_end) is exactly the user's strictly earlier
    behaviours. Per request: one positive, `negatives` negatives never seen by the user."""
    offsets, ts, item = store.offsets, np.asarray(store.ts), np.asarray(store.fields["item"])
    for cols in samples.splits.values():
        for i in range(len(cols["label"])):
            u, end, t = int(cols["user"][i]), int(cols["hist_end"][i]), int(cols["target_ts"][i])
            start, stop = int(offsets[u]), int(offsets[u + 1])
            assert start <= end <= stop
            assert all(ts[start:end] < t), "history holds the target time or later"
            assert all(ts[end:stop] >= t), "history misses a strictly earlier behaviour"
        rid = cols["request_id"]
        for r in np.unique(rid):
            sel = rid == r
            assert cols["label"][sel].tolist() == [1.0] + [0.0] * negatives
            for name in ("user", "hist_end", "target_ts"):
                assert len(set(cols[name][sel].tolist())) == 1
            u = int(cols["user"][sel][0])
            history = set(item[offsets[u] : offsets[u + 1]].tolist())  # whole history
            for neg in cols["item"][sel][1:].tolist():
                assert neg not in history and neg >= 2
    ids = np.concatenate([c["request_id"] for c in samples.splits.values()])
    groups = [len(np.unique(c["request_id"])) for c in samples.splits.values()]
    assert len(np.unique(ids)) == sum(groups), "a request id is shared across splits"


def positives_by_split(samples: SampleSet) -> dict[str, Counter]:
    out = {}
    for name, cols in samples.splits.items():
        pos = cols["label"] == 1
        out[name] = Counter(
            zip(
                cols["user"][pos].tolist(),
                cols["target_ts"][pos].tolist(),
                cols["item"][pos].tolist(),
                strict=True,
            )
        )
    return out


def expected_positives(store: SequenceStore, targets, min_history: int):
    """(user, ts, item) of each (user, 0-based position, split) target that has enough history."""
    ts, item = np.asarray(store.ts), np.asarray(store.fields["item"])
    out = {name: Counter() for name in SPLITS}
    dropped = 0
    for user, pos, split in targets:
        start = int(store.offsets[user])
        row = start + pos
        history = int((ts[start:row] < ts[row]).sum())  # rows before it, strictly earlier
        if history < min_history:
            dropped += 1
            continue
        out[split][(user, int(ts[row]), int(item[row]))] += 1
    return out, dropped


SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(
    logs,
    st.integers(1, 12),
    st.integers(0, 6),
    st.integers(1, 4),
    st.integers(2, 4),
    st.integers(0, 2),
    st.integers(0, 3),
    st.integers(0, 2**16),
)
def test_dare_makes_exactly_its_samples(
    users, min_len, train_targets, stride, offset, min_history, negatives, seed
):
    store = make_store(users)
    cfg = ProtocolConfig(
        name="dare",
        min_len=min_len,
        train_targets=train_targets,
        train_stride=stride,
        train_offset=offset,
        min_history=min_history,
        negatives=negatives,
        seed=seed,
    )
    samples, _, cfg = run(store, cfg)
    targets = []
    for user, length in enumerate(store.lengths().tolist()):
        if length < min_len:
            continue
        # 1-indexed positions: train T-offset-stride*j, valid T-1, test T
        wanted = [(length - offset - stride * j, "train") for j in range(train_targets)]
        wanted += [(length - 1, "valid"), (length, "test")]
        targets += [(user, p - 1, split) for p, split in wanted if p >= 1]
    expected, dropped = expected_positives(store, targets, min_history)
    assert positives_by_split(samples) == expected
    assert sum(samples.dropped.values()) == dropped
    for cols in samples.splits.values():
        assert len(cols["label"]) == (1 + negatives) * int(cols["label"].sum())
    check_leakage_and_requests(store, samples, negatives)
    if negatives:  # popularity sampling: only items that occur in the store
        occurring = set(np.asarray(store.fields["item"]).tolist())
        for cols in samples.splits.values():
            assert set(cols["item"][cols["label"] == 0].tolist()) <= occurring


def test_dare_defaults_on_long_users():
    """DARE's protocol: 19 train targets at T-2-5j (1-indexed), valid T-1, test T, 2 negatives each."""
    rng = np.random.default_rng(3)
    users = [[(t, int(rng.integers(2, 32))) for t in range(n)] for n in (210, 250, 209, 400)]
    # distinct, increasing timestamps so that every history is the whole prefix
    users = [[(t * 10, it) for t, it in u] for u in users]
    store = make_store(users)
    samples, _, cfg = run(store, ProtocolConfig(name="dare"))
    assert cfg.negatives == 2 and cfg.neg_sampling == "popularity" and cfg.min_len == 210
    eligible = [u for u, n in enumerate(store.lengths()) if n >= 210]
    assert eligible == [2, 3, 5]
    train, valid, test = (samples.splits[s] for s in SPLITS)
    assert len(train["label"]) == 3 * 19 * 3 and len(valid["label"]) == len(test["label"]) == 9
    for cols in (train, valid, test):  # requests are contiguous, positive first
        n = len(cols["label"]) // 3
        assert cols["label"].reshape(-1, 3).tolist() == [[1.0, 0.0, 0.0]] * n
        assert (cols["request_id"].reshape(-1, 3) == cols["request_id"][::3, None]).all()
    for u in eligible:
        T = int(store.lengths()[u])
        start = int(store.offsets[u])
        pos = train["label"] == 1
        mine = train["user"][pos] == u
        # positions are recoverable from hist_end: timestamps are distinct, so hist_end = row
        got = sorted((train["hist_end"][pos][mine] - start + 1).tolist())
        assert got == sorted(T - 2 - 5 * j for j in range(19))
        assert (valid["hist_end"][valid["user"] == u] - start + 1).tolist() == [T - 1] * 3
        assert (test["hist_end"][test["user"] == u] - start + 1).tolist() == [T] * 3
    check_leakage_and_requests(store, samples, 2)


@SETTINGS
@given(logs, st.integers(0, 2), st.integers(0, 2), st.integers(0, 2**16))
def test_leave_one_out_makes_every_position_a_target(users, min_history, negatives, seed):
    store = make_store(users)
    cfg = ProtocolConfig(
        name="leave_one_out", min_history=min_history, negatives=negatives, seed=seed
    )
    samples, _, cfg = run(store, cfg)
    targets = []
    for user, length in enumerate(store.lengths().tolist()):
        if length < 3:
            continue
        targets += [(user, p, "train") for p in range(length - 2)]
        targets += [(user, length - 2, "valid"), (user, length - 1, "test")]
    expected, dropped = expected_positives(store, targets, min_history)
    assert positives_by_split(samples) == expected
    assert sum(samples.dropped.values()) == dropped
    check_leakage_and_requests(store, samples, negatives)


@SETTINGS
@given(
    logs,
    st.one_of(
        st.tuples(st.floats(0.05, 0.95), st.floats(0.05, 0.95)).map(sorted),
        st.tuples(st.integers(0, 13), st.integers(0, 13)).map(sorted),
    ),
    st.integers(0, 2),
    st.integers(0, 2**16),
)
def test_time_split_splits_by_the_cuts(users, cuts, min_history, seed):
    store = make_store(users)
    base = 1_500_000_000
    if isinstance(cuts[0], float):
        cfg = ProtocolConfig(
            name="time_split", valid_quantile=cuts[0], test_quantile=cuts[1], seed=seed
        )
        want = time_cuts(np.asarray(store.ts), cfg)
        assert want == (
            int(np.quantile(store.ts, cuts[0])),
            int(np.quantile(store.ts, cuts[1])),
        )
    else:
        want = (base + cuts[0], base + cuts[1])
        cfg = ProtocolConfig(name="time_split", valid_cut_ts=want[0], test_cut_ts=want[1])
    cfg.min_history = min_history
    samples, notes, cfg = run(store, cfg)
    assert (notes["valid_cut_ts"], notes["test_cut_ts"]) == want
    ts = np.asarray(store.ts)
    targets = []
    for user in range(store.n_users):
        for p in range(int(store.lengths()[user])):
            t = ts[store.offsets[user] + p]
            split = "test" if t >= want[1] else "valid" if t >= want[0] else "train"
            targets.append((user, p, split))
    expected, dropped = expected_positives(store, targets, min_history)
    assert positives_by_split(samples) == expected
    assert sum(samples.dropped.values()) == dropped
    check_leakage_and_requests(store, samples, 1)


def test_time_split_train_fraction_subsamples_train_only():
    rng = np.random.default_rng(0)
    users = [
        [(int(t), int(rng.integers(2, 32))) for t in rng.integers(0, 100, 25)] for _ in range(40)
    ]
    store = make_store(users)
    full, _, _ = run(store, ProtocolConfig(name="time_split", negatives=0, min_history=0))
    half, _, _ = run(
        store, ProtocolConfig(name="time_split", negatives=0, min_history=0, train_fraction=0.5)
    )
    for split in ("valid", "test"):
        assert len(half.splits[split]["label"]) == len(full.splits[split]["label"])
    ratio = len(half.splits["train"]["label"]) / len(full.splits["train"]["label"])
    assert 0.4 < ratio < 0.6


def fixed_store() -> SequenceStore:
    rng = np.random.default_rng(11)
    users = []
    for _ in range(40):
        n = int(rng.integers(5, 30))
        users.append(
            list(
                zip(
                    np.sort(rng.integers(0, 50, n)).tolist(),
                    rng.integers(2, 32, n).tolist(),
                    strict=True,
                )
            )
        )
    return make_store(users)


@pytest.mark.parametrize("name", ["dare", "leave_one_out", "time_split"])
def test_seeded_determinism(name):
    store = fixed_store()
    base = {"name": name, "min_len": 5}
    a, _, _ = run(store, ProtocolConfig(**base, seed=1))
    b, _, _ = run(store, ProtocolConfig(**base, seed=1))
    c, _, _ = run(store, ProtocolConfig(**base, seed=2))
    for split in SPLITS:
        for col in a.splits[split]:
            assert np.array_equal(a.splits[split][col], b.splits[split][col]), (split, col)
        pos = a.splits[split]["label"] == 1
        assert np.array_equal(a.splits[split]["item"][pos], c.splits[split]["item"][pos])
        assert np.array_equal(a.splits[split]["hist_end"], c.splits[split]["hist_end"])
    negs_a = np.concatenate([a.splits[s]["item"][a.splits[s]["label"] == 0] for s in SPLITS])
    negs_c = np.concatenate([c.splits[s]["item"][c.splits[s]["label"] == 0] for s in SPLITS])
    assert len(negs_a) == len(negs_c) > 50
    assert (negs_a != negs_c).mean() > 0.5, "a different seed should draw different negatives"


def test_negative_sampler_follows_popularity_or_uniform():
    # items 2..5 seen 800, 150, 40, 10 times by user 0; user 1 has seen item 3
    item = np.repeat(np.array([2, 3, 4, 5], dtype=np.int32), [800, 150, 40, 10])
    user_of_row = np.zeros(len(item), dtype=np.int64)
    user_of_row[-1] = 1
    item[-1] = 3
    rng = np.random.default_rng(0)
    pop = NegativeSampler(user_of_row, item, 8, "popularity")
    draws = pop.sample(rng, np.full(20_000, 7))  # a user who saw nothing
    freq = np.bincount(draws, minlength=8) / len(draws)
    counts = np.bincount(item, minlength=8) / len(item)
    assert np.allclose(freq, counts, atol=0.02)
    assert freq[[0, 1, 6, 7]].sum() == 0  # never padding, unseen, or items nobody touched
    assert 3 not in pop.sample(rng, np.full(2000, 1)).tolist()
    uni = NegativeSampler(user_of_row, item, 8, "uniform")
    freq = np.bincount(uni.sample(rng, np.full(30_000, 7)), minlength=8) / 30_000
    assert freq[:2].sum() == 0 and np.allclose(freq[2:], 1 / 6, atol=0.02)
    with pytest.raises(UserError, match="every item"):
        pop.sample(rng, np.zeros(3, dtype=np.int64))  # user 0 saw every item that occurs


def test_negative_sampler_when_the_user_saw_almost_all_popularity_mass():
    # user 0 saw item 2 (100,000 of 100,003 behaviours); items 3, 4, 5 were each seen once
    item = np.concatenate((np.full(100_000, 2), [3, 4, 5])).astype(np.int32)
    user_of_row = np.concatenate((np.zeros(100_000), [1, 1, 1])).astype(np.int64)
    sampler = NegativeSampler(user_of_row, item, 6, "popularity")
    draws = sampler.sample(np.random.default_rng(0), np.zeros(3000, dtype=np.int64))
    freq = np.bincount(draws, minlength=6)
    assert freq[:3].sum() == 0 and (np.abs(freq[3:] / 3000 - 1 / 3) < 0.05).all()


@pytest.mark.parametrize(
    "bad",
    [
        {"name": "nope"},
        {"name": "dare", "train_offset": 1},  # would make T-1 a train and a valid target
        {"name": "dare", "train_stride": 0},
        {"neg_sampling": "random"},
        {"negatives": -1},
        {"train_fraction": 0},
        {"valid_quantile": 0.9, "test_quantile": 0.8},
    ],
)
def test_protocol_config_is_validated(bad):
    with pytest.raises(UserError):
        ProtocolConfig(**bad).resolved()


# ------------------------------------------------------------ the same through prepare()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.integers(0, 5), st.integers(0, 25), st.integers(0, 6)),
        min_size=12,
        max_size=80,
    ),
    st.sampled_from(["dare", "leave_one_out", "time_split"]),
    st.booleans(),
)
def test_prepare_never_leaks_on_random_logs(check_samples, rows, protocol, as_parquet):
    """Unsorted logs with many equal timestamps and repeated items, through the real readers."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # users u0..u5, items i0..i25 plus a filler user so that negatives always exist
        rows = [*rows, *[(9, it, 3) for it in range(26, 40)]]
        if as_parquet:
            import pyarrow as pa
            import pyarrow.parquet as pq

            path = tmp / "log.parquet"
            pq.write_table(
                pa.table(
                    {
                        "who": [f"u{u}" for u, _, _ in rows],
                        "what": [f"i{i}" for _, i, _ in rows],
                        "when": [1_600_000_000 + 3600 * t for _, _, t in rows],
                    }
                ),
                path,
            )
            source = "parquet"
        else:
            path = tmp / "log.csv"
            path.write_text(
                "who,what,when\n"
                + "".join(f"u{u},i{i},{1_600_000_000 + 3600 * t}\n" for u, i, t in rows)
            )
            source = "csv"
        try:
            meta = prepare(
                PrepareConfig(
                    source=source,
                    input=path,
                    out=tmp / "out",
                    protocol=ProtocolConfig(name=protocol, min_len=3),
                    source_options=SourceOptions(
                        columns=parse_column_map("user=who,item=what,ts=when")
                    ),
                    quiet=True,
                )
            )
        except UserError as err:
            assert "no samples" in str(err)
            return
        splits = check_samples(tmp / "out")
        total = sum(len(c["label"]) for c in splits.values())
        assert total == sum(meta["splits"][s]["samples"] for s in SPLITS)
        assert meta["store"]["rows"] == len(rows)
