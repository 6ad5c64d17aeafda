"""Scaling study (issue 04): test AUC against history length for several models, over several
seeds, with the training cost (samples/s, peak RSS) at each length.

Every (model, length, seed) trains in its own `longrec train` process, so its peak memory is
its own (polled with psutil); finished runs are reused, like `compare`. One seed cannot tell a
trend from noise, hence the seeds and the gain measured in standard deviations. A length is a
number or `full`, the dataset's longest history (from meta.json), so the study always reaches
the whole history whatever the dataset.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import psutil
import yaml

from longrec.errors import UserError
from longrec.train import run_dir as rd

FULL = "full"
Length = int | str  # a number of behaviours, or FULL

DEFAULT_LENGTHS: tuple[Length, ...] = (50, 100, 300, 1000, FULL)
DEFAULT_MODELS = ("stca", "longer", "hstu", "din", "dare", "twin_hard")
DEFAULT_SEEDS = 3
PEAK_RSS = "peak_rss_gib.txt"


def parse_lengths(text: str) -> list[Length]:
    """`50,100,full` -> [50, 100, "full"]; anything else is the user's mistake."""
    tokens = [t.strip().lower() for t in text.split(",") if t.strip()]
    if not tokens:
        raise UserError("--lengths: give at least one length (a positive integer or 'full')")
    lengths = [_parse_length(t) for t in tokens]
    repeated = sorted({str(n) for n in lengths if lengths.count(n) > 1})
    if repeated:
        raise UserError(f"--lengths: {', '.join(repeated)} given more than once")
    return lengths


def _parse_length(token: str) -> Length:
    if token == FULL:
        return FULL
    try:
        n = int(token)
    except ValueError:
        n = 0
    if n < 1:
        raise UserError(f"--lengths: '{token}' is neither a positive integer nor '{FULL}'")
    return n


def full_length(data: Path) -> int:
    """The longest history of any sample in the prepared dataset (the splits' statistics in
    meta.json); datasets without them fall back to the store's longest user."""
    path = Path(data) / "meta.json"
    if not path.exists():
        raise UserError(f"{data} is not a prepared dataset (no meta.json); run `longrec prepare`")
    meta = json.loads(path.read_text())
    longest = [
        s["history_len_percentiles"]["100"]
        for s in meta.get("splits", {}).values()
        if "100" in s.get("history_len_percentiles", {})
    ]
    store = meta.get("store", {}).get("user_history_len_percentiles", {})
    if not longest and "100" in store:
        longest = [store["100"]]
    if not longest or max(longest) < 1:
        raise UserError(f"{path} has no history lengths, so '{FULL}' has none: give numbers")
    return math.ceil(max(longest))


def resolve_lengths(
    lengths: Iterable[Length], data: Path, log: Callable[[str], None] = print
) -> list[tuple[Length, int]]:
    """(label, max_len) per length. With `full` present, numbers at or beyond the longest
    history would train the same histories again, so they are dropped (and said so)."""
    lengths = list(lengths)
    if FULL not in lengths:
        return [(n, int(n)) for n in lengths]
    full = full_length(data)
    covered = [n for n in lengths if n != FULL and int(n) >= full]
    if covered:
        names = ", ".join(f"L={int(n):,}" for n in covered)
        log(f"{names}: not shorter than the longest history ({full:,}), covered by {FULL}")
    return [(n, full if n == FULL else int(n)) for n in lengths if n not in covered]


