"""Micro-batching: requests run together give the scores they get alone, states split from a
batched forward serve later cache hits, concurrent callers really share forwards, and one
failing request does not fail its batch-mates."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from longrec.config import resolve
from longrec.data.dataset import PreparedDataset
from longrec.data.vocab import load_vocab
from longrec.serve.batching import MicroBatcher
from longrec.serve.history import open_history
from longrec.serve.load_history import load_history
from longrec.serve.ranker import Ranker, RankerConfig, RankTimings, _Request
from longrec.train.loop import Trainer

# dare: states with de-duplicated rows shared by the batch; stca: plain per-user tensors;
# longer: a KV cache; tin: hierarchical search over shared rows.
MODELS = ("dare", "stca", "longer", "tin")


@pytest.fixture(scope="module")
def setup(prepared_taobao, tmp_path_factory):
    root = tmp_path_factory.mktemp("microbatch")
    runs = {}
    for name in MODELS:
        cfg = resolve(
            None,
            [
                "train.max_steps=3",
                "train.batch_size=64",
                "train.progress=false",
                "train.eval_every=3",
            ],
            data__path=str(prepared_taobao),
            model__name=name,
        )
        Trainer(cfg, root / name).fit()
        runs[name] = root / name
    ds = PreparedDataset(prepared_taobao)
    store = open_history(f"lmdb://{root / 'history'}", list(ds.fields.values()))
    load_history(prepared_taobao, store)
    users = load_vocab(ds.root, "user")
    lengths = {u: int(ds.store.offsets[i + 1] - ds.store.offsets[i]) for u, i in users.items()}
    by_length = sorted((u for u in lengths if users[u] >= 2), key=lambda u: -lengths[u])
    # a long, a middling and a short history, one user twice, and one nobody has seen
    picked = [by_length[0], by_length[len(by_length) // 2], by_length[-1], by_length[0], "nobody"]
    items = [k for k, v in load_vocab(ds.root, "item").items() if v >= 2]
    yield {"runs": runs, "store": store, "users": picked, "items": items}
    store.close()


def _requests(users: list[str], items: list[str], seed: int = 0) -> list[_Request]:
    rng = np.random.default_rng(seed)
    return [
        _Request(
            u,
            [*rng.choice(items, size=int(rng.integers(1, 30))).tolist(), "no-such-item"],
            1_600_000_000 + 3600 * i,
            None,
            RankTimings(),
        )
        for i, u in enumerate(users)
    ]


def _ranker(setup, model: str, **config) -> Ranker:
    return Ranker.from_run(
        setup["runs"][model], history=setup["store"], config=RankerConfig(micro_batch=1, **config)
    )


@pytest.mark.parametrize("model", MODELS)
def test_a_batch_scores_what_each_request_scores_alone(setup, model):
    alone = _ranker(setup, model, cache_bytes=0)
    together = _ranker(setup, model, cache_bytes=0)
    requests = _requests(setup["users"], setup["items"])
    expected = [alone.rank(r.user, r.candidates, r.now, timings=r.timings) for r in requests]
    results = together._rank_many(_requests(setup["users"], setup["items"]))
    for got, want in zip(results, expected, strict=True):
        assert not isinstance(got, BaseException), got
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert requests[0].timings.extra == {"batch": 1}


@pytest.mark.parametrize("model", MODELS)
def test_states_split_from_a_batch_serve_later_hits(setup, model):
    ranker = _ranker(setup, model)
    requests = _requests(setup["users"][:3], setup["items"], seed=1)
    batched = ranker._rank_many(requests)
    assert all(r.timings.extra["batch"] == 3 for r in requests)
    assert ranker.cache.stats.entries == 3
    for r, first in zip(requests, batched, strict=True):
        timings = RankTimings()
        again = ranker.rank(r.user, r.candidates, r.now, timings=timings)
        assert timings.cache_hit, f"{model}: the state split from the batch was not cached"
        np.testing.assert_allclose(again, first, rtol=1e-5, atol=1e-6)


def test_concurrent_callers_share_forwards(setup):
    ranker = Ranker.from_run(
        setup["runs"]["stca"],
        history=setup["store"],
        config=RankerConfig(cache_bytes=0, micro_batch=8, micro_batch_wait_ms=200),
    )
    requests = _requests(setup["users"] * 3, setup["items"], seed=2)
    expected = [
        _ranker(setup, "stca", cache_bytes=0).rank(r.user, r.candidates, r.now) for r in requests
    ]
    got: dict[int, list[float]] = {}

    def call(i: int) -> None:
        r = requests[i]
        got[i] = ranker.rank(r.user, r.candidates, r.now)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    ranker.close()
    assert ranker.batcher.stats.requests == len(requests)
    assert ranker.batcher.stats.largest > 1
    assert ranker.batcher.stats.batches < len(requests)
    for i, want in enumerate(expected):
        np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-6)


def test_a_failing_item_fails_alone_and_a_failing_batch_fails_all():
    def run(items: list[int]) -> list:
        if -1 in items:
            raise RuntimeError("the whole batch broke")
        return [ValueError(f"bad {i}") if i % 2 else i * 10 for i in items]

    batcher = MicroBatcher(run, max_batch=4, wait_ms=100)
    out: dict[int, object] = {}

    def call(i: int) -> None:
        try:
            out[i] = batcher.submit(i)
        except Exception as err:  # the caller sees its own item's error
            out[i] = err

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert out[0] == 0 and out[2] == 20
    assert isinstance(out[1], ValueError) and str(out[1]) == "bad 1"
    assert isinstance(out[3], ValueError)
    with pytest.raises(RuntimeError, match="whole batch"):
        batcher.submit(-1)
    assert batcher.submit(4) == 40  # the worker survived the failed batch
    batcher.close()


def test_micro_batch_must_be_positive():
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(lambda items: items, max_batch=0)


def test_the_cost_budget_keeps_large_requests_apart():
    sizes: list[list[int]] = []

    def run(items: list[int]) -> list[int]:
        sizes.append(list(items))
        return items

    batcher = MicroBatcher(run, max_batch=8, wait_ms=300, cost=lambda i: i, max_cost=10)
    threads = [threading.Thread(target=batcher.submit, args=(c,)) for c in (4, 4, 4, 20, 1)]
    for t in threads:
        t.start()
        time.sleep(0.01)  # queue them in this order
    for t in threads:
        t.join(10)
    batcher.close()
    assert sorted(x for batch in sizes for x in batch) == [1, 4, 4, 4, 20]  # none lost
    assert all(sum(b) <= 10 or len(b) == 1 for b in sizes), sizes
    assert [20] in sizes  # over budget on its own: still runs, alone
    assert max(len(b) for b in sizes) > 1
