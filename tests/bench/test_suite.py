"""`longrec bench all`: the quick suite end to end, the BENCHMARKS.md section it regenerates,
dataset reuse, and a failing benchmark that loses none of the others."""

from __future__ import annotations

import dataclasses
import json

import pytest
from typer.testing import CliRunner

from longrec.bench.suite import SuiteConfig
from longrec.bench.summary import BEGIN, END, SECTION, render_summary, update_benchmarks_md
from longrec.cli import app

HEAD = "# Benchmarks\n\nHand-written text before the section.\n\n"
TAIL = "\n## Later\n\nHand-written text after it, `code` | pipes | kept.\n"
NAMES = ("peak", "data", "train", "search", "serve", "scaling")


def invoke(root, md, *extra: str):
    args = ["bench", "all", "--quick", "--out", str(root / "out"), "--work", str(root / "work")]
    return CliRunner().invoke(app, [*args, "--benchmarks-md", str(md), *extra])


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """The quick suite, run once through the CLI (in-process)."""
    root = tmp_path_factory.mktemp("suite")
    md = root / "BENCHMARKS.md"
    md.write_text(f"{HEAD}{BEGIN}\nold generated figures\n{END}\n{TAIL}")
    result = invoke(root, md)
    assert result.exit_code == 0, result.output
    return root, md, result


@pytest.mark.slow
def test_quick_suite_writes_every_result(suite):
    root, _, _ = suite
    out = {name: json.loads((root / "out" / f"{name}.json").read_text()) for name in NAMES}
    for name, r in out.items():
        assert "error" not in r, (name, r["error"])
        assert r["benchmark"] == name and r["machine"]["cores"] >= 1
        assert r["command"].startswith("longrec bench all --out") and "--quick" in r["command"]
    assert not list((root / "out").glob(".*.tmp"))  # written atomically
    assert out["peak"]["fp32_gflops"] > 0 < out["peak"]["bf16_gflops"]
    assert out["peak"]["copy_gb_per_s"] > 0
    assert out["data"]["dataset"]["reused"] is False
    assert all(x["samples_per_s"] > 0 for x in out["data"]["loader"])
    (rec,) = out["train"]["records"]
    assert rec["model"] == "din" and rec["train_samples_per_s"] > 0 < rec["infer_samples_per_s"]
    lay = out["train"]["layouts"]
    assert lay["model"] == "stca" and lay["request"]["samples_per_s"] > 0
    assert all(x["ms"] > 0 for x in out["search"]["cost"]) and out["search"]["hierarchical"]
    rows = out["serve"]["rows"]
    assert {r["cache"] for r in rows} == {"cold", "warm"}
    assert all(r["p99_ms"] > 0 and r["p99_ms"] >= r["p50_ms"] for r in rows)
    scaling = out["scaling"]["rows"]
    assert [(r["model"], r["history"]) for r in scaling] == [("din", 50), ("din", 100)]
    assert all(0 <= r["test_auc"] <= 1 and r["train_samples_per_s"] > 0 for r in scaling)
    assert (root / "out" / "scaling.png").stat().st_size > 0


@pytest.mark.slow
def test_benchmarks_md_section_replaced(suite):
    root, md, result = suite
    text = md.read_text()
    assert text.startswith(f"{HEAD}{BEGIN}\n") and text.endswith(f"{END}\n{TAIL}")
    assert "old generated figures" not in text
    assert text.count(BEGIN) == text.count(END) == 1
    section = text[text.index(BEGIN) + len(BEGIN) : text.index(END)].strip()
    assert section == render_summary(root / "out")
    for expected in (
        "Machine:",
        "GFLOP/s fp32",
        "| din |",
        "| 200 |",
        "d=16",
        "p50 / p99",
        "| dare | 200 |",
        "Scaling with history length",
        "L=100",
    ):
        assert expected in section, expected
    assert section in result.stdout


@pytest.mark.slow
def test_failure_is_recorded_and_dataset_reused(suite, monkeypatch):
    """An unknown model fails train only: error record, exit 1, the rest written; the second
    run reuses the prepared dataset of the first."""
    root, md, _ = suite
    meta = root / "work" / "prepared" / "meta.json"
    mtime = meta.stat().st_mtime_ns
    quick = SuiteConfig.quick()
    bad = dataclasses.replace(quick, train_models=("no_such_model",), layout_model=None)
    monkeypatch.setattr(SuiteConfig, "quick", classmethod(lambda cls: bad))
    serve_before = (root / "out" / "serve.json").read_text()
    result = invoke(root, md, "--no-serve")
    assert result.exit_code == 1, result.output
    assert "failed: train" in result.stderr
    assert "reusing the dataset" in result.stderr and meta.stat().st_mtime_ns == mtime
    train = json.loads((root / "out" / "train.json").read_text())
    (rec,) = train["records"]
    assert "no_such_model" in rec["error"] and "no_such_model" in train["error"]
    data = json.loads((root / "out" / "data.json").read_text())
    assert data["dataset"]["reused"] is True and data["loader"][0]["samples_per_s"] > 0
    assert "error" not in json.loads((root / "out" / "search.json").read_text())
    assert (root / "out" / "serve.json").read_text() == serve_before  # --no-serve: untouched
    text = md.read_text()
    assert text.startswith(f"{HEAD}{BEGIN}\n") and text.endswith(f"{END}\n{TAIL}")
    assert "**train failed**" in text and "From an earlier run" in text


def test_markers_missing_appends_a_section(tmp_path):
    md = tmp_path / "B.md"
    md.write_text("# Title\n\nHand text.")
    update_benchmarks_md(md, "figures 1")
    assert md.read_text() == f"# Title\n\nHand text.\n\n{SECTION}\n\n{BEGIN}\nfigures 1\n{END}\n"
    update_benchmarks_md(md, "figures 2\n")
    assert md.read_text() == f"# Title\n\nHand text.\n\n{SECTION}\n\n{BEGIN}\nfigures 2\n{END}\n"
    assert [p.name for p in tmp_path.iterdir()] == ["B.md"]


def test_malformed_markers_leave_the_file_alone(tmp_path):
    md = tmp_path / "B.md"
    original = f"# Title\n{END}\ntext\n{BEGIN}\n"
    md.write_text(original)
    with pytest.raises(ValueError, match="expected one"):
        update_benchmarks_md(md, "figures")
    assert md.read_text() == original


def test_render_summary_without_results(tmp_path):
    assert "No results" in render_summary(tmp_path)
    (tmp_path / "search.json").write_text(json.dumps({"error": "boom", "machine": {}}))
    text = render_summary(tmp_path)
    assert "**search failed**: `boom`" in text and "**serve**: no result." in text
