"""The synthetic generator: format, determinism, ground-truth consistency and planted signal."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import typer
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from longrec.commands import synth as synth_command
from longrec.data import synthetic_impressions
from longrec.data.synthetic import SynthConfig, generate
from longrec.data.synthetic_world import history_lengths
from longrec.data.synthetic_write import auc
from longrec.errors import UserError

BEHAVIOR_COLUMNS = ["user", "item", "category", "behavior", "ts", "domain"]
DATA_FILES = (
    "behaviors.csv",
    "impressions.csv",
    "truth.parquet",
    "taxonomy.csv",
    "category_map.csv",
)

# Small, but several chunks (so row and impression offsets across chunks are exercised).
SMALL = SynthConfig(users=400, mean_len=250, max_len=5000, seed=7, chunk_rows=20_000)


def load(folder: Path) -> dict:
    manifest = json.loads((folder / "manifest.json").read_text())
    files = manifest["files"]

    def table(name: str, **kw) -> dict[str, np.ndarray]:
        path = folder / files[name]
        t = pq.read_table(path) if path.suffix == ".parquet" else pacsv.read_csv(path, **kw)
        return {c: t.column(c).to_numpy() for c in t.column_names}

    data: dict = {
        "manifest": manifest,
        "beh": table("behaviors", read_options=pacsv.ReadOptions(column_names=BEHAVIOR_COLUMNS)),
        "imp": table("impressions"),
        "truth": table("truth"),
        "tax": table("taxonomy"),
        "map": table("category_map"),
    }
    return data


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("synth") / "small"
    generate(SMALL, out, progress=False)
    data = load(out)
    data["out"] = out
    beh, imp = data["beh"], data["imp"]
    # the unified leaf and l2 of every behaviour and impression, through the two tables
    mapping = {
        (d, r): leaf
        for d, r, leaf in zip(
            data["map"]["domain"], data["map"]["raw_category"], data["map"]["leaf"], strict=True
        )
    }
    beh["leaf"] = np.array(
        [mapping[(d, r)] for d, r in zip(beh["domain"], beh["category"], strict=True)]
    )
    l2_of = dict(zip(data["tax"]["leaf"], data["tax"]["l2"], strict=True))
    beh["l2"] = np.vectorize(l2_of.get)(beh["leaf"])
    imp["l2"] = np.vectorize(l2_of.get)(imp["category"])
    # history end of every impression: the user's behaviours strictly before its ts
    key = beh["user"].astype(np.int64) * 2**33 + beh["ts"]
    imp["hist_end"] = np.searchsorted(key, imp["user"] * 2**33 + imp["ts"], side="left")
    user_start = np.searchsorted(beh["user"], np.arange(SMALL.users + 2), side="left")
    imp["hist_start"] = user_start[imp["user"]]
    return data


def test_manifest_describes_the_files(small):
    m = small["manifest"]
    assert m["format"] == "longrec-synth/1"
    assert m["seed"] == SMALL.seed
    assert m["config"]["users"] == SMALL.users
    assert m["behavior_columns"] == BEHAVIOR_COLUMNS
    assert m["domains"] == ["ads_moments", "ads_channels", "content"]
    assert m["target_types"] == list(SMALL.target_types)
    for name in m["files"].values():
        assert (small["out"] / name).is_file()
    s = m["stats"]
    assert s["rows"] == small["beh"]["user"].size
    assert s["impressions"] == small["imp"]["user"].size
    assert s["truth_rows"] == small["truth"]["impression"].size
    assert s["users"] == SMALL.users
    assert not list(small["out"].parent.glob(".*synth-tmp*"))


def test_behaviours_grouped_by_user_in_time_order(small):
    beh = small["beh"]
    user, ts = beh["user"], beh["ts"]
    assert np.all(np.diff(user) >= 0)
    assert set(np.unique(user)) == set(range(1, SMALL.users + 1))
    same_user = np.diff(user) == 0
    assert np.all(np.diff(ts)[same_user] > 0)
    end = SMALL.start_ts + SMALL.years * 365.25 * 86400
    assert ts.min() >= SMALL.start_ts and ts.max() <= end + 86400
    lengths = np.bincount(user)[1:]
    assert lengths.min() >= SMALL.min_len and lengths.max() <= SMALL.max_len
    allowed = {"ads_moments": {"click", "conversion"}, "ads_channels": {"click", "conversion"}}
    allowed["content"] = {"view", "like"}
    for domain, kinds in allowed.items():
        assert set(beh["behavior"][beh["domain"] == domain]) == kinds


@settings(max_examples=25, deadline=None)
@given(
    mean=st.floats(5, 3000),
    extra=st.floats(1.0, 30.0),
    sigma=st.floats(0.3, 2.0),
    seed=st.integers(0, 2**31),
)
def test_history_lengths_respect_max_and_mean(mean, extra, sigma, seed):
    max_len = int(np.ceil(mean * extra))
    lengths = history_lengths(50_000, mean, sigma, 5, max_len, np.random.default_rng(seed))
    assert lengths.min() >= 5 and lengths.max() <= max_len
    # heavy tails make the sample mean noisy; 50k draws keep it within a few percent
    assert abs(lengths.mean() - mean) <= 0.06 * mean + 0.5


def test_lengths_are_heavy_tailed_and_reach_the_max():
    lengths = history_lengths(200_000, 500, 1.2, 5, 50_000, np.random.default_rng(0))
    assert np.percentile(lengths, 99) > 5 * np.median(lengths)
    assert lengths.max() > 10_000


@settings(max_examples=50, deadline=None)
@given(
    labels=st.lists(st.integers(0, 1), min_size=2, max_size=200),
    levels=st.integers(1, 20),
    seed=st.integers(0, 2**31),
)
def test_manifest_auc_matches_sklearn(labels, levels, seed):
    y = np.array(labels)
    score = np.random.default_rng(seed).integers(0, levels, y.size).astype(np.float32)  # ties
    if y.min() == y.max():
        assert auc(y, score) is None
    else:
        assert auc(y, score) == pytest.approx(roc_auc_score(y, score), abs=1e-4)


def test_taxonomy_is_a_three_level_tree(small):
    tax = small["tax"]
    leaf, l2, l1 = tax["leaf"], tax["l2"], tax["l1"]
    assert len(set(leaf)) == leaf.size == SMALL.n_l1 * SMALL.l2_per_l1 * SMALL.leaves_per_l2
    parents = {}
    for child, parent in zip(l2, l1, strict=True):
        assert parents.setdefault(child, parent) == parent  # one parent per l2
    assert len(set(l1)) == SMALL.n_l1 and len(set(l2)) == SMALL.n_l1 * SMALL.l2_per_l1
    assert not (set(leaf) & set(l2)) and not (set(leaf) & set(l1)) and not (set(l2) & set(l1))
    assert set(small["imp"]["category"]) <= set(leaf)


def test_category_map_covers_the_log_and_unifies_two_systems(small):
    cmap, beh = small["map"], small["beh"]
    pairs = set(zip(cmap["domain"], cmap["raw_category"], strict=True))
    assert len(pairs) == cmap["domain"].size  # no duplicate (domain, raw) rows
    assert set(zip(beh["domain"], beh["category"], strict=True)) <= pairs
    leaves = set(small["tax"]["leaf"])
    assert set(cmap["leaf"]) <= leaves
    for domain in ("ads_moments", "ads_channels"):
        rows = cmap["domain"] == domain
        assert np.array_equal(cmap["raw_category"][rows], cmap["leaf"][rows])  # identity
        assert set(cmap["raw_category"][rows]) == leaves
    content = cmap["domain"] == "content"
    raw = cmap["raw_category"][content]
    assert raw.min() > max(leaves)  # a distinct id range
    assert raw.size > len(leaves)  # finer: many raw categories per leaf
    assert set(cmap["leaf"][content]) == leaves


def test_impressions_requests_share_user_and_ts(small):
    imp = small["imp"]
    req = imp["request_id"]
    assert np.all(np.diff(req) >= 0) and req.min() == 1
    assert np.array_equal(np.unique(req), np.arange(1, req.max() + 1))
    for column in ("user", "ts"):
        first = {}
        for r, v in zip(req, imp[column], strict=True):
            assert first.setdefault(r, v) == v
    assert set(imp["target_type"]) == set(SMALL.target_types)
    assert set(imp["label"]) == {0, 1}
    assert np.all(imp["hist_end"] > imp["hist_start"])  # every request has a history


def test_positive_rate_in_range(small):
    rate = small["imp"]["label"].mean()
    assert 0.10 <= rate <= 0.35
    assert small["manifest"]["stats"]["positive_rate"] == pytest.approx(rate, abs=1e-4)


def test_positive_rate_is_calibrated_for_long_histories(tmp_path):
    config = SynthConfig(users=40, mean_len=4000, max_len=20_000, seed=2, requests_per_user=30)
    manifest = generate(config, tmp_path / "long", progress=False)
    assert 0.10 <= manifest["stats"]["positive_rate"] <= 0.35
    assert manifest["logit_offset"] < 0  # long histories sum more relevance


def test_truth_points_to_earlier_behaviours_of_the_same_user(small):
    beh, imp, truth = small["beh"], small["imp"], small["truth"]
    i, r = truth["impression"], truth["behavior_row"]
    assert truth["relevance"].dtype == np.float32 and np.all(truth["relevance"] > 0)
    assert np.all(beh["user"][r] == imp["user"][i])
    assert np.all(beh["ts"][r] < imp["ts"][i])
    assert np.bincount(i).max() <= SMALL.truth_top_k
    assert len(set(zip(i, r, strict=True))) == i.size  # no duplicate pairs


def test_truth_is_consistent_with_the_logs(small):
    """Truth rows are the candidate's l2 branch, weighted exactly as the process defines."""
    beh, imp, truth = small["beh"], small["imp"], small["truth"]
    cfg = SMALL
    i, r = truth["impression"], truth["behavior_row"]
    assert np.all(beh["l2"][r] == imp["l2"][i])
    kinds = ("click", "conversion", "view", "like")
    code = np.array([kinds.index(b) for b in beh["behavior"]])
    target = np.array([cfg.target_types.index(t) for t in imp["target_type"]])
    expected = synthetic_impressions.relevance(
        cfg, beh["leaf"][r] == imp["category"][i], code[r], imp["ts"][i] - beh["ts"][r], target[i]
    )
    np.testing.assert_allclose(truth["relevance"], expected, rtol=1e-5)

    # completeness: every other branch behaviour before the impression is less relevant
    by_imp = np.split(np.arange(i.size), np.flatnonzero(np.diff(i)) + 1)
    kept = {int(i[g[0]]): g for g in by_imp if g.size}
    rng = np.random.default_rng(0)
    for j in rng.choice(imp["user"].size, 300, replace=False):
        rows = np.arange(imp["hist_start"][j], imp["hist_end"][j])
        rows = rows[beh["l2"][rows] == imp["l2"][j]]
        rel = synthetic_impressions.relevance(
            cfg,
            beh["leaf"][rows] == imp["category"][j],
            code[rows],
            imp["ts"][j] - beh["ts"][rows],
            np.full(rows.size, target[j]),
        )
        chosen = kept.get(int(j), np.zeros(0, dtype=np.int64))
        assert chosen.size == min(rows.size, cfg.truth_top_k)
        if rows.size > chosen.size:
            left_out = np.setdiff1d(rows, r[chosen])
            assert rel[np.isin(rows, left_out)].max() <= truth["relevance"][chosen].min() + 1e-6


