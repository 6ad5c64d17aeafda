"""Store round trip: every input behaviour exactly once, CSR offsets, (user, ts, file order) sort,
vocabularies that map back to the raw values, item tables."""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from longrec.data.prepare import PrepareConfig, prepare
from longrec.data.protocols import ProtocolConfig
from longrec.data.sources import SourceOptions, parse_column_map
from longrec.data.store import SequenceStore
from longrec.data.vocab import load_vocab

COLUMNS = "user=who,item=what,ts=when,category=cat,behavior=act"


def prepare_log(folder: Path, rows: list[tuple], **overrides) -> tuple[Path, dict]:
    """rows: (user, item, ts, category, behavior) -> a prepared dataset in folder/out."""
    path = folder / "log.csv"
    path.write_text("who,what,when,cat,act\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    cfg = dict(
        source="csv",
        input=path,
        out=folder / "out",
        protocol=ProtocolConfig(name="time_split", negatives=0, min_history=0),
        source_options=SourceOptions(columns=parse_column_map(COLUMNS)),
        quiet=True,
    )
    cfg.update(overrides)
    meta = prepare(PrepareConfig(**cfg))
    return folder / "out", meta


def inverse_vocab(root: Path, name: str) -> dict[int, str]:
    return {index: value for value, index in load_vocab(root, name).items()}


def check_round_trip(root: Path, meta: dict, rows: list[tuple]) -> SequenceStore:
    store = SequenceStore.open(root)
    n = len(rows)
    # CSR offsets over the whole user vocabulary; users 0 (padding) and 1 (unseen) are empty
    offsets = store.offsets
    assert offsets.dtype == np.int64 and len(offsets) == meta["n_users"] + 1
    assert offsets[0] == offsets[1] == offsets[2] == 0 and offsets[-1] == n == store.n_rows
    assert (np.diff(offsets) >= 0).all()
    for name, arr in [("ts", store.ts), ("source_row", store.source_row), *store.fields.items()]:
        assert len(arr) == n, name
        assert isinstance(arr, np.memmap), name
    assert sorted(store.fields) == ["behavior", "category", "item"]

    users = inverse_vocab(root, "user")
    items = inverse_vocab(root, "item")
    cats = inverse_vocab(root, "category")
    acts = inverse_vocab(root, "behavior")
    user_of_row = store.user_of_rows()
    decoded = [
        (users[u], items[i], int(t), cats[c], acts[b])
        for u, i, t, c, b in zip(
            user_of_row.tolist(),
            store.fields["item"].tolist(),
            store.ts.tolist(),
            store.fields["category"].tolist(),
            store.fields["behavior"].tolist(),
            strict=True,
        )
    ]
    as_text = [(str(u), str(i), int(t), str(c), str(b)) for u, i, t, c, b in rows]
    assert Counter(decoded) == Counter(as_text), "a behaviour was lost or duplicated"
    # source_row is the behaviour's data row in the file
    source = store.source_row.tolist()
    assert sorted(source) == list(range(n))
    assert [as_text[s] for s in source] == decoded
    # sorted by (user, ts), file order for equal timestamps
    keys = list(zip(user_of_row.tolist(), store.ts.tolist(), source, strict=True))
    assert keys == sorted(keys)
    return store


def check_vocab(root: Path, name: str, values: list[str]) -> None:
    table = pq.read_table(root / "vocab" / f"{name}.parquet").to_pydict()
    counts = Counter(values)
    assert sorted(table["value"]) == sorted(counts)
    assert sorted(table["index"]) == list(range(2, len(counts) + 2)), "0 and 1 are reserved"
    assert dict(zip(table["value"], table["count"], strict=True)) == counts
    # most frequent first, ties by value: deterministic
    order = sorted(counts, key=lambda v: (-counts[v], v))
    assert [table["value"][table["index"].index(i)] for i in range(2, len(counts) + 2)] == order


logs = st.lists(
    st.tuples(st.integers(0, 6), st.integers(0, 15), st.integers(0, 5), st.sampled_from("pcb")),
    min_size=1,
    max_size=60,
)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(logs)
def test_store_round_trip_random_logs(raw):
    # category is a property of the item; timestamps collide a lot; rows are in no order
    rows = [(f"u{u}", f"i{i}", 1_700_000_000 + 60 * t, f"c{i % 4}", b) for u, i, t, b in raw]
    with tempfile.TemporaryDirectory() as tmp:
        root, meta = prepare_log(Path(tmp), rows)
        check_round_trip(root, meta, rows)
        check_vocab(root, "user", [r[0] for r in rows])
        check_vocab(root, "item", [r[1] for r in rows])
        assert meta["store"]["rows"] == len(rows)
        assert meta["n_users"] == len({r[0] for r in rows}) + 2


