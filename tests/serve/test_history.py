"""History stores: the same suite on LMDB and Redis, durability under SIGKILL, bulk loading."""

from __future__ import annotations

import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from longrec.data.schema import FieldSpec
from longrec.errors import UserError
from longrec.serve import HistorySchemaError, open_history

# item and category single-valued, genres multi-valued (width 3): both record shapes
FIELDS = [
    FieldSpec("item", 1000),
    FieldSpec("category", 20),
    FieldSpec("genres", 10, width=3),
]


def events(start: int, n: int) -> dict[str, np.ndarray]:
    """n behaviours whose item ids are start, start+1, ...: every field derived from the item."""
    item = np.arange(start, start + n, dtype=np.int64)
    return {
        "item": item,
        "category": item % 7,
        "genres": np.stack([item % 5, item % 3, np.zeros_like(item)], axis=1),
        "ts": 1_700_000_000 + 10 * item,
    }


def check_items(data: dict[str, np.ndarray], items: np.ndarray) -> None:
    """`data` holds exactly the behaviours `events` made for `items`, in that order."""
    want = {k: v[0:0] for k, v in events(0, 0).items()}
    if len(items):
        want = events(0, int(items.max()) + 1)
        want = {k: v[items] for k, v in want.items()}
    assert set(data) == {"item", "category", "genres", "ts"}
    for name, arr in want.items():
        got = data[name]
        assert got.dtype == (np.int64 if name == "ts" else np.int32), name
        assert got.shape == arr.shape, (name, got.shape, arr.shape)
        np.testing.assert_array_equal(got, arr, err_msg=name)


def test_round_trip_multi_valued(open_store):
    store = open_store(FIELDS)
    assert store.append("alice", events(0, 5)) == 1
    data, version = store.recent("alice", 10)
    check_items(data, np.arange(5))
    assert data["genres"].shape == (5, 3) and data["item"].shape == (5,)
    assert data["item"].flags.writeable and data["ts"].flags.c_contiguous
    assert version == 1 and store.version("alice") == 1 and store.count("alice") == 5
    data, _ = store.recent("alice", 3)
    check_items(data, np.arange(2, 5))
    # another user is independent; unicode ids are fine; [n, 1] is accepted for width 1
    ev = events(100, 2)
    ev["item"] = ev["item"][:, None]
    assert store.append("bob ☃", ev) == 1
    check_items(store.recent("bob ☃", 10)[0], np.arange(100, 102))
    check_items(store.recent("alice", 10)[0], np.arange(5))
    # an empty append changes nothing
    assert store.append("alice", events(0, 0)) == 1


def test_unknown_user(open_store):
    store = open_store(FIELDS)
    data, version = store.recent("nobody", 50)
    check_items(data, np.arange(0))
    assert data["genres"].shape == (0, 3)
    assert version == 0 and store.version("nobody") == 0 and store.count("nobody") == 0


def test_most_recent_n_across_chunks(open_store):
    store = open_store(FIELDS, chunk=4)
    sizes = [1, 3, 5, 8, 2, 4, 1, 9, 3]
    start = 0
    for i, size in enumerate(sizes):
        assert store.append("u", events(start, size)) == i + 1  # versions count appends
        start += size
        for n in (1, 3, 4, 5, 7, 12, start, start + 10):
            data, version = store.recent("u", n)
            check_items(data, np.arange(max(0, start - n), start))
            assert version == i + 1
    assert store.count("u") == start
    data, version = store.recent("u", 0)
    check_items(data, np.arange(0))
    assert version == len(sizes)


def test_max_per_user_trims_oldest(open_store, history_url):
    store = open_store(FIELDS, chunk=4, max_per_user=10)
    start = 0
    for size in [3, 4, 1, 6, 2, 7, 5, 25, 1, 2]:  # 25 > max_per_user in one append
        store.append("u", events(start, size))
        start += size
        assert store.count("u") == min(start, 10)
        check_items(store.recent("u", 100)[0], np.arange(max(0, start - 10), start))
        # physically bounded: whole old chunks are dropped
        if history_url.startswith("lmdb"):
            assert store.n_chunks("u") <= math.ceil(10 / 4) + 1
        else:
            chunks, tail = store.physical("u")
            assert chunks <= math.ceil(10 / 4) and tail < 4
    assert store.version("u") == 10


def test_schema_mismatch_refused(open_store):
    store = open_store(FIELDS)
    store.append("u", events(0, 3))
    store.close()
    wider = [FieldSpec("item", 1000), FieldSpec("category", 20), FieldSpec("genres", 10, width=4)]
    with pytest.raises(HistorySchemaError, match=r"genres\[3\].*genres\[4\]"):
        open_store(wider)
    with pytest.raises(HistorySchemaError, match="holds fields"):
        open_store([*FIELDS, FieldSpec("behavior", 5, side="event")])
    # the same fields in another order open the store with its own layout
    reordered = open_store(list(reversed(FIELDS)))
    check_items(reordered.recent("u", 10)[0], np.arange(3))


