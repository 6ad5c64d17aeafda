"""Request-level batching (docs/architecture.md, "The batch") changes the cost of a training step, not what it computes:
B requests of M targets give the loss and gradients of the B·M pointwise rows (history
repeated), in training mode (batch-norm statistics over the same real targets). The per-user
estimator equals the pointwise loss weighted 1 / (M_u · U)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from longrec.models import build_model
from longrec.train.loop import masked_bce

MODELS = ["stca", "longer", "dare", "twin", "din", "tin"]


def _request_batch(helpers, schema, seed=0, b=4, m=5, length=40):
    """B requests with 5, 5, 3 and 1 real targets (shared request time), mixed history lengths."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(length // 3, length + 1, size=b)
    hist = [rng.integers(2, 50, size=n) for n in lengths]
    targets = [rng.integers(2, 50, size=k) for k in (5, 5, 3, 1)[:b]]
    return helpers["build_batch"](schema, hist, targets, rng, length=length, n_targets=m)


def _loss_and_grads(model, batch, reduction, weights=None):
    model.zero_grad(set_to_none=True)
    logits, _ = model.forward_train(batch)
    if weights is None:
        loss = masked_bce(logits, batch.label, batch.target_mask, reduction)
    else:  # pointwise rows weighted by hand
        per = torch.nn.functional.binary_cross_entropy_with_logits(
            logits[:, 0], batch.label[:, 0], reduction="none"
        )
        loss = (per * weights).sum()
    loss.backward()
    grads = {
        n: p.grad.to_dense().clone() for n, p in model.named_parameters() if p.grad is not None
    }
    return loss.detach(), grads


def _assert_same(a, b):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, atol=1e-6, rtol=1e-5)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("name", MODELS)
def test_request_layout_same_loss_and_gradients(name, helpers):
    schema = helpers["make_schema"](False)
    batch = _request_batch(helpers, schema)
    pointwise = helpers["to_pointwise"](batch)
    torch.manual_seed(0)
    model = build_model(name, schema, None).train()
    _assert_same(_loss_and_grads(model, batch, "mean"), _loss_and_grads(model, pointwise, "mean"))
    # per-user: mean within each request, then across requests
    counts = batch.target_mask.sum(1)
    rows = torch.repeat_interleave(torch.arange(len(counts)), counts)
    weights = 1.0 / (counts[rows].float() * len(counts))
    _assert_same(
        _loss_and_grads(model, batch, "per_user"),
        _loss_and_grads(model, pointwise, None, weights),
    )
