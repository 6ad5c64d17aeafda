"""longrec: long user-behaviour sequence models for click-through and conversion prediction."""

__version__ = "0.1.0"