def test_store_layout_items_and_history(tmp_path):
    rows = [
        ("u1", "i1", 300, "c1", "p"),
        ("u2", "i2", 100, "c2", "p"),
        ("u1", "i2", 100, "c2", "b"),
        ("u1", "i3", 100, "c1", "p"),  # same time as the row above: file order decides
        ("u2", "i1", 50, "c1", "c"),
        ("u1", "i1", 200, "c1", "p"),
    ]
    root, meta = prepare_log(tmp_path, rows)
    store = check_round_trip(root, meta, rows)
    user = load_vocab(root, "user")
    item = load_vocab(root, "item")
    assert user == {"u1": 2, "u2": 3}
    h = store.history(user["u1"])
    assert h["ts"].tolist() == [100, 100, 200, 300]
    assert h["item"].tolist() == [item["i2"], item["i3"], item["i1"], item["i1"]]
    h = store.history(user["u1"], end=int(store.offsets[user["u1"]]) + 2)
    assert h["item"].tolist() == [item["i2"], item["i3"]]
    # item tables: the item-side fields of every item, for negatives and serving
    assert sorted(p.name for p in (root / "items").iterdir()) == ["category.npy", "item.npy"]
    item_table = np.load(root / "items" / "item.npy")
    assert item_table.tolist() == list(range(len(item) + 2))
    cat_table = np.load(root / "items" / "category.npy")
    cat = load_vocab(root, "category")
    assert cat_table[0] == 0 and cat_table[1] == 1
    assert {name: int(cat_table[i]) for name, i in item.items()} == {
        "i1": cat["c1"],
        "i2": cat["c2"],
        "i3": cat["c1"],
    }
    meta_fields = {f["name"]: f for f in meta["fields"]}
    assert meta_fields["behavior"]["side"] == "event" and meta_fields["item"]["side"] == "item"
    assert meta_fields["item"]["vocab_size"] == 5 and meta_fields["category"]["vocab_size"] == 4
    # every sample's target fields come from the item tables
    samples = pq.read_table(root / "samples" / "train.parquet").to_pydict()
    for it, c in zip(samples["item"], samples["category"], strict=True):
        assert cat_table[it] == c
    assert json.loads((root / "meta.json").read_text())["format_version"] == 1


def test_min_count_maps_rare_items_to_unseen(tmp_path):
    rows = [("u1", "hot", t, "c", "p") for t in range(5)] + [("u1", "rare", 9, "c", "p")]
    root, _ = prepare_log(tmp_path, rows, min_count=2)
    vocab = load_vocab(root, "item")
    assert vocab == {"hot": 2, "rare": 1}
    store = SequenceStore.open(root)
    assert store.fields["item"].tolist() == [2, 2, 2, 2, 2, 1]


def test_multi_valued_field(tmp_path):
    folder = tmp_path / "ml"
    folder.mkdir()
    (folder / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n1,1,4.0,10\n1,2,3.0,20\n1,3,5.0,30\n2,1,1.0,15\n"
    )
    (folder / "movies.csv").write_text(
        "movieId,title,genres\n1,A,Drama\n2,B,Comedy|Drama|Horror\n3,C,Comedy|Romance\n"
    )
    for max_multi, width in ((16, 3), (2, 2)):
        out = tmp_path / f"out{max_multi}"
        meta = prepare(
            PrepareConfig(
                source="movielens",
                input=folder,
                out=out,
                protocol=ProtocolConfig(name="time_split", negatives=0, min_history=0),
                max_multi=max_multi,
                quiet=True,
            )
        )
        spec = next(f for f in meta["fields"] if f["name"] == "genres")
        assert spec["width"] == width and spec["side"] == "item"
        genres = inverse_vocab(out, "genres")
        store = SequenceStore.open(out)
        matrix = np.asarray(store.fields["genres"])
        assert matrix.shape == (4, width)
        got = [[genres[g] for g in row if g] for row in matrix.tolist()]
        ts = store.ts.tolist()
        want = {
            10: ["Drama"],
            20: ["Comedy", "Drama", "Horror"],
            30: ["Comedy", "Romance"],
            15: ["Drama"],
        }
        assert got == [want[t][:width] for t in ts]
        table = np.load(out / "items" / "genres.npy")
        assert table.shape == (len(load_vocab(out, "item")) + 2, width)
