"""Rank requests as model batches: a user's history left-padded into a one-row `Batch`,
several such rows stacked for a micro-batched forward, and candidates attached as targets
(their item-side fields looked up in the dataset's item tables). IAT's instance tokens travel
in `Batch.extra` ([1, T, D] per row, left-padded to a common T when rows are stacked)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from longrec.data.batch import Batch
from longrec.data.schema import UNSEEN


class RequestBatches:
    def __init__(self, schema, fields: tuple[str, ...], item_tables: dict[str, torch.Tensor]):
        self.schema, self.fields, self.item_tables = schema, fields, item_tables

    @staticmethod
    def padded_length(events: dict[str, np.ndarray]) -> int:
        """History slots for n behaviours: n rounded up to a multiple of 8 (at least 8)."""
        n = len(events["ts"]) if "ts" in events else 0
        return max(8, -(-n // 8) * 8)

    def history(
        self,
        events: dict[str, np.ndarray],
        now: int,
        length: int | None = None,
        extra: dict[str, torch.Tensor] | None = None,
    ) -> Batch:
        """A one-user batch of the history, left-padded to `length` slots (extra left padding
        leaves every model's scores unchanged, so a state encoded at one length serves any)."""
        n = len(events["ts"]) if "ts" in events else 0
        length = length or self.padded_length(events)
        mask = torch.zeros(1, length, dtype=torch.bool)
        mask[0, length - n :] = True
        history = {}
        for f in self.fields:
            spec = self.schema.fields[f]
            shape = (1, length) if spec.width == 1 else (1, length, spec.width)
            t = torch.zeros(shape, dtype=torch.int32)
            if n:
                t[0, length - n :] = torch.from_numpy(
                    np.asarray(events[f], dtype=np.int32).reshape(n, *shape[2:])
                )
            history[f] = t
        ts = torch.zeros(1, length, dtype=torch.int64)
        if n:
            ts[0, length - n :] = torch.from_numpy(np.asarray(events["ts"], dtype=np.int64))
        empty = torch.zeros(1, 1, dtype=torch.int64)
        return Batch(
            user=torch.zeros(1, dtype=torch.int64),
            history=history,
            history_mask=mask,
            history_ts=ts,
            target={k: empty for k in self.schema.target_fields},
            target_ts=torch.full((1, 1), now, dtype=torch.int64),
            label=torch.zeros(1, 1),
            target_mask=torch.ones(1, 1, dtype=torch.bool),
            extra=extra,
        )

    @staticmethod
    def stack(rows: list[Batch]) -> Batch:
        """One B-user batch from one-user batches of equal history length."""
        if len(rows) == 1:
            return rows[0]
        first = rows[0]
        return Batch(
            user=torch.cat([r.user for r in rows]),
            history={f: torch.cat([r.history[f] for r in rows]) for f in first.history},
            history_mask=torch.cat([r.history_mask for r in rows]),
            history_ts=torch.cat([r.history_ts for r in rows]),
            target={k: torch.cat([r.target[k] for r in rows]) for k in first.target},
            target_ts=torch.cat([r.target_ts for r in rows]),
            label=torch.cat([r.label for r in rows]),
            target_mask=torch.cat([r.target_mask for r in rows]),
            extra=_stack_extra([r.extra for r in rows]),
        )

    def with_targets(
        self,
        batch: Batch,
        items: torch.Tensor,
        types: torch.Tensor | None,
        now: torch.Tensor,
        target_mask: torch.Tensor,
    ) -> Batch:
        """`batch` with targets items [B, m] (their item-side fields looked up), request
        times now [B] and target_mask [B, m] (False on slots padding shorter requests)."""
        target = {}
        for name in self.schema.target_fields:
            if name == "item":
                target[name] = items
            elif name == "target_type":
                target[name] = types if types is not None else torch.full_like(items, UNSEEN)
            elif name in self.item_tables:
                table = self.item_tables[name]
                target[name] = table[items.clamp_max(len(table) - 1)]
        return Batch(
            user=batch.user,
            history=batch.history,
            history_mask=batch.history_mask,
            history_ts=batch.history_ts,
            target=target,
            target_ts=now.view(-1, 1).expand_as(items).contiguous(),
            label=torch.zeros(items.shape),
            target_mask=target_mask,
            extra=batch.extra,
        )


def _stack_extra(rows: list[dict[str, torch.Tensor] | None]) -> dict[str, torch.Tensor] | None:
    """Side sequences [1, T_i, ...] of each row, left-padded (zeros) to the longest T."""
    if all(r is None for r in rows):
        return None
    if any(r is None for r in rows):
        raise ValueError("either every row of a batch carries side sequences or none does")
    width = max(r["token_mask"].shape[1] for r in rows)
    out = {}
    for key in rows[0]:
        parts = []
        for r in rows:
            x = r[key]
            pad = width - x.shape[1]
            parts.append(F.pad(x, (0, 0) * (x.dim() - 2) + (pad, 0)) if pad else x)
        out[key] = torch.cat(parts)
    return out
