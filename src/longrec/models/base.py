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
        _check_param_values(cls.name, cls.Params, values)
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

    def history_cap(self) -> int | None:
        """The most behaviours the model reads whatever the batch holds (models that encode
        only their most recent `max_len`, fixed when built); None = all it is given."""
        cap = getattr(self, "max_len", None)
        return int(cap) if isinstance(cap, int) else None

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


# widths and counts that no model can be built with at 0; other int parameters may be 0
# (n_layers=0: no self-attention layers; type_dim=0: no target-type embedding; ...)
_ZERO_ALLOWED = frozenset({"type_dim", "pos_dim", "attn_pos_dim", "time_dim"})
_COUNTS = frozenset({"heads", "n_heads", "top_k", "soft_k", "hashes", "bits", "bits_per_hash"})


def _needs_positive(name: str) -> bool:
    if name in _ZERO_ALLOWED:
        return False
    return name == "dim" or name.endswith("_dim") or name in _COUNTS or name.endswith("_buckets")


def _check_param_values(model: str, params_type: type, values: dict[str, Any]) -> None:
    """Types and ranges of the parameters a user set: an int parameter takes an int (not a
    bool or a float), never a negative one, and 0 only where 0 means "off"; a float parameter
    takes a finite number."""
    import math
    import types
    import typing

    try:
        hints = typing.get_type_hints(params_type)
    except Exception:  # annotations that only resolve for type checkers: nothing to check by
        return
    defaults = {f.name: f.default for f in dataclasses.fields(params_type)}
    for name, value in values.items():
        hint = hints.get(name)
        origin = typing.get_origin(hint)
        if origin is None:
            allowed = (hint,)
        elif origin in (typing.Union, types.UnionType):
            allowed = typing.get_args(hint)
        else:  # tuple[int, ...], Literal[...]: not a plain number
            continue
        if value is None and type(None) in allowed:
            continue
        where = f"model '{model}': {name} = {value!r}"
        if int in allowed and float not in allowed and bool not in allowed:
            if not isinstance(value, int) or isinstance(value, bool):
                raise UserError(f"{where} must be an integer")
            zero_ok = not _needs_positive(name) or defaults[name] in (0, None)
            if value < 0 or (value == 0 and not zero_ok):
                raise UserError(f"{where} must be at least {0 if zero_ok else 1}")
        elif float in allowed and bool not in allowed:
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise UserError(f"{where} must be a number")
            if not math.isfinite(value):
                raise UserError(f"{where} must be finite")
