"""A/B of two training configurations in ONE process, their steps alternating on the same
batches, so that the VM's speed swings (up to 1.5x between runs here) hit both arms alike.

    .venv/bin/python benchmarks/ab_steps.py DATA --a "SETS" --b "SETS" [--rounds 4]

Each arm is a space-separated list of `key=value` config overrides and `ENV:NAME=value`
environment variables (set before each of that arm's steps, removed before the other's).
DARE's Taobao configuration (batch 2048, history 200) unless overridden. Prints each arm's
min, first quartile and median step time and the median of the per-batch time ratios A/B.
The two trainers share the caches, as one trainer's forward, backward and update do; figures
are for comparing the arms, not absolute throughput (`longrec bench train` gives that).

e.g. `benchmarks/ab_steps.py prep100m --a "" --b "train.sparse_table_grads=false"`.
"""

# ruff: noqa: I001  (longrec is imported before torch on purpose)
from __future__ import annotations

import longrec  # noqa: F401  (first: its allocator settings apply before torch allocates)

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from longrec.config import resolve
from longrec.train.loop import Trainer

BASE = ["data.max_len=200", "train.batch_size=2048", "data.layout=pointwise"]


def parse_arm(spec: str) -> tuple[list[str], dict[str, str]]:
    tokens = spec.split()
    env = dict(t.removeprefix("ENV:").split("=", 1) for t in tokens if t.startswith("ENV:"))
    return [t for t in tokens if not t.startswith("ENV:")], env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--a", default="", help="arm A: overrides and ENV:NAME=value")
    parser.add_argument("--b", default="", help="arm B")
    parser.add_argument("--model", default="dare")
    parser.add_argument("--rounds", type=int, default=4, help="passes over the 7 timed batches")
    args = parser.parse_args()
    arms = [parse_arm(args.a), parse_arm(args.b)]
    env_keys = {k for _, env in arms for k in env}
    with tempfile.TemporaryDirectory() as tmp:
        trainers = []
        for i, (sets, _env) in enumerate(arms):
            cfg = resolve(
                None,
                [*BASE, "train.progress=false", *sets],
                data__path=str(args.data),
                model__name=args.model,
            )
            trainers.append(Trainer(cfg, Path(tmp) / str(i)))
        chunks = trainers[0].loader.batch_requests(0)
        batches = [trainers[0].loader.make_batch(chunks[i % len(chunks)]) for i in range(10)]

        def step(i: int, batch) -> float:
            for key in env_keys:
                os.environ.pop(key, None)
            os.environ.update(arms[i][1])
            start = time.perf_counter()
            trainers[i]._step(batch, 0)
            return time.perf_counter() - start

        for i in range(2):  # warm-up: extension build, allocator, first-touch of the state
            for batch in batches[:3]:
                step(i, batch)
        times: list[list[float]] = [[], []]
        for _ in range(args.rounds):
            for batch in batches[3:]:
                for i in range(2):
                    times[i].append(step(i, batch))
    for i, name in enumerate("AB"):
        t = [x * 1e3 for x in times[i]]
        spec = (args.a, args.b)[i] or "(defaults)"
        print(
            f"{name} {spec}: min {min(t):.1f} q25 {statistics.quantiles(t, n=4)[0]:.1f} "
            f"median {statistics.median(t):.1f} ms"
        )
    ratio = statistics.median(a / b for a, b in zip(times[0], times[1], strict=True))
    print(f"A/B step-time ratio, median over batches: {ratio:.3f}")


if __name__ == "__main__":
    main()