def test_long_range_signal(small):
    """Relevance from the whole history separates labels; the last 50 behaviours do worse."""
    imp, truth, beh = small["imp"], small["truth"], small["beh"]
    n = imp["user"].size
    i, r = truth["impression"], truth["behavior_row"]
    y = imp["label"]
    full = np.bincount(i, weights=truth["relevance"], minlength=n)
    recent = r >= imp["hist_end"][i] - 50
    last50 = np.bincount(i[recent], weights=truth["relevance"][recent], minlength=n)
    auc_full = roc_auc_score(y, full)
    auc_last50 = roc_auc_score(y, last50)
    assert auc_full > 0.7
    assert auc_full > auc_last50 + 0.04

    # the same from the raw logs alone: a same-leaf behaviour more than 50 behaviours back
    old_same_leaf = np.zeros(n)
    for j in range(n):
        lo, hi = imp["hist_start"][j], max(imp["hist_end"][j] - 50, imp["hist_start"][j])
        old_same_leaf[j] = np.count_nonzero(beh["leaf"][lo:hi] == imp["category"][j])
    assert roc_auc_score(y, old_same_leaf) > 0.6


def test_max_pool_labels_follow_the_most_relevant_behaviour(tmp_path):
    """relevance_pool=max: S is the largest truth relevance, so one relevant behaviour far back
    carries the label however many others there are; the last 50 alone miss it."""
    config = replace(SMALL, users=200, relevance_pool="max", relevance_gain=4.0)
    data = load(generate_to(config, tmp_path / "max"))
    imp, truth = data["imp"], data["truth"]
    n = imp["user"].size
    i = truth["impression"]
    s = np.zeros(n)
    np.maximum.at(s, i, truth["relevance"].astype(np.float64))
    assert s.max() <= max(config.behavior_weights) + 1e-6  # a max, not a sum
    # the label was drawn from sigma(bias + offset + gain * log(1 + S) + quality)
    target = np.array([config.target_types.index(t) for t in imp["target_type"]])
    bias = np.asarray(config.target_bias)[target] + data["manifest"]["logit_offset"]
    quality_free = 1 / (1 + np.exp(-(bias + config.relevance_gain * np.log1p(s))))
    assert roc_auc_score(imp["label"], quality_free) > 0.7
    assert data["manifest"]["stats"]["auc"]["truth_relevance"] == pytest.approx(
        roc_auc_score(imp["label"], s), abs=1e-3
    )


