"""Prediction heads: BatchNorm -> MLP -> logit, applied only to real targets."""

from __future__ import annotations

from torch import Tensor, nn


class MLPHead(nn.Module):
    """DARE's head: BN -> Linear(200) -> PReLU(0.1) -> Linear(80) -> PReLU -> Linear(1)."""

    def __init__(
        self,
        in_dim: int,
        hidden: tuple[int, ...] = (200, 80),
        batch_norm: bool = True,
        prelu_init: float = 0.1,
    ):
        super().__init__()
        layers: list[nn.Module] = [nn.BatchNorm1d(in_dim)] if batch_norm else []
        prev = in_dim
        for width in hidden:
            layers += [nn.Linear(prev, width), nn.PReLU(init=prelu_init)]
            prev = width
        layers.append(nn.Linear(prev, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """x [B, M, D], mask [B, M] -> logits [B, M] (0 where mask is False).

        Only real targets enter BatchNorm, so padding of the request layout never changes the
        statistics, and a pointwise and a request batch of the same samples agree exactly.
        """
        out = x.new_zeros(mask.shape)
        if mask.all():
            return self.net(x.reshape(-1, x.shape[-1])).view(mask.shape).to(out.dtype)
        rows = self.net(x[mask]).squeeze(-1)
        return out.masked_scatter(mask, rows.to(out.dtype))
