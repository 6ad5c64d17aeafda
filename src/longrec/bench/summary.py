"""Markdown summary of the `longrec bench all` results, and its section of BENCHMARKS.md."""

from __future__ import annotations

import json
import os
from pathlib import Path

BEGIN = "<!-- bench all: begin -->"
END = "<!-- bench all: end -->"
SECTION = "## Suite figures (longrec bench all)"
NAMES = ("peak", "data", "train", "search", "serve", "scaling")


def _n(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and not x.is_integer():
        return f"{x:,.1f}" if abs(x) >= 10 else f"{x:.2f}"
    return f"{int(x):,}"


def _table(header: list[str], rows: list[list], align: str = "") -> list[str]:
    align = align or "l" + "r" * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join("---" if a == "l" else "---:" for a in align) + "|")
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split()).replace("`", "'")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _machine_line(m: dict) -> str:
    return (
        f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores, {m.get('memory_gib', '?')} GiB, "
        f"Python {m.get('python', '?')}, torch {m.get('torch', '?')}"
    )


def _load(out_dir: Path) -> dict[str, dict]:
    results = {}
    for name in NAMES:
        path = out_dir / f"{name}.json"
        if path.exists():
            try:
                results[name] = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                results[name] = {"error": f"{path.name} is not valid JSON ({err.msg})"}
    return results


def _peak(r: dict) -> list[str]:
    return [
        f"Machine limits ({r['threads']} threads, `bench/peak.py`): GEMM {r['gemm_n']}^3 "
        f"{_n(r['fp32_gflops'])} GFLOP/s fp32, {_n(r['bf16_gflops'])} GFLOP/s bf16; "
        f"tensor copy {r['copy_gb_per_s']} GB/s (read + write).",
    ]


def _data(r: dict, peak: dict | None = None) -> list[str]:
    copy = (peak or {}).get("copy_gb_per_s")

    def share(x: dict) -> str:
        mb = x.get("batch_mb_per_s")
        return f"{mb / 1e3 / copy:.1%}" if mb is not None and copy else "-"

    rows = [
        [
            _n(x["max_len"]),
            _n(x["samples_per_s"]),
            _n(x["mean_history"]),
            _n(x.get("batch_bytes_per_sample")),
            _n(x.get("batch_mb_per_s")),
            share(x),
        ]
        for x in r.get("loader", [])
    ]
    batch = r["loader"][0]["batch_size"] if r.get("loader") else "?"
    return [
        f"Loader, samples/s (batch {batch}, pointwise, batch building only); bytes of the "
        "batches it writes, and that rate as a share of the measured copy bandwidth:",
        "",
        *_table(
            ["history", "samples/s", "mean history", "bytes/sample", "MB/s", "of copy bw"], rows
        ),
    ]


def _train(r: dict) -> list[str]:
    ok = [x for x in r.get("records", []) if "error" not in x]
    lengths = sorted({x["max_len"] for x in ok})
    by = {(x["model"], x["max_len"]): x for x in ok}
    models = list(dict.fromkeys(x["model"] for x in ok))
    header = ["model"] + [f"{k} {_n(n)}" for n in lengths for k in ("train", "infer")]
    rows = [
        [m]
        + [
            _n(by[m, n][f"{k}_samples_per_s"]) if (m, n) in by else "-"
            for n in lengths
            for k in ("train", "infer")
        ]
        for m in models
    ]
    batch_of = {x["max_len"]: x["batch_size"] for x in ok}
    batches = ", ".join(f"{_n(batch_of[n])} at {_n(n)}" for n in lengths)
    if not ok:
        return ["No training figures."]
    steps = ok[0]["steps"]
    lines = [
        f"Training / inference, samples/s by history length (batch {batches}; {steps} timed step{'s' if steps != 1 else ''}):",
        "",
        *_table(header, rows),
    ]
    lay = r.get("layouts")
    if lay and "error" not in lay:
        lines += [
            "",
            f"Layouts, {lay['model']} at history {_n(lay['max_len'])}, "
            f"{lay['requests_per_batch']} requests per batch: request-level "
            f"{_n(lay['request']['samples_per_s'])} samples/s vs pointwise "
            f"{_n(lay['pointwise']['samples_per_s'])} (x{lay['throughput_ratio']}); "
            f"history bytes per sample {lay['bytes_saved']:.0%} lower.",
        ]
    return lines


def _search(r: dict) -> list[str]:
    cost = r.get("cost", [])
    dims = list(dict.fromkeys(x["attn_dim"] for x in cost))
    lines = []
    if cost:
        by = {(x["history"], x["attn_dim"]): x for x in cost}
        rows = [
            [_n(h)]
            + [
                f"{_n(by[h, d]['ms'])} ms ({by[h, d]['ratio_to_128']:.2f})" if (h, d) in by else "-"
                for d in dims
            ]
            for h in dict.fromkeys(x["history"] for x in cost)
        ]
        lines += [
            f"Search cost by attention dim (batch {cost[0]['batch']}, top {cost[0]['top_k']}; "
            f"median ms, ratio to d={dims[0]}):",
            "",
            *_table(["history", *[f"d={d}" for d in dims]], rows),
        ]
    hier = r.get("hierarchical", [])
    if hier:
        soft = next(k for k in hier[0] if k.startswith("soft_topk"))
        rows = [
            [
                _n(x["history"]),
                x["targets"],
                _n(x["merged_ms"]),
                _n(x["per_level_ms"]),
                _n(x["hard_search_ms"]),
                _n(x[soft]),
            ]
            for x in hier
        ]
        header = ["history", "targets", "hierarchical", "per level", "hard search", "soft top-k"]
        lines += [
            "",
            f"Hierarchical hard search, {hier[0]['levels']} levels (batch {hier[0]['batch']}, "
            f"k {hier[0]['k']}; median ms; soft top-k at {soft.split('_')[2]}):",
            "",
            *_table(header, rows),
        ]
    return lines