def generate_to(config: SynthConfig, out: Path) -> Path:
    generate(config, out, progress=False)
    return out


def test_same_seed_same_bytes_and_parquet_matches_csv(tmp_path):
    config = SynthConfig(users=60, mean_len=80, max_len=1000, seed=3, chunk_rows=2000)
    generate(config, tmp_path / "a", progress=False)
    generate(config, tmp_path / "b", progress=False)
    for name in DATA_FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    ma = json.loads((tmp_path / "a" / "manifest.json").read_text())
    mb = json.loads((tmp_path / "b" / "manifest.json").read_text())
    ma["stats"].pop("generation_seconds"), mb["stats"].pop("generation_seconds")
    assert ma == mb

    generate(replace(config, seed=4), tmp_path / "c", progress=False)
    a_bytes = (tmp_path / "a" / "behaviors.csv").read_bytes()
    assert (tmp_path / "c" / "behaviors.csv").read_bytes() != a_bytes

    generate(replace(config, format="parquet"), tmp_path / "p", progress=False)
    csv, parquet = load(tmp_path / "a"), load(tmp_path / "p")
    for key in ("beh", "imp", "truth"):
        for column, values in csv[key].items():
            assert np.array_equal(values, parquet[key][column]), (key, column)


def test_existing_output_needs_overwrite_and_failures_leave_nothing(tmp_path, monkeypatch):
    config = SynthConfig(users=20, mean_len=30, max_len=100)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    with pytest.raises(UserError, match="already exists"):
        generate(config, out, progress=False)
    with pytest.raises(UserError, match="not something longrec wrote"):
        generate(config, out, overwrite=True, progress=False)
    assert (out / "old.txt").read_text() == "x"
    out = tmp_path / "synth"
    generate(config, out, progress=False)
    (out / "old.txt").write_text("x")
    generate(config, out, overwrite=True, progress=False)
    assert not (out / "old.txt").exists() and (out / "manifest.json").exists()

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr("longrec.data.synthetic.make_impressions", broken)
    with pytest.raises(RuntimeError):
        generate(config, tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "synth"]


