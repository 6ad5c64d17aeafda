"""`longrec train` notes when dense Adam would update every row of a large table each step."""

from __future__ import annotations

import torch
from torch import nn

from longrec.config import TrainConfig
from longrec.train.optim import LARGE_TABLE_ROWS, dense_update_hint


class _Tables(nn.Module):
    def __init__(self, rows: int):
        super().__init__()
        self.table = nn.Embedding(rows, 2, _weight=torch.empty(rows, 2))

    def embedding_parameters(self):
        return [self.table.weight]


def test_dense_adam_on_a_large_table_gets_a_note():
    big, small = _Tables(LARGE_TABLE_ROWS), _Tables(LARGE_TABLE_ROWS - 1)
    note = dense_update_hint(big, TrainConfig(embed_optimizer="adam"))
    assert note is not None and f"{LARGE_TABLE_ROWS:,} rows" in note and "rowwise_adagrad" in note
    assert dense_update_hint(small, TrainConfig(embed_optimizer="adam")) is None
    for optimizer in ("rowwise_adam", "rowwise_adagrad", "sparse_adam"):
        assert dense_update_hint(big, TrainConfig(embed_optimizer=optimizer)) is None