def _run_measured(cmd: list[str], log_path: Path) -> float:
    """Run cmd (output to log_path, never a pipe that could fill up); return its peak RSS in
    GiB (children included), polled every 0.2 s."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, text=True)
        return _poll(proc, log_path)


def _poll(proc: subprocess.Popen, log_path: Path) -> float:
    peak = 0
    handle = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            rss = handle.memory_info().rss + sum(
                c.memory_info().rss for c in handle.children(recursive=True)
            )
            peak = max(peak, rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.2)
    if proc.wait() != 0:
        raise RuntimeError(
            f"{' '.join(map(str, proc.args))} failed:\n{log_path.read_text()[-3000:]}"
        )
    return peak / 2**30


def _train_cmd(data: Path, model: str, run: Path, sets: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "longrec",
        "train",
        "--data",
        str(data),
        "--model",
        model,
        "--out",
        str(run),
        "--overwrite",
        *[a for s in sets for a in ("--set", s)],
    ]


def _finished(run: Path, max_len: int, log: Callable[[str], None]) -> bool:
    """A run is reused only if it finished at this length (`full` can change with the data)."""
    if not (run / rd.METRICS).exists():
        return False
    trained = yaml.safe_load((run / rd.CONFIG).read_text())["data"]["max_len"]
    if trained != max_len:
        log(f"{run} trained at history {trained:,}, not {max_len:,}: training again")
    return trained == max_len


def _row(model: str, label: Length, max_len: int, seed: int, run: Path) -> dict:
    metrics = json.loads((run / rd.METRICS).read_text())
    peak = run / PEAK_RSS
    return {
        "model": model,
        "history": label,
        "max_len": max_len,
        "seed": seed,
        "test_auc": metrics["test"].get("auc"),
        "test_gauc": metrics["test"].get("gauc"),
        "test_logloss": metrics["test"].get("logloss"),
        "train_samples_per_s": round(metrics["train"]["samples_per_s"]),
        "peak_rss_gib": float(peak.read_text()) if peak.exists() else None,
    }


def _train_measured(
    data: Path,
    out: Path,
    name: str,
    model: str,
    max_len: int,
    seed: int,
    sets: list[str],
    log: Callable[[str], None],
) -> Path:
    """out/runs/<name>, trained unless already finished at max_len, with its peak RSS beside
    it."""
    run = out / "runs" / name
    if _finished(run, max_len, log):
        return run
    # last, so the study's own settings win over the user's
    sets = [*sets, f"data.max_len={max_len}", f"train.seed={seed}"]
    log(f"{model} at history {max_len:,} seed {seed}: training in {run}")
    peak = _run_measured(_train_cmd(data, model, run, sets), out / "logs" / f"{name}.log")
    (run / PEAK_RSS).write_text(f"{peak:.3f}\n")
    return run


def run_scaling(
    data: Path,
    out: Path,
    models: Iterable[str] = DEFAULT_MODELS,
    lengths: Iterable[Length] = DEFAULT_LENGTHS,
    overrides: list[str] | None = None,
    per_model: dict[str, list[str]] | None = None,
    log: Callable[[str], None] = print,
    seeds: int = DEFAULT_SEEDS,
) -> list[dict]:
    """Train every (model, length) for seeds 1..seeds in out/runs/<model>-L<length>-s<seed>;
    rows (one per run) are rewritten to out/scaling.json after each run."""
    if seeds < 1:
        raise UserError(f"--seeds must be >= 1, not {seeds}")
    columns = resolve_lengths(lengths, data, log)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for model in models:
        sets = [*(overrides or []), *((per_model or {}).get(model, []))]
        for label, max_len in columns:
            for seed in range(1, seeds + 1):
                name = f"{model}-L{label}-s{seed}"
                run = _train_measured(data, out, name, model, max_len, seed, sets, log)
                rows.append(_row(model, label, max_len, seed, run))
                (out / "scaling.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


@dataclass
class Cell:
    """The runs of one (model, length): their test AUCs and mean costs."""

    max_len: int
    aucs: list[float] = field(default_factory=list)
    speeds: list[float] = field(default_factory=list)
    rss: list[float] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.aucs)

    @property
    def mean(self) -> float:
        return sum(self.aucs) / self.n

    @property
    def std(self) -> float | None:
        """Sample std (ddof 1); None below two seeds."""
        if self.n < 2:
            return None
        return math.sqrt(sum((a - self.mean) ** 2 for a in self.aucs) / (self.n - 1))


def _max_len(row: dict) -> int:
    return int(row.get("max_len", row["history"]))  # rows written before `full` lack max_len


def _cells(rows: list[dict]) -> dict[str, dict[Length, Cell]]:
    """model -> label -> Cell, in the rows' model order and by length."""
    out: dict[str, dict[Length, Cell]] = {}
    for r in sorted(rows, key=_max_len):
        cell = out.setdefault(r["model"], {}).setdefault(r["history"], Cell(_max_len(r)))
        if r.get("test_auc") is not None:
            cell.aucs.append(r["test_auc"])
        cell.speeds.append(r["train_samples_per_s"])
        if r.get("peak_rss_gib") is not None:
            cell.rss.append(r["peak_rss_gib"])
    order = list(dict.fromkeys(r["model"] for r in rows))
    return {m: out[m] for m in order}


def _columns(cells: dict[str, dict[Length, Cell]]) -> list[tuple[Length, int]]:
    both = {(label, c.max_len) for by_len in cells.values() for label, c in by_len.items()}
    return sorted(both, key=lambda x: (x[1], x[0] == FULL))


