"""The auto training batch (train/batch_size.py): the rule, the rows it counts per layout, and
what a run records and says about it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from longrec.config import resolve
from longrec.data.dataset import PreparedDataset
from longrec.data.loader import BatchLoader, LoaderConfig, rows_per_epoch
from longrec.train import run_dir as rd
from longrec.train.batch_size import (
    LARGEST,
    MIN_STEPS,
    SMALLEST,
    auto_batch_size,
    plan_batch,
    planned_steps,
)
from longrec.train.loop import Trainer

QUICK = [
    "train.threads=1",
    "train.progress=false",
    "data.prefetch=0",
    "data.max_len=50",
    "model.embed_dim=4",
]


def test_a_small_dataset_gets_a_batch_of_about_300_steps():
    assert auto_batch_size(19_665, epochs=2) == 128  # 131 per step -> 128
    assert planned_steps(19_665, 128, epochs=2) == 2 * 154 >= MIN_STEPS
    assert auto_batch_size(38_400, epochs=2) == 256  # exactly 256 per step
    assert auto_batch_size(38_399, epochs=2) == 128
    assert auto_batch_size(19_665, epochs=4) == 256  # more epochs, more steps: a larger batch


def test_large_datasets_keep_2048_and_tiny_ones_32():
    assert auto_batch_size(100_000_000, epochs=2) == LARGEST == 2048
    assert auto_batch_size(300 * 4096, epochs=1) == 2048
    assert auto_batch_size(1_000, epochs=1) == SMALLEST == 32
    assert auto_batch_size(0, epochs=2) == 32


def test_with_max_steps_a_pass_over_the_data_holds_the_steps():
    assert auto_batch_size(25_821, epochs=2, max_steps=3) == 2048  # a short run keeps 2048
    assert auto_batch_size(25_821, epochs=2, max_steps=20) == 1024  # 1,291 per step
    # beyond 300 steps the run loops over the data: the batch stays that of 300 steps a pass
    assert auto_batch_size(25_821, epochs=2, max_steps=5_000) == 64
    assert planned_steps(25_821, 64, epochs=2, max_steps=5_000) == 5_000


def test_rows_are_samples_pointwise_and_requests_in_the_request_layout():
    cols = {"label": np.zeros(7), "request_id": np.array([4, 4, 4, 9, 9, 2, 2])}
    assert rows_per_epoch(cols, "pointwise") == 7
    assert rows_per_epoch(cols, "request") == 3
    assert rows_per_epoch(cols, "pointwise", world_size=2) == 3  # per process
    assert rows_per_epoch({"label": np.zeros(0), "request_id": np.zeros(0)}, "request") == 0


def test_request_rows_are_the_loaders_requests(prepared_taobao):
    ds = PreparedDataset(prepared_taobao)
    for layout in ("pointwise", "request"):
        loader = BatchLoader(ds, "train", LoaderConfig(batch_size=1, layout=layout, prefetch=0))
        assert rows_per_epoch(ds.split("train"), layout) == len(loader)
    assert rows_per_epoch(ds.split("train"), "request") < rows_per_epoch(
        ds.split("train"), "pointwise"
    )


def test_the_trainer_sizes_the_batch_by_requests_and_keeps_the_callers_config(
    prepared_taobao, tmp_path
):
    cfg = resolve(
        None, [*QUICK, "data.layout=request"], data__path=str(prepared_taobao), model__name="din"
    )
    assert cfg.train.batch_size is None
    trainer = Trainer(cfg, tmp_path / "run")
    requests = rows_per_epoch(trainer.dataset.split("train"), "request")
    assert trainer.cfg.train.batch_size == auto_batch_size(requests, cfg.train.epochs)
    assert trainer.loader.cfg.batch_size == trainer.cfg.train.batch_size
    assert trainer.batch_plan.unit == "requests" and trainer.batch_plan.auto
    assert trainer.batch_plan.steps == trainer.total_steps
    assert cfg.train.batch_size is None  # compare reuses its base config for every pair


def test_longrec_train_records_and_states_the_auto_batch(prepared_taobao, tmp_path, run_cli):
    run = tmp_path / "run"
    sets = [*QUICK, "train.max_steps=20"]
    result = run_cli(
        "train", "--data", prepared_taobao, "--model", "din", "--out", run,
        *[a for s in sets for a in ("--set", s)],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    samples = rows_per_epoch(PreparedDataset(prepared_taobao).split("train"), "pointwise")
    batch = auto_batch_size(samples, epochs=2, max_steps=20)
    assert batch < LARGEST  # the auto rule chose, not the old default
    config = yaml.safe_load((run / rd.CONFIG).read_text())
    assert config["train"]["batch_size"] == batch
    line = (
        f"train.batch_size auto: {batch} ({samples:,} training samples, max_steps 20 -> 20 "
        "steps; set train.batch_size to override)"
    )
    assert line in result.stderr.splitlines()
    first = json.loads((run / rd.LOG).read_text().splitlines()[0])
    assert first == {
        "step": 0,
        "batch_size": batch,
        "batch_size_auto": True,
        "train_rows": samples,
        "planned_steps": 20,
    }


def test_a_set_batch_with_few_steps_gets_a_warning():
    note = plan_batch(2048, rows=19_665, epochs=2, max_steps=None).note()
    assert note == (
        "warning: train.batch_size=2048 gives 20 optimiser steps on 19,665 training samples; "
        "models rarely learn in so few; try train.batch_size=128 or more epochs"
    )
    assert plan_batch(256, rows=19_665, epochs=2, max_steps=None).note() is None  # 154 steps
    assert plan_batch(2048, rows=19_665, epochs=2, max_steps=10).note() is None  # chosen steps
    tiny = plan_batch(32, rows=500, epochs=1, max_steps=None).note()
    assert tiny is not None and tiny.endswith("try more epochs")  # no smaller batch to offer


def test_the_run_prints_the_warning(prepared_taobao, tmp_path, capsys):
    cfg = resolve(
        None,
        [*QUICK, "train.batch_size=2048", "train.epochs=1"],
        data__path=str(prepared_taobao),
        model__name="din",
    )

    class Stop(Exception):
        pass

    def stop(step: int) -> None:
        raise Stop

    with pytest.raises(Stop):  # one step is enough: the warning comes before it
        Trainer(cfg, tmp_path / "run", callbacks=[stop]).fit()
    samples = rows_per_epoch(PreparedDataset(prepared_taobao).split("train"), "pointwise")
    steps = planned_steps(samples, 2048, epochs=1)
    assert steps < 50
    err = capsys.readouterr().err
    assert f"warning: train.batch_size=2048 gives {steps} optimiser steps on {samples:,}" in err
    assert yaml.safe_load((tmp_path / "run" / rd.CONFIG).read_text())["train"]["batch_size"] == 2048
