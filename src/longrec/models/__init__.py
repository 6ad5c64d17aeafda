"""Models: each composes nn/ blocks and is registered by name (see registry.py)."""

from longrec.models.registry import MODELS, build_model, describe_models

__all__ = ["MODELS", "build_model", "describe_models"]
