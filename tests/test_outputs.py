"""Output folders: --overwrite replaces only what longrec wrote, one writer at a time, no debris."""

from __future__ import annotations

import subprocess
import sys

import pytest

from longrec.data.synthetic import SynthConfig, generate
from longrec.errors import UserError
from longrec.outputs import (
    MARKER,
    check_replaceable,
    kind_of,
    remove_stale_temps,
    writer_lock,
)

TINY_SYNTH = SynthConfig(users=20, mean_len=30, max_len=100, ad_items=1000, content_items=1000)


def _user_folder(path):
    path.mkdir()
    (path / "thesis.tex").write_text("years of work")
    return path


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_overwrite_refuses_a_folder_longrec_did_not_write(tmp_path, run_cli, taobao_sample):
    mine = _user_folder(tmp_path / "mine")
    for args in (
        ("prepare", "taobao", "--input", taobao_sample, "--out", mine, "--overwrite"),
        ("synth", "--out", mine, "--users", "5", "--overwrite", "--quiet"),
    ):
        r = run_cli(*args)
        assert r.returncode == 2, r.stderr
        assert "not something longrec wrote" in r.stderr and "Traceback" not in r.stderr
        assert (mine / "thesis.tex").read_text() == "years of work"
        assert sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]


def test_train_refuses_a_non_run_folder(tmp_path, run_cli, prepared_taobao):
    mine = _user_folder(tmp_path / "mine")
    for flag in ("--overwrite", "--resume"):
        r = run_cli("train", "--data", prepared_taobao, "--model", "din", "--out", mine, flag)
        assert r.returncode == 2 and "not something longrec wrote" in r.stderr, r.stderr
    # a dataset is not a run either: --overwrite must not turn it into one
    r = run_cli("train", "--data", prepared_taobao, "--model", "din", "--out", prepared_taobao,
                "--overwrite")  # fmt: skip
    assert r.returncode == 2 and "is a longrec dataset, not a longrec run" in r.stderr
    assert kind_of(prepared_taobao) == "dataset"
    assert (mine / "thesis.tex").read_text() == "years of work"


def test_overwrite_replaces_its_own_kind(tmp_path):
    out = tmp_path / "synth"
    generate(TINY_SYNTH, out, progress=False)
    assert kind_of(out) == "synth" and (out / MARKER).is_file()
    (out / "stale.txt").write_text("from the old output")
    with pytest.raises(UserError, match="already exists"):
        generate(TINY_SYNTH, out, progress=False)
    generate(TINY_SYNTH, out, overwrite=True, progress=False)
    assert not (out / "stale.txt").exists()
    assert not list(tmp_path.glob(".synth*"))  # no lock, temp or old folder left


def test_empty_folder_is_free_and_file_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    assert check_replaceable(tmp_path / "empty", "dataset", overwrite=False) is False
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        check_replaceable(tmp_path / "file", "dataset", overwrite=True)


HOLD = """
import sys, time
from pathlib import Path
from longrec.outputs import writer_lock
with writer_lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_writer_is_refused_and_a_killed_one_blocks_nothing(tmp_path):
    out = tmp_path / "data"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with (
            pytest.raises(UserError, match="being written by another longrec process"),
            writer_lock(out),
        ):
            pass
        with pytest.raises(UserError, match="being written by another"):
            generate(TINY_SYNTH, out, progress=False)
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, the lock file stays behind
        holder.wait()
    assert (tmp_path / ".data.lock").exists()
    generate(TINY_SYNTH, out, progress=False)  # the kernel released the dead writer's lock
    assert kind_of(out) == "synth" and not (tmp_path / ".data.lock").exists()


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    out = tmp_path / "data"
    dead, live = (
        _dead_pid(),
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"]),
    )
    try:
        stale = [tmp_path / f".data.tmp-{dead}", tmp_path / f".data.synth-old-{dead}"]
        kept = [tmp_path / f".data.tmp-{live.pid}", tmp_path / f".other.tmp-{dead}"]
        for d in stale + kept:
            d.mkdir()
            (d / "x").write_text("x")
        with writer_lock(out):
            pass
        assert not any(d.exists() for d in stale)
        assert all(d.exists() for d in kept)
        assert remove_stale_temps(out) == []
    finally:
        live.kill()
        live.wait()


def test_train_overwrite_retires_the_old_run_first(tmp_path, prepared_taobao):
    from longrec.commands.train import train_command

    run = tmp_path / "run"
    run.mkdir()
    (run / MARKER).write_text('{"kind": "run"}\n')
    for name in ("model.safetensors", "metrics.json", "best.safetensors"):
        (run / name).write_text("old")
    seen: list[set[str]] = []

    import longrec.train.loop as loop

    real_fit = loop.Trainer.fit

    def spy(self, resume=False):
        seen.append({p.name for p in run.iterdir()} if run.exists() else set())
        return real_fit(self, resume)

    loop.Trainer.fit = spy
    try:
        train_command(
            data=prepared_taobao,
            out=run,
            model="din",
            set=["train.max_steps=2", "train.eval_every=2", "train.threads=1"],
            overwrite=True,
        )
    finally:
        loop.Trainer.fit = real_fit
    assert seen == [set()]  # nothing of the old run was there when training began
    assert (run / "model.safetensors").read_bytes() != b"old"
    assert kind_of(run) == "run"
    assert not list(tmp_path.glob(".run*"))


def test_an_impossible_out_is_one_line(tmp_path, run_cli):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="cannot create"), writer_lock(tmp_path / "file" / "out"):
        pass
    r = run_cli("synth", "--out", tmp_path / "file" / "out", "--users", "5", "--quiet")
    assert r.returncode == 2 and "cannot create" in r.stderr and "Traceback" not in r.stderr


def test_lock_file_is_removed_on_release(tmp_path):
    out = tmp_path / "x"
    for _ in range(2):
        with writer_lock(out):
            assert (tmp_path / ".x.lock").exists()
        assert not (tmp_path / ".x.lock").exists()
