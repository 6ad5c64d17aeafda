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
        rows = x.reshape(-1, x.shape[-1]) if mask.all() else x[mask]
        if self.training and rows.shape[0] == 1 and isinstance(self.net[0], nn.BatchNorm1d):
            # one real target has no batch statistics: normalise it with the running ones
            self.net[0].eval()
            try:
                logits = self.net(rows).squeeze(-1)
            finally:
                self.net[0].train()
        else:
            logits = self.net(rows).squeeze(-1)
        if mask.all():
            return logits.view(mask.shape).to(out.dtype)
        return out.masked_scatter(mask, logits.to(out.dtype))
