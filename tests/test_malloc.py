"""The glibc malloc settings applied at import (longrec/malloc.py), and their opt-out."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import longrec.malloc

CHECK = "import longrec, longrec.malloc as m; print(m._applied)"


def _glibc() -> bool:
    return os.confstr("CS_GNU_LIBC_VERSION") is not None if hasattr(os, "confstr") else False


@pytest.mark.skipif(not _glibc(), reason="mallopt exists in glibc only (this machine: glibc)")
def test_applied_at_import_on_glibc():
    assert longrec.malloc.tune_malloc() is True
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_opt_out_by_environment():
    env = {**os.environ, "LONGREC_MALLOC_TUNING": "0"}
    out = subprocess.run(
        [sys.executable, "-c", CHECK], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.strip() == "False"
