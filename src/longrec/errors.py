"""Errors caused by what the user gave us.

Anything raised as a `UserError` is printed by the command line as one line, without a
traceback, and the process exits with status 2. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """A problem with the user's input, configuration or environment."""


class DataError(UserError):
    """A problem in an input file, located as precisely as we can (file, line, field)."""

    def __init__(
        self, path: str | Path, problem: str, line: int | None = None, field: str | None = None
    ):
        self.path = str(path)
        self.problem = problem
        self.line = line
        self.field = field
        where = self.path if line is None else f"{self.path}:{line}"
        what = problem if field is None else f"field '{field}': {problem}"
        super().__init__(f"{where}: {what}")
