"""The glibc malloc settings applied at import (longrec/malloc.py), and their opt-out."""

from __future__ import annotations

import os
import subprocess
import sys

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
