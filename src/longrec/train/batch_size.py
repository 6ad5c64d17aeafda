"""The training batch when `train.batch_size` is left unset (auto), and the warning when a set
one leaves too few optimiser steps.

DARE's batch of 2048 suits its 100M-row Taobao log, but on a dataset of ~20K training samples
two epochs of it are 20 steps, and every model stays at chance. The auto batch is the largest
power of two that still gives the run `MIN_STEPS` steps, clipped to [32, 2048]:

    batch = clip(largest power of two <= rows * epochs / MIN_STEPS, 32, 2048)

`rows` is what the loader yields per epoch and process: samples in the pointwise layout,
requests in the request layout. With `train.max_steps` the run's length is fixed whatever the
batch, so the batch is instead the largest that still gives min(max_steps, MIN_STEPS) distinct
batches in one pass over the data (epochs = 1 above, MIN_STEPS = min(max_steps, MIN_STEPS)):
a short run keeps 2048, a long one on little data does not loop over a few large batches.
Large datasets get 2048 either way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from longrec.config import RunConfig
from longrec.data.loader import rows_per_epoch

MIN_STEPS = 300  # optimiser steps the auto batch aims for
SMALLEST, LARGEST = 32, 2048
FEW_STEPS = 50  # a set batch giving fewer steps than this gets a warning


def auto_batch_size(rows: int, epochs: int, max_steps: int | None = None) -> int:
    """The auto training batch for `rows` loader rows per epoch (module docstring)."""
    if max_steps is None:
        target_steps, passes = MIN_STEPS, epochs
    else:
        target_steps, passes = min(max_steps, MIN_STEPS), 1
    per_step = rows * max(passes, 1) // max(target_steps, 1)
    power = 1 << (per_step.bit_length() - 1) if per_step >= 1 else 1
    return min(max(power, SMALLEST), LARGEST)


def planned_steps(rows: int, batch_size: int, epochs: int, max_steps: int | None = None) -> int:
    """Optimiser steps of the run (the trainer's rule: max_steps, else epochs x batches)."""
    return max_steps if max_steps is not None else epochs * math.ceil(rows / batch_size)


@dataclass(frozen=True)
class BatchPlan:
    """The training batch of a run and what it was derived from, for the log and warnings."""

    size: int
    auto: bool  # derived by `auto_batch_size`, not set by the user
    rows: int  # loader rows per epoch and process
    steps: int  # optimiser steps the run will take (fewer if it stops early)
    epochs: int
    max_steps: int | None
    unit: str = "samples"  # what a row is: samples (pointwise) or requests

    def note(self) -> str | None:
        """One line for stderr: how an auto batch was chosen, or a warning that a set batch
        leaves too few steps to learn; None when there is nothing to say."""
        data = f"{self.rows:,} training {self.unit}"
        if self.auto:
            length = f"max_steps {self.max_steps}" if self.max_steps is not None else self._epochs()
            return (
                f"train.batch_size auto: {self.size} ({data}, {length} -> {self.steps:,} steps; "
                "set train.batch_size to override)"
            )
        if self.max_steps is not None or self.steps >= FEW_STEPS:
            return None  # with max_steps the user chose the step count itself
        better = auto_batch_size(self.rows, self.epochs)
        fix = f"train.batch_size={better} or more epochs" if better < self.size else "more epochs"
        return (
            f"warning: train.batch_size={self.size} gives {self.steps} optimiser steps on "
            f"{data}; models rarely learn in so few; try {fix}"
        )

    def record(self) -> dict:
        """The log.jsonl line of the plan."""
        return {
            "step": 0,
            "batch_size": self.size,
            "batch_size_auto": self.auto,
            "train_rows": self.rows,
            "planned_steps": self.steps,
        }

    def _epochs(self) -> str:
        return f"{self.epochs} epoch{'s' if self.epochs != 1 else ''}"


def plan_batch(
    batch_size: int | None, rows: int, epochs: int, max_steps: int | None, unit: str = "samples"
) -> BatchPlan:
    """The run's batch: `batch_size` when set, else the auto rule on `rows`."""
    auto = batch_size is None
    size = auto_batch_size(rows, epochs, max_steps) if batch_size is None else batch_size
    steps = planned_steps(rows, max(size, 1), epochs, max_steps)
    return BatchPlan(size, auto, rows, steps, epochs, max_steps, unit)


def plan_run_batch(cfg: RunConfig, train: dict[str, np.ndarray], world_size: int) -> BatchPlan:
    """The training batch of a run on the `train` split's columns, per process."""
    layout, tc = cfg.data.layout, cfg.train
    rows = rows_per_epoch(train, layout, world_size)
    unit = ("requests" if layout == "request" else "samples") + (
        " per process" if world_size > 1 else ""
    )
    return plan_batch(tc.batch_size, rows, tc.epochs, tc.max_steps, unit)
