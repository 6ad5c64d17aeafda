"""Target read-out: attention of each target over the history's item embeddings, before any
encoder mixes them, handed to the head as [r, r ⊙ target].

The end-to-end encoders (SASRec's causal blocks, HSTU's layers, LONGER's merged tokens) turn
behaviour tokens into running summaries that a target can no longer match item by item; on
the bundled real samples their own user vectors stayed near chance (docs/models.md, "Why the
end-to-end models did not learn"). Giving the head r = attention(target, raw embeddings) and
r ⊙ target, DIN's target x interest product, is what made them learn. Scorers:

* `"din"`: DIN's local activation unit (`nn.attention.DinScore`), an MLP over
  [q, k, q - k, q ⊙ k]: learns any relevance, starts near uniform;
* `"cosine"`: temperature x cosine(q W_Q, k W_K) with a learned temperature, W_Q = W_K = W_V =
  I at init (`nn.cross_attention.MultiHeadCrossAttention` under QK-norm, one head): bounded
  scores that start as item similarity (STCA's attention), strong where the same item recurs;
* `"both"`: one read-out of each kind, side by side.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from longrec.nn.attention import DinScore, masked_softmax
from longrec.nn.cross_attention import MultiHeadCrossAttention

READOUT_SCORES = ("din", "cosine", "both")


class TargetReadout(nn.Module):
    """Head features [B, M, width] for targets [B, M, d] over keys [B, L, d] (mask [B, L],
    True = real): [r, r ⊙ target] per scorer."""

    def __init__(self, dim: int, score: str = "din", temperature: float = 4.0):
        super().__init__()
        if score not in READOUT_SCORES:
            raise ValueError(f"readout_score must be one of {READOUT_SCORES}, got '{score}'")
        self.din = DinScore(dim) if score in ("din", "both") else None
        self.cosine = None
        if score in ("cosine", "both"):
            self.cosine = MultiHeadCrossAttention(dim, 1, "plain", temperature)
            self.cosine.identity_init()
        self.width = 2 * dim * (2 if score == "both" else 1)
        self._register_load_state_dict_pre_hook(_bare_din_keys)

    def pooled(self, target: Tensor, keys: Tensor, mask: Tensor) -> list[Tensor]:
        """r [B, M, d] of each scorer."""
        keys = keys.to(target.dtype)
        out = []
        if self.din is not None:
            weights = masked_softmax(self.din(target, keys), mask.unsqueeze(1))
            out.append(weights @ keys)
        if self.cosine is not None:
            out.append(self.cosine(target, keys, mask))
        return out

    def forward(self, target: Tensor, keys: Tensor, mask: Tensor) -> Tensor:
        parts = []
        for r in self.pooled(target, keys, mask):
            parts += [r, r * target]
        return torch.cat(parts, dim=-1)


def _bare_din_keys(state_dict, prefix, *_args) -> None:
    """Runs saved when the models held a bare `DinScore` as `readout` keep loading."""
    for name in ("first.weight", "first.bias", "act.weight", "out.weight", "out.bias"):
        if prefix + name in state_dict:
            state_dict[prefix + "din." + name] = state_dict.pop(prefix + name)
