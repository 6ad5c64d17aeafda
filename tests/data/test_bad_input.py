"""Bad input through the command line: one clear line naming file and line, exit 2, no output.

Every case runs `python -m longrec prepare ...` in a subprocess, exactly as a user would.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

GOOD_ROWS = [
    f"{u},{100 + 10 * u + i},7,pv,{1_511_000_000 + 60 * i}" for u in (1, 2, 3) for i in range(8)
]


def write_log(path: Path, bad: bytes | str | None = None, at: int = 3) -> Path:
    """A small Taobao log with `bad` as physical line `at`."""
    lines = [row.encode() for row in GOOD_ROWS]
    if bad is not None:
        lines.insert(at - 1, bad.encode() if isinstance(bad, str) else bad)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def assert_clean_failure(result, out: Path, *fragments: str) -> str:
    """Exit 2, exactly one line on stderr, no traceback, no output and no build directory."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("longrec: error: "), line
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*")), "left a build directory behind"
    return line


@pytest.mark.parametrize(
    ("bad", "fragments"),
    [
        ("1,100,7,pv", ["expected 5 columns, found 4"]),
        ("1,100,7,pv,1511000000,9", ["expected 5 columns, found 6"]),
        ("1,100,7,pv,yesterday", ["field 'ts'", "integer", '"yesterday"']),
        ("1,100,7,pv,1511000000.5", ["field 'ts'", "integer", '"1511000000.5"']),
        ("1,100,7,click,1511000000", ["field 'behavior'", "pv, buy, cart, fav", '"click"']),
        ("1,100,7,pv,", ["field 'ts'", "empty"]),
        (b"1,100,7,p\xe4v,1511000000", ["not valid UTF-8"]),
    ],
    ids=["too_few", "too_many", "ts_text", "ts_float", "behavior", "ts_empty", "non_utf8"],
)
def test_bad_row_names_file_and_line(tmp_path, run_cli, bad, fragments):
    log = write_log(tmp_path / "UserBehavior.csv", bad, at=3)
    out = tmp_path / "out"
    result = run_cli(
        "prepare", "taobao", "--input", log, "--out", out, "--protocol", "leave_one_out"
    )
    assert_clean_failure(result, out, f"{log}:3: ", *fragments)


def test_missing_file(tmp_path, run_cli):
    out = tmp_path / "out"
    missing = tmp_path / "nowhere.csv"
    result = run_cli("prepare", "taobao", "--input", missing, "--out", out)
    assert_clean_failure(result, out, str(missing), "no such file")


def test_empty_file(tmp_path, run_cli):
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    out = tmp_path / "out"
    result = run_cli("prepare", "taobao", "--input", empty, "--out", out)
    assert_clean_failure(result, out, str(empty), "empty")


def test_tmall_invalid_date(tmp_path, run_cli):
    log = tmp_path / "user_log_format1.csv"
    log.write_text(
        "user_id,item_id,cat_id,seller_id,brand_id,time_stamp,action_type\n"
        "1,2,3,4,5,1111,0\n"
        "1,3,3,4,5,1345,0\n"
    )
    out = tmp_path / "out"
    result = run_cli("prepare", "tmall", "--input", log, "--out", out)
    assert_clean_failure(result, out, f"{log}:3: ", "time_stamp", "1345")


def test_truncated_last_line_of_bundled_taobao(tmp_path, run_cli, taobao_sample):
    out = tmp_path / "taobao"
    result = run_cli("prepare", "taobao", "--input", taobao_sample, "--out", out)
    assert_clean_failure(result, out, f"{taobao_sample}:84476: ", "expected 5 columns, found 4")


