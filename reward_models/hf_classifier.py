"""Any Hugging Face sequence-classification model as a TRL reward function."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal, Sequence

import torch

from .rule_based import completion_text

__all__ = ["SequenceClassifierReward"]


class SequenceClassifierReward:
    """Wrap a ``AutoModelForSequenceClassification`` model into a reward callable.

    ``reward(prompts, completions, **ignored) -> list[float]`` scores each text
    with the model (eval mode, no grad, batches of ``batch_size``) and returns,
    for class ``label``:

    - ``kind="prob"``: its softmax probability, in [0, 1];
    - ``kind="logprob"``: its log-softmax, in (-inf, 0];
    - ``kind="logit"``: its raw logit.

    Single-logit models (``num_labels == 1``, e.g. preference reward models) and
    ``problem_type="multi_label_classification"`` models use a sigmoid instead
    of the softmax (``label`` must then index the logit: 0 for a single logit).

    Args:
        model_name_or_path: hub name or local directory (``from_pretrained``),
            or an already built ``PreTrainedModel`` (then pass ``tokenizer``).
        label: class index, or a label name looked up in ``config.label2id``
            (exact, then case-insensitive), e.g. ``"positive"``.
        kind: ``"prob"`` | ``"logit"`` | ``"logprob"``.
        text: what is scored: ``"completion"`` or ``"prompt+completion"``
            (``prompt + separator + completion``, the way TRL feeds reward models).
        batch_size: texts per forward pass.
        device: torch device for the model.
        max_length: tokens per text (special tokens included); longer texts are
            truncated (on the tokenizer's ``truncation_side``). Capped at the
            tokenizer's ``model_max_length`` and at the positions the model has
            (``max_position_embeddings`` / ``n_positions``, less the offset of
            RoBERTa-style position tables that start after the padding index).
        local_files_only: never contact the hub (``from_pretrained`` flag).
        tokenizer: a tokenizer object or name/path (default: the model's).
        separator: inserted between prompt and completion for ``"prompt+completion"``.
        name: ``__name__`` override; default ``<model dir/repo name>_<label name>``
            plus ``_<kind>`` unless ``kind == "prob"``.
        dtype: optional torch dtype to load the model in.
        **model_kwargs: passed to ``from_pretrained`` (e.g. ``revision``, ``trust_remote_code``).

    Conversational prompts/completions (lists of messages) are scored on their
    concatenated contents. Texts are sorted by token count before batching (less
    padding); results come back in input order.

    Every text gets a defined score that does not depend on the batch it lands in
    (the same value, up to float rounding, as scoring it alone):

    - Batches are padded here, always on the right (a tokenizer's
      ``padding_side="left"`` is ignored: left padding would shift the absolute
      positions of GPT-2/BERT-style models), with the model's
      ``config.pad_token_id`` and an attention mask. If the config has no pad id it
      is set to the tokenizer's pad id (else its eos id): GPT-2-style classifiers
      pool the last token that is not ``config.pad_token_id``, so padding with
      exactly that id keeps the pooled position independent of the padding.
    - A text that tokenizes to **zero tokens** (``""``, whitespace, an empty
      message list, with a tokenizer that adds no special tokens of its own) is
      scored as the one-token input ``[eos]``: the document that ends at once.
      If the tokenizer has no eos token, ``[bos]``; if neither, the pad token
      used for batching. (Tokenizers that add special tokens, e.g. BERT's
      ``[CLS] [SEP]``, never produce zero tokens and are fed as they are.) An
      empty row would otherwise crash the model or, padded inside a batch, be
      a fully masked row whose score depends on its batch.
    - Texts longer than ``max_length`` tokens are truncated; eos/pad *text* in
      a completion (``"<eos>"``, ``"<|endoftext|>"``) is tokenized like any other
      text.
    """

    def __init__(
        self,
        model_name_or_path: str | os.PathLike | Any,
        label: int | str = 1,
        kind: Literal["prob", "logit", "logprob"] = "prob",
        text: Literal["completion", "prompt+completion"] = "completion",
        batch_size: int = 32,
        device: str | torch.device = "cpu",
        max_length: int = 128,
        *,
        local_files_only: bool = False,
        tokenizer: Any = None,
        separator: str = "",
        name: str | None = None,
        dtype: torch.dtype | None = None,
        **model_kwargs: Any,
    ) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

        if kind not in ("prob", "logit", "logprob"):
            raise ValueError(f"kind must be 'prob', 'logit' or 'logprob', got {kind!r}")
        if text not in ("completion", "prompt+completion"):
            raise ValueError(f"text must be 'completion' or 'prompt+completion', got {text!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")

        if isinstance(model_name_or_path, PreTrainedModel):
            model = model_name_or_path
            source = str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
            if tokenizer is None:
                if not source or source == type(model).__name__:
                    raise ValueError("pass tokenizer= when giving a model object without a saved name_or_path")
                tokenizer = source
        else:
            source = str(model_name_or_path)
            if dtype is not None:
                model_kwargs["dtype"] = dtype
            model = AutoModelForSequenceClassification.from_pretrained(
                source, local_files_only=local_files_only, **model_kwargs
            )
        if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
            tok_source = source if tokenizer is None else str(tokenizer)
            tok_kwargs = {k: model_kwargs[k] for k in ("revision", "trust_remote_code") if k in model_kwargs}
            tokenizer = AutoTokenizer.from_pretrained(tok_source, local_files_only=local_files_only, **tok_kwargs)

        vocab = _vocab_size(model)
        pad_id = getattr(model.config, "pad_token_id", None)
        if pad_id is None:
            # e.g. GPT-2 style classifiers find the last non-pad token through it
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            if pad_id is None:
                raise ValueError(
                    f"neither the model config nor the tokenizer of {source!r} has a pad or eos token to pad batches with; "
                    "set model.config.pad_token_id"
                )
            model.config.pad_token_id = pad_id
        if not _valid_id(pad_id, vocab):
            raise ValueError(f"pad_token_id {pad_id!r} of {source!r} is not a token id of the model (vocabulary {vocab})")
        self.pad_token_id = int(pad_id)
        # The one-token input that stands for a text with no tokens (see the class docstring).
        self.empty_token_id = next(
            int(i) for i in (tokenizer.eos_token_id, tokenizer.bos_token_id, self.pad_token_id) if _valid_id(i, vocab)
        )

        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.kind = kind
        self.text = text
        self.batch_size = batch_size
        # Never feed more tokens than the model has positions for (or the tokenizer allows).
        limits = [max_length]
        tok_max = getattr(tokenizer, "model_max_length", None)
        if isinstance(tok_max, int) and 0 < tok_max < 1_000_000:
            limits.append(tok_max)
        pos_max = _position_limit(model)
        if pos_max is not None:
            limits.append(pos_max)
        self.max_length = min(limits)
        self.separator = separator
        self.source = source

        num_labels = int(model.config.num_labels)
        self.label_index = self._resolve_label(label, model.config, num_labels)
        self.use_sigmoid = num_labels == 1 or getattr(model.config, "problem_type", None) == "multi_label_classification"
        id2label = getattr(model.config, "id2label", None) or {}
        self.label_name = str(id2label.get(self.label_index, label if isinstance(label, str) else self.label_index))

        short = Path(source.rstrip("/\\")).name or source
        self.__name__ = name or (f"{short}_{self.label_name}" + ("" if kind == "prob" else f"_{kind}"))

    @staticmethod
    def _resolve_label(label: int | str, config: Any, num_labels: int) -> int:
        if isinstance(label, bool):
            raise TypeError("label must be an int index or a label name, not a bool")
        if isinstance(label, int):
            if not 0 <= label < num_labels:
                raise ValueError(f"label index {label} out of range for a model with {num_labels} label(s)")
            return label
        if isinstance(label, str):
            label2id = {str(k): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()}
            if label in label2id:
                return label2id[label]
            folded = [v for k, v in label2id.items() if k.lower() == label.lower()]
            if len(set(folded)) == 1:
                return folded[0]
            raise ValueError(f"label {label!r} not in the model's config.label2id {label2id}")
        raise TypeError(f"label must be an int or str, got {type(label).__name__}")

    def texts(self, prompts: Sequence[Any] | None, completions: Sequence[Any]) -> list[str]:
        """The strings that are scored, one per completion."""
        if self.text == "completion":
            return [completion_text(c) for c in completions]
        if prompts is None or len(prompts) != len(completions):
            raise ValueError(f"{self.__name__}: text='prompt+completion' needs one prompt per completion")
        return [completion_text(p) + self.separator + completion_text(c) for p, c in zip(prompts, completions)]

    def encode(self, texts: Sequence[str]) -> list[tuple[list[int], list[int] | None]]:
        """``(input_ids, token_type_ids or None)`` per text, truncated to ``max_length``;
        a text with no tokens becomes ``[empty_token_id]``."""
        enc = self.tokenizer(list(texts), truncation=True, max_length=self.max_length, padding=False)
        ids = enc["input_ids"]
        types = enc.get("token_type_ids")
        out = []
        for i, row in enumerate(ids):
            row = list(row)
            tt = list(types[i]) if types is not None else None
            if not row:
                row, tt = [self.empty_token_id], ([0] if tt is not None else None)
            out.append((row, tt))
        return out

    @torch.inference_mode()
    def score_texts(self, texts: Sequence[str]) -> list[float]:
        """Score raw strings; ``len(texts)`` forward rows in batches of ``batch_size``."""
        self.model.eval()
        if not texts:
            return []
        encoded = self.encode(texts)
        order = sorted(range(len(texts)), key=lambda i: len(encoded[i][0]))
        out = [math.nan] * len(texts)
        for s in range(0, len(order), self.batch_size):
            idx = order[s : s + self.batch_size]
            width = max(len(encoded[i][0]) for i in idx)
            input_ids = torch.full((len(idx), width), self.pad_token_id, dtype=torch.long)
            attention = torch.zeros((len(idx), width), dtype=torch.long)
            with_types = encoded[idx[0]][1] is not None
            token_types = torch.zeros((len(idx), width), dtype=torch.long) if with_types else None
            for r, i in enumerate(idx):  # right padding: real tokens keep positions 0..n-1
                row, tt = encoded[i]
                input_ids[r, : len(row)] = torch.tensor(row, dtype=torch.long)
                attention[r, : len(row)] = 1
                if token_types is not None:
                    token_types[r, : len(row)] = torch.tensor(tt, dtype=torch.long)
            enc = {"input_ids": input_ids, "attention_mask": attention}
            if token_types is not None:
                enc["token_type_ids"] = token_types
            enc = {k: v.to(self.device) for k, v in enc.items()}
            logits = self.model(**enc).logits.float()  # (B, num_labels)
            if self.use_sigmoid:
                x = logits[:, self.label_index]
                vals = {"logit": x, "prob": torch.sigmoid(x), "logprob": torch.nn.functional.logsigmoid(x)}[self.kind]
            elif self.kind == "logit":
                vals = logits[:, self.label_index]
            elif self.kind == "prob":
                vals = logits.softmax(-1)[:, self.label_index]
            else:
                vals = logits.log_softmax(-1)[:, self.label_index]
            for i, v in zip(idx, vals.tolist()):
                out[i] = float(v)
        return out

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        if prompts is not None and len(prompts) != len(completions):
            raise ValueError(f"{self.__name__}: {len(prompts)} prompts but {len(completions)} completions")
        return self.score_texts(self.texts(prompts, completions))

    def __repr__(self) -> str:
        return (
            f"SequenceClassifierReward({self.source!r}, label={self.label_index} ({self.label_name}), "
            f"kind={self.kind!r}, text={self.text!r}, batch_size={self.batch_size}, device={str(self.device)!r})"
        )


def _vocab_size(model: Any) -> int | None:
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        emb = None
    n = getattr(emb, "num_embeddings", None)
    if isinstance(n, int):
        return n
    n = getattr(model.config, "vocab_size", None)
    return n if isinstance(n, int) else None


def _valid_id(i: Any, vocab: int | None) -> bool:
    return isinstance(i, int) and not isinstance(i, bool) and i >= 0 and (vocab is None or i < vocab)


def _position_limit(model: Any) -> int | None:
    """The most tokens the model has positions for, or ``None`` if it has no such limit.

    ``max_position_embeddings`` (``n_positions`` for GPT-2 configs); a learned
    ``position_embeddings`` table with a ``padding_idx`` (the RoBERTa family numbers
    positions from ``padding_idx + 1``) holds ``num_embeddings - padding_idx - 1``.
    """
    limits = []
    for attr in ("max_position_embeddings", "n_positions"):
        v = getattr(model.config, attr, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            limits.append(v)
    for name, mod in model.named_modules():
        if (
            isinstance(mod, torch.nn.Embedding)
            and name.rsplit(".", 1)[-1] == "position_embeddings"
            and mod.padding_idx is not None
        ):
            limits.append(mod.num_embeddings - mod.padding_idx - 1)
    limits = [v for v in limits if v > 0]
    return min(limits) if limits else None
