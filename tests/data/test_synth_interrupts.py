"""synth under SIGKILL: the output is complete or absent, and the next run cleans up after a
killed one and writes the same bytes as an uninterrupted run."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time

import pytest

from longrec.outputs import kind_of

ARGS = ["--users", "3000", "--mean-len", "800", "--max-len", "8000", "--seed", "5", "--quiet"]


def _synth(out, env=None):
    args = [sys.executable, "-m", "longrec", "synth", "--out", str(out), *ARGS]
    return subprocess.Popen(
        args, env={**os.environ, **(env or {})}, stderr=subprocess.PIPE, text=True
    )


def _digest(folder):
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name not in ("manifest.json", ".longrec.json"):  # times
            h.update(path.relative_to(folder).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def _debris(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "raw"
    _, err = _synth(out).communicate(timeout=300)
    assert kind_of(out) == "synth", err
    return _digest(out)


def test_sigkill_before_the_rename_leaves_no_output_and_the_next_run_cleans_up(tmp_path, reference):
    out = tmp_path / "raw"
    proc = _synth(out, env={"LONGREC_KILL_AT": "synth-before-rename"})
    proc.communicate(timeout=300)
    assert proc.returncode == -9
    assert not out.exists()
    assert any(name.startswith(".raw.synth-tmp-") for name in _debris(tmp_path))
    proc = _synth(out)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert kind_of(out) == "synth" and _debris(tmp_path) == []
    assert _digest(out) == reference


@pytest.mark.parametrize("delay", [0.8, 1.6])
def test_sigkill_at_an_instant_leaves_a_whole_output_or_none(tmp_path, reference, delay):
    out = tmp_path / "raw"
    proc = _synth(out)
    time.sleep(delay)
    proc.kill()
    proc.communicate(timeout=60)
    assert not out.exists() or (kind_of(out) == "synth" and _digest(out) == reference)
    if not out.exists():
        proc = _synth(out)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    assert kind_of(out) == "synth" and _debris(tmp_path) == []
    assert _digest(out) == reference
