"""A run directory is finished, resumable exactly, or refused: SIGKILL between named write steps,
torn or corrupted checkpoints, and --resume with settings that would splice two runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from longrec.config import resolve
from longrec.errors import UserError
from longrec.train import run_dir as rd
from longrec.train.compare import run_compare
from longrec.train.resume import differences

SETS = [
    "train.max_steps=30",
    "train.eval_every=10",
    "train.batch_size=256",
    "train.threads=1",
    "train.progress=false",
    "train.precision=fp32",  # what train.precision=auto picks depends on the CPU
    "data.prefetch=0",
    "model.embed_dim=8",
]


def _train(data, out, *extra, kill_at=None, sets=SETS):
    env = dict(os.environ, COLUMNS="200", NO_COLOR="1")
    env.pop("LONGREC_KILL_AT", None)
    if kill_at:
        env["LONGREC_KILL_AT"] = kill_at
    args = [sys.executable, "-m", "longrec", "train", "--data", str(data), "--out", str(out)]
    args += ["--model", "din", *[a for s in sets for a in ("--set", s)], *extra]
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)


def _metrics(run):
    m = json.loads((run / rd.METRICS).read_text())
    return {s: (m[s]["auc"], m[s]["logloss"]) for s in ("valid", "test")}, m["train"]["steps"]


@pytest.fixture(scope="module")
def straight(prepared_taobao, tmp_path_factory):
    run = tmp_path_factory.mktemp("straight") / "run"
    r = _train(prepared_taobao, run)
    assert r.returncode == 0, r.stderr
    return _metrics(run)


@pytest.mark.parametrize(
    "kill_at",
    ["checkpoint-weights-written:2", "checkpoint-state-written:2", "finish-weights-written"],
)
def test_sigkill_between_writes_resumes_exactly(prepared_taobao, tmp_path, straight, kill_at):
    run = tmp_path / "run"
    killed = _train(prepared_taobao, run, kill_at=kill_at)
    assert killed.returncode == -9, killed.stderr
    assert not (run / rd.METRICS).exists()
    if kill_at.startswith("checkpoint"):  # not finished: eval refuses it
        r = subprocess.run(
            [sys.executable, "-m", "longrec", "eval", "--run", str(run)],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 2 and "did training finish" in r.stderr, r.stderr
    resumed = _train(prepared_taobao, run, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert _metrics(run) == straight
    assert len(list(run.glob("last*.safetensors"))) == 1


def test_a_run_configured_with_the_old_bf16_flag_resumes_exactly(
    prepared_taobao, tmp_path, straight
):
    """config.yaml of runs from before train.device / train.precision: `train.bf16: false`."""
    run = tmp_path / "run"
    assert _train(prepared_taobao, run, kill_at="checkpoint-state-written:2").returncode == -9
    body = yaml.safe_load((run / rd.CONFIG).read_text())
    assert body["train"].pop("precision") == "fp32" and body["train"].pop("device") == "auto"
    body["train"]["bf16"] = False
    (run / rd.CONFIG).write_text(yaml.safe_dump(body, sort_keys=False))
    resumed = _train(prepared_taobao, run, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert _metrics(run) == straight
    assert yaml.safe_load((run / rd.CONFIG).read_text())["train"]["precision"] == "fp32"
    assert "train: device cpu (auto), precision fp32 (set)" in resumed.stderr


def test_a_torn_or_corrupted_checkpoint_is_refused(prepared_taobao, tmp_path):
    run = tmp_path / "run"
    assert _train(prepared_taobao, run, kill_at="checkpoint-state-written:2").returncode == -9
    named = rd.load_state(run)["last_weights"]
    (run / named).unlink()  # state.pt now names weights that are gone
    r = _train(prepared_taobao, run, "--resume")
    assert r.returncode == 2 and "cannot resume exactly" in r.stderr, r.stderr
    (run / rd.STATE).write_bytes((run / rd.STATE).read_bytes()[:100])  # truncated
    r = _train(prepared_taobao, run, "--resume")
    assert r.returncode == 2 and "state.pt is unreadable" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_resume_refuses_a_different_run_and_applies_a_longer_schedule(prepared_taobao, tmp_path):
    run = tmp_path / "run"
    assert _train(prepared_taobao, run, kill_at="checkpoint-state-written:2").returncode == -9
    config = (run / rd.CONFIG).read_text()
    for change, named in (("train.lr=0.5", "train.lr"), ("model.embed_dim=16", "embed_dim")):
        r = _train(prepared_taobao, run, "--resume", sets=[*SETS, change])
        assert r.returncode == 2 and named in r.stderr and "--resume" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        assert (run / rd.CONFIG).read_text() == config  # untouched before validation
    r = _train(prepared_taobao, run, "--resume", "--model", "dare")
    assert r.returncode == 2 and "model.name" in r.stderr
    # only the schedule may change: it is applied, written to config.yaml and logged
    r = _train(prepared_taobao, run, "--resume", sets=[*SETS, "train.max_steps=40"])
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load((run / rd.CONFIG).read_text())["train"]["max_steps"] == 40
    assert _metrics(run)[1] == 40
    log = [json.loads(line) for line in (run / rd.LOG).read_text().splitlines()]
    assert {"resume_changes": {"train.max_steps": [30, 40]}} in log
    r = _train(prepared_taobao, run, "--resume", "--overwrite")
    assert r.returncode == 2 and "either --resume" in r.stderr


def test_an_old_runs_precision_matches_auto_where_auto_picks_the_same(monkeypatch):
    """Runs configured with `train.bf16: false` (fp32) are reused and resumed under today's
    default `auto` where auto computes in fp32, and refused where it would pick bf16."""
    from longrec import runtime

    old, today = resolve(None, ["train.bf16=false"]), resolve(None, ["train.device=cpu"])
    monkeypatch.setattr(runtime, "cpu_computes_bf16", lambda cpuinfo=None: True)
    monkeypatch.setattr(runtime, "CPU_BF16_AUTO", False)
    assert differences(old, today) == ({}, {"train.device": ("auto", "cpu")})  # may change
    monkeypatch.setattr(runtime, "CPU_BF16_AUTO", True)
    assert differences(old, today)[0] == {"train.precision": ("fp32", "auto")}
    assert differences(resolve(None, ["train.bf16=true"]), today)[0] == {}


def test_compare_refuses_to_reuse_a_run_with_other_settings(prepared_taobao, tmp_path):
    base = resolve(None, [*SETS[:-1], "train.max_steps=4"], data__path=str(prepared_taobao))
    run_compare(base, ["din"], [1], tmp_path, log=lambda *_: None)
    run_compare(base, ["din"], [1], tmp_path, log=lambda *_: None)  # same settings: reused
    sets = [*SETS[:-1], "train.max_steps=4", "train.lr=0.1"]
    changed = resolve(None, sets, data__path=str(prepared_taobao))
    with pytest.raises(UserError, match=r"other settings.*train\.lr"):
        run_compare(changed, ["din"], [1], tmp_path, log=lambda *_: None)
    # longrec's own demo folder retrains instead
    run_compare(changed, ["din"], [1], tmp_path, log=lambda *_: None, retrain_changed=True)
    (run,) = [p for p in tmp_path.glob("runs/*") if p.is_dir()]
    assert rd.read_config(run)[0].train.lr == 0.1 and (run / rd.METRICS).exists()


@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_at_a_random_instant_finishes_resumes_exactly_or_refuses(
    prepared_taobao, tmp_path, straight, seed
):
    import random
    import signal
    import time

    run = tmp_path / "run"
    delay = random.Random(seed).uniform(3.0, 9.0)  # import, first steps, checkpoints
    args = [sys.executable, "-m", "longrec", "train", "--data", str(prepared_taobao)]
    args += ["--out", str(run), "--model", "din", *[a for s in SETS for a in ("--set", s)]]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if not (run / rd.METRICS).exists():
        r = _train(prepared_taobao, run, "--resume")
        if r.returncode == 2:  # refused: one line, and nothing half-trusted left behind
            assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
            return
        assert r.returncode == 0, r.stderr
    assert _metrics(run) == straight
