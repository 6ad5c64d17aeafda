"""What seeds 1-5 reach in the real-data learning test's exact setup (tests/models/
test_real_data_learning.py): test AUC and the drop with histories swapped between users, the
figures its bars are set below.

Usage: python benchmarks/learning_bars.py DATA MODEL [SEEDS] [--set k=v ...]
DATA: the bundled Taobao sample prepared as the test's fixture does (DARE protocol,
`--behaviors pv --min-len 50 --on-bad-rows skip`).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "models"))

from test_real_data_learning import MODELS, SETTINGS, test_auc

from longrec.config import resolve
from longrec.train.loop import Trainer


def main(data: str, name: str, seeds: int = 5, extra: tuple[str, ...] = ()) -> None:
    settings = SETTINGS + MODELS[name][0] + list(extra)
    for seed in range(1, seeds + 1):
        cfg = resolve(
            None,
            [*settings, f"train.seed={seed}"],
            data__path=data,
            model__name=name,
        )
        with tempfile.TemporaryDirectory() as tmp:
            run = Path(tmp) / name
            auc = Trainer(cfg, run).fit()["test"]["auc"]
            drop = auc - test_auc(run, swap=True)
        print(
            f"{name} seed {seed}: test AUC {auc:.3f}, swapped-history drop {drop:.3f}", flush=True
        )


if __name__ == "__main__":
    cli = argparse.ArgumentParser()
    cli.add_argument("data")
    cli.add_argument("model")
    cli.add_argument("seeds", type=int, nargs="?", default=5)
    cli.add_argument("--set", action="append", default=[], dest="sets")
    a = cli.parse_args()
    main(a.data, a.model, a.seeds, tuple(a.sets))
