"""source -> vocabularies + SequenceStore + samples + meta.json, written atomically.

The heavy relational work (parsing, vocabularies, the (user, ts) sort of up to ~100M rows) runs
in DuckDB with a memory limit and an on-disk working database, so memory stays bounded; the
protocols then run vectorised in numpy over the memory-mapped store. Everything is built in a
temporary directory beside the output and renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import numpy as np

from longrec import __version__
from longrec.data.dataset import compute_fingerprint
from longrec.data.impressions import fetch_impressions, impression_samples
from longrec.data.protocols import (
    SPLITS,
    NegativeSampler,
    ProtocolConfig,
    dare_positives,
    leave_one_out_positives,
    time_split_positives,
)
from longrec.data.samples import (
    SampleSet,
    add_item_fields,
    from_positives,
    split_stats,
    write_split,
)
from longrec.data.schema import FORMAT_VERSION, UNSEEN, USER, FieldSpec
from longrec.data.sources import FieldDecl, LoadedSource, SourceOptions, get_source
from longrec.data.store import SequenceStore, StoreWriter
from longrec.data.vocab import build_vocab, encode_sql, pad_lists
from longrec.errors import UserError
from longrec.faults import fault_point
from longrec.outputs import check_replaceable, replace_dir, temp_path, write_marker, writer_lock

_FETCH_ROWS = 1 << 20


@dataclass
class PrepareConfig:
    source: str
    input: Path
    out: Path
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    source_options: SourceOptions = field(default_factory=SourceOptions)
    behaviors: tuple[str, ...] | None = None  # keep only these behaviour types (e.g. DARE: pv)
    duplicates: str = "keep"  # exact duplicate rows: keep (counted) | drop (all but the first)
    min_count: int = 1  # values of item-side fields rarer than this map to "unseen"
    max_multi: int = 16  # width of multi-valued fields (longer lists are cut)
    overwrite: bool = False
    memory_limit: str = "4GB"  # DuckDB's budget; the rest spills to the build directory
    threads: int | None = None
    quiet: bool = False


class _Log:
    def __init__(self, quiet: bool):
        self.quiet, self.t0 = quiet, time.perf_counter()

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(
                f"[prepare {time.perf_counter() - self.t0:7.1f}s] {msg}",
                file=sys.stderr,
                flush=True,
            )


def prepare(cfg: PrepareConfig) -> dict:
    """Build the prepared dataset at `cfg.out`; return its meta.json content."""
    protocol = cfg.protocol.resolved()
    out = Path(cfg.out)
    if cfg.duplicates not in ("keep", "drop"):
        raise UserError(f"--duplicates must be keep or drop, not {cfg.duplicates!r}")
    check_replaceable(out, "dataset", cfg.overwrite)
    source = get_source(cfg.source)
    if protocol.name == "impressions" and cfg.source != "synth":
        raise UserError("--protocol impressions needs a source with an impression table (synth)")
    with writer_lock(out):
        check_replaceable(out, "dataset", cfg.overwrite)  # it may have appeared meanwhile
        return _prepare_locked(cfg, protocol, source, out)


def _prepare_locked(cfg: PrepareConfig, protocol, source, out: Path) -> dict:
    build = temp_path(out)
    shutil.rmtree(build, ignore_errors=True)
    work = build / ".work"
    work.mkdir(parents=True)
    log = _Log(cfg.quiet)
    stack = contextlib.ExitStack()
    ctrl_c: list[bool] = []
    try:
        # in-memory database: tables spill to temp_directory beyond memory_limit, and nothing
        # is written to (and compressed into) a database file that is deleted afterwards
        con = duckdb.connect()
        ctrl_c = stack.enter_context(_ctrl_c_interrupts(con))
        con.execute(f"SET memory_limit = '{cfg.memory_limit}'")
        con.execute(f"SET temp_directory = '{work / 'spill'}'")
        con.execute("SET preserve_insertion_order = true")
        con.execute("SET enable_progress_bar = false")
        if cfg.threads:
            con.execute(f"SET threads = {int(cfg.threads)}")
        loaded = source.load(con, Path(cfg.input), cfg.source_options, work)
        log(f"read {loaded.report.rows_read:,} rows from {', '.join(loaded.inputs)}")
        for line in loaded.report.summary_lines():
            log(line)
        _filter_behaviors(con, loaded, cfg.behaviors)
        _duplicate_rows(con, loaded, cfg.duplicates, log)
        meta = _build(con, loaded, cfg, protocol, build, log)
        con.close()
        shutil.rmtree(work)
        meta["fingerprint"] = compute_fingerprint(build, meta)
        (build / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        write_marker(build, "dataset")
        fault_point("prepare-before-rename")
        replace_dir(build, out)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        if ctrl_c:  # DuckDB reports the interrupted query as one of its own errors
            raise KeyboardInterrupt from None
        raise
    finally:
        stack.close()
    log(f"wrote {out}")
    return meta


@contextlib.contextmanager
def _ctrl_c_interrupts(con) -> Iterator[list[bool]]:
    """Make Ctrl-C stop a running DuckDB query: with Python's default handler DuckDB swallows
    SIGINT and the query (minutes on a large log) runs on. The handler interrupts the query
    and raises KeyboardInterrupt, so the build folder is removed and nothing is written."""
    pressed: list[bool] = []
    if threading.current_thread() is not threading.main_thread():
        yield pressed
        return

    def handler(signum, frame):
        pressed.append(True)
        con.interrupt()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield pressed
    finally:
        signal.signal(signal.SIGINT, previous)


def _duplicate_rows(con, loaded: LoadedSource, policy: str, log) -> None:
    """Count rows identical in every field (a log exported twice, a retried write) and, with
    `drop`, keep only the first of each; the count goes to meta.json either way."""
    cols = [r[0] for r in con.execute("DESCRIBE behaviors").fetchall() if r[0] != "ord"]
    listed = ", ".join(f'"{c}"' for c in cols)
    total = con.execute("SELECT count(*) FROM behaviors").fetchone()[0]
    distinct = con.execute(f"SELECT count(*) FROM (SELECT DISTINCT {listed} FROM behaviors)")
    n = int(total - distinct.fetchone()[0])
    loaded.report.duplicates = n
    if not n:
        return
    if policy == "drop":
        con.execute(
            f"""CREATE OR REPLACE TABLE behaviors AS SELECT * FROM behaviors
                QUALIFY row_number() OVER (PARTITION BY {listed} ORDER BY ord) = 1
                ORDER BY ord"""
        )
        loaded.report.add_filtered("exact duplicate row", n)
    log(f"{n:,} rows repeat an earlier row exactly ({'dropped' if policy == 'drop' else 'kept'})")


def _filter_behaviors(con, loaded: LoadedSource, keep: tuple[str, ...] | None) -> None:
    if not keep:
        return
    names = {f.name for f in loaded.fields}
    if "behavior" not in names:
        raise UserError(f"--behaviors given, but source '{loaded.behaviors}' has no behaviour type")
    present = {r[0] for r in con.execute("SELECT DISTINCT behavior FROM behaviors").fetchall()}
    unknown = [b for b in keep if b not in present]
    if unknown:
        raise UserError(
            f"--behaviors: {', '.join(unknown)} not in the data (it has {', '.join(sorted(map(str, present)))})"
        )
    listed = ", ".join("'" + b.replace("'", "''") + "'" for b in keep)
    # rows without a behaviour type are not of a kept type either (NOT IN is NULL for them)
    drop = f"behavior IS NULL OR behavior NOT IN ({listed})"
    n = con.execute(f"SELECT count(*) FROM behaviors WHERE {drop}").fetchone()[0]
    con.execute(f"DELETE FROM behaviors WHERE {drop}")
    loaded.report.add_filtered(f"behavior not in {{{', '.join(keep)}}}", int(n))
    if con.execute("SELECT count(*) FROM behaviors").fetchone()[0] == 0:
        raise UserError("no behaviours left after --behaviors")


def _build(
    con, loaded: LoadedSource, cfg: PrepareConfig, protocol: ProtocolConfig, build: Path, log
) -> dict:
    vocab_dir = build / "vocab"
    imp = loaded.impressions
    imp_cols = set()
    if imp:
        imp_cols = {r[0] for r in con.execute(f"DESCRIBE {imp}").fetchall()}
    n_users = build_vocab(
        con, USER, [("behaviors", USER)] + ([(imp, USER)] if imp else []), vocab_dir
    )
    specs: list[FieldSpec] = []
    for decl in loaded.fields:
        srcs = [("behaviors", decl.name)] + ([(imp, decl.name)] if decl.name in imp_cols else [])
        min_count = cfg.min_count if decl.side == "item" else 1
        size = build_vocab(con, decl.name, srcs, vocab_dir, multi=decl.multi, min_count=min_count)
        width = _multi_width(con, decl, cfg.max_multi) if decl.multi else 1
        specs.append(FieldSpec(decl.name, size, decl.side, width))
    log(
        "vocabularies: "
        + ", ".join(f"{s.name} {s.vocab_size:,}" for s in [FieldSpec(USER, n_users), *specs])
    )

    store = _write_store(con, loaded.fields, specs, n_users, build, log)
    impressions = fetch_impressions(con, loaded, specs, imp_cols, vocab_dir) if imp else None
    con.close()  # release DuckDB's memory before the numpy phase
    item_tables = _item_tables(store, specs)
    notes: dict = {}
    if impressions is not None:
        samples = impression_samples(impressions, item_tables, store, protocol, notes)
    else:
        samples = _behavior_samples(store, specs, protocol, notes)
    add_item_fields(samples, {s.name: item_tables[s.name] for s in specs if s.name in item_tables})
    for name, cols in samples.splits.items():
        write_split(build / "samples" / f"{name}.parquet", cols)
    for name, cols in samples.truth.items():
        write_split(build / "truth" / f"{name}.parquet", cols)
    items_dir = build / "items"
    items_dir.mkdir()
    for name, table in item_tables.items():
        np.save(items_dir / f"{name}.npy", table)
    stats = {
        name: split_stats(cols, store.offsets, protocol.max_len)
        for name, cols in samples.splits.items()
    }
    for name in SPLITS:
        s = stats[name]
        if s["samples"]:
            log(
                f"{name}: {s['samples']:,} samples, {s['users']:,} users, positive rate {s['positive_rate']:.3f}"
            )
        else:
            log(f"{name}: no samples")
    if sum(s["samples"] for s in stats.values()) == 0:
        raise UserError(
            "the protocol made no samples (too few behaviours per user? for dare, lower --min-len)"
        )
    lengths = store.lengths()[2:]
    lengths = lengths[lengths > 0]
    q = [0, 50, 90, 99, 100]
    return {
        "format_version": FORMAT_VERSION,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "longrec_version": __version__,
        "source": {
            "name": cfg.source,
            "inputs": loaded.inputs,
            "options": _jsonable(asdict(cfg.source_options)),
            "notes": _jsonable(loaded.notes),
        },
        "rows": loaded.report.to_json(),
        "behaviors_kept": list(cfg.behaviors) if cfg.behaviors else None,
        "min_count": cfg.min_count,
        "protocol": asdict(protocol),
        "protocol_notes": _jsonable(notes),
        "targets_dropped": samples.dropped,
        "seed": protocol.seed,
        "n_users": n_users,
        "fields": [s.to_json() for s in specs],
        "target_fields": sorted(
            samples.splits["train"].keys()
            - {"user", "hist_end", "target_ts", "label", "request_id"}
        ),
        "store": {
            "rows": store.n_rows,
            "users_with_history": len(lengths),
            "user_history_len_percentiles": dict(
                zip(map(str, q), np.percentile(lengths, q).round(1).tolist(), strict=True)
            )
            if len(lengths)
            else {},
        },
        "splits": stats,
    }


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


def _multi_width(con, decl: FieldDecl, cap: int) -> int:
    longest = con.execute(f"SELECT coalesce(max(len({decl.name})), 1) FROM behaviors").fetchone()[0]
    return int(max(1, min(longest, cap)))


def _write_store(
    con, decls: list[FieldDecl], specs: list[FieldSpec], n_users: int, build: Path, log
) -> SequenceStore:
    selects, joins = [], []
    user_sql, user_join = encode_sql(USER, USER, "b")
    for decl in decls:
        sql, join = encode_sql(decl.name, decl.name, "b", multi=decl.multi)
        selects.append(f"{sql} AS {decl.name}")
        if join:
            joins.append(join)
    # fetchall, not fetchone: a partly fetched result blocks the con.sql() below (DuckDB 2)
    n_rows = con.execute("SELECT count(*) FROM behaviors").fetchall()[0][0]
    query = f"""SELECT {user_sql} AS user, b.ts AS ts, b.ord AS source_row, {", ".join(selects)}
                FROM behaviors b {user_join} {" ".join(joins)}
                ORDER BY 1, b.ts, b.ord"""
    writer = StoreWriter(build, n_rows, specs)
    counts = np.zeros(n_users, dtype=np.int64)
    reader = con.sql(query).to_arrow_reader(_FETCH_ROWS)
    widths = {s.name: s.width for s in specs}
    multi = {d.name for d in decls if d.multi}
    for batch in reader:
        chunk = {}
        for name in batch.schema.names:
            col = batch.column(name)
            if name in multi:
                chunk[name] = pad_lists(col, widths[name])
            else:
                chunk[name] = np.asarray(
                    col.fill_null(UNSEEN) if name not in ("ts", "source_row") else col
                )
        counts += np.bincount(chunk["user"], minlength=n_users)
        writer.append(chunk)
    offsets = np.concatenate(([0], np.cumsum(counts)))
    writer.close(offsets)
    log(f"store: {n_rows:,} behaviours of {int((counts > 0).sum()):,} users, sorted by (user, ts)")
    return SequenceStore.open(build)


def _item_tables(store: SequenceStore, specs: list[FieldSpec]) -> dict[str, np.ndarray]:
    """item index -> value of each item-side field (as seen in the item's behaviours)."""
    n_items = next(s.vocab_size for s in specs if s.name == "item")
    item = np.asarray(store.fields["item"])
    tables = {"item": np.arange(n_items, dtype=np.int32)}
    for spec in specs:
        if spec.side != "item" or spec.name == "item":
            continue
        shape = (n_items,) if spec.width == 1 else (n_items, spec.width)
        table = np.zeros(shape, dtype=np.int32)
        table[item] = np.asarray(store.fields[spec.name])
        table[UNSEEN] = UNSEEN  # the bucket of rare items has no single value
        tables[spec.name] = table
    return tables


def _behavior_samples(
    store: SequenceStore, specs, protocol: ProtocolConfig, notes: dict
) -> SampleSet:
    rng = np.random.default_rng(protocol.seed)
    if protocol.name == "dare":
        positives = dare_positives(store.offsets, protocol)
    elif protocol.name == "leave_one_out":
        positives = leave_one_out_positives(store.offsets)
    else:
        positives, cuts = time_split_positives(np.asarray(store.ts), protocol, rng)
        notes["valid_cut_ts"], notes["test_cut_ts"] = cuts
    user_of_row = store.user_of_rows()
    n_items = next(s.vocab_size for s in specs if s.name == "item")
    sampler = None
    if protocol.negatives:
        sampler = NegativeSampler(
            user_of_row, np.asarray(store.fields["item"]), n_items, protocol.neg_sampling
        )
    return from_positives(store, user_of_row, positives, protocol, sampler, rng)
