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


def _train(data, out, extra):
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
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
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
