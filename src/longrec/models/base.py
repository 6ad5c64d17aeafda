"""The model contract (DESIGN.md): forward == score(encode_user(batch), batch).

`encode_user` does all the work that does not depend on the targets (embedding the history,
precomputing keys, a history FFN, a KV cache) and returns a `UserState` (a dict of tensors,
cacheable per user); `score` does the rest for the M targets of each row. Training uses
`forward_train`, which may also return auxiliary logits (DARE's full-sequence head).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from longrec.data.batch import Batch
from longrec.data.schema import FieldSpec
from longrec.errors import UserError

UserState = dict[str, Tensor]


@dataclass
class DataSchema:
    """What a model needs to know about the data to build its tables."""

    fields: dict[str, FieldSpec]  # history fields
    target_fields: tuple[str, ...]
    n_users: int
    max_len: int
    n_target_types: int = 0
    fingerprint: str | None = None  # the dataset's vocabularies (PreparedDataset.fingerprint)

    @classmethod
    def from_dataset(cls, dataset, max_len: int) -> DataSchema:
        n_types = dataset.vocab_size("target_type") if "target_type" in dataset.target_fields else 0
        return cls(
            dict(dataset.fields),
            tuple(dataset.target_fields),
            dataset.n_users,
            max_len,
            n_types,
            dataset.fingerprint,
        )

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["fields"] = {k: v.to_json() for k, v in self.fields.items()}
        d["target_fields"] = list(self.target_fields)
        return d

    @classmethod
    def from_json(cls, d: dict) -> DataSchema:
        d = dict(d)
        d["fields"] = {k: FieldSpec.from_json(v) for k, v in d["fields"].items()}
        d["target_fields"] = tuple(d["target_fields"])
        return cls(**d)

    def shared_item_fields(self) -> list[str]:
        """Item-side fields present in both history and targets (item first)."""
        names = [n for n, f in self.fields.items() if f.side == "item" and n in self.target_fields]
        return sorted(names, key=lambda n: (n != "item", n != "category", n))

    def head_types(self, type_dim: int) -> dict[str, int]:
        """MLPHead's target-type arguments for a model's `type_dim` (no table without types)."""
        return {"target_types": self.n_target_types, "type_dim": type_dim}

    def vocab(self, name: str) -> int:
        return self.fields[name].vocab_size

    def multi_fields(self) -> frozenset[str]:
        return frozenset(n for n, f in self.fields.items() if f.width > 1)


class SequenceModel(nn.Module, ABC):
    """Base of every model: parameters come from a `Params` dataclass with documented defaults."""

    name: ClassVar[str] = ""
    Params: ClassVar[type] = object

    def __init__(self, schema: DataSchema, params: Any):
        super().__init__()
        self.schema = schema
        self.params = params

    @classmethod
    def make_params(cls, values: dict[str, Any]):
        known = {f.name for f in dataclasses.fields(cls.Params)}
        unknown = set(values) - known
        if unknown:
            raise UserError(
                f"model '{cls.name}': unknown parameter(s) {', '.join(sorted(unknown))}; "
                f"known: {', '.join(sorted(known))}"
            )
        return cls.Params(**values)

    @abstractmethod
    def encode_user(self, batch: Batch) -> UserState:
        """Everything that does not depend on the targets."""

    @abstractmethod
    def score(self, state: UserState, batch: Batch) -> Tensor:
        """Logits [B, M] of the targets given the user state."""

    def forward(self, batch: Batch) -> Tensor:
        return self.score(self.encode_user(batch), batch)

    def forward_train(self, batch: Batch) -> tuple[Tensor, list[tuple[Tensor, float]]]:
        """(logits, [(auxiliary logits, loss weight), ...]); no auxiliary head by default."""
        return self(batch), []

    def search_scores(self, batch: Batch) -> Tensor | None:
        """Relevance of every behaviour to every target [B, M, L] as the search stage ranks it
        (for retrieval NDCG); None for models without a search stage."""
        return None

    def history_fields(self) -> tuple[str, ...] | None:
        """History fields the model reads (None = all): the loader gathers only these, which
        is most of its cost on long histories. Models that embed `self.fields` and match on a
        search field declare them here."""
        names = list(getattr(self, "fields", None) or [])
        if not names:
            return None
        for extra in ("category", getattr(self.params, "search_field", None)):
            if extra and extra in self.schema.fields and extra not in names and self._reads(extra):
                names.append(extra)
        return tuple(names)

    def reads_history_ts(self) -> bool:
        """Whether the model reads `batch.history_ts`: the loader copies the timestamps (8 bytes
        a behaviour) only for models that do."""
        return True

    def _reads(self, name: str) -> bool:
        """Whether the search stage reads `name` beyond the embedded fields (hard search)."""
        return getattr(self.params, "search", None) == "hard" or name == getattr(
            self.params, "search_field", None
        )

    def embedding_parameters(self) -> list[nn.Parameter]:
        """Embedding tables (separate optimiser, no L2 penalty)."""
        return [m.weight for m in self.modules() if isinstance(m, nn.Embedding)]
