"""Converters for released checkpoints (docs/ESOLM.md §9)."""

from . import official
from .official import *  # noqa: F401,F403 - the public API is official.__all__

__all__ = official.__all__
