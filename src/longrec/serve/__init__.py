"""Online serving: history stores (LMDB default, Redis shared), the ranker and the HTTP app.

`open_history(url, fields)` opens a `HistoryStore`; `longrec.serve.load_history.load_history`
fills one from a prepared dataset.
"""

from longrec.serve.history import (
    DEFAULT_CHUNK,
    DEFAULT_MAX_PER_USER,
    HistorySchemaError,
    HistoryStore,
    open_history,
    record_dtype,
)

__all__ = [
    "DEFAULT_CHUNK",
    "DEFAULT_MAX_PER_USER",
    "HistorySchemaError",
    "HistoryStore",
    "open_history",
    "record_dtype",
]
