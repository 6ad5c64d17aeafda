"""The one-weight PReLU's C++ backward against nn.PReLU's."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from longrec.nn import row_kernels
from longrec.nn.prelu import PReLU
from longrec.ops import dispatch


def test_the_kernel_path_is_taken():
    """The extension builds here, so the heads use its backward (not nn.PReLU's)."""
    assert row_kernels.available()
    x = torch.randn(4, 3, requires_grad=True)
    assert type(PReLU(init=0.1)(x).grad_fn).__name__.startswith("_OneWeightPReLU")


@pytest.mark.parametrize("shape", [(2048, 200), (7, 3), (3, 40, 36), (0, 5), (1, 1)])
@pytest.mark.parametrize("setting", ["native", "reference"])
def test_gradients_match_nn_prelu(shape, setting):
    """Under both kernels settings (ops.dispatch), so native and reference agree through it."""
    torch.manual_seed(0)
    x = torch.randn(shape)
    x.view(-1)[::5] = 0.0  # the kink: x = 0 takes the weight's side in both
    grad = torch.randn(shape)
    ours, reference = PReLU(init=0.1), nn.PReLU(init=0.1)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with dispatch.using(setting):
        ya, yb = ours(xa), reference(xb)
        kernel = type(ya.grad_fn).__name__.startswith("_OneWeightPReLU")
        assert kernel == (setting == "native")
        torch.testing.assert_close(ya, yb)
        ya.backward(grad)
        yb.backward(grad)
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(ours.weight.grad, reference.weight.grad, rtol=1e-4, atol=1e-3)


def test_same_state_dict_and_fallbacks():
    ours, reference = PReLU(init=0.1), nn.PReLU(init=0.1)
    assert ours.state_dict().keys() == reference.state_dict().keys()
    several = PReLU(num_parameters=4, init=0.1)  # one weight per channel: PyTorch's path
    x = torch.randn(5, 4, requires_grad=True)
    several(x).sum().backward()
    assert several.weight.grad.shape == (4,)
    x16 = torch.randn(6, 3, dtype=torch.bfloat16, requires_grad=True)
    PReLU(init=0.1).to(torch.bfloat16)(x16).sum().backward()
    assert x16.grad is not None


def test_bf16_gradient_from_autocast_takes_the_reference_path():
    """Under bf16 autocast the Linear after a PReLU (DIN's activation unit) hands back a bf16
    gradient for a float32 input; the kernel takes float32 only, so the reference runs."""
    torch.manual_seed(0)
    x = torch.randn(6, 5, 36)
    ours, reference = PReLU(init=0.1), nn.PReLU(init=0.1)
    out = nn.Linear(36, 1)
    grads = []
    for act in (ours, reference):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = out(act(xi + 0.0))
        y.float().sum().backward()
        grads.append((xi.grad, act.weight.grad))
    # the same to bf16 rounding (the bf16 gradient is widened at different points)
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-2, atol=1e-3)