def test_a_store_of_another_dataset_is_refused_and_a_missing_one_is_not_created(open_store):
    with pytest.raises(UserError, match=r"no history store there.*--create-history"):
        open_store(FIELDS, create=False)
    store = open_store(FIELDS, dataset="sha256:" + "a" * 64)
    store.append("u", events(0, 3))
    store.close()
    with pytest.raises(HistorySchemaError, match="histories of another dataset"):
        open_store(FIELDS, dataset="sha256:" + "b" * 64)
    again = open_store(FIELDS, dataset="sha256:" + "a" * 64, create=False)
    check_items(again.recent("u", 10)[0], np.arange(3))
    open_store(FIELDS).close()  # a caller that knows no dataset is not checked


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda e: e.pop("genres"), "missing"),
        (lambda e: e.update(extra=e["item"]), "unknown"),
        (lambda e: e.update(genres=e["genres"][:, :2]), "genres.*shape"),
        (lambda e: e.update(item=e["item"][:-1]), "item.*shape"),
        (lambda e: e.update(item=e["item"].astype(float)), "integers"),
        (lambda e: e.update(item=-e["item"] - 1), "outside"),
    ],
)
def test_bad_events_rejected(open_store, change, message):
    store = open_store(FIELDS)
    ev = events(0, 3)
    change(ev)
    with pytest.raises(ValueError, match=message):
        store.append("u", ev)
    assert store.version("u") == 0
    with pytest.raises(ValueError, match="user id"):
        store.append("bad\x00id", events(0, 1))


def test_concurrent_readers_see_consistent_snapshots(open_store):
    """Readers in several threads while one thread appends: every read is a whole snapshot
    (data and version of the same append), never torn, never going back."""
    store = open_store(FIELDS, chunk=8)
    sizes = [1 + i % 4 for i in range(40)]
    ends = np.cumsum([0, *sizes])  # behaviours after v appends
    errors: list[BaseException] = []
    done = threading.Event()

    def writer():
        try:
            start = 0
            for size in sizes:
                store.append("u", events(start, size))
                start += size
        except BaseException as err:
            errors.append(err)
        finally:
            done.set()

    def reader(n: int):
        try:
            last = 0
            while not done.is_set() or last < len(sizes):
                data, version = store.recent("u", n)
                assert version >= last
                last = version
                total = int(ends[version])
                check_items(data, np.arange(max(0, total - n), total))
        except BaseException as err:
            errors.append(err)
            done.set()

    threads = [threading.Thread(target=writer)]
    threads += [threading.Thread(target=reader, args=(n,)) for n in (5, 17, 1000)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[0]
    assert store.count("u") == ends[-1]


def test_load_history_equals_sequence_store(open_store, history_url, prepared_taobao):
    from longrec.data.dataset import PreparedDataset
    from longrec.serve.load_history import load_history, raw_user_ids

    ds = PreparedDataset(prepared_taobao)
    fields = list(ds.fields.values())
    seq = ds.store
    result = load_history(prepared_taobao, history_url, batch_users=100, batch_rows=5_000)
    lengths = seq.lengths()
    assert result.users == int((lengths > 0).sum()) and result.behaviours == seq.n_rows
    store = open_store(fields)
    raw = raw_user_ids(prepared_taobao, seq.n_users)
    users = np.flatnonzero(lengths > 0)
    for u in users.tolist():
        want = seq.history(u)
        got, version = store.recent(raw[u], 10_000)
        assert version == 1 and store.count(raw[u]) == lengths[u]
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"user {u} {name}")
    # loading again replaces (no duplicates) and bumps versions; max_per_user cuts old ones
    again = load_history(prepared_taobao, store, batch_users=1000)
    assert again.behaviours == seq.n_rows
    u = int(users[np.argmax(lengths[users])])
    got, version = store.recent(raw[u], 10_000)
    assert version == 2 and len(got["ts"]) == lengths[u]
    np.testing.assert_array_equal(got["item"], seq.history(u)["item"])


def test_load_history_max_per_user(tmp_path, prepared_taobao):
    from longrec.data.dataset import PreparedDataset
    from longrec.serve.load_history import load_history, raw_user_ids

    seq = PreparedDataset(prepared_taobao).store
    url = f"lmdb://{tmp_path / 'h'}?max_per_user=50"
    result = load_history(prepared_taobao, url)
    lengths = seq.lengths()
    assert result.behaviours == int(np.minimum(lengths, 50).sum())
    assert result.dropped == seq.n_rows - result.behaviours
    u = int(np.argmax(lengths))
    with open_history(url, list(PreparedDataset(prepared_taobao).fields.values())) as store:
        got, _ = store.recent(raw_user_ids(prepared_taobao, seq.n_users)[u], 1000)
    np.testing.assert_array_equal(got["ts"], seq.history(u)["ts"][-50:])


