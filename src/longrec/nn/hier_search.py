"""Hierarchical hard search over a category taxonomy and the union of two retrievals
(docs/models.md, "Search stage").

Conventions follow ``nn.search``: a search returns indices [B, M, K] into the history and a
validity mask [B, M, K]; padding is never valid and invalid slots hold index 0. Histories are
left-padded with the most recent behaviour last; ``mask`` [B, L] is True on real behaviours.

Levels are given coarse -> fine (index 0 = coarsest, e.g. category_l1, category_l2,
category_l3). A behaviour *matches the target at level h* when their category paths agree down
to level h, i.e. the ids are equal at every level 0..h. With globally unique ids (a level-h id
determines its parents) this is plain equality at level h; with ids that are only unique
within their parent it is still the taxonomy match. Matches are therefore nested: a behaviour
matching at a finer level matches at every coarser one, so "not already taken" is all the
merged reading needs to avoid selecting a behaviour twice.

Algorithm (no loop over samples or behaviours; Python loops only over the H levels). Write
U_0 = real behaviours, U_h = behaviours matching at level h (h = 1..H, coarse -> fine), and
N_c(x) = number of members of U_c at positions >= x. Everything below only needs N at a few
positions per row.

1. ``bits`` [B, M, H+1, Lp] bool holds U_0..U_H, L right-padded to a multiple of the block
   size (64). Building it is the only work proportional to M * L: one comparison and one ``&``
   per level (one more copy for U_0).
2. Block table by SWAR: the bool bytes are read as int64 words (8 behaviours each), the words
   of a block are summed (each byte lane holds a count <= 8, no carries) and one multiply adds
   the 8 lanes. A suffix cumsum gives N_c at every block boundary, [B, M, H+1, Lp/64 + 1].
3. Stages, finest level first, then the fill stage (U_0, quota k if ``fill``, else 0). With
   s(x) the number selected so far at positions >= x, stage c takes
   t_c = min(quota_c, k - s(0), N_c(0) - s(0)) behaviours: the most recent members of U_c not
   taken yet (taken ones all lie in U_c, by nesting, so N_c(x) - s(x) counts the eligible ones
   at positions >= x). Its threshold p_c (the t_c-th eligible from the end) is located on the
   table (the last boundary with N_c - s >= t_c), then inside that block: the block's words
   minus the members finer stages took (U_c' at positions >= p_c', c' > c) are searched for
   the eligible member with the right rank. Then s += min(N_c - s, t_c) on the table.
4. A behaviour whose finest matching level is tau is selected iff its position is
   >= thr_tau = min(p_0, ..., p_tau). The selection is therefore the disjoint union over tau
   of U_tau within [thr_tau, thr_{tau-1}) (thr_{-1} = end): runs of consecutive U_tau members.
   Output slot j maps to (window tau, rank) and hence to a count c; its position is the last
   x with N_tau(x) >= c: one ``searchsorted`` over the block tables of all channels at once
   (offset so that they form one ascending row), then a SWAR search inside one block.

So the output is ordered most recent first. All per-position work is bool/byte or 8-bytes-per-
int64-word arithmetic; the stage and slot logic works on [B, M, Lp/64] tables and
[B, M, K] slots. This relies on int64 arithmetic wrapping on overflow (as torch does) and on a
little-endian machine (byte i of a word is behaviour i).
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor

BLOCK = 64  # behaviours per block: a multiple of 8, at most 64 (8 words of 8 behaviours)
_ONES = 0x0101010101010101  # w * _ONES: byte i holds the sum of bytes 0..i of w (if no carry)
_HIGH = 0x8080808080808080 - (1 << 64)  # the top bit of every byte, as a signed int64
_LITTLE = sys.byteorder == "little"


def _check(history_levels, target_levels, mask: Tensor, quotas) -> None:
    if not history_levels:
        raise ValueError("at least one taxonomy level is needed")
    if len(history_levels) != len(target_levels):
        raise ValueError(
            f"{len(history_levels)} history levels but {len(target_levels)} target levels"
        )
    if len(quotas) != len(history_levels):
        raise ValueError(f"{len(quotas)} quotas for {len(history_levels)} levels")
    if any(q < 0 for q in quotas):
        raise ValueError(f"quotas must be non-negative, got {list(quotas)}")
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, L], got {tuple(mask.shape)}")
    for h, (hist, tgt) in enumerate(zip(history_levels, target_levels, strict=True)):
        if hist.shape != mask.shape:
            raise ValueError(f"level {h}: history {tuple(hist.shape)} vs mask {tuple(mask.shape)}")
        if tgt.shape != target_levels[0].shape or tgt.dim() != 2 or len(tgt) != len(mask):
            raise ValueError(f"level {h}: target ids must be [B, M], got {tuple(tgt.shape)}")


def _check_block(block: int) -> None:
    if block % 8 or not 8 <= block <= 64:
        raise ValueError(f"block must be a multiple of 8 in [8, 64], got {block}")
    if not _LITTLE:
        raise NotImplementedError("the SWAR counting assumes a little-endian machine")


def _empty(b: int, m: int, k: int, device) -> tuple[Tensor, Tensor]:
    return (
        torch.zeros(b, m, k, dtype=torch.int64, device=device),
        torch.zeros(b, m, k, dtype=torch.bool, device=device),
    )


# -- per-position work ----------------------------------------------------------------------
def _compare_into(out: Tensor, history: Tensor, target: Tensor) -> None:
    """out[b, m, l] = (history[b, l] == target[b, m]), out a bool [B, M, L] view.

    Torch compares into bool with a scalar loop but vectorises a comparison into the inputs'
    own dtype. So with several targets on the CPU, ids that fit uint8 (or int16) are compared
    in that dtype: one range check and one cast of the [B, L] history instead of M times the
    slow loop over [B, M, L]."""
    if target.shape[1] > 1 and out.device.type == "cpu" and not history.is_floating_point():
        lo, hi = torch.aminmax(history)
        t_lo, t_hi = torch.aminmax(target)
        lo, hi = min(int(lo), int(t_lo)), max(int(hi), int(t_hi))
        small = None
        if lo >= 0 and hi <= 255:
            small = torch.uint8
        elif lo >= -(2**15) and hi < 2**15:
            small = torch.int16
        if small is not None:
            hist, tgt = history.to(small).unsqueeze(1), target.to(small).unsqueeze(-1)
            if small == torch.uint8:  # 0/1 bytes are valid bools
                torch.eq(hist, tgt, out=out.view(torch.uint8))
            else:
                same = torch.empty(out.shape, dtype=small, device=out.device)
                out.copy_(torch.eq(hist, tgt, out=same))
            return
    torch.eq(history.unsqueeze(1), target.unsqueeze(-1), out=out)


def _level_bits(history_levels, target_levels, mask: Tensor, block: int) -> Tensor:
    """[B, M, H+1, Lp] bool: channel 0 = real behaviour, channel h = path match down to level h
    (coarse -> fine); positions >= L (right padding up to a multiple of ``block``) are False."""
    b, length = mask.shape
    m = target_levels[0].shape[1]
    levels = len(history_levels)
    lp = max(1, -(-length // block)) * block
    bits = torch.empty(b, m, levels + 1, lp, dtype=torch.bool, device=mask.device)
    if lp > length:
        bits[..., length:] = False
    prev = bits[:, :, 0, :length]
    prev.copy_(mask.unsqueeze(1).expand(b, m, length))
    for h in range(levels):
        cur = bits[:, :, h + 1, :length]
        _compare_into(cur, history_levels[h], target_levels[h])
        cur &= prev
        prev = cur
    return bits


def _suffix_counts(bits: Tensor, block: int) -> Tensor:
    """N[..., c, i] = members of channel c at positions >= i * block: int64
    [..., C, Lp / block + 1] (the last column is 0)."""
    *lead, lp = bits.shape
    nb = lp // block
    words = bits.view(torch.uint8).view(torch.int64)  # 8 behaviours per word, one per byte
    lanes = words.view(*lead, nb, block // 8).sum(-1)  # per-byte counts <= 8: no carry
    counts = (lanes * _ONES) >> 56  # the sum of the 8 byte lanes (<= block <= 64)
    suffix = counts.flip(-1).cumsum(-1).flip(-1)
    return torch.cat([suffix, suffix.new_zeros(*lead, 1)], dim=-1)


# -- SWAR inside one block (8 words of 8 behaviours, one byte each) -------------------------
def _count_at_most(packed: Tensor, limit: Tensor) -> Tensor:
    """How many of the 8 bytes of each word are <= limit: packed [...] int64 with byte values
    <= 127, limit [...] in [0, 127] (other limits give some count in [0, 8]) -> [...] int64.
    Per byte, (limit + 128) - x never borrows from the next byte and keeps its top bit set
    exactly when x <= limit."""
    diff = torch.add(_HIGH - packed, limit, alpha=_ONES)
    return (((diff >> 7) & _ONES) * _ONES) >> 56


def _from_position(start: Tensor, per_block: int) -> Tensor:
    """Word masks of the block offsets >= start: start [...] (any integer) -> [..., W] int64
    whose byte i of word w is 1 iff 8w + i >= start."""
    word_start = torch.arange(0, 8 * per_block, 8, device=start.device)
    shift = 4 * (start.unsqueeze(-1) - word_start).clamp(0, 8)
    return (_ONES << shift) << shift  # two shifts < 64: an 8-byte shift gives 0


def _nth_member(words: Tensor, before: Tensor) -> Tensor:
    """Offset inside a block of the member with ``before`` members ahead of it: words [N, W]
    int64 (W <= 8 words, one behaviour per byte, 0/1), before [N] int64 -> [N] int64 in
    [0, 8W) (any offset if there is no such member). ``w * _ONES`` turns a word into in-word
    prefix counts per byte, its top byte being the word's total; the W totals packed into one
    word and multiplied again give per-word prefix counts; the word, then the byte, is the
    number of prefix counts <= before."""
    n, per_block = words.shape
    prefix = words * _ONES  # [N, W]
    totals = prefix.view(torch.uint8).view(n, per_block, 8)[..., 7]
    if per_block < 8:
        totals = torch.cat([totals, totals.new_zeros(n, 8 - per_block)], dim=-1)
    upto = totals.contiguous().view(torch.int64).squeeze(-1) * _ONES  # byte w: words 0..w
    word = _count_at_most(upto, before).clamp(max=per_block - 1)  # words wholly ahead
    chosen = prefix.gather(-1, word.unsqueeze(-1)).squeeze(-1)
    skip = before - (((upto << 8) >> (8 * word)) & 0xFF)  # members ahead inside the word
    return word * 8 + _count_at_most(chosen, skip).clamp(max=7)


def _block_rows(bits: Tensor, per_block: int) -> Tensor:
    """bits [B, M, C, Lp] -> [B * M * C * nb, W] int64: one block per row."""
    return bits.view(torch.uint8).view(torch.int64).view(-1, per_block)


def _row_base(b: int, m: int, c: int, nb: int, device) -> Tensor:
    """Row of block 0 of channel c of row (b, m) in ``_block_rows``: [B, M, C] int64."""
    return (torch.arange(b * m * c, device=device) * nb).view(b, m, c)


def _count_from(bits: Tensor, suffix: Tensor, channel: Tensor, pos: Tensor, block: int):
    """N_channel(pos) for arbitrary positions in [0, Lp]: channel, pos [B, M, S] -> [B, M, S]."""
    b, m, c, nb1 = suffix.shape
    per_block = block // 8
    blk = pos // block  # in [0, nb]
    at_start = suffix.view(b, m, c * nb1).gather(-1, channel * nb1 + blk)
    rows = _row_base(b, m, c, nb1 - 1, bits.device).view(b, m, c)
    row = rows.gather(-1, channel) + blk.clamp(max=nb1 - 2)  # pos = Lp: any block, offset 0
    words = _block_rows(bits, per_block).index_select(0, row.view(-1)).view(b, m, -1, per_block)
    early = words & ~_from_position(pos - blk * block, per_block)  # members before pos
    return at_start - ((early * _ONES) >> 56).sum(-1)


def _locate(bits: Tensor, suffix: Tensor, channel: Tensor, count: Tensor, block: int) -> Tensor:
    """Last position x with N_channel(x) >= count, i.e. the count-th most recent member of the
    channel: channel, count [B, M, S] int64 -> positions [B, M, S] int64. Slots with count
    outside [1, N_channel(0)] get some position in range."""
    b, m, c, nb1 = suffix.shape
    nb = nb1 - 1
    span = nb * block + 1  # > any count, so the channels' rows do not overlap
    offset = torch.arange(c, device=bits.device).view(c, 1) * span
    seq = (offset - suffix).view(b * m, c * nb1)  # ascending within and across channels
    query = (channel * span - count).view(b * m, -1)
    hits = torch.searchsorted(seq, query, right=True).view(b, m, -1)
    blk = (hits - channel * nb1 - 1).clamp(0, nb - 1)  # last block start with N >= count
    before = suffix.view(b, m, c * nb1).gather(-1, channel * nb1 + blk) - count
    row = _row_base(b, m, c, nb, bits.device).gather(-1, channel) + blk
    words = _block_rows(bits, block // 8).index_select(0, row.view(-1))
    return blk * block + _nth_member(words, before.view(-1)).view(b, m, -1)


# -- searches -------------------------------------------------------------------------------
@torch.no_grad()
def hierarchical_hard_search(
    history_levels: list[Tensor],
    target_levels: list[Tensor],
    mask: Tensor,
    quotas: list[int],
    k: int,
    fill: bool = True,
    block: int = BLOCK,
) -> tuple[Tensor, Tensor]:
    """Merged-list hierarchical hard search (docs/models.md, "Search stage"). Finest level
    first: up to quotas[finest] most recent behaviours matching the target there; then up to the
    next quota of not-yet-taken behaviours matching at the next coarser level; ...; then (if
    ``fill``) the most recent remaining real behaviours, until k are taken (quotas beyond k
    are clipped, finest first). history_levels[h] [B, L] and target_levels[h] [B, M] are
    integer ids, coarse -> fine; mask [B, L] True = real. Returns (idx, valid) [B, M, k],
    most recent first; with ``fill`` exactly min(k, real length) slots are valid."""
    _check(history_levels, target_levels, mask, quotas)
    _check_block(block)
    b, length = mask.shape
    m = target_levels[0].shape[1]
    levels = len(history_levels)
    if k <= 0 or length == 0 or m == 0:
        return _empty(b, m, max(k, 0), mask.device)
    dev = mask.device
    bits = _level_bits(history_levels, target_levels, mask, block)
    suffix = _suffix_counts(bits, block)  # [B, M, H+1, nb+1]
    nb = suffix.shape[-1] - 1
    per_block = block // 8
    rows = _block_rows(bits, per_block)
    base = _row_base(b, m, levels + 1, nb, dev)
    stage_quota = [k if fill else 0, *quotas]  # by channel: 0 = fill, c = level c - 1

    selected = torch.zeros_like(suffix[:, :, 0])  # s at the block starts, [B, M, nb+1]
    thresholds: list[Tensor] = [torch.full((b, m), nb * block, device=dev)] * (levels + 1)
    for c in range(levels, -1, -1):
        short = (selected - suffix[:, :, c]).view(b * m, nb + 1)  # -(N_c - s): ascending
        t = torch.minimum(-short[:, 0], k - selected[..., 0].view(-1)).clamp_(max=stage_quota[c])
        blk = torch.searchsorted(short, -t.unsqueeze(-1), right=True).view(b, m) - 1
        blk = blk.clamp_(0, nb - 1)  # the last block start with N_c - s >= t holds p_c
        words = rows.index_select(0, (base[:, :, c:] + blk.unsqueeze(-1)).view(-1))
        words = words.view(b, m, levels + 1 - c, per_block)  # channels c..H of that block
        start = blk * block
        free = words[:, :, 0]
        if c < levels:  # drop what finer stages took: U_c' at positions >= p_c'
            later = torch.stack(thresholds[c + 1 :], dim=-1) - start.unsqueeze(-1)
            took = words[:, :, 1:] & _from_position(later, per_block)
            for i in range(1, took.shape[2]):
                took[:, :, 0] |= took[:, :, i]
            free = free & ~took[:, :, 0]
        ahead = -short.gather(-1, blk.view(-1, 1)).squeeze(-1) - t  # eligible ahead of p_c
        offset = _nth_member(free.reshape(-1, per_block), ahead).view(b, m)
        t = t.view(b, m)
        thresholds[c] = torch.where(t > 0, start + offset, nb * block)
        selected = selected - torch.maximum(short.view(b, m, -1), -t.unsqueeze(-1))

    # windows: channel tau owns U_tau within [thr_tau, thr_{tau-1}), thr = cumulative min
    thr = torch.cummin(torch.stack(thresholds, dim=-1), dim=-1).values  # [B, M, H+1]
    upper = torch.cat([torch.full_like(thr[..., :1], nb * block), thr[..., :-1]], dim=-1)
    channels = torch.arange(levels + 1, device=dev).expand(b, m, levels + 1)
    n_at = _count_from(
        bits, suffix, torch.cat([channels, channels], -1), torch.cat([thr, upper], -1), block
    )
    n_lo, n_hi = n_at.split(levels + 1, dim=-1)  # N_tau(thr_tau), N_tau(thr_{tau-1})
    ends = (n_lo - n_hi).cumsum(-1)  # slots used by windows 0..tau
    slot = torch.arange(k, device=dev)
    channel = torch.zeros(b, m, k, dtype=torch.int64, device=dev)
    for tau in range(levels):  # windows wholly before the slot
        channel += slot >= ends[..., tau : tau + 1]
    first = torch.cat([torch.zeros_like(ends[..., :1]), ends[..., :-1]], dim=-1)
    count = (n_hi - first).gather(-1, channel) + slot + 1  # rank in the window -> N target
    valid = slot < ends[..., -1:]
    idx = _locate(bits, suffix, channel, torch.where(valid, count, 1), block)
    return torch.where(valid, idx, 0), valid


@torch.no_grad()
def per_level_hard_search(
    history_levels: list[Tensor],
    target_levels: list[Tensor],
    mask: Tensor,
    quotas: list[int],
    block: int = BLOCK,
) -> list[tuple[Tensor, Tensor]]:
    """Per-level reading of the hierarchical hard search (docs/models.md, "Search stage"): one
    sub-sequence per level h (coarse -> fine), the quotas[h] most recent real behaviours matching
    the target at level h (path match, see the module docstring); sub-sequences of different levels
    may overlap. Returns a list of (idx, valid) [B, M, quotas[h]], each most recent first."""
    _check(history_levels, target_levels, mask, quotas)
    _check_block(block)
    b, length = mask.shape
    m = target_levels[0].shape[1]
    total = sum(quotas)
    if total == 0 or length == 0 or m == 0:
        return [_empty(b, m, q, mask.device) for q in quotas]
    dev = mask.device
    bits = _level_bits(history_levels, target_levels, mask, block)
    suffix = _suffix_counts(bits, block)
    level_ids = torch.arange(1, len(quotas) + 1, device=dev)  # channel c = level c - 1
    channel = torch.repeat_interleave(level_ids, torch.tensor(quotas, device=dev))
    channel = channel.expand(b, m, total)
    count = torch.cat([torch.arange(1, q + 1, device=dev) for q in quotas])  # rank per level
    valid = count <= suffix[..., 0].gather(-1, channel)
    count = torch.where(valid, count, 1)
    idx = torch.where(valid, _locate(bits, suffix, channel, count, block), 0)
    sizes = list(quotas)
    return list(zip(idx.split(sizes, dim=-1), valid.split(sizes, dim=-1), strict=True))


@torch.no_grad()
def union_search(
    idx_a: Tensor, valid_a: Tensor, idx_b: Tensor, valid_b: Tensor, k_total: int | None = None
) -> tuple[Tensor, Tensor]:
    """Union of two retrievals [B, M, K_a] and [B, M, K_b] (e.g. hard ∪ soft) with
    de-duplication: every history position at most once, valid ones first (a's in a's order,
    then b's new ones in b's order), cut or padded to k_total slots (default K_a + K_b).
    Invalid input slots never become valid; padded and invalid slots hold index 0."""
    idx = torch.cat([idx_a, idx_b], dim=-1)
    valid = torch.cat([valid_a, valid_b], dim=-1)
    n = idx.shape[-1]
    k_total = n if k_total is None else k_total
    if k_total < 0:
        raise ValueError(f"k_total must be non-negative, got {k_total}")
    key = torch.where(valid, idx, -1)
    sorted_key, order = torch.sort(key, dim=-1, stable=True)  # first occurrence stays first
    first = sorted_key >= 0
    first[..., 1:] &= sorted_key[..., 1:] != sorted_key[..., :-1]
    keep = torch.empty_like(first).scatter_(-1, order, first)
    rank = torch.arange(n, device=idx.device) + n * (~keep).to(torch.int64)
    take = rank.argsort(dim=-1)[..., : min(k_total, n)]
    out_idx = torch.where(keep, idx, 0).gather(-1, take)
    out_valid = keep.gather(-1, take)
    if k_total > n:
        pad_idx, pad_valid = _empty(*idx.shape[:-1], k_total - n, idx.device)
        out_idx = torch.cat([out_idx, pad_idx], dim=-1)
        out_valid = torch.cat([out_valid, pad_valid], dim=-1)
    return out_idx, out_valid
