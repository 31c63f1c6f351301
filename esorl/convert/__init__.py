"""Converters for released checkpoints (spec §9)."""

from . import official
from .official import *  # noqa: F401,F403 - the public API is official.__all__

__all__ = official.__all__
