"""`longrec bench train --profile`: a real profiled training step on the Taobao sample."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from longrec.cli import app


def test_profile_names_the_top_operators_and_gemm_rate(prepared_taobao, tmp_path):
    out, trace = tmp_path / "dare.json", tmp_path / "trace.json"
    result = CliRunner().invoke(
        app,
        [
            "bench", "train", "--data", str(prepared_taobao), "--model", "dare",
            "--max-len", "50", "--batch-size", "64", "--steps", "2",
            "--profile", "2", "--trace", str(trace), "--out", str(out),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    prof = json.loads(out.read_text())["profile"]
    assert prof["steps"] == 2 and prof["ms_per_step"] > 0
    ops = [row["op"] for row in prof["top"]]
    assert len(ops) == len(set(ops)) >= 5
    shares = [row["share"] for row in prof["top"]]
    assert shares == sorted(shares, reverse=True) and sum(shares) <= 1.0 + 1e-6
    # DARE's MLP heads are addmm: the profiler must have counted their FLOPs
    assert prof["gemm_gflop_per_step"] > 0 and prof["gemm_gflops"] > 0
    assert 0 < prof["gemm_share"] < 1
    assert json.loads(trace.read_text())["traceEvents"]
