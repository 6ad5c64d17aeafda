"""A run, a dataset and a history store that do not belong together are refused in one line."""

from __future__ import annotations

import json
import shutil

import pytest

from longrec.data.dataset import PreparedDataset, compute_fingerprint
from longrec.data.prepare import PrepareConfig, prepare
from longrec.data.protocols import ProtocolConfig
from longrec.data.sources import SourceOptions
from longrec.errors import UserError
from longrec.serve.ranker import Ranker
from longrec.train import run_dir as rd

SETS = ["train.max_steps=2", "train.eval_every=2", "train.threads=1", "train.progress=false"]


@pytest.fixture(scope="module")
def movielens(tmp_path_factory, movielens_dir):
    out = tmp_path_factory.mktemp("ml") / "movielens"
    prepare(PrepareConfig("movielens", movielens_dir, out, ProtocolConfig("dare", min_len=50), quiet=True))  # fmt: skip
    return out


@pytest.fixture(scope="module")
def taobao_run(tmp_path_factory, prepared_taobao, run_cli):
    run = tmp_path_factory.mktemp("run") / "din"
    sets = [a for s in SETS for a in ("--set", s)]
    r = run_cli("train", "--data", prepared_taobao, "--model", "din", "--out", run, *sets)
    assert r.returncode == 0, r.stderr
    return run


def test_fingerprint_is_the_vocabularies(prepared_taobao, tmp_path, taobao_sample):
    meta = json.loads((prepared_taobao / "meta.json").read_text())
    assert meta["fingerprint"].startswith("sha256:")
    assert compute_fingerprint(prepared_taobao, meta) == meta["fingerprint"]
    # the same input prepared again: the same ids, the same fingerprint
    again = tmp_path / "again"
    options = SourceOptions(on_bad_rows="skip")
    protocol = ProtocolConfig("dare", min_len=50)
    cfg = PrepareConfig("taobao", taobao_sample, again, protocol, quiet=True, behaviors=("pv",))
    cfg.source_options = options
    prepare(cfg)
    assert PreparedDataset(again).fingerprint == meta["fingerprint"]
    # one item id renamed: another fingerprint
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(again / "vocab" / "item.parquet")
    values = table["value"].to_pylist()
    values[5] = "renamed"
    table = table.set_column(table.schema.get_field_index("value"), "value", pa.array(values))
    pq.write_table(table, again / "vocab" / "item.parquet")
    assert compute_fingerprint(again, meta) != meta["fingerprint"]


def test_eval_and_resume_refuse_another_dataset(taobao_run, movielens, run_cli, tmp_path):
    schema = rd.read_config(taobao_run)[1]
    assert (
        schema.fingerprint == PreparedDataset(rd.read_config(taobao_run)[0].data.path).fingerprint
    )
    r = run_cli("eval", "--run", taobao_run, "--data", movielens)
    assert r.returncode == 2 and "is not the dataset" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    copy = tmp_path / "run"
    shutil.copytree(taobao_run, copy)
    sets = [a for s in SETS for a in ("--set", s)]
    r = run_cli("train", "--data", movielens, "--model", "din", "--out", copy, "--resume", *sets)
    assert r.returncode == 2 and "is not the dataset" in r.stderr, r.stderr


def test_a_run_predating_fingerprints_is_checked_by_vocabulary_sizes(taobao_run, movielens):
    schema = rd.read_config(taobao_run)[1]
    with pytest.raises(UserError, match="field item"):
        PreparedDataset(movielens).check_belongs(None, schema.fields, "old-run")
    PreparedDataset(rd.read_config(taobao_run)[0].data.path).check_belongs(None, schema.fields, "r")


def test_serve_refuses_another_dataset_and_a_foreign_store(
    taobao_run, movielens, tmp_path, taobao_sample
):
    with pytest.raises(UserError, match="is not the dataset"):
        Ranker.from_run(taobao_run, history=f"lmdb://{tmp_path / 'h0'}", data=movielens)
    # a store loaded from MovieLens cannot serve the Taobao run
    from longrec.serve.load_history import load_history

    load_history(movielens, f"lmdb://{tmp_path / 'ml-history'}", progress=False)
    with pytest.raises(UserError, match="holds fields"):
        Ranker.from_run(taobao_run, history=f"lmdb://{tmp_path / 'ml-history'}")
    # the same fields, but more behaviour types, so other item ids: the fingerprint tells
    other = tmp_path / "taobao-loo"
    cfg = PrepareConfig("taobao", taobao_sample, other, ProtocolConfig("leave_one_out"), quiet=True)
    cfg.source_options, cfg.behaviors = SourceOptions(on_bad_rows="skip"), ("pv", "cart")
    prepare(cfg)
    load_history(other, f"lmdb://{tmp_path / 'loo-history'}", progress=False)
    with pytest.raises(UserError, match="histories of another dataset"):
        Ranker.from_run(taobao_run, history=f"lmdb://{tmp_path / 'loo-history'}")
    # a store that is not there is refused, and nothing is created
    with pytest.raises(UserError, match="no history store there"):
        Ranker.from_run(taobao_run, history=f"lmdb://{tmp_path / 'none'}", create_history=False)
    assert not (tmp_path / "none").exists()
    ranker = Ranker.from_run(taobao_run, history=f"lmdb://{tmp_path / 'new'}")
    ranker.close()
