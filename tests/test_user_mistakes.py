"""User mistakes end in one line naming the setting or file, never a traceback."""

from __future__ import annotations

import shutil

import pytest

from longrec.config import resolve
from longrec.data.dataset import PreparedDataset
from longrec.errors import DataError, UserError
from longrec.models import build_model
from longrec.models.base import DataSchema


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        ("train.lr=-1", "train.lr"),
        ("train.lr=.nan", "train.lr"),
        ("train.embed_lr=0", "train.embed_lr"),
        ("train.epochs=0", "train.epochs"),
        ("train.max_steps=0", "train.max_steps"),
        ("train.batch_size=0", "train.batch_size"),
        ("train.batch_size=-4", "train.batch_size"),
        ("train.eval_every=0", "train.eval_every"),
        ("train.threads=0", "train.threads"),
        ("train.grad_clip=-1", "train.grad_clip"),
        ("data.max_len=0", "data.max_len"),
        ("data.eval_batch_size=0", "data.eval_batch_size"),
        ("train.device=gpu", "train.device = 'gpu': expected auto, cpu, cuda or cuda:N"),
        ("train.device=cuda:x", "train.device"),
        ("train.precision=fp16", "train.precision = 'fp16': expected auto, fp32, bf16"),
        ("train.bf16=1", "train.bf16 = 1 is not a bool"),
        ("train.kernels=fast", "train.kernels = 'fast': expected auto, reference, native"),
    ],
)
def test_settings_no_run_can_use_are_refused(setting, named):
    with pytest.raises(UserError, match=named):
        resolve(None, [setting])


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"embed_dim": 0}, "embed_dim = 0 must be at least 1"),
        ({"embed_dim": -3}, "at least 1"),
        ({"embed_dim": True}, "must be an integer"),
        ({"embed_dim": 1.5}, "must be an integer"),
    ],
)
def test_model_parameters_are_checked(prepared_taobao, params, message):
    schema = DataSchema.from_dataset(PreparedDataset(prepared_taobao), 50)
    with pytest.raises(UserError, match=message):
        build_model("din", schema, params)
    build_model("din", schema, {"type_dim": 0})  # 0 turns a feature off: allowed


@pytest.mark.parametrize(
    ("path", "damage", "message"),
    [
        ("store/item.npy", "truncate", "truncated or not a .npy"),
        ("store/ts.npy", "remove", "missing"),
        ("store/offsets.npy", "remove", "missing"),
        ("samples/train.parquet", "truncate", "truncated or not a parquet"),
        ("vocab/item.parquet", "truncate", "truncated or not a parquet"),
        ("meta.json", "truncate", "not a dataset description"),
    ],
)
def test_damaged_dataset_files_are_named(prepared_taobao, tmp_path, path, damage, message):
    data = tmp_path / "data"
    shutil.copytree(prepared_taobao, data)
    target = data / path
    if damage == "remove":
        target.unlink()
    else:
        target.write_bytes(target.read_bytes()[:40])
    with pytest.raises(DataError, match=message) as err:
        ds = PreparedDataset(data)
        ds.store.offsets  # noqa: B018
        ds.split("train")
        ds.vocab_size("item")
        from longrec.data.vocab import load_vocab

        load_vocab(data, "item")
    assert str(target) in str(err.value)


def test_a_store_array_of_another_length_is_named(prepared_taobao, tmp_path):
    import numpy as np

    data = tmp_path / "data"
    shutil.copytree(prepared_taobao, data)
    np.save(data / "store" / "item.npy", np.load(data / "store" / "item.npy")[:-5])
    with pytest.raises(DataError, match=r"item\.npy.*rows where the store has"):
        PreparedDataset(data).store  # noqa: B018


def test_server_options_are_checked_before_anything_loads(run_cli, tmp_path):
    for args, message in (
        (["--port", "70000"], "is not a TCP port"),
        (["--cache-mb", "-5"], "--cache-mb -5 must be at least 0"),
        (["--max-candidates", "0"], "--max-candidates 0 must be at least 1"),
        (["--precision", "fp16"], "--precision = 'fp16': expected auto, fp32, bf16"),
        (["--bf16", "--precision", "fp32"], "--bf16 contradicts --precision fp32"),
        (["--device", "tpu"], "--device = 'tpu': expected auto, cpu, cuda or cuda:N"),
        (["--kernels", "fast"], "--kernels = 'fast': expected auto, reference, native"),
    ):
        r = run_cli("serve", "--run", tmp_path, "--history", f"lmdb://{tmp_path}/h", *args)
        assert r.returncode == 2 and message in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


def test_malformed_run_files_are_named(prepared_taobao, tmp_path):
    from longrec.train import run_dir as rd

    (tmp_path / rd.CONFIG).write_text("garbage: [")
    with pytest.raises(UserError, match="not a longrec run config"):
        rd.read_config(tmp_path)
    schema = DataSchema.from_dataset(PreparedDataset(prepared_taobao), 50)
    model = build_model("din", schema, {})
    (tmp_path / "w.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(UserError, match="unreadable or foreign weights"):
        rd.load_weights(model, tmp_path / "w.safetensors")


def test_eval_beyond_what_the_model_reads_says_so(prepared_taobao, tmp_path, run_cli):
    run = tmp_path / "run"
    sets = ["train.max_steps=2", "train.eval_every=2", "train.threads=1", "data.max_len=50"]
    r = run_cli("train", "--data", prepared_taobao, "--model", "hstu", "--out", run,
                *[a for s in sets for a in ("--set", s)])  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = run_cli("eval", "--run", run, "--max-len", "400")
    assert r.returncode == 0 and "reads at most its 50 most recent behaviours" in r.stderr
    r = run_cli("eval", "--run", run, "--max-len", "0")
    assert r.returncode == 2 and "--max-len 0 must be at least 1" in r.stderr
    r = run_cli("eval", "--run", run, "--kernels", "fast")
    assert r.returncode == 2 and "--kernels = 'fast': expected auto" in r.stderr, r.stderr
    r = run_cli("eval", "--run", run, "--kernels", "reference")
    assert r.returncode == 0, r.stderr
    r = run_cli("eval", "--run", run, "--device", "cuda:99")
    assert r.returncode == 2 and "--device = cuda:99: " in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_a_gpu_this_machine_lacks_is_one_line(prepared_taobao, tmp_path, run_cli):
    r = run_cli("train", "--data", prepared_taobao, "--model", "din", "--out", tmp_path / "run",
                "--set", "train.device=cuda:99")  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert "train.device = cuda:99: " in r.stderr and "available: cpu" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
