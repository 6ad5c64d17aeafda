"""Canonical column names and the description of fields in a prepared dataset.

A *field* is one categorical attribute of a behaviour or a target (item, category, behaviour
type, ...). Every field has its own vocabulary (0 = padding, 1 = unseen) and one array in the
store. Fields are either item-side (a property of the item, so it can be looked up for a
sampled negative or a served candidate) or event-side (a property of the behaviour itself, such
as the behaviour type or the domain it happened in).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

PAD = 0
UNSEEN = 1
FIRST_INDEX = 2

USER, ITEM, TS = "user", "item", "ts"
CATEGORY, CATEGORY_PATH, BEHAVIOR, DOMAIN = "category", "category_path", "behavior", "domain"
REQUIRED_COLUMNS = (USER, ITEM, TS)
OPTIONAL_COLUMNS = (CATEGORY, CATEGORY_PATH, BEHAVIOR, DOMAIN)

# Item-side unless declared otherwise: a behaviour's type and its domain belong to the event.
EVENT_SIDE_FIELDS = frozenset({BEHAVIOR, DOMAIN})

FORMAT_VERSION = 1

Side = Literal["item", "event"]


@dataclass(frozen=True)
class FieldSpec:
    """One categorical field of the store.

    `width` > 1 marks a multi-valued field (e.g. all genres of a movie) stored as a fixed-width,
    zero-padded row per behaviour.
    """

    name: str
    vocab_size: int
    side: Side = "item"
    width: int = 1

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> FieldSpec:
        return cls(**d)


def category_level_field(level: int) -> str:
    """Name of the field holding level `level` (1 = coarsest) of a category path."""
    return f"category_l{level}"
