"""Serving benchmark (issue 05): latency p50/p99 and throughput of POST /v1/rank over real HTTP.

For each model, history length, candidate count and client concurrency: a uvicorn server on
127.0.0.1 (in this process) answers requests from `concurrency` clients (another process:
`longrec.bench.load`). "cold" disables
the user-state cache (every request encodes its user, like a user's first request); "warm"
repeats a cached user. The comparison "one at a time" scores the same candidates with one
request per candidate.
"""

from __future__ import annotations

import itertools
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import uvicorn

from longrec.data.dataset import PreparedDataset
from longrec.data.vocab import load_vocab
from longrec.serve.app import create_app
from longrec.serve.history import open_history
from longrec.serve.load_history import load_history
from longrec.serve.ranker import Ranker, RankerConfig


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """An ASGI app served by uvicorn on a free 127.0.0.1 port in a background thread, for the
    span of a `with` block; entering waits until it answers HTTP."""

    def __init__(self, app):
        self.port = _free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        base = f"http://127.0.0.1:{self.port}"
        for _ in range(400):
            try:
                httpx.get(f"{base}/healthz", timeout=1)  # any answer, even a 404, will do
                return base
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError("server did not start")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def ensure_history(dataset: Path, url: str) -> None:
    ds = PreparedDataset(dataset)
    store = open_history(url, list(ds.fields.values()))
    if store.count(next(iter(load_vocab(ds.root, "user")))) == 0:
        load_history(dataset, store)
    store.close()


def long_users(dataset: Path, min_len: int, n: int) -> list[str]:
    """Raw ids of users with at least min_len behaviours (the longest first)."""
    ds = PreparedDataset(dataset)
    lengths = np.diff(ds.store.offsets)
    order = np.argsort(-lengths)
    inverse = {v: k for k, v in load_vocab(ds.root, "user").items()}
    users = [inverse[int(u)] for u in order[:n] if lengths[u] >= min_len and int(u) in inverse]
    return users or [inverse[int(order[0])]]


def measure(
    base: str,
    users: list[str],
    items: list[str],
    candidates: int,
    concurrency: int,
    requests: int,
    ranker: Ranker | None = None,
) -> dict:
    """Latency and throughput of `requests` rank requests from `concurrency` clients.

    The clients run in a separate process (`longrec.bench.load`): in this one they would share
    the server's GIL and measure themselves. `requests_per_forward` is how many requests each
    forward pass of the ranker answered (micro-batching at work)."""
    rng = np.random.default_rng(0)
    warmup = min(20, requests)
    with tempfile.TemporaryDirectory() as tmp:
        bodies = Path(tmp) / "bodies.jsonl"
        with bodies.open("w") as f:
            for i in range(requests):  # the first `warmup` are also sent once, unmeasured
                body = {
                    "user": users[i % len(users)],
                    "candidates": [str(c) for c in rng.choice(items, candidates)],
                    "now": 2_000_000_000,
                }
                f.write(json.dumps(body) + "\n")
        before = _forwards(ranker)
        port = base.rsplit(":", 1)[1]
        cmd = [sys.executable, "-m", "longrec.bench.load", "--port", port, "--bodies", str(bodies)]
        cmd += ["--concurrency", str(concurrency), "--warmup", str(warmup)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"load generator failed: {done.stderr.strip()[-500:]}")
        result = json.loads(done.stdout)
    forwards = _forwards(ranker) - before
    non_2xx = sum(n for code, n in result["statuses"].items() if not code.startswith("2"))
    return {
        "p50_ms": result["p50_ms"],
        "p90_ms": result["p90_ms"],
        "p99_ms": result["p99_ms"],
        "requests_per_s": result["requests_per_s"],
        "candidates_per_s": round(result["requests_per_s"] * candidates),
        "non_2xx": non_2xx,
        "requests_per_forward": round((warmup + requests) / forwards, 2) if forwards else None,
    }


def _forwards(ranker: Ranker | None) -> int:
    """Forward passes the ranker's micro-batcher has run (0 when micro-batching is off)."""
    return 0 if ranker is None or ranker.batcher is None else ranker.batcher.stats.batches


def bench_serve(
    runs: dict[str, Path],
    dataset: Path,
    history_url: str,
    lengths=(1000, 10000),
    candidates=(100, 500, 1000),
    concurrency=(1, 4, 16),
    requests: int = 40,
    log=print,
    micro_batches=(8,),
    device: str = "auto",
) -> list[dict]:
    ensure_history(dataset, history_url)
    ds = PreparedDataset(dataset)
    items = [k for k, v in load_vocab(ds.root, "item").items() if v >= 2][:20000]
    rows = []
    for model, run in runs.items():
        for length in lengths:
            users = long_users(dataset, length, 64)
            for micro_batch, cache in itertools.product(micro_batches, ("cold", "warm")):
                config = RankerConfig(
                    micro_batch=micro_batch,
                    max_len=length,
                    cache_bytes=0 if cache == "cold" else 1 << 30,
                    max_candidates=max(candidates),
                    device=device,
                )
                store = open_history(history_url, list(ds.fields.values()))
                ranker = Ranker.from_run(run, history=store, config=config)
                with Server(create_app(ranker, max_body_bytes=8 << 20)) as base:
                    for m in candidates:
                        for c in concurrency:
                            who = users if cache == "cold" else users[:1]
                            n = requests if c == 1 else max(requests, 4 * c)
                            result = measure(base, who, items, m, c, n, ranker)
                            row = {
                                "model": model,
                                "history": length,
                                "candidates": m,
                                "concurrency": c,
                                "cache": cache,
                                "micro_batch": micro_batch,
                                "device": str(ranker.runtime.device),
                                **result,
                            }
                            log(row)
                            rows.append(row)
                    if cache == "cold" and micro_batch == micro_batches[0]:
                        one = measure(base, users, items, 1, 1, 100, ranker)
                        row = {
                            "model": model,
                            "history": length,
                            "candidates": 1,
                            "concurrency": 1,
                            "cache": "cold",
                            "one_at_a_time_ms_for_500": round(one["p50_ms"] * 500, 1),
                            **one,
                        }
                        log(row)
                        rows.append(row)
                ranker.close()
                store.close()
    return rows


def train_tiny_runs(
    dataset: Path, models: list[str], out: Path, max_len: int = 1000
) -> dict[str, Path]:
    """A few training steps per model: the latency benchmark needs weights of the right shape,
    not good ones."""
    from longrec.config import resolve
    from longrec.train.loop import Trainer
    from longrec.train.run_dir import METRICS

    runs = {}
    for model in models:
        run = out / model
        if not (run / METRICS).exists():
            cfg = resolve(
                None,
                [
                    "train.max_steps=2",
                    "train.batch_size=32",
                    "train.eval_every=2",
                    "train.progress=false",
                    f"data.max_len={max_len}",
                    "data.eval_batch_size=256",
                ],
                data__path=str(dataset),
                model__name=model,
            )
            Trainer(cfg, run).fit()
        runs[model] = run
    return runs
