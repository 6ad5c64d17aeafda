"""Data-parallel training with 2 CPU processes (torchrun, gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

SETS = [
    "train.max_steps=12",
    "train.eval_every=6",
    "train.progress=false",
    "model.embed_dim=8",
    "model.pos_dim=8",
]


def _run(data, out, extra, kill_at=None):
    cmd = [
        sys.executable,
        "-m",
        "longrec",
        "train",
        "--data",
        str(data),
        "--model",
        "dare",
        "--out",
        str(out),
        *[a for s in SETS for a in ("--set", s)],
        *extra,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("LONGREC_KILL_AT", None)
    if kill_at:
        env["LONGREC_KILL_AT"] = kill_at
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def _train(data, out, extra):
    result = _run(data, out, extra)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text())


def test_two_processes_match_one_in_expectation(prepared_taobao, tmp_path):
    two = _train(
        prepared_taobao, tmp_path / "two", ["--nproc", "2", "--set", "train.batch_size=128"]
    )
    one = _train(prepared_taobao, tmp_path / "one", ["--set", "train.batch_size=256"])
    assert two["train"]["processes"] == 2
    assert two["train"]["steps"] == one["train"]["steps"] == 12
    # same global batch (2 x 128 vs 256) and steps: the same number of samples seen
    assert two["train"]["samples"] == one["train"]["samples"]
    for split in ("valid", "test"):
        assert two[split]["auc"] > 0.6
        assert abs(two[split]["auc"] - one[split]["auc"]) < 0.06
    for name in ("config.yaml", "model.safetensors", "state.pt", "log.jsonl"):
        assert (tmp_path / "two" / name).exists()


def test_sigkill_of_rank_0_between_writes_resumes_exactly(prepared_taobao, tmp_path):
    """Rank 0 killed after committing its second checkpoint: the launcher stops rank 1, and
    `--resume` with two processes ends exactly where an uninterrupted run does."""
    two = ["--nproc", "2", "--set", "train.batch_size=128", "--set", "train.eval_every=4"]
    straight = _train(prepared_taobao, tmp_path / "straight", two)
    run = tmp_path / "killed"
    killed = _run(prepared_taobao, run, two, kill_at="checkpoint-state-written:2")
    assert killed.returncode != 0
    assert not (run / "metrics.json").exists()
    resumed = _train(prepared_taobao, run, [*two, "--resume"])
    for split in ("valid", "test"):
        assert resumed[split]["auc"] == straight[split]["auc"]
        assert resumed[split]["logloss"] == straight[split]["logloss"]


def test_a_user_mistake_with_two_processes_is_one_line(prepared_taobao, tmp_path):
    result = _run(prepared_taobao, tmp_path / "run", ["--nproc", "2", "--set", "train.lr=-1"])
    assert result.returncode == 2
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("longrec: error:")]
    assert len(errors) == 1 and "train.lr" in errors[0], result.stderr[-3000:]
