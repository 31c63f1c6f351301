"""esorl: RL fine-tuning of Esoteric Language Models with exact trajectory likelihoods.

``EsoLMConfig``, ``EsoLMModel`` and ``EsoKVCache`` are imported on first access (so that
``esorl --help`` does not load torch); accessing ``EsoLMModel`` also registers the Eso-LM
with ``transformers``' ``AutoConfig`` / ``AutoModel``.
"""

__version__ = "0.1.0"
__all__ = ["EsoLMConfig", "EsoLMModel", "EsoKVCache", "__version__"]

_LAZY = {"EsoLMConfig": "configuration_esolm", "EsoLMModel": "modeling_esolm", "EsoKVCache": "modeling_esolm"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
