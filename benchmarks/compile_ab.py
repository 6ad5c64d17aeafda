"""train.compile=dense against eager on the same trainer, interleaved to cancel machine drift:
STCA training steps (fp32) alternating between eager and compiled dense stacks.

    .venv/bin/python benchmarks/compile_ab.py DATASET [MAX_LEN] [BATCH] [MODEL]

Prints the compile time (compile + 2 steps) and ms per step of each mode in every round, with
the medians. Switching back to eager clears the compiled call of each module in place.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(".cache/inductor").resolve()))

from longrec.config import resolve
from longrec.train.compile import compile_dense_modules
from longrec.train.loop import Trainer


def main(data: str, max_len: str = "200", batch: str = "2048", model: str = "stca") -> None:
    sets = [f"data.max_len={max_len}", f"train.batch_size={batch}", "train.progress=false"]
    cfg = resolve(None, sets, data__path=data, model__name=model)
    trainer = Trainer(cfg, Path(".cache/bench/compile_ab"))
    chunks = trainer.loader.batch_requests(0)
    batches = [trainer.loader.make_batch(chunks[i % len(chunks)]) for i in range(4)]
    modules = [
        trainer.model.get_submodule(n) for n in compile_dense_modules(trainer.model, "dense")
    ]
    if not modules:
        raise SystemExit(f"{model} has no dense stack to compile")
    compiled = [m._compiled_call_impl for m in modules]

    def use(on: bool) -> None:
        for m, impl in zip(modules, compiled, strict=True):
            m._compiled_call_impl = impl if on else None

    def ms_per_step() -> float:
        t0 = time.perf_counter()
        for b in batches:
            trainer._step(b, 0)
        return round((time.perf_counter() - t0) / len(batches) * 1000, 1)

    use(True)
    t0 = time.perf_counter()
    for b in batches[:2]:
        trainer._step(b, 0)
    print(f"compile + 2 steps: {time.perf_counter() - t0:.1f} s")
    use(False)
    trainer._step(batches[0], 0)
    rounds: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(4):
        for mode, times in rounds.items():
            use(mode == "compiled")
            times.append(ms_per_step())
    medians = {mode: sorted(t)[len(t) // 2] for mode, t in rounds.items()}
    print(f"{model} {max_len} x {batch}: {rounds}; medians {medians}")


if __name__ == "__main__":
    main(*sys.argv[1:])
