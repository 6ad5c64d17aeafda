"""`longrec bench scaling`: lengths (`full` from meta.json), the mean ± std table and its gain
lines from hand-made rows, user mistakes, and one tiny study end to end (2 seeds)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from longrec.bench.scaling import (
    FULL,
    full_length,
    parse_lengths,
    resolve_lengths,
    run_scaling,
    scaling_plot,
    scaling_table,
)
from longrec.cli import app
from longrec.errors import UserError

TINY = [
    "train.max_steps=3",
    "train.batch_size=64",
    "train.eval_every=3",
    "train.threads=1",
    "train.progress=false",
]


def rows_of(model: str, label, max_len: int, aucs: list[float]) -> list[dict]:
    return [
        {
            "model": model,
            "history": label,
            "max_len": max_len,
            "seed": seed,
            "test_auc": auc,
            "train_samples_per_s": 1000 * seed,
            "peak_rss_gib": 1.0 + seed / 10,
        }
        for seed, auc in enumerate(aucs, start=1)
    ]


def test_table_mean_std_and_gain():
    rows = [
        *rows_of("stca", 50, 50, [0.700, 0.702, 0.704]),
        *rows_of("stca", FULL, 2698, [0.720, 0.722, 0.724]),
        *rows_of("din", 50, 50, [0.650, 0.660, 0.670]),
        *rows_of("din", 100, 100, [0.640, 0.650, 0.660]),
        *rows_of("din", FULL, 2698, [0.655, 0.665, 0.675]),
    ]
    lines = scaling_table(rows, "t").splitlines()
    assert lines[:3] == [
        "## t",
        "",
        "test AUC, mean ± sample std over 3 seeds (mean train samples/s, mean peak RSS GiB)",
    ]
    assert lines[4] == "| model | L=50 | L=100 | full (2,698) |"
    assert lines[6] == "| stca | 0.7020 ± 0.0020 (2,000, 1.2) |  | 0.7220 ± 0.0020 (2,000, 1.2) |"
    assert lines[7].startswith("| din | 0.6600 ± 0.0100 (2,000, 1.2) | 0.6500 ± 0.0100 ")
    assert lines[-2] == (
        "- stca: +0.0200 from L=50 to full (10.0 std, more than 2 std); "
        "mean AUC non-decreasing in length"
    )
    assert lines[-1] == (
        "- din: +0.0050 from L=50 to full (0.5 std, within 2 std); "
        "mean AUC not monotone (falls at L=100)"
    )


def test_table_with_one_seed_prints_as_before():
    rows = [*rows_of("din", 50, 50, [0.6]), *rows_of("din", 100, 100, [0.61])]
    text = scaling_table(rows, "t")
    assert "±" not in text and "n=" not in text
    assert "test AUC (train samples/s, peak RSS GiB)" in text
    assert "| din | 0.6000 (1,000, 1.1) | 0.6100 (1,000, 1.1) |" in text
    assert "- din: +0.0100 from L=50 to L=100 (one seed: no std); mean AUC non-decreasing" in text


def test_table_names_seed_counts_when_they_differ():
    rows = [*rows_of("din", 50, 50, [0.60, 0.61, 0.62]), *rows_of("din", 100, 100, [0.64])]
    text = scaling_table(rows, "t")
    assert "n = seeds in the cell" in text
    assert "| din | 0.6100 ± 0.0100, n=3 (2,000, 1.2) | 0.6400, n=1 (1,000, 1.1) |" in text
    assert "- din: +0.0300 from L=50 to L=100 (3.0 std, more than 2 std);" in text


def test_rows_without_max_len_or_seed_still_render(tmp_path):
    """scaling.json written before seeds and `full`: history was the length itself."""
    rows = [
        {k: v for k, v in r.items() if k not in ("max_len", "seed")}
        for r in rows_of("din", 50, 50, [0.6])
    ]
    assert "| din | 0.6000 (1,000, 1.1) |" in scaling_table(rows, "t")
    scaling_plot(rows, tmp_path / "p.png", "t")
    assert (tmp_path / "p.png").stat().st_size > 0


def test_parse_lengths():
    assert parse_lengths("25, 50,FULL") == [25, 50, FULL]
    for bad, message in (
        ("10,abc", "'abc' is neither"),
        ("0", "'0' is neither"),
        ("-5", "'-5' is neither"),
        ("10,10", "10 given more than once"),
        (" , ", "at least one length"),
    ):
        with pytest.raises(UserError, match=message):
            parse_lengths(bad)


def test_full_is_the_longest_history_in_meta(prepared_taobao, tmp_path):
    from longrec.data.samples import read_split
    from longrec.data.store import SequenceStore

    offsets = SequenceStore.open(prepared_taobao).offsets
    longest = max(
        int((cols["hist_end"] - offsets[cols["user"]]).max())
        for cols in (read_split(prepared_taobao, s) for s in ("train", "valid", "test"))
    )
    assert full_length(prepared_taobao) == longest
    said: list[str] = []
    resolved = resolve_lengths([10, 10**6, FULL], prepared_taobao, said.append)
    assert resolved == [(10, 10), (FULL, longest)]
    assert said == [
        f"L=1,000,000: not shorter than the longest history ({longest:,}), covered by full"
    ]
    assert resolve_lengths([10, 10**6], tmp_path) == [(10, 10), (10**6, 10**6)]  # no meta needed
    with pytest.raises(UserError, match="not a prepared dataset"):
        full_length(tmp_path)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seeds", "0"], "--seeds must be >= 1"),
        (["--lengths", "10,long"], "'long' is neither"),
        (["--models", "din,no_such_model"], "unknown model"),
    ],
)
def test_user_mistakes(tmp_path, args, message):
    result = CliRunner().invoke(
        app, ["bench", "scaling", "--data", str(tmp_path), "--out", str(tmp_path / "o"), *args]
    )
    assert isinstance(result.exception, UserError) and message in str(result.exception)
    assert "\n" not in str(result.exception)
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_tiny_study_two_seeds(prepared_taobao, tmp_path):
    out, said = tmp_path / "scaling", []
    rows = run_scaling(prepared_taobao, out, ["din"], [10, FULL], TINY, log=said.append, seeds=2)
    full = full_length(prepared_taobao)
    assert [(r["history"], r["max_len"], r["seed"]) for r in rows] == [
        (10, 10, 1),
        (10, 10, 2),
        (FULL, full, 1),
        (FULL, full, 2),
    ]
    assert all(0 <= r["test_auc"] <= 1 and r["peak_rss_gib"] > 0 for r in rows)
    assert len({r["test_auc"] for r in rows}) == 4  # the seeds differ
    assert json.loads((out / "scaling.json").read_text()) == rows
    assert sorted(p.name for p in (out / "runs").iterdir()) == [
        "din-L10-s1",
        "din-L10-s2",
        "din-Lfull-s1",
        "din-Lfull-s2",
    ]
    assert sum("training in" in m for m in said) == 4
    table = scaling_table(rows, "tiny")
    assert f"| model | L=10 | full ({full:,}) |" in table and " ± " in table
    mean = np.mean([r["test_auc"] for r in rows if r["history"] == FULL])
    assert f"{mean:.4f} ± " in table
    scaling_plot(rows, out / "scaling.png", "tiny")
    assert (out / "scaling.png").stat().st_size > 0
    said.clear()
    assert (
        run_scaling(prepared_taobao, out, ["din"], [10, FULL], TINY, log=said.append, seeds=2)
        == rows
    )
    assert said == []  # finished runs reused
