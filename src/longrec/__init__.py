"""longrec: long user-behaviour sequence models for click-through and conversion prediction."""

from longrec.malloc import tune_malloc as _tune_malloc

__version__ = "0.1.0"

_tune_malloc()  # keep freed activation buffers mapped (see longrec/malloc.py)