# --- durability --------------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[2])
    from tests.serve.test_history import FIELDS, events
    from longrec.serve import open_history

    store = open_history(sys.argv[1], FIELDS, chunk=4)
    start = 0
    for i in range(100_000):
        size = 1 + i % 3
        version = store.append("u", events(start, size))
        start += size
        print(version, start, flush=True)  # acknowledged: append returned
    """
)


def _sizes_total(versions: int) -> int:
    return sum(1 + i % 3 for i in range(versions))


def _check_after_crash(store, acked_version: int) -> None:
    version = store.version("u")
    assert version >= acked_version, f"acknowledged append {acked_version} lost (have {version})"
    total = _sizes_total(version)  # data and version were written together
    assert store.count("u") == total
    data, v = store.recent("u", 10**6)
    assert v == version
    check_items(data, np.arange(total))


def test_lmdb_survives_sigkill(tmp_path, repo_root):
    url = f"lmdb://{tmp_path / 'history'}"
    rng = random.Random()
    seed = rng.randrange(10**6)
    rng.seed(seed)
    kill_after = rng.randint(3, 40)
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, url, str(repo_root)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    acked = 0
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            acked = int(line.split()[0])
            if acked >= kill_after:
                time.sleep(rng.random() * 0.02)  # land the kill anywhere in a later append
                break
        os.kill(proc.pid, signal.SIGKILL)
        rest, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert acked >= kill_after, f"child stopped early (seed {seed}): {err}"
    for line in rest.splitlines():  # printed before the kill: acknowledged too
        acked = max(acked, int(line.split()[0]))
    with open_history(url, FIELDS) as store:
        _check_after_crash(store, acked)


def test_redis_server_sigkill_keeps_acknowledged(fresh_redis_server):
    """With appendonly yes + appendfsync always, nothing Redis acknowledged is lost when the
    server is SIGKILLed in the middle of a stream of appends."""
    import redis

    server = fresh_redis_server
    rng = random.Random()
    kill_after = rng.randint(5, 40)
    acked = [0]
    failure: list[BaseException] = []
    reached = threading.Event()

    def writer():
        store = open_history(server.url, FIELDS, chunk=4)
        try:
            start = 0
            for i in range(100_000):
                size = 1 + i % 3
                version = store.append("u", events(start, size))
                start += size
                acked[0] = version
                if version >= kill_after:
                    reached.set()
        except redis.RedisError:
            pass  # the server died under us: expected
        except BaseException as err:
            failure.append(err)
        finally:
            reached.set()
            store.close()

    thread = threading.Thread(target=writer)
    thread.start()
    assert reached.wait(30)
    time.sleep(rng.random() * 0.02)
    server.kill()
    thread.join(30)
    assert not failure, failure[0]
    assert acked[0] >= kill_after
    server.start(port=server.port)  # same port, same dir: replays the AOF
    with open_history(server.url, FIELDS) as store:
        _check_after_crash(store, acked[0])


def test_redis_warns_when_not_durable(redis_server):
    client = redis_server.client()
    client.flushall()
    client.config_set("appendfsync", "everysec")
    try:
        with pytest.warns(RuntimeWarning, match="appendfsync=everysec"):
            store = open_history(redis_server.url, FIELDS)
        assert store.durable is False
        store.close()
    finally:
        client.config_set("appendfsync", "always")
        client.close()
    with open_history(redis_server.url, FIELDS) as store:
        assert store.durable is True


# --- URLs --------------------------------------------------------------------------------------


def test_lmdb_urls(tmp_path, monkeypatch):
    with open_history(f"lmdb://{tmp_path / 'abs'}", FIELDS) as store:
        store.append("u", events(0, 2))
    assert (tmp_path / "abs" / "data.mdb").exists()
    monkeypatch.chdir(tmp_path)
    with open_history("lmdb://rel/dir?max_per_user=3", FIELDS) as store:
        store.append("u", events(0, 5))
        assert store.count("u") == 3 and store.max_per_user == 3
    assert (tmp_path / "rel" / "dir" / "data.mdb").exists()
    # two stores on one directory in one process share the environment
    a = open_history("lmdb://rel/dir", FIELDS)
    b = open_history(f"lmdb://{tmp_path / 'rel' / 'dir'}", FIELDS)
    a.close()
    assert b.count("u") == 3
    b.close()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("/some/dir", "is not lmdb"),
        ("file:///x", "unknown scheme"),
        ("lmdb://", "no path"),
        ("lmdb:///x?colour=red", "unknown option"),
        ("lmdb:///x?max_per_user=many", "must be an integer"),
        ("redis://:6379", "no host"),
        ("redis://localhost:6379/zero", "database must be a number"),
    ],
)
def test_bad_urls(url, message):
    with pytest.raises(UserError, match=message):
        open_history(url, FIELDS)


def test_redis_unreachable_is_one_clear_line(unused_port):
    port = unused_port
    with pytest.raises(UserError) as info:
        open_history(f"redis://127.0.0.1:{port}/0", FIELDS)
    text = str(info.value)
    assert text.startswith(f"cannot connect to Redis at redis://127.0.0.1:{port}/0")
    assert "\n" not in text
