"""A per-user, time-ordered store of dense vectors, one per past training instance (IAT's
instance tokens, docs/iat.md): the instance's compressed 64-d embedding plus its label.

Layout (a directory, written atomically):
    offsets.npy   int64 [n_users + 1]   user indices as in the dataset's user vocabulary
    ts.npy        int64 [N]             instance (request) time, sorted within each user
    label.npy     float32 [N]
    tokens.npy    float16/float32 [N, D]
    meta.json     dimension, count, how it was made

A request at time t may only see tokens with ts < t (strictly): `before` enforces it with the
same per-user binary search as the behaviour store's histories.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from longrec.data.store import history_end
from longrec.errors import UserError
from longrec.outputs import replace_dir, temp_path, write_marker


@dataclass
class TokenStore:
    offsets: np.ndarray
    ts: np.ndarray
    label: np.ndarray
    tokens: np.ndarray
    meta: dict

    @classmethod
    def open(cls, root: str | Path) -> TokenStore:
        root = Path(root)
        if not (root / "meta.json").exists():
            raise UserError(
                f"{root} is not a token store (no meta.json); build one with `longrec iat tokens`"
            )
        load = lambda n: np.load(root / f"{n}.npy", mmap_mode="r")  # noqa: E731
        return cls(
            np.asarray(load("offsets")),
            load("ts"),
            load("label"),
            load("tokens"),
            json.loads((root / "meta.json").read_text()),
        )

    @property
    def dim(self) -> int:
        return int(self.tokens.shape[1])

    @staticmethod
    def write(
        root: str | Path,
        n_users: int,
        user: np.ndarray,
        ts: np.ndarray,
        label: np.ndarray,
        tokens: np.ndarray,
        meta: dict,
    ) -> None:
        root = Path(root)
        order = np.lexsort((np.arange(len(user)), ts, user))  # by user, then time, stable
        counts = np.bincount(user, minlength=n_users)
        tmp = temp_path(root)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        np.save(tmp / "offsets.npy", np.concatenate(([0], np.cumsum(counts))).astype(np.int64))
        np.save(tmp / "ts.npy", ts[order].astype(np.int64))
        np.save(tmp / "label.npy", label[order].astype(np.float32))
        np.save(tmp / "tokens.npy", tokens[order])
        (tmp / "meta.json").write_text(
            json.dumps({**meta, "count": len(user), "dim": int(tokens.shape[1])}, indent=2)
        )
        write_marker(tmp, "token-store")
        replace_dir(tmp, root)

    def before(self, user: np.ndarray, t: np.ndarray, max_tokens: int) -> dict[str, torch.Tensor]:
        """The (up to) `max_tokens` most recent tokens of each user strictly before t, left-padded:
        tokens [B, T, D] float32, token_label [B, T], token_mask [B, T]."""
        user = np.asarray(user, dtype=np.int64)
        user = np.minimum(user, len(self.offsets) - 2)
        end = history_end(self.ts, self.offsets, user, np.asarray(t, dtype=np.int64))
        start = np.maximum(self.offsets[user], end - max_tokens)
        n = end - start
        width = max(1, int(n.max()) if len(n) else 1)
        idx = end[:, None] - width + np.arange(width)[None, :]
        mask = idx >= start[:, None]
        idx = np.where(mask, idx, 0)
        tokens = np.asarray(self.tokens[idx.reshape(-1)], dtype=np.float32).reshape(
            len(user), width, -1
        )
        tokens *= mask[..., None]
        label = np.asarray(self.label[idx]) * mask
        return {
            "tokens": torch.from_numpy(tokens),
            "token_label": torch.from_numpy(label.astype(np.float32)),
            "token_mask": torch.from_numpy(mask),
            "token_ts": torch.from_numpy(np.asarray(self.ts[idx]) * mask),
        }
