"""Models by name. A registered name is a model class plus preset parameters, so paper variants
(TWIN hard, TWIN w/o TR, ...) are one line each rather than string tests inside a class."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from longrec.errors import UserError


@dataclass(frozen=True)
class Entry:
    cls: type
    preset: dict[str, Any] = field(default_factory=dict)
    description: str = ""


MODELS: dict[str, Entry] = {}


def register(name: str, description: str, **preset: Any):
    def wrap(cls):
        MODELS[name] = Entry(cls, preset, description)
        if not cls.name:
            cls.name = name
        return cls

    return wrap


def register_variant(name: str, cls: type, description: str, **preset: Any) -> None:
    MODELS[name] = Entry(cls, preset, description)


def _load_all() -> None:
    # importing the modules registers their models
    from longrec.models import (  # noqa: F401
        din,
        eta,
        hstu,
        iat,
        longer,
        sasrec,
        sdim,
        sim,
        stca,
        td_sasrec,
        tin,
        two_stage,
    )


def build_model(name: str, schema, params: dict[str, Any] | None = None, **context: Any):
    _load_all()
    if name not in MODELS:
        raise UserError(
            f"unknown model '{name}'; `longrec models` lists: {', '.join(sorted(MODELS))}"
        )
    entry = MODELS[name]
    merged = {**entry.preset, **(params or {})}
    try:
        model = entry.cls(schema, entry.cls.make_params(merged), **context)
    except ValueError as err:  # the constructors' parameter checks: a user's config mistake
        raise UserError(f"model '{name}': {err}") from err
    model.registered_name = name
    return model


def describe_models() -> list[tuple[str, str]]:
    _load_all()
    return [(name, MODELS[name].description) for name in sorted(MODELS)]
