"""The glibc malloc settings applied at import (longrec/malloc.py), and their opt-out."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
    """The variable is set (or not) everywhere; the pages are measured on the process's own
    mappings, and are huge only where the kernel offers THP on request (here and on CI)."""
    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    offered = mode.exists() and "[never]" not in mode.read_text()
    probe = (
        "import longrec, torch, os; t = torch.ones(50_000_000); "
        "print(os.environ.get('THP_MEM_ALLOC_ENABLE'), "
        "sum(int(l.split()[1]) for l in open(f'/proc/{os.getpid()}/smaps') "
        "if l.startswith('AnonHugePages')))"
    )
    for tuning, wanted in (("1", True), ("0", False)):
        env = {**os.environ, "LONGREC_MALLOC_TUNING": tuning}
        env.pop("THP_MEM_ALLOC_ENABLE", None)
        out = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, check=True, env=env
        )
        variable, huge_kb = out.stdout.split()
        assert variable == ("1" if wanted else "None"), (tuning, out.stdout)
        assert (int(huge_kb) > 100_000) is (wanted and offered), (tuning, out.stdout)
