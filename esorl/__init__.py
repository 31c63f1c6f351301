"""esorl: RL fine-tuning of Esoteric Language Models with exact trajectory likelihoods.

Importing ``esorl`` registers the Eso-LM with ``transformers``' ``AutoConfig`` /
``AutoModel``. Only the console script's own ``esorl``, ``esorl --help`` and ``esorl
--version`` skip that import (they need no torch, and answer at once); there ``EsoLMConfig``,
``EsoLMModel`` and ``EsoKVCache`` are imported on first access.
"""

import os as _os
import sys as _sys

__version__ = "0.1.0"
__all__ = ["EsoLMConfig", "EsoLMModel", "EsoKVCache", "__version__"]

_LAZY = {"EsoLMConfig": "configuration_esolm", "EsoLMModel": "modeling_esolm", "EsoKVCache": "kv_cache"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def _help_only() -> bool:
    argv = _sys.argv
    return _os.path.basename(argv[0] or "") == "esorl" and (len(argv) == 1 or argv[1] in ("-h", "--help", "-V", "--version"))


if not _help_only():
    from .configuration_esolm import EsoLMConfig  # noqa: E402,F401
    from .kv_cache import EsoKVCache  # noqa: E402,F401
    from .modeling_esolm import EsoLMModel  # noqa: E402,F401  (registers the auto classes)