def test_skip_counts_every_reason(tmp_path, run_cli):
    log = tmp_path / "log.csv"
    bad = {
        2: b"1,100,7,pv",
        5: b"1,100,7,pv,1511000000,5",
        7: b"2,100,7,pv,soon",
        9: b"2,100,7,cart,1511000000",  # fine: a behaviour type Taobao has
        11: b"2,100,7,clik,1511000000",
        13: b"3,100,7,p\xffv,1511000000",
        16: b"3,100,7,pv,",
        20: b"3,100,7,pv,1e9",
        23: b"3,100,7",
    }
    lines = [row.encode() for row in GOOD_ROWS]
    for at in sorted(bad):
        lines.insert(at - 1, bad[at])
    log.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    result = run_cli(
        "prepare", "taobao", "--input", log, "--out", out, "--protocol", "leave_one_out",
        "--on-bad-rows", "skip",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    meta = json.loads((out / "meta.json").read_text())
    rows = meta["rows"]
    assert rows["skipped_by_reason"] == {
        "bad_value:behavior": 1,
        "bad_value:ts": 2,
        "invalid_utf8": 1,
        "missing_columns": 2,
        "missing_value:ts": 1,
        "too_many_columns": 1,
    }
    assert rows["rows_skipped"] == 8
    assert rows["rows_read"] == len(GOOD_ROWS) + 9
    assert meta["store"]["rows"] == len(GOOD_ROWS) + 1
    first = rows["first_example_by_reason"]
    for reason, line in [
        ("missing_columns", 2),
        ("too_many_columns", 5),
        ("bad_value:ts", 7),
        ("bad_value:behavior", 11),
        ("invalid_utf8", 13),
        ("missing_value:ts", 16),
    ]:
        assert first[reason].startswith(f"{log}:{line}: "), (reason, first[reason])
    # the console says so: a progress line per reason and the summary table
    assert "skipped 2 bad rows (missing_columns)" in result.stderr
    assert "skipped 1 bad rows (invalid_utf8)" in result.stderr
    assert "8 skipped" in result.stdout
    assert "Traceback" not in result.stderr


def test_bundled_taobao_skip_and_behavior_filter(tmp_path, run_cli, taobao_sample):
    with open(taobao_sample, newline="") as f:
        parsed = list(csv.reader(f))
    complete = [r for r in parsed if len(r) == 5]
    assert len(parsed) == 84476 and len(complete) == 84475
    not_pv = sum(r[3] != "pv" for r in complete)
    out = tmp_path / "taobao"
    result = run_cli(
        "prepare", "taobao", "--input", taobao_sample, "--out", out, "--protocol", "dare",
        "--behaviors", "pv", "--min-len", "50", "--on-bad-rows", "skip",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    meta = json.loads((out / "meta.json").read_text())
    assert meta["rows"]["rows_read"] == 84476
    assert meta["rows"]["skipped_by_reason"] == {"missing_columns": 1}
    assert ":84476: " in meta["rows"]["first_example_by_reason"]["missing_columns"]
    assert meta["rows"]["rows_filtered"] == {"behavior not in {pv}": not_pv}
    assert meta["behaviors_kept"] == ["pv"]
    assert meta["store"]["rows"] == len(complete) - not_pv
    assert "1 skipped" in result.stdout and f"{not_pv:,} filtered" in result.stdout
    assert "skipped 1 bad rows (missing_columns)" in result.stderr


def test_behaviors_not_in_data(tmp_path, run_cli):
    log = write_log(tmp_path / "log.csv")
    out = tmp_path / "out"
    result = run_cli(
        "prepare", "taobao", "--input", log, "--out", out, "--behaviors", "buy", "--quiet"
    )
    assert_clean_failure(result, out, "--behaviors", "buy", "pv")


def test_protocol_without_samples_leaves_nothing(tmp_path, run_cli):
    log = write_log(tmp_path / "log.csv")
    out = tmp_path / "out"
    result = run_cli("prepare", "taobao", "--input", log, "--out", out, "--quiet")
    assert_clean_failure(result, out, "no samples", "--min-len")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["excel"], "unknown source 'excel'"),
        (["taobao", "--protocol", "random"], "unknown protocol 'random'"),
        (["taobao", "--on-bad-rows", "ignore"], "--on-bad-rows"),
        (["csv", "--columns", "user=a,item=b"], "missing required key(s) ts"),
        (["csv", "--columns", "user=0,item=1,ts=4,order=2"], "'order' cannot be a field name"),
    ],
)
def test_bad_options(tmp_path, run_cli, args, fragment):
    log = write_log(tmp_path / "log.csv")
    out = tmp_path / "out"
    result = run_cli("prepare", *args, "--input", log, "--out", out)
    assert_clean_failure(result, out, fragment)


