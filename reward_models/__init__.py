"""Reward functions for esorl's RL recipes, in TRL's callable convention.

Every reward is ``f(prompts, completions, **columns) -> list[float | None]`` with
a ``__name__``; unknown keyword arguments (``completion_ids``, ``trainer_state`` ...)
are accepted and ignored.

- rule based: :func:`gsm8k_answer_reward`, :func:`length_reward`,
  :func:`keyword_reward`, :func:`format_reward`;
- learned: :class:`SequenceClassifierReward` (any HF sequence classifier),
  :func:`train_sentiment_model` (a tiny SST-2 classifier trained from scratch);
- plumbing: :func:`weighted_sum`, :func:`call_reward`, :class:`RewardFunctionError`.
"""

from .combine import RewardFunctionError, WeightedSum, call_reward, reward_name, weighted_sum
from .hf_classifier import SequenceClassifierReward
from .rule_based import (
    FormatReward,
    KeywordReward,
    LengthReward,
    completion_text,
    extract_gsm8k_answer,
    format_reward,
    gsm8k_answer_reward,
    keyword_reward,
    length_reward,
)

# train_sentiment is imported on first use: importing it eagerly here would make
# `python -m reward_models.train_sentiment` warn that the module was imported twice.
_LAZY = {"train_sentiment_model", "SentimentTrainConfig"}


def __getattr__(name: str):
    if name in _LAZY:
        from . import train_sentiment

        return getattr(train_sentiment, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LAZY)

__all__ = [
    "FormatReward",
    "KeywordReward",
    "LengthReward",
    "RewardFunctionError",
    "SentimentTrainConfig",
    "SequenceClassifierReward",
    "WeightedSum",
    "call_reward",
    "completion_text",
    "extract_gsm8k_answer",
    "format_reward",
    "gsm8k_answer_reward",
    "keyword_reward",
    "length_reward",
    "reward_name",
    "train_sentiment_model",
    "weighted_sum",
]
