"""The command line starts, lists its commands and shows an example in every help text."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys


def test_top_level_help(run_cli):
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    assert "prepare" in result.stdout
    assert "Traceback" not in result.stderr


def test_prepare_help_shows_an_example(run_cli):
    result = run_cli("prepare", "--help")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "Example" in text
    assert "longrec prepare taobao --input examples/data/taobao/UserBehavior_head.csv" in text
    for option in ("--input", "--out", "--protocol", "--on-bad-rows", "--behaviors", "--min-len"):
        assert option in text, option
    for source in ("taobao", "tmall", "movielens", "csv", "parquet", "synth"):
        assert source in text


def test_no_arguments_shows_usage(run_cli):
    result = run_cli()
    assert "Usage" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_console_script():
    script = shutil.which("longrec", path=os.path.dirname(sys.executable))
    result = subprocess.run(
        [script, "prepare", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, COLUMNS="200"),
    )
    assert result.returncode == 0, result.stderr
    assert "Example" in result.stdout
