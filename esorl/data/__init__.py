"""Data: the embedded synthetic corpus, tokenizers, dataset loading and packing."""

from .datasets import (
    load_prompt_completion_dataset,
    load_text_dataset,
    split_train_eval,
    tokenize_and_pack,
)
from .synthetic import generate_reviews, negative_words, positive_words, write_synthetic_corpus
from .tokenizer import SPECIAL_TOKENS, load_tokenizer, mask_token_id, tokenizer_ids, train_tokenizer

__all__ = [
    "SPECIAL_TOKENS",
    "generate_reviews",
    "write_synthetic_corpus",
    "positive_words",
    "negative_words",
    "train_tokenizer",
    "load_tokenizer",
    "mask_token_id",
    "tokenizer_ids",
    "load_text_dataset",
    "load_prompt_completion_dataset",
    "tokenize_and_pack",
    "split_train_eval",
]
