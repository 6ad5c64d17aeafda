"""End to end on the bundled real data (Taobao head, MovieLens small), and prepare's guarantees:
atomic output, determinism, meta.json statistics."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from longrec.data import prepare as prepare_module
from longrec.data.prepare import PrepareConfig, prepare
from longrec.data.protocols import ProtocolConfig
from longrec.data.samples import read_split
from longrec.data.sources import SourceOptions, parse_column_map
from longrec.errors import UserError

SPLITS = ("train", "valid", "test")


def dare_target_count(lengths, train_targets=19, stride=5, offset=2) -> int:
    """Targets DARE defines for users of these lengths (positions >= 1 only)."""
    total = 0
    for T in lengths:
        total += sum(T - offset - stride * j >= 1 for j in range(train_targets))
        total += (T - 1 >= 1) + 1
    return total


def check_dare_meta(meta: dict, eligible_lengths: list[int]) -> None:
    n = len(eligible_lengths)
    assert meta["protocol"]["negatives"] == 2
    assert meta["protocol"]["neg_sampling"] == "popularity"
    for name in SPLITS:
        s = meta["splits"][name]
        assert s["positive_rate"] == pytest.approx(1 / 3)
        assert s["samples"] == 3 * s["positives"] == 3 * s["requests"]
    assert meta["splits"]["valid"]["users"] == meta["splits"]["test"]["users"] == n
    assert meta["splits"]["train"]["positives"] <= 19 * n
    positives = sum(meta["splits"][s]["positives"] for s in SPLITS)
    assert positives + sum(meta["targets_dropped"].values()) == dare_target_count(eligible_lengths)


@pytest.fixture(scope="module")
def taobao_rows(taobao_sample) -> list[list[str]]:
    with open(taobao_sample, newline="") as f:
        return [r for r in csv.reader(f) if len(r) == 5]


@pytest.fixture(scope="module")
def movielens_ratings(movielens_dir) -> list[list[str]]:
    with open(movielens_dir / "ratings.csv", newline="") as f:
        return list(csv.reader(f))[1:]


@pytest.mark.slow
def test_taobao_dare_end_to_end(prepared_taobao, taobao_rows, check_samples):
    meta = json.loads((prepared_taobao / "meta.json").read_text())
    pv = Counter(r[0] for r in taobao_rows if r[3] == "pv")
    eligible = [n for n in pv.values() if n >= 50]
    assert len(eligible) > 400
    assert meta["rows"]["rows_read"] == 84476
    assert meta["rows"]["skipped_by_reason"] == {"missing_columns": 1}
    assert meta["rows"]["rows_filtered"] == {"behavior not in {pv}": len(taobao_rows) - pv.total()}
    assert meta["n_users"] == len(pv) + 2
    assert meta["store"]["rows"] == pv.total()
    assert meta["store"]["users_with_history"] == len(pv)
    assert meta["store"]["user_history_len_percentiles"]["100"] == max(pv.values())
    assert meta["protocol"]["min_len"] == 50 and meta["behaviors_kept"] == ["pv"]
    check_dare_meta(meta, eligible)
    fields = {f["name"]: f for f in meta["fields"]}
    assert set(fields) == {"item", "category", "behavior"}
    assert fields["behavior"]["vocab_size"] == 3  # padding, unseen, pv
    assert meta["target_fields"] == ["category", "item"]
    splits = check_samples(prepared_taobao)
    assert len(np.unique(splits["valid"]["user"])) == len(eligible)
    layout = sorted(str(p.relative_to(prepared_taobao)) for p in prepared_taobao.rglob("*"))
    assert layout == sorted(
        [
            ".longrec.json",
            "items",
            "items/category.npy",
            "items/item.npy",
            "meta.json",
            "samples",
            "samples/test.parquet",
            "samples/train.parquet",
            "samples/valid.parquet",
            "store",
            "store/behavior.npy",
            "store/category.npy",
            "store/item.npy",
            "store/offsets.npy",
            "store/source_row.npy",
            "store/ts.npy",
            "vocab",
            "vocab/behavior.parquet",
            "vocab/category.parquet",
            "vocab/item.parquet",
            "vocab/user.parquet",
        ]
    )


@pytest.mark.slow
def test_movielens_leave_one_out_end_to_end(
    tmp_path, movielens_dir, movielens_ratings, check_samples
):
    out = tmp_path / "ml"
    meta = prepare(
        PrepareConfig(
            source="movielens",
            input=movielens_dir,
            out=out,
            protocol=ProtocolConfig(name="leave_one_out"),
            quiet=True,
        )
    )
    per_user = Counter(r[0] for r in movielens_ratings)
    assert meta["n_users"] == len(per_user) + 2 == 612
    assert meta["store"]["rows"] == len(movielens_ratings) == 100836
    assert meta["rows"]["rows_skipped"] == 0
    for name in SPLITS:
        assert meta["splits"][name]["positive_rate"] == pytest.approx(0.5)
    assert meta["splits"]["valid"]["users"] == meta["splits"]["test"]["users"] == len(per_user)
    positives = sum(meta["splits"][s]["positives"] for s in SPLITS)
    assert positives + sum(meta["targets_dropped"].values()) == len(movielens_ratings)
    fields = {f["name"]: f for f in meta["fields"]}
    assert fields["genres"]["width"] > 1 and fields["genres"]["vocab_size"] > 15
    assert fields["category"]["vocab_size"] > 15
    assert fields["behavior"]["vocab_size"] == 2 + 10  # ratings 0.5 .. 5.0
    splits = check_samples(out)
    genres = splits["test"]["genres"]
    assert genres.ndim == 2 and genres.shape[1] == fields["genres"]["width"]
    assert (genres[:, 0] >= 2).all()  # every movie has at least one genre
    items = np.load(out / "items" / "genres.npy")
    assert (items[splits["test"]["item"]] == genres).all()


@pytest.mark.slow
def test_movielens_dare_end_to_end(tmp_path, movielens_dir, movielens_ratings, check_samples):
    out = tmp_path / "ml"
    meta = prepare(
        PrepareConfig(
            source="movielens",
            input=movielens_dir,
            out=out,
            protocol=ProtocolConfig(name="dare", min_len=50),
            quiet=True,
        )
    )
    per_user = Counter(r[0] for r in movielens_ratings)
    eligible = [n for n in per_user.values() if n >= 50]
    check_dare_meta(meta, eligible)
    check_samples(out)


@pytest.mark.slow
def test_movielens_time_split_end_to_end(tmp_path, movielens_dir, check_samples):
    out = tmp_path / "ml"
    meta = prepare(
        PrepareConfig(
            source="movielens",
            input=movielens_dir,
            out=out,
            protocol=ProtocolConfig(name="time_split", valid_quantile=0.8, test_quantile=0.9),
            quiet=True,
        )
    )
    valid_cut = meta["protocol_notes"]["valid_cut_ts"]
    test_cut = meta["protocol_notes"]["test_cut_ts"]
    assert valid_cut < test_cut
    splits = check_samples(out)
    assert (splits["train"]["target_ts"] < valid_cut).all()
    v = splits["valid"]["target_ts"]
    assert ((v >= valid_cut) & (v < test_cut)).all()
    assert (splits["test"]["target_ts"] >= test_cut).all()
    assert 0.05 < meta["splits"]["test"]["positives"] / meta["store"]["rows"] < 0.15


# ------------------------------------------------------------------- prepare's guarantees


def small_log(folder: Path, n_users: int = 20, n: int = 15) -> Path:
    rng = np.random.default_rng(0)
    path = folder / "log.csv"
    lines = ["user,item,ts,category"]
    for u in range(n_users):
        for t in np.sort(rng.integers(0, 40, n)):
            it = int(rng.integers(0, 60))
            lines.append(f"u{u},i{it},{1_600_000_000 + 600 * int(t)},c{it % 7}")
    path.write_text("\n".join(lines) + "\n")
    return path


def small_config(folder: Path, out: Path, **protocol) -> PrepareConfig:
    return PrepareConfig(
        source="csv",
        input=small_log(folder),
        out=out,
        protocol=ProtocolConfig(**{"name": "dare", "min_len": 10, **protocol}),
        quiet=True,
    )


def test_same_seed_same_dataset_other_seed_other_negatives(tmp_path):
    a = tmp_path / "a"
    b = tmp_path / "b"
    c = tmp_path / "c"
    prepare(small_config(tmp_path, a, seed=5))
    prepare(small_config(tmp_path, b, seed=5))
    prepare(small_config(tmp_path, c, seed=6))
    for split in SPLITS:
        sa, sb, sc = (read_split(root, split) for root in (a, b, c))
        assert sa.keys() == sb.keys()
        for col in sa:
            assert np.array_equal(sa[col], sb[col]), (split, col)
        assert np.array_equal(sa["label"], sc["label"])
        assert np.array_equal(sa["hist_end"], sc["hist_end"])
    neg = lambda s: s["item"][s["label"] == 0]  # noqa: E731
    assert not np.array_equal(neg(read_split(a, "train")), neg(read_split(c, "train")))
    for name in ("offsets", "ts", "item", "category"):
        assert np.array_equal(
            np.load(a / "store" / f"{name}.npy"), np.load(c / "store" / f"{name}.npy")
        )


def test_failure_after_reading_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "out"
    with pytest.raises(UserError, match="no samples"):
        prepare(small_config(tmp_path, out, min_len=1000))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.csv"]

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(prepare_module, "write_split", broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        prepare(small_config(tmp_path, out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.csv"]


def test_existing_output_needs_overwrite(tmp_path):
    out = tmp_path / "out"
    prepare(small_config(tmp_path, out))
    first = (out / "meta.json").read_text()
    with pytest.raises(UserError, match="already exists"):
        prepare(small_config(tmp_path, out))
    assert (out / "meta.json").read_text() == first
    cfg = small_config(tmp_path, out, seed=3)
    cfg.overwrite = True
    meta = prepare(cfg)
    assert meta["seed"] == 3 and json.loads((out / "meta.json").read_text())["seed"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.csv", "out"]
    assert not (out / ".work").exists()


def test_behaviors_filter_drops_rows_without_a_type(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text(
        "user,item,ts,act\n"
        + "".join(f"u1,i{i},{100 + i},pv\n" for i in range(6))
        + "u1,i9,107,\n"  # no behaviour type: not a "pv"
        + "u1,i8,108,buy\n"
    )
    meta = prepare(
        PrepareConfig(
            source="csv",
            input=path,
            out=tmp_path / "out",
            protocol=ProtocolConfig(name="leave_one_out", negatives=0),
            source_options=SourceOptions(
                columns=parse_column_map("user=user,item=item,ts=ts,behavior=act")
            ),
            behaviors=("pv",),
            quiet=True,
        )
    )
    assert meta["store"]["rows"] == 6
    assert meta["rows"]["rows_filtered"] == {"behavior not in {pv}": 2}