def _serve(r: dict) -> list[str]:
    rows = r.get("rows", [])
    grid = [x for x in rows if "one_at_a_time_ms_for_500" not in x]
    by = {
        (
            x["model"],
            x["history"],
            x["candidates"],
            x["concurrency"],
            x.get("micro_batch", 1),
            x["cache"],
        ): x
        for x in grid
    }
    keys = list(dict.fromkeys(k[:5] for k in by))
    table = []
    for k in keys:
        cold, warm = by.get((*k, "cold"), {}), by.get((*k, "warm"), {})
        table.append(
            [
                k[0],
                _n(k[1]),
                _n(k[2]),
                k[3],
                k[4],
                f"{_n(cold.get('p50_ms'))} / {_n(cold.get('p99_ms'))}",
                _n(cold.get("requests_per_s")),
                f"{_n(warm.get('p50_ms'))} / {_n(warm.get('p99_ms'))}",
                _n(warm.get("requests_per_s")),
            ]
        )
    header = [
        "model",
        "history",
        "candidates",
        "clients",
        "micro-batch",
        "cold p50 / p99",
        "cold req/s",
        "warm p50 / p99",
        "warm req/s",
    ]
    lines = [
        "Serving, POST /v1/rank latency in ms (cold: user state not cached; warm: cached; "
        "micro-batch: concurrent requests per forward, 1 = off):",
        "",
        *_table(header, table, "lrrrrrrrr"),
    ]
    one = [x for x in rows if "one_at_a_time_ms_for_500" in x]
    if one:
        lines += [
            "",
            "One candidate per request instead (cold p50, x500): "
            + "; ".join(
                f"{x['model']} at {_n(x['history'])}: {_n(x['one_at_a_time_ms_for_500'])} ms"
                for x in one
            )
            + ".",
        ]
    return lines


def _scaling(r: dict) -> list[str]:
    from longrec.bench.scaling import scaling_table

    rows = r.get("rows", [])
    if not rows:
        return ["Scaling: no rows."]
    table = scaling_table(rows, "").splitlines()[2:]  # without its heading
    sets = ", ".join(f"`{x}`" for x in r.get("sets", []))
    return [
        f"Scaling with history length, short runs ({sets}); plot `{r.get('plot', '')}`:",
        "",
        *table,
    ]


def render_summary(out_dir: Path) -> str:
    """Compact markdown tables of out_dir/{data,train,search,serve}.json."""
    results = _load(Path(out_dir))
    if not results:
        return f"No results in {out_dir}: run `longrec bench all --out {out_dir}`."
    first = next(iter(results.values()))
    machine = first.get("machine", {})
    date = machine.get("date", "?")
    lines = [
        f"Generated by `{first.get('command', 'longrec bench all')}`; rerun it to refresh "
        "this section (the text outside it is not touched).",
        "",
        f"Machine: {_machine_line(machine)}; date {date}.",
    ]
    suite = first.get("suite", {})
    if suite:
        lines += [
            "",
            f"Data: `longrec synth` with {_n(suite['users'])} users, mean history "
            f"{_n(suite['mean_len'])} (max {_n(suite['max_len'])}), seed {suite['seed']}, "
            f"impressions protocol (preset {suite.get('preset', '?')}).",
        ]
    render = {
        "peak": _peak,
        "data": lambda r: _data(r, results.get("peak")),
        "train": _train,
        "search": _search,
        "serve": _serve,
        "scaling": _scaling,
    }
    for name in NAMES:
        lines.append("")
        if name not in results:
            lines.append(f"**{name}**: no result.")
            continue
        r = results[name]
        m = r.get("machine", {})
        if m and (m.get("date") != date or _machine_line(m) != _machine_line(machine)):
            lines += [f"({name} ran on {_machine_line(m)}; date {m.get('date', '?')}.)", ""]
        elif r.get("command") != first.get("command"):
            lines += [f"(From an earlier run: `{r.get('command')}`.)", ""]
        if "error" in r:
            lines += [f"**{name} failed**: `{_short(r['error'])}`", ""]
        try:
            lines += render[name](r)
        except (KeyError, TypeError, ValueError, StopIteration, IndexError) as err:
            lines.append(f"**{name}**: cannot render ({type(err).__name__}: {err}).")
    while lines and lines[-1] == "":
        lines.pop()
    return "\n".join(lines)


def update_benchmarks_md(path: Path, summary: str) -> None:
    """Replace the text between the BEGIN and END marker lines of `path` with `summary`
    (appending a section with the markers if they are missing); nothing else changes."""
    path = Path(path)
    text = path.read_text() if path.exists() else ""
    lines = text.splitlines(keepends=True)
    begins = [i for i, line in enumerate(lines) if line.strip() == BEGIN]
    ends = [i for i, line in enumerate(lines) if line.strip() == END]
    block = f"{summary.rstrip()}\n"
    if not begins and not ends:
        sep = "" if not text else ("\n" if text.endswith("\n") else "\n\n")
        new = f"{text}{sep}{SECTION}\n\n{BEGIN}\n{block}{END}\n"
    elif len(begins) == 1 and len(ends) == 1 and begins[0] < ends[0]:
        b, e = begins[0], ends[0]
        new = "".join(lines[: b + 1]) + block + "".join(lines[e:])
    else:
        raise ValueError(
            f"{path}: expected one '{BEGIN}' line followed by one '{END}' line "
            f"(found {len(begins)} and {len(ends)})"
        )
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(new)
    tmp.replace(path)