def test_overwrite_semantics(tmp_path, run_cli):
    good = write_log(tmp_path / "good.csv")
    bad = write_log(tmp_path / "bad.csv", "1,100,7,pv", at=4)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    common = ["--out", out, "--protocol", "leave_one_out", "--quiet"]

    result = run_cli("prepare", "taobao", "--input", good, *common)
    assert result.returncode == 2 and "already exists" in result.stderr
    assert "--overwrite" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert (out / "keep.txt").read_text() == "precious"

    # --overwrite never deletes a folder longrec did not write
    result = run_cli("prepare", "taobao", "--input", good, *common, "--overwrite")
    assert result.returncode == 2 and "not something longrec wrote" in result.stderr
    assert (out / "keep.txt").read_text() == "precious"

    data = tmp_path / "data"
    common = ["--out", data, "--protocol", "leave_one_out", "--quiet"]
    assert run_cli("prepare", "taobao", "--input", good, *common).returncode == 0
    before = (data / "meta.json").read_text()
    result = run_cli("prepare", "taobao", "--input", bad, *common, "--overwrite")
    assert result.returncode == 2 and f"{bad}:4: " in result.stderr
    assert (data / "meta.json").read_text() == before, "a failed run touched the output"

    (data / "stale.txt").write_text("from the old dataset")
    result = run_cli("prepare", "taobao", "--input", good, *common, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert not (data / "stale.txt").exists()
    assert json.loads((data / "meta.json").read_text())["store"]["rows"] == len(GOOD_ROWS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv", "data", "good.csv", "out"]


def test_tab_delimiter_typed_as_backslash_t(tmp_path, run_cli):
    log = tmp_path / "log.txt"
    log.write_text(
        "uid\titem\twhen\n"
        + "".join(f"u{u}\ti{u}{i}\t{1000 + i}\n" for u in range(3) for i in range(5))
    )
    out = tmp_path / "out"
    result = run_cli(
        "prepare", "csv", "--input", log, "--out", out, "--protocol", "leave_one_out",
        "--columns", "user=uid,item=item,ts=when", "--delimiter", "\\t", "--quiet",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "meta.json").read_text())["store"]["rows"] == 15


def test_timestamps_out_of_range_and_duplicate_rows(tmp_path, run_cli):
    rows = [f"{u},{100 * u + i},7,pv,{1_511_000_000 + 10 * i}" for u in (1, 2) for i in range(6)]
    log = tmp_path / "log.csv"
    log.write_text("\n".join([*rows, rows[0], rows[1], "3,9,7,pv,99999999999999"]) + "\n")
    common = ["prepare", "taobao", "--input", log, "--protocol", "leave_one_out", "--quiet"]
    r = run_cli(*common, "--out", tmp_path / "a")
    assert r.returncode == 2 and f"{log}:15: field 'ts': expected unix seconds" in r.stderr
    r = run_cli(*common, "--out", tmp_path / "b", "--on-bad-rows", "skip")
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "b" / "meta.json").read_text())
    assert meta["rows"]["skipped_by_reason"] == {"bad_value:ts": 1}
    assert meta["rows"]["duplicate_rows"] == 2 and meta["store"]["rows"] == 14  # kept
    r = run_cli(*common, "--out", tmp_path / "c", "--on-bad-rows", "skip", "--duplicates", "drop")
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    assert meta["rows"]["duplicate_rows"] == 2 and meta["store"]["rows"] == 12
    assert meta["rows"]["rows_filtered"] == {"exact duplicate row": 2}


def test_a_huge_bad_field_is_echoed_short(tmp_path, run_cli):
    log = tmp_path / "log.csv"
    rows = [f"1,{100 + i},7,pv,{1_511_000_000 + i}" for i in range(5)]
    log.write_text("\n".join([*rows, "1,1,7,pv," + "9" * 50 + "x" * 5_000_000]) + "\n")
    r = run_cli("prepare", "taobao", "--input", log, "--out", tmp_path / "o", "--quiet",
                "--protocol", "leave_one_out")  # fmt: skip
    assert r.returncode == 2 and len(r.stderr) < 500, r.stderr[:1000]
    assert "characters" in r.stderr