@pytest.mark.parametrize(
    "change",
    [
        {"users": 0},
        {"mean_len": 600, "max_len": 500},
        {"min_len": 0},
        {"format": "json"},
        {"ad_items": 10},
        {"target_floor": (0.1, 0.2)},
        {"candidates_per_request": 0},
        {"relevance_pool": "mean"},
    ],
)
def test_bad_parameters_are_user_errors(tmp_path, change):
    with pytest.raises(UserError):
        generate(replace(SynthConfig(), **change), tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


def test_cli(tmp_path):
    app = typer.Typer()
    synth_command.register(app)

    @app.callback()
    def main() -> None:
        """Test app with only the synth command."""

    runner = CliRunner()
    out = tmp_path / "cli"
    args = ["synth", "--out", str(out), "--users", "30", "--mean-len", "40", "--max-len", "400"]
    args += ["--format", "parquet", "--seed", "5", "--quiet", "--set", "truth_top_k=10"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["truth_top_k"] == 10 and manifest["seed"] == 5
    assert manifest["files"]["behaviors"] == "behaviors.parquet"
    assert "wrote" in result.output

    bad = runner.invoke(
        app, ["synth", "--out", str(tmp_path / "y"), "--mean-len", "900", "--max-len", "800"]
    )
    assert isinstance(bad.exception, UserError)
    bad = runner.invoke(app, ["synth", "--out", str(tmp_path / "y"), "--set", "nope=1"])
    assert isinstance(bad.exception, UserError)
    assert "Example" in runner.invoke(app, ["synth", "--help"]).output
