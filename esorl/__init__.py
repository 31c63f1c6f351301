"""esorl: RL fine-tuning of Esoteric Language Models with exact trajectory likelihoods."""

from .configuration_esolm import EsoLMConfig
from .modeling_esolm import EsoKVCache, EsoLMModel

__version__ = "0.1.0"
__all__ = ["EsoLMConfig", "EsoLMModel", "EsoKVCache"]
