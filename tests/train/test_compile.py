"""train.compile=dense (train/compile.py): the dense stacks really get compiled, compiled and
eager STCA agree in logits and gradients, a real training run with it works end to end, and a
bad value is a user error."""

from __future__ import annotations

import pytest
import torch
from tests.models.conftest import left_pad, make_schema, tiny_batch

from longrec.config import resolve
from longrec.errors import UserError
from longrec.models import build_model
from longrec.train.compile import compile_dense_modules
from longrec.train.loop import Trainer


def test_compiled_stca_equals_eager(one_thread):
    schema = make_schema()
    torch.manual_seed(0)
    # float64: the compiled stack reorders sums, and in float32 those roundings, carried through
    # two attention layers' backward, reach ~1e-3 relative on single gradient elements
    eager = build_model("stca", schema).double()
    compiled = build_model("stca", schema).double()
    compiled.load_state_dict(eager.state_dict())
    names = compile_dense_modules(compiled, "dense")
    assert names and all(n.startswith("history_ffn.") for n in names)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints unchanged
    for length in (16, 24):  # dynamic shapes: a second history length reuses the graph
        batch = tiny_batch(schema, seed=length)
        if length != batch.history_len:
            batch = left_pad(batch, length)
        outs = []
        for model in (eager, compiled):
            model.zero_grad()
            logits, _ = model.forward_train(batch)
            logits.sum().backward()
            outs.append((logits.detach(), [p.grad.clone() for p in model.parameters()]))
        torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-10, atol=1e-12)
        for a, b in zip(outs[1][1], outs[0][1], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)  # fused reorderings


def test_models_without_a_dense_stack_run_eager():
    model = build_model("dare", make_schema())
    assert compile_dense_modules(model, "dense") == []


def test_a_bad_mode_is_a_user_error():
    with pytest.raises(UserError, match=r"train\.compile must be one of none, dense"):
        compile_dense_modules(build_model("stca", make_schema()), "max")


def test_both_modes_parse_from_the_command_line(prepared_taobao):
    for mode in ("none", "dense"):
        cfg = resolve(None, [f"train.compile={mode}"], data__path=str(prepared_taobao))
        assert cfg.train.compile == mode


def test_training_with_compile_runs_end_to_end(prepared_taobao, tmp_path):
    sets = [
        "train.compile=dense",
        "train.max_steps=4",
        "train.batch_size=128",
        "train.eval_every=4",
        "train.progress=false",
        "data.max_len=50",
    ]
    cfg = resolve(None, sets, data__path=str(prepared_taobao), model__name="stca")
    trainer = Trainer(cfg, tmp_path / "run")
    assert trainer.compiled
    metrics = trainer.fit()
    assert 0.0 <= metrics["test"]["auc"] <= 1.0 and metrics["test"]["logloss"] > 0