def _header(label: Length, max_len: int) -> str:
    return f"{FULL} ({max_len:,})" if label == FULL else f"L={max_len:,}"


def _name(label: Length, max_len: int) -> str:
    return FULL if label == FULL else f"L={max_len:,}"


def _cell_text(cell: Cell | None, show_n: bool) -> str:
    if cell is None:
        return ""
    auc = "n/a" if cell.n == 0 else f"{cell.mean:.4f}"
    if cell.std is not None:
        auc += f" ± {cell.std:.4f}"
    if show_n:
        auc += f", n={cell.n}"
    speed = sum(cell.speeds) / len(cell.speeds)
    rss = f", {sum(cell.rss) / len(cell.rss):.1f}" if cell.rss else ""
    return f"{auc} ({speed:,.0f}{rss})"


def _caption(counts: set[int]) -> str:
    if counts <= {0, 1}:
        return "test AUC (train samples/s, peak RSS GiB)"
    over = f"{min(counts)} seeds" if len(counts) == 1 else "seeds; n = seeds in the cell"
    return f"test AUC, mean ± sample std over {over} (mean train samples/s, mean peak RSS GiB)"


def _gain_line(model: str, by_len: dict[Length, Cell]) -> str:
    """Shortest to longest length: the gain in AUC, in pooled stds, and whether the means
    never fall as the history grows."""
    cells = [(label, c) for label, c in by_len.items() if c.n]
    if len(cells) < 2:
        return f"- {model}: one length with results, no gain to measure"
    (lo_label, lo), (hi_label, hi) = cells[0], cells[-1]
    gain = hi.mean - lo.mean
    span = f"{gain:+.4f} from {_name(lo_label, lo.max_len)} to {_name(hi_label, hi.max_len)}"
    return f"- {model}: {span} ({_in_stds(gain, lo, hi)}); {_monotone(cells)}"


def _in_stds(gain: float, a: Cell, b: Cell) -> str:
    """The gain over the pooled sample std of the two cells (a one-seed cell adds no spread
    but no degree of freedom either)."""
    dof = a.n + b.n - 2
    if dof == 0:
        return "one seed: no std"
    pooled = math.sqrt(((a.n - 1) * (a.std or 0) ** 2 + (b.n - 1) * (b.std or 0) ** 2) / dof)
    if pooled == 0:
        return "std 0"
    z = gain / pooled
    return f"{z:.1f} std, {'more than' if abs(z) > 2 else 'within'} 2 std"


def _monotone(cells: list[tuple[Length, Cell]]) -> str:
    falls = [
        _name(label, c.max_len) for (_, prev), (label, c) in pairwise(cells) if c.mean < prev.mean
    ]
    if not falls:
        return "mean AUC non-decreasing in length"
    return f"mean AUC not monotone (falls at {', '.join(falls)})"


def scaling_table(rows: list[dict], title: str) -> str:
    """Markdown: a heading, a caption, models x lengths, then one gain line per model."""
    cells = _cells(rows)
    columns = _columns(cells)
    counts = {c.n for by_len in cells.values() for c in by_len.values()}
    show_n = len(counts) > 1
    lines = [
        f"## {title}",
        "",
        _caption(counts),
        "",
        "| model | " + " | ".join(_header(*col) for col in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for m, by_len in cells.items():
        texts = [_cell_text(by_len.get(label), show_n) for label, _ in columns]
        lines.append(f"| {m} | " + " | ".join(texts) + " |")
    lines += ["", "Gain from the shortest to the longest history (pooled std of the two):", ""]
    lines += [_gain_line(m, by_len) for m, by_len in cells.items()]
    return "\n".join(lines)


def scaling_plot(rows: list[dict], path: Path, title: str) -> None:
    """Mean test AUC against history length (log x), ± std error bars, one line per model;
    `full` sits at its concrete length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    cells = _cells(rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    for m, by_len in cells.items():
        pts = [c for c in by_len.values() if c.n]
        ax.errorbar(
            [c.max_len for c in pts],
            [c.mean for c in pts],
            yerr=[c.std or 0.0 for c in pts],
            marker="o",
            capsize=3,
            label=m,
        )
    columns = _columns(cells)
    ax.set_xscale("log")
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticks(
        [n for _, n in columns],
        [f"{FULL}\n{n:,}" if label == FULL else f"{n:,}" for label, n in columns],
    )
    ax.set_xlabel("history length (behaviours)")
    ax.set_ylabel("test AUC (mean ± std over seeds)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
