"""Command implementations, one module per command, each exposing `register(app)`."""

from __future__ import annotations

import importlib

import typer

COMMAND_MODULES = (
    "prepare",
    "synth",
    "demo",
    "train",
    "compare",
    "ablate",
    "bench",
    "serve",
    "iat",
)


def register_all(app: typer.Typer) -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(f"longrec.commands.{name}").register(app)
