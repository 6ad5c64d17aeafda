"""The target read-out block: both scorers ignore padding, the cosine scorer starts as item
similarity, and runs saved with a bare DinScore still load."""

from __future__ import annotations

import pytest
import torch

from longrec.nn.attention import DinScore
from longrec.nn.readout import TargetReadout


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(3, 7, 8, generator=g)
    target = torch.randn(3, 2, 8, generator=g)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[0, :4] = False
    mask[2] = False  # a user without history reads nothing
    return target, keys, mask


@pytest.mark.parametrize("score", ["din", "cosine", "both"])
def test_padding_is_never_read(score):
    torch.manual_seed(0)
    block = TargetReadout(8, score)
    target, keys, mask = _inputs()
    out = block(target, keys, mask)
    noisy = keys.masked_fill(~mask.unsqueeze(-1), 1e3)
    torch.testing.assert_close(block(target, noisy, mask), out)
    assert out[2].abs().max() < 1e-6  # nothing to read: zero (W_O has no bias yet)
    assert out[:2].abs().max() > 1e-3


def test_cosine_readout_starts_as_similarity():
    """At init the target picks the behaviour that is most like it."""
    torch.manual_seed(0)
    block = TargetReadout(8, "cosine", temperature=50.0)
    _, keys, mask = _inputs()
    mask[:] = True
    target = keys[:, [5]] + 0.01 * torch.randn(3, 1, 8)
    out = block(target, keys, mask)
    r = out[..., :8]  # [r, r ⊙ target]
    torch.testing.assert_close(r, block.cosine.o(keys[:, [5]]), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(out[..., 8:], r * target)


def test_bare_din_score_state_loads():
    torch.manual_seed(0)
    old = DinScore(8)
    block = TargetReadout(8, "din")
    block.load_state_dict(old.state_dict())
    target, keys, _ = _inputs()
    torch.testing.assert_close(block.din(target, keys), old(target, keys))


def test_unknown_score_is_refused():
    with pytest.raises(ValueError, match="readout_score must be one of"):
        TargetReadout(8, "dot")
