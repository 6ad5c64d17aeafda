"""PReLU whose one-weight backward pass is a C++ kernel (csrc/prelu.cpp).

Why: PyTorch's CPU backward of a one-weight PReLU took 1.2 ms on DARE's [2048, 200] hidden
layer (3.6 ms of a 67 ms training step for the two heads' three PReLUs); the kernel does the
same in one vectorised pass. Same parameters and state_dict as `nn.PReLU`, and the same
results to float rounding (the weight's gradient is summed in another order); several weights,
or where ops.dispatch says no (`train.kernels`, other dtypes or devices, no extension), take
`nn.PReLU`'s own path.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from longrec.nn import row_kernels
from longrec.ops import dispatch


class _OneWeightPReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight)
        return torch.prelu(x, weight)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        if grad.shape != x.shape or not dispatch.use_native("prelu_backward", grad):
            # under autocast the incoming gradient can be bf16: PyTorch's own backward
            with torch.enable_grad():
                xr, wr = x.detach().requires_grad_(), weight.detach().requires_grad_()
                grad_x, grad_weight = torch.autograd.grad(torch.prelu(xr, wr), (xr, wr), grad)
            return grad_x, grad_weight
        grad_x, grad_weight = row_kernels._extension().prelu_backward(x, grad.contiguous(), weight)
        return grad_x, grad_weight


class PReLU(nn.PReLU):
    def forward(self, x: Tensor) -> Tensor:
        if (
            self.num_parameters == 1
            and torch.is_grad_enabled()
            and x.is_contiguous()
            and dispatch.use_native("prelu_backward", x, self.weight)
        ):
            return _OneWeightPReLU.apply(x, self.weight)
        return super().forward(x)
