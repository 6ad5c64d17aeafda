"""prepare under Ctrl-C and SIGKILL: the output is complete or absent, never half-written, and
the next run cleans up after a killed one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from longrec.data.synthetic import SynthConfig, generate
from longrec.outputs import kind_of


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    out = tmp_path_factory.mktemp("raw") / "synth"
    generate(SynthConfig(users=6000, mean_len=500, max_len=5000, seed=3), out, progress=False)
    return out


def _prepare(raw, out, env=None):
    args = [sys.executable, "-m", "longrec", "prepare", "synth", "--input", str(raw)]
    args += ["--out", str(out), "--protocol", "impressions", "--quiet"]
    return subprocess.Popen(
        args, env={**os.environ, **(env or {})}, stderr=subprocess.PIPE, text=True
    )


def _debris(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("delay", [1.5, 2.5, 3.5])
def test_ctrl_c_stops_prepare_at_once_and_leaves_nothing(raw, tmp_path, delay):
    out = tmp_path / "data"
    proc = _prepare(raw, out)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert "Traceback" not in err, err
    # a prepare of this size runs ~10 s here: Ctrl-C must stop it, not let the query run on
    assert time.monotonic() - t0 < 2.5, "Ctrl-C must interrupt the running query"
    assert proc.returncode == 130, err
    assert not out.exists()
    assert _debris(tmp_path) == []


def test_sigkill_before_the_rename_leaves_no_output_and_the_next_run_cleans_up(raw, tmp_path):
    out = tmp_path / "data"
    proc = _prepare(raw, out, env={"LONGREC_KILL_AT": "prepare-before-rename"})
    proc.communicate(timeout=120)
    assert proc.returncode == -9
    assert not out.exists()
    assert any(name.startswith(".data.tmp-") for name in _debris(tmp_path))
    proc = _prepare(raw, out)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert kind_of(out) == "dataset" and _debris(tmp_path) == []


@pytest.mark.parametrize("delay", [2.0, 4.5])
def test_sigkill_at_an_instant_leaves_a_whole_dataset_or_none(raw, tmp_path, delay):
    out = tmp_path / "data"
    proc = _prepare(raw, out)
    time.sleep(delay)
    proc.kill()
    proc.communicate(timeout=60)
    assert not out.exists() or kind_of(out) == "dataset"
    proc = _prepare(raw, out, env={})
    _, err = proc.communicate(timeout=120)
    if out.exists() and proc.returncode == 2:  # it had finished: a second prepare needs --overwrite
        assert "already exists" in err
    else:
        assert proc.returncode == 0, err
    assert kind_of(out) == "dataset" and _debris(tmp_path) == []
