"""The glibc malloc settings applied at import (longrec/malloc.py), and their opt-out."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import longrec.malloc

CHECK = "import longrec, longrec.malloc as m; print(m._applied)"


def _glibc() -> bool:
    names = getattr(os, "confstr_names", {})
    return "CS_GNU_LIBC_VERSION" in names and bool(os.confstr("CS_GNU_LIBC_VERSION"))


def test_applied_at_import_exactly_on_glibc():
    """Applied wherever glibc is (this machine, CI); elsewhere it must report doing nothing."""
    assert longrec.malloc.tune_malloc() is _glibc()
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(_glibc())


def test_opt_out_by_environment():
    env = {**os.environ, "LONGREC_MALLOC_TUNING": "0"}
    out = subprocess.run(
        [sys.executable, "-c", CHECK], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.strip() == "False"


def test_large_tensors_get_huge_pages_unless_opted_out():
    """Measured on the process's own mappings; only where the kernel offers THP on request."""
    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not (_glibc() and mode.exists() and "[never]" not in mode.read_text()):
        pytest.skip("no transparent huge pages on this machine")
    probe = (
        "import longrec, torch, os; t = torch.ones(50_000_000); "
        "print(sum(int(l.split()[1]) for l in open(f'/proc/{os.getpid()}/smaps') "
        "if l.startswith('AnonHugePages')))"
    )
    for tuning, huge in (("1", True), ("0", False)):
        env = {**os.environ, "LONGREC_MALLOC_TUNING": tuning}
        env.pop("THP_MEM_ALLOC_ENABLE", None)
        out = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, check=True, env=env
        )
        assert (int(out.stdout) > 100_000) is huge, (tuning, out.stdout)
