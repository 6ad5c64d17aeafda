"""Each reader on small files: the canonical `behaviors` table, fields, options, bad rows."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from longrec.data.sources import SourceOptions, get_source, parse_column_map
from longrec.data.sources.base import LoadedSource
from longrec.errors import DataError, UserError


def load(source: str, path: Path, scratch: Path, **options) -> tuple[LoadedSource, list[dict]]:
    """Run one reader; return what it declared and the behaviours table in file order."""
    con = duckdb.connect()
    loaded = get_source(source).load(con, Path(path), SourceOptions(**options), scratch)
    result = con.execute(f"SELECT * FROM {loaded.behaviors} ORDER BY ord")
    names = [d[0] for d in result.description]
    rows = [dict(zip(names, r, strict=True)) for r in result.fetchall()]
    con.close()
    return loaded, rows


def fields_of(loaded: LoadedSource) -> dict[str, tuple[str, bool]]:
    return {f.name: (f.side, f.multi) for f in loaded.fields}


def day(year: int, month: int, d: int) -> int:
    return int(datetime(year, month, d, tzinfo=UTC).timestamp())


# ---------------------------------------------------------------------------------- taobao


def test_taobao_reads_canonical_columns_in_file_order(tmp_path):
    path = tmp_path / "UserBehavior.csv"
    path.write_text(
        "1,2268318,2520377,pv,1511544070\n"
        "1,2333346,2520771,cart,1511561733\n"
        "2,2576651,149192,buy,1511572885\n"
        "1,3830808,4181361,fav,1511593493\n"
    )
    loaded, rows = load("taobao", path, tmp_path)
    assert [r["ord"] for r in rows] == [0, 1, 2, 3]
    assert rows[1] == {
        "ord": 1,
        "user": 1,
        "item": 2333346,
        "category": 2520771,
        "behavior": "cart",
        "ts": 1511561733,
    }
    assert [r["behavior"] for r in rows] == ["pv", "cart", "buy", "fav"]
    assert fields_of(loaded) == {
        "item": ("item", False),
        "category": ("item", False),
        "behavior": ("event", False),
    }
    assert loaded.report.rows_read == 4 and loaded.report.total_skipped == 0
    assert loaded.inputs == [str(path)]


def test_taobao_header_option_and_blank_lines(tmp_path):
    path = tmp_path / "with_header.csv"
    path.write_text("user,item,cat,type,ts\n\n1,10,5,pv,100\n\n2,11,5,buy,200\n")
    _, rows = load("taobao", path, tmp_path, header="yes")
    assert [(r["user"], r["item"], r["ts"]) for r in rows] == [(1, 10, 100), (2, 11, 200)]
    # without --header yes, the header line is a bad row, located at line 1
    with pytest.raises(DataError) as err:
        load("taobao", path, tmp_path)
    assert err.value.line == 1


@pytest.mark.parametrize(
    ("bad_line", "reason", "words"),
    [
        ("1,10,5,pv", "missing_columns", ["expected 5 columns, found 4"]),
        ("1,10,5,pv,100,7", "too_many_columns", ["expected 5 columns, found 6"]),
        ("1,10,5,pv,noon", "bad_value:ts", ["'ts'", "integer", '"noon"']),
        ("1,10,5,pv,1511544070.5", "bad_value:ts", ["'ts'", "integer", '"1511544070.5"']),
        ("1,10,5,pv,1.5e9", "bad_value:ts", ["'ts'", '"1.5e9"']),
        ("1.5,10,5,pv,100", "bad_value:user", ["'user'", '"1.5"']),
        ("1,10,5,click,100", "bad_value:behavior", ["'behavior'", "pv", '"click"']),
        ("1,10,5,PV,100", "bad_value:behavior", ["'behavior'", '"PV"']),
        ("1,10,5,pv,", "missing_value:ts", ["'ts'", "empty"]),
        (",10,5,pv,100", "missing_value:user", ["'user'", "empty"]),
        ("1,10,5,,100", "missing_value:behavior", ["'behavior'", "empty"]),
    ],
)
def test_taobao_bad_row_is_located_or_skipped(tmp_path, bad_line, reason, words):
    good = [f"1,{10 + i},5,pv,{100 + i}" for i in range(4)]
    path = tmp_path / "log.csv"
    path.write_text("\n".join([*good[:2], bad_line, *good[2:]]) + "\n")
    with pytest.raises(DataError) as err:
        load("taobao", path, tmp_path)
    assert err.value.line == 3
    assert str(err.value).startswith(f"{path}:3: ")
    for word in words:
        assert word in str(err.value)
    loaded, rows = load("taobao", path, tmp_path, on_bad_rows="skip")
    assert loaded.report.skipped == {reason: 1}
    assert loaded.report.first_example[reason].startswith(f"{path}:3: ")
    assert loaded.report.rows_read == 5
    assert [r["item"] for r in rows] == [10, 11, 12, 13]
    # `ord` keeps file order (it may have gaps where rows were dropped)
    ords = [r["ord"] for r in rows]
    assert ords == sorted(set(ords))


def test_taobao_skip_reports_every_reason_and_first_line(tmp_path):
    lines = [
        "1,10,5,pv,100",
        "1,10,5,pv",  # 2
        "1,10,5,pv,x",  # 3
        "1,11,5,pv,101",
        "1,10,5,xx,1",  # 5
        "1,10,5,pv,y",  # 6
        "1,10,5,pv,1,2",  # 7
        "1,12,5,pv",  # 8
    ]
    path = tmp_path / "log.csv"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        load("taobao", path, tmp_path)
    assert err.value.line == 2  # the first bad row wins, whatever its kind
    loaded, rows = load("taobao", path, tmp_path, on_bad_rows="skip")
    assert loaded.report.skipped == {
        "missing_columns": 2,
        "bad_value:ts": 2,
        "bad_value:behavior": 1,
        "too_many_columns": 1,
    }
    examples = loaded.report.first_example
    assert examples["missing_columns"].startswith(f"{path}:2:")
    assert examples["bad_value:ts"].startswith(f"{path}:3:")
    assert examples["bad_value:behavior"].startswith(f"{path}:5:")
    assert examples["too_many_columns"].startswith(f"{path}:7:")
    assert [r["item"] for r in rows] == [10, 11]


def test_line_numbers_count_blank_and_crlf_lines(tmp_path):
    path = tmp_path / "log.csv"
    # DuckDB's own reject table misplaces ENUM errors followed by blank lines
    path.write_text("1,10,5,pv,100\n\n1,11,5,click,101\n\n\n1,12,5,pv,102\n")
    with pytest.raises(DataError) as err:
        load("taobao", path, tmp_path)
    assert err.value.line == 3
    crlf = tmp_path / "crlf.csv"
    crlf.write_bytes(b"1,10,5,pv,100\r\n\r\n1,11,5,pv,10x\r\n1,12,5,pv\r\n")
    with pytest.raises(DataError) as err:
        load("taobao", crlf, tmp_path)
    assert err.value.line == 3 and '"10x"' in str(err.value)
    loaded, _ = load("taobao", crlf, tmp_path, on_bad_rows="skip")
    assert loaded.report.first_example["missing_columns"].startswith(f"{crlf}:4:")


def test_invalid_utf8_line_is_located_and_later_lines_stay_correct(tmp_path):
    path = tmp_path / "log.csv"
    path.write_bytes(
        b"1,10,5,pv,100\n1,11,5,p\xe9v,101\n1,12,5,pv,102\n1,13,5,pv,1.5\n1,14,5,pv,104\n"
    )
    with pytest.raises(DataError) as err:
        load("taobao", path, tmp_path)
    assert err.value.line == 2 and "UTF-8" in str(err.value)
    loaded, rows = load("taobao", path, tmp_path, on_bad_rows="skip")
    assert loaded.report.skipped == {"invalid_utf8": 1, "bad_value:ts": 1}
    # a later bad row is still named by its physical line
    assert loaded.report.first_example["bad_value:ts"].startswith(f"{path}:4:")
    assert [r["item"] for r in rows] == [10, 12, 14]


def test_missing_empty_and_header_only_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load("taobao", tmp_path / "absent.csv", tmp_path)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        load("taobao", empty, tmp_path)
    with pytest.raises(DataError, match="directory"):
        load("taobao", tmp_path, tmp_path)
    only_bad = tmp_path / "bad.csv"
    only_bad.write_text("1,2,3,pv\n")
    with pytest.raises(DataError, match="no data rows"):
        load("taobao", only_bad, tmp_path, on_bad_rows="skip")


# ----------------------------------------------------------------------------------- tmall

TMALL_HEADER = "user_id,item_id,cat_id,seller_id,brand_id,time_stamp,action_type\n"


def test_tmall_dates_actions_and_fields(tmp_path):
    path = tmp_path / "user_log_format1.csv"
    path.write_text(
        TMALL_HEADER
        + "328862,323294,833,2882,2661,829,0\n"
        + "328862,844400,1271,2882,2661,0829,1\n"
        + "328862,575153,1271,2882,,1111,2\n"
        + "234512,575153,1271,2882,2661,101,3\n"
    )
    loaded, rows = load("tmall", path, tmp_path)
    assert [r["behavior"] for r in rows] == ["click", "cart", "buy", "fav"]
    assert [r["ts"] for r in rows] == [
        day(2015, 8, 29),
        day(2015, 8, 29),
        day(2015, 11, 11),
        day(2015, 1, 1),
    ]
    assert rows[0]["user"] == 328862 and rows[0]["item"] == 323294 and rows[0]["category"] == 833
    assert rows[0]["seller"] == 2882 and rows[2]["brand"] is None  # brand_id may be empty
    assert fields_of(loaded) == {
        "item": ("item", False),
        "category": ("item", False),
        "seller": ("item", False),
        "brand": ("item", False),
        "behavior": ("event", False),
    }
    assert loaded.notes["year"] == 2015
    _, rows16 = load("tmall", path, tmp_path, year=2016)
    assert rows16[0]["ts"] == day(2016, 8, 29)


@pytest.mark.parametrize("stamp", ["1345", "0230", "0229", "1301", "0000", "11111", "-511"])
def test_tmall_invalid_date_is_a_bad_row_with_its_line(tmp_path, stamp):
    path = tmp_path / "log.csv"
    path.write_text(
        TMALL_HEADER + "1,2,3,4,5,511,0\n" + f"1,3,3,4,5,{stamp},0\n" + "1,4,3,4,5,512,0\n"
    )
    with pytest.raises(DataError) as err:
        load("tmall", path, tmp_path)
    assert err.value.line == 3
    assert "time_stamp" in str(err.value) and f"got {int(stamp)}" in str(err.value)
    loaded, rows = load("tmall", path, tmp_path, on_bad_rows="skip")
    assert loaded.report.skipped == {"bad_value:time_stamp": 1}
    assert [r["item"] for r in rows] == [2, 4]


def test_tmall_leap_day_depends_on_year(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text(TMALL_HEADER + "1,2,3,4,5,229,0\n")
    with pytest.raises(DataError, match="2015"):
        load("tmall", path, tmp_path)
    _, rows = load("tmall", path, tmp_path, year=2016)
    assert rows[0]["ts"] == day(2016, 2, 29)


def test_tmall_unknown_action_type(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text(TMALL_HEADER + "1,2,3,4,5,511,0\n1,2,3,4,5,511,4\n")
    with pytest.raises(DataError) as err:
        load("tmall", path, tmp_path)
    assert err.value.line == 3 and "action_type" in str(err.value) and '"4"' in str(err.value)


# ------------------------------------------------------------------------------- movielens


def test_movielens_csv_layout(tmp_path):
    folder = tmp_path / "ml-latest-small"
    folder.mkdir()
    (folder / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n"
        "1,1,4.0,964982703\n"
        "1,3,4.5,964981247\n"
        "2,99,0.5,964982224\n"
    )
    (folder / "movies.csv").write_text(
        "movieId,title,genres\n"
        "1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy\n"
        '3,"American President, The (1995)",Comedy|Drama|Romance\n'
        "7,Unrated (2000),(no genres listed)\n"
    )
    for given in (folder, folder / "ratings.csv"):
        loaded, rows = load("movielens", given, tmp_path)
        assert [(r["user"], r["item"], r["ts"]) for r in rows] == [
            (1, 1, 964982703),
            (1, 3, 964981247),
            (2, 99, 964982224),
        ]
        assert [r["behavior"] for r in rows] == ["4.0", "4.5", "0.5"]
        assert rows[0]["genres"] == ["Adventure", "Animation", "Children", "Comedy", "Fantasy"]
        assert rows[0]["category"] == "Adventure"
        assert rows[1]["genres"] == ["Comedy", "Drama", "Romance"]  # quoted title with a comma
        assert rows[2]["genres"] is None and rows[2]["category"] is None  # no such movie
        assert loaded.notes == {"format": "csv", "ratings_without_movie": 1}
        assert fields_of(loaded) == {
            "item": ("item", False),
            "category": ("item", False),
            "genres": ("item", True),
            "behavior": ("event", False),
        }
        assert len(loaded.inputs) == 2


def test_movielens_dat_layout_with_latin1_movies(tmp_path):
    folder = tmp_path / "ml-1m"
    folder.mkdir()
    (folder / "ratings.dat").write_text(
        "1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n"
    )
    # ML-1M's movies.dat is Latin-1 (e.g. "Amélie"); a made-up accented genre proves the decoding
    (folder / "movies.dat").write_bytes(
        "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
        "661::Amélie (2001)::Comédie|Romance\n".encode("latin-1")
    )
    loaded, rows = load("movielens", folder, tmp_path)
    assert [(r["user"], r["item"], r["ts"], r["behavior"]) for r in rows] == [
        (1, 1193, 978300760, "5.0"),
        (1, 661, 978302109, "3.0"),
        (2, 1193, 978298413, "4.0"),
    ]
    assert rows[1]["genres"] == ["Comédie", "Romance"]
    assert rows[1]["category"] == "Comédie"
    assert loaded.notes["format"] == "dat"


def test_movielens_without_movies_file_and_bad_rating(tmp_path):
    folder = tmp_path / "ml"
    folder.mkdir()
    (folder / "ratings.dat").write_text("1::10::5::978300760\n1::11::five::978300761\n")
    with pytest.raises(DataError) as err:
        load("movielens", folder, tmp_path)
    assert err.value.line == 2 and "rating" in str(err.value)
    loaded, rows = load("movielens", folder, tmp_path, on_bad_rows="skip")
    assert fields_of(loaded) == {"item": ("item", False), "behavior": ("event", False)}
    assert len(rows) == 1 and "missing" in loaded.notes["movies_file"]
    with pytest.raises(DataError, match="no ratings"):
        load("movielens", tmp_path, tmp_path)


# ------------------------------------------------------------------------------ csv, parquet


def test_csv_column_map_by_names_with_extra_field(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text(
        "uid,iid,time,cat,act,price,ignored\n"
        "u1,i1,100,c1,click,5,x\n"
        "u1,i2,101,c2,buy,7,y\n"
        "u2,i1,102,c1,click,5,z\n"
    )
    columns = parse_column_map("user=uid,item=iid,ts=time,category=cat,behavior=act,price=price")
    loaded, rows = load("csv", path, tmp_path, columns=columns)
    assert rows[1] == {
        "ord": 1,
        "user": "u1",
        "item": "i2",
        "ts": 101,
        "category": "c2",
        "behavior": "buy",
        "price": "7",
    }
    assert fields_of(loaded) == {
        "item": ("item", False),
        "category": ("item", False),
        "price": ("item", False),
        "behavior": ("event", False),
    }


def test_csv_column_map_by_positions_without_header(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("7,u1,i1,100\n8,u1,i2,101\n")
    columns = parse_column_map("user=1,item=2,ts=3,extra=0")
    loaded, rows = load("csv", path, tmp_path, columns=columns)
    assert [(r["user"], r["item"], r["ts"], r["extra"]) for r in rows] == [
        ("u1", "i1", 100, "7"),
        ("u1", "i2", 101, "8"),
    ]
    assert "extra" in fields_of(loaded)


@pytest.mark.parametrize(
    ("text", "header", "n_rows"),
    [
        ("a,b,time\nu1,i1,100\nu2,i2,101\n", "auto", 2),  # "time" is no integer: a header
        ("u1,i1,100\nu2,i2,101\n", "auto", 2),  # an integer time: no header
        ("a,b,100\nu1,i1,100\nu2,i2,101\n", "yes", 2),  # forced header
        ("u1,i1,100\nu2,i2,101\n", "no", 2),
    ],
)
def test_csv_header_detection(tmp_path, text, header, n_rows):
    path = tmp_path / "log.csv"
    path.write_text(text)
    _, rows = load(
        "csv", path, tmp_path, columns=parse_column_map("user=0,item=1,ts=2"), header=header
    )
    assert len(rows) == n_rows and rows[0]["user"] == "u1" and rows[-1]["ts"] == 101


def test_csv_header_names_without_column_map(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("user,item,ts,category\nu1,i1,100,c\n")
    _, rows = load("csv", path, tmp_path)
    assert rows == [{"ord": 0, "user": "u1", "item": "i1", "ts": 100, "category": "c"}]
    bad = tmp_path / "bad.csv"
    bad.write_text("uid,item,ts\nu1,i1,100\n")
    with pytest.raises(DataError, match="lacks user") as err:
        load("csv", bad, tmp_path)
    assert err.value.line == 1
    with pytest.raises(DataError, match="'when'"):
        load("csv", path, tmp_path, columns=parse_column_map("user=user,item=item,ts=when"))
    with pytest.raises(UserError, match="positions"):
        load("csv", path, tmp_path, header="no")


def test_csv_with_byte_order_mark(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbfuid,iid,time\nu1,i1,100\n")
    _, rows = load("csv", path, tmp_path, columns=parse_column_map("user=uid,item=iid,ts=time"))
    assert rows == [{"ord": 0, "user": "u1", "item": "i1", "ts": 100}]


def test_csv_delimiters(tmp_path):
    tsv = tmp_path / "log.tsv"
    tsv.write_text("user\titem\tts\nu1\ti,1\t100\nu2\ti2\t101\n")
    _, rows = load("csv", tsv, tmp_path)  # .tsv means tab
    assert [r["item"] for r in rows] == ["i,1", "i2"]
    txt = tmp_path / "log.txt"
    txt.write_text(tsv.read_text())
    _, rows = load("csv", txt, tmp_path, delimiter="\t")
    assert [r["item"] for r in rows] == ["i,1", "i2"]
    semi = tmp_path / "semi.csv"
    semi.write_text("u1;i1;100\nu2;i2;101\n")
    _, rows = load(
        "csv", semi, tmp_path, delimiter=";", columns=parse_column_map("user=0,item=1,ts=2")
    )
    assert [r["user"] for r in rows] == ["u1", "u2"]
    dat = tmp_path / "log.dat"
    dat.write_text("u1::i1::100\nu2::i2::101\n")
    _, rows = load(
        "csv", dat, tmp_path, delimiter="::", columns=parse_column_map("user=0,item=1,ts=2")
    )
    assert [(r["user"], r["ts"]) for r in rows] == [("u1", 100), ("u2", 101)]


def test_csv_bad_rows(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("user,item,ts\nu1,i1,100\nu1,,101\nu1,i2,10.5\nu1,i3\n")
    with pytest.raises(DataError) as err:
        load("csv", path, tmp_path)
    assert err.value.line == 3 and "item" in str(err.value)
    loaded, rows = load("csv", path, tmp_path, on_bad_rows="skip")
    assert loaded.report.skipped == {
        "missing_value:item": 1,
        "bad_value:ts": 1,
        "missing_columns": 1,
    }
    assert loaded.report.first_example["bad_value:ts"].startswith(f"{path}:4:")
    assert len(rows) == 1


def test_parse_column_map_errors():
    assert parse_column_map(None) is None
    assert parse_column_map(" user = a , item=b,ts=c ") == {"user": "a", "item": "b", "ts": "c"}
    with pytest.raises(UserError, match="missing required"):
        parse_column_map("user=a,item=b")
    with pytest.raises(UserError, match="key=column"):
        parse_column_map("user=a,item,ts=c")


@pytest.mark.parametrize("name", ["order", "sub-cat", "offsets", "label", "2nd"])
def test_field_names_must_be_plain_identifiers(tmp_path, name):
    with pytest.raises(UserError, match="cannot be a field name"):
        parse_column_map(f"user=a,item=b,ts=c,{name}=d")
    path = tmp_path / "log.csv"
    path.write_text(f"user,item,ts,{name}\nu1,i1,100,x\n")
    with pytest.raises(UserError, match="cannot be a field name"):
        load("csv", path, tmp_path)


def test_parquet_with_column_map(tmp_path):
    path = tmp_path / "log.parquet"
    pq.write_table(
        pa.table(
            {
                "uid": pa.array([7, 7, 8], pa.int64()),
                "iid": ["a", "b", "a"],
                "time": pa.array([5, 3, 4], pa.int32()),
                "cat": ["x", "y", "x"],
                "kind": ["pv", "buy", "pv"],
                "unused": [1.0, 2.0, 3.0],
            }
        ),
        path,
    )
    columns = parse_column_map("user=uid,item=iid,ts=time,category=cat,behavior=kind")
    loaded, rows = load("parquet", path, tmp_path, columns=columns)
    assert rows == [
        {"ord": 0, "user": 7, "item": "a", "ts": 5, "category": "x", "behavior": "pv"},
        {"ord": 1, "user": 7, "item": "b", "ts": 3, "category": "y", "behavior": "buy"},
        {"ord": 2, "user": 8, "item": "a", "ts": 4, "category": "x", "behavior": "pv"},
    ]
    assert fields_of(loaded) == {
        "item": ("item", False),
        "category": ("item", False),
        "behavior": ("event", False),
    }
    with pytest.raises(DataError, match="'nope'"):
        load("parquet", path, tmp_path, columns=parse_column_map("user=uid,item=iid,ts=nope"))
    with pytest.raises(DataError, match="no 'user' column"):
        load("parquet", path, tmp_path)


def test_parquet_timestamps_and_nulls(tmp_path):
    path = tmp_path / "log.parquet"
    when = [datetime(2020, 1, 1, tzinfo=UTC), datetime(2020, 1, 2, tzinfo=UTC), None]
    pq.write_table(
        pa.table(
            {
                "user": ["u1", "u1", "u2"],
                "item": ["a", "b", "c"],
                "ts": pa.array(when, pa.timestamp("s", tz="UTC")),
            }
        ),
        path,
    )
    with pytest.raises(DataError, match="row 3"):
        load("parquet", path, tmp_path)
    loaded, rows = load("parquet", path, tmp_path, on_bad_rows="skip")
    assert [r["ts"] for r in rows] == [day(2020, 1, 1), day(2020, 1, 2)]
    assert loaded.report.skipped == {"missing_value:ts": 1}
    text = tmp_path / "text.parquet"
    pq.write_table(pa.table({"user": ["u"], "item": ["i"], "ts": ["yesterday"]}), text)
    with pytest.raises(DataError, match="integer unix seconds"):
        load("parquet", text, tmp_path)
    not_parquet = tmp_path / "fake.parquet"
    not_parquet.write_text("user,item,ts\n")
    with pytest.raises(DataError, match="Parquet"):
        load("parquet", not_parquet, tmp_path)


def test_unknown_source():
    with pytest.raises(UserError, match="unknown source"):
        get_source("excel")
