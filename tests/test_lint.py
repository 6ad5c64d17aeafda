"""Lint is part of the test suite: ruff check and ruff format --check on src and tests.

ruff is a dev dependency; if it is missing these tests fail (rather than skip) on purpose.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args, "--no-cache", "src", "tests"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_ruff_check():
    result = ruff("check")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format():
    result = ruff("format", "--check")
    assert result.returncode == 0, result.stdout + result.stderr
