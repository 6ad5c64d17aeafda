"""`longrec bench all`: the benchmark suite end to end on a synthetic dataset it makes itself.

One JSON per benchmark goes to the results directory (data, train, search, serve, scaling); a failing
benchmark writes ``{"error": ...}`` and the others still run. ``run_suite`` returns the names
of the benchmarks that failed.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from longrec.bench.common import write_result

DATASET_VERSION = 1  # bump when the way the suite's dataset is made changes


@dataclass
class SuiteConfig:
    preset: str = "full"
    # synthetic dataset (long histories; impressions protocol)
    users: int = 2000
    mean_len: float = 3000.0
    max_len: int = 50_000
    items: int = 50_000  # per ad domain; the content domain has twice as many
    seed: int = 1
    # loader throughput
    loader_lengths: tuple[int, ...] = (200, 1000, 10000)
    loader_batch_size: int = 256
    loader_seconds: float = 3.0
    # training / inference samples/s; batch sizes pair with the lengths
    train_models: tuple[str, ...] = (
        "din",
        "sim_hard",
        "eta",
        "sdim",
        "twin",
        "dare",
        "tin",
        "stacked_tin",
        "stca",
        "longer",
    )
    train_lengths: tuple[int, ...] = (200, 1000)
    train_batch_sizes: tuple[int, ...] = (2048, 512)
    train_steps: int = 10
    train_warmup: int = 3  # untimed steps first
    layout_model: str | None = "stca"  # request vs pointwise layout (None: skip)
    layout_len: int = 1000
    layout_requests: int = 128
    # search cost
    search_dims: tuple[int, ...] = (128, 64, 32, 16)
    search_lengths: tuple[int, ...] = (1000, 10000)
    search_batch: int = 256
    search_repeats: int = 5
    hier_targets: tuple[int, ...] = (1, 8)
    # serving latency
    serve: bool = True
    # Stacked TIN is left out: ~15 s per request at 10K x 500 would take the suite past an hour
    # (`longrec bench serve --models stacked_tin` measures it on its own)
    serve_models: tuple[str, ...] = ("dare", "stca", "longer")
    serve_lengths: tuple[int, ...] = (1000, 10000)
    serve_candidates: tuple[int, ...] = (100, 500)
    serve_concurrency: tuple[int, ...] = (1, 4)
    serve_requests: int = 20
    serve_micro_batches: tuple[int, ...] = (1, 8)  # 1 = off: the comparison
    # AUC against history length (short runs: a trend and the cost per length, not a study;
    # `longrec bench scaling` runs the full one)
    scaling: bool = True
    scaling_models: tuple[str, ...] = ("stca", "longer", "din", "dare")
    scaling_lengths: tuple[int, ...] = (100, 300, 1000, 3000)
    scaling_sets: tuple[str, ...] = (
        "train.max_steps=100",
        "train.batch_size=128",
        "train.eval_every=100",
        "train.progress=false",
    )

    @classmethod
    def quick(cls) -> SuiteConfig:
        """Tiny sizes for tests: seconds, not minutes."""
        return cls(
            preset="quick",
            users=60,
            mean_len=300.0,
            max_len=3000,
            items=2000,
            loader_lengths=(200,),
            loader_seconds=0.2,
            train_models=("din",),
            train_lengths=(100,),
            train_batch_sizes=(32,),
            train_steps=2,
            train_warmup=1,
            layout_len=100,
            layout_requests=4,
            search_dims=(128, 16),
            search_lengths=(1000,),
            search_batch=16,
            search_repeats=2,
            hier_targets=(1,),
            serve_models=("dare",),
            serve_lengths=(200,),
            serve_candidates=(20,),
            serve_concurrency=(1,),
            serve_requests=3,
            serve_micro_batches=(8,),
            scaling_models=("din",),
            scaling_lengths=(50, 100),
            scaling_sets=(
                "train.max_steps=2",
                "train.batch_size=32",
                "train.eval_every=2",
                "train.progress=false",
            ),
        )

    def dataset_key(self) -> dict:
        """What the dataset depends on: a prepared dataset with the same key is reused."""
        return {
            "version": DATASET_VERSION,
            "protocol": "impressions",
            **{k: getattr(self, k) for k in ("users", "mean_len", "max_len", "items", "seed")},
        }


def make_dataset(cfg: SuiteConfig, work_dir: Path, log: Callable[[str], None]) -> tuple[Path, bool]:
    """Generate + prepare (impressions protocol) into work_dir, or reuse the one already there.
    Returns (prepared path, reused)."""
    from longrec.data.prepare import PrepareConfig, prepare
    from longrec.data.protocols import ProtocolConfig
    from longrec.data.synthetic import SynthConfig, generate

    raw, prepared, stamp = work_dir / "raw", work_dir / "prepared", work_dir / "dataset.json"
    key = cfg.dataset_key()
    if (prepared / "meta.json").exists() and stamp.exists():
        try:
            if json.loads(stamp.read_text()) == key:
                log(f"reusing the dataset in {prepared}")
                return prepared, True
        except json.JSONDecodeError:
            pass
    log(f"making a synthetic dataset in {work_dir}: {key}")
    stamp.unlink(missing_ok=True)
    for stale in ("serve", "scaling"):  # runs and history made from an old dataset
        shutil.rmtree(work_dir / stale, ignore_errors=True)
    sizes = {k: key[k] for k in ("users", "mean_len", "max_len", "seed")}
    synth = SynthConfig(**sizes, ad_items=cfg.items, content_items=2 * cfg.items)
    generate(synth, raw, overwrite=True, progress=False)
    protocol = ProtocolConfig(name="impressions")
    prepare(PrepareConfig("synth", raw, prepared, protocol, overwrite=True, quiet=True))
    tmp = stamp.with_name(f".{stamp.name}.tmp")
    tmp.write_text(json.dumps(key, indent=2) + "\n")
    tmp.replace(stamp)
    return prepared, False


def _error(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def _train(cfg: SuiteConfig, data: Path, work_dir: Path, log) -> dict:
    from longrec.bench.train import bench_layouts, bench_train

    if len(cfg.train_batch_sizes) != len(cfg.train_lengths):
        raise ValueError("train_batch_sizes must pair with train_lengths")
    runs, steps, warmup, failed = work_dir / "runs", cfg.train_steps, cfg.train_warmup, []

    def attempt(label: str, stub: dict, bench: Callable[[], dict]) -> dict:
        log(f"train: {label}")
        try:
            return bench()
        except Exception as err:  # one model failing must not lose the others
            log(traceback.format_exc())
            failed.append(f"{label}: {_error(err)}")
            return {**stub, "error": _error(err)}

    records = []
    for m in cfg.train_models:
        for n, b in zip(cfg.train_lengths, cfg.train_batch_sizes, strict=True):
            run = runs / f"{m}-{n}"
            records.append(
                attempt(
                    f"{m} history {n} batch {b}",
                    {"model": m, "max_len": n, "batch_size": b},
                    lambda: bench_train(data, m, n, steps, b, warmup=warmup, run_dir=run),  # noqa: B023
                )
            )
    result: dict = {"records": records}
    if m := cfg.layout_model:
        n, b, run = cfg.layout_len, cfg.layout_requests, runs / f"layouts-{m}"
        result["layouts"] = attempt(
            f"layouts of {m} history {n}",
            {"model": m, "max_len": n},
            lambda: bench_layouts(data, m, n, b, steps, warmup=warmup, run_dir=run),
        )
    if failed:
        result["error"] = "; ".join(failed)
    return result


def _search(cfg: SuiteConfig, log) -> dict:
    from longrec.bench.hier_search import bench_hier_search
    from longrec.bench.search import bench_search_dims

    log("search: cost by attention dim, hierarchical search")
    return {
        "cost": bench_search_dims(
            cfg.search_dims, cfg.search_lengths, cfg.search_batch, repeats=cfg.search_repeats
        ),
        "hierarchical": bench_hier_search(
            cfg.search_batch, cfg.search_lengths, cfg.hier_targets, repeats=cfg.search_repeats
        ),
    }


def _serve(cfg: SuiteConfig, data: Path, work_dir: Path, log) -> dict:
    from longrec.bench.serve import bench_serve, train_tiny_runs

    log(f"serve: tiny runs of {', '.join(cfg.serve_models)}")
    runs = train_tiny_runs(data, list(cfg.serve_models), work_dir / "serve" / "runs")
    rows = bench_serve(
        runs,
        data,
        f"lmdb://{(work_dir / 'serve' / 'history').resolve()}",
        cfg.serve_lengths,
        cfg.serve_candidates,
        cfg.serve_concurrency,
        cfg.serve_requests,
        log=lambda r: log(f"serve: {r}"),
        micro_batches=cfg.serve_micro_batches,
    )
    return {"rows": rows}


def _scaling(cfg: SuiteConfig, data: Path, work_dir: Path, out_dir: Path, log) -> dict:
    from longrec.bench.scaling import run_scaling, scaling_plot

    log(f"scaling: {', '.join(cfg.scaling_models)} at {cfg.scaling_lengths}")
    rows = run_scaling(
        data,
        work_dir / "scaling",
        list(cfg.scaling_models),
        list(cfg.scaling_lengths),
        list(cfg.scaling_sets),
        log=lambda m: log(f"scaling: {m}"),
        seeds=1,  # a trend and the cost per length; `longrec bench scaling` adds the seeds
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    scaling_plot(rows, out_dir / "scaling.png", "suite data (short runs)")
    return {"rows": rows, "sets": list(cfg.scaling_sets), "plot": "scaling.png"}


def run_suite(
    cfg: SuiteConfig,
    out_dir: Path,
    work_dir: Path,
    log: Callable[[str], None] = print,
    command: str | None = None,
) -> list[str]:
    """Run every benchmark; write out_dir/<name>.json for each. Returns the failed names."""
    out_dir, work_dir = Path(out_dir), Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    command = command or f"longrec bench all --out {out_dir} --work {work_dir}" + (
        " --quick" if cfg.preset == "quick" else ""
    )
    common = {"command": command, "suite": dataclasses.asdict(cfg)}
    failed: list[str] = []

    def record(name: str, body: Callable[[], dict]) -> None:
        t0 = time.perf_counter()
        try:
            result = body()
        except Exception as err:
            log(traceback.format_exc())
            result = {"error": _error(err)}
        result["seconds"] = round(time.perf_counter() - t0, 1)
        if "error" in result:
            failed.append(name)
            log(f"{name}: {result['error']}")
        log(f"wrote {write_result(out_dir, name, {**common, **result})}")

    data: Path | None = None
    reused, data_error = False, ""
    try:
        data, reused = make_dataset(cfg, work_dir, log)
    except Exception as err:
        log(traceback.format_exc())
        data_error = f"dataset: {_error(err)}"

    def need_data() -> Path:
        if data is None:
            raise RuntimeError(data_error)
        return data

    def loader() -> dict:
        from longrec.bench.data import bench_loader

        log(f"data: loader samples/s at {cfg.loader_lengths}")
        return {
            "dataset": {"path": str(need_data()), "reused": reused, **cfg.dataset_key()},
            "loader": bench_loader(
                need_data(),
                list(cfg.loader_lengths),
                batch_size=cfg.loader_batch_size,
                min_seconds=cfg.loader_seconds,
            ),
        }

    def peak() -> dict:
        from longrec.bench.peak import bench_peak

        log("peak: GEMM FLOP/s (fp32, bf16) and copy bandwidth")
        return bench_peak(**({"n": 512, "mib": 64} if cfg.preset == "quick" else {}))

    record("peak", peak)
    record("data", loader)
    record("train", lambda: _train(cfg, need_data(), work_dir, log))
    record("search", lambda: _search(cfg, log))
    if cfg.serve:
        record("serve", lambda: _serve(cfg, need_data(), work_dir, log))
    if cfg.scaling:
        record("scaling", lambda: _scaling(cfg, need_data(), work_dir, out_dir, log))
    return failed
