"""Prompt/completion pairs as training rows (SFT): sources, templates, tokenization.

Each row is ``[BOS]? prompt completion EOS`` (padded); ``prompt_mask`` marks BOS + prompt,
which the hybrid objective keeps clean at step 0 and never scores
(:func:`esorl.objective.hybrid_loss`). Prompts are tokenized exactly as the RL policy encodes
them (:meth:`esorl.policy.EsoPolicy.encode_prompts`). Tokenized tensors are cached in
``cache_dir``, keyed by every setting, the tokenizer and the source files' sizes and times.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..io import write_if_changed
from .corpus import DataConfig, DataSourceArgs, _key, encode_splits, resolve_source

_TOKENIZE_BATCH = 1000


@dataclass
class SFTDataConfig(DataSourceArgs):
    """Prompt/completion pairs and how they become rows.

    source: ``synthetic`` (prompt = the first ``prompt_words`` words of each sentence of the
        embedded synthetic corpus, completion = the rest; written as jsonl into ``cache_dir``),
        a local file or directory (``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet``; a directory
        is searched for ``<split>.<ext>``), or a Hugging Face hub dataset name.
    train_split / eval_split: split names (``eval_split: ""`` carves ``eval_fraction`` of the
        training rows instead).
    prompt_field / completion_field: the columns (GSM8K: ``question`` / ``answer``).
    prompt_template: format string applied to the prompt (``{prompt}``); use the same one in
        the RL recipe (``prompts.prompt_template``).
    completion_template: format string applied to the completion (``{completion}``), e.g.
        ``" {completion}"`` for a BPE tokenizer after a template ending in ``:``.
    max_length: tokens per row (≤ the model's context; TRL's SFTConfig name). A row that does
        not fit is an error naming it, unless ``truncate``.
    truncate: cut the completion of a row that does not fit (its EOS is lost); rows whose
        prompt alone leaves no room for a completion token are dropped (and counted).
    add_bos: start each row with the tokenizer's BOS (when it has one) as the RL policy
        does; false = the prompt starts the row (then an empty prompt is an error).
    tokenizer: tokenizer directory or hub name (default: the ``init_from`` directory).
    synthetic_size / synthetic_seed / prompt_words: the ``synthetic`` source.
    cache_dir: where generated pairs and tokenized tensors are cached.
    task: a verifiable task by name (``countdown``, ``mini_sudoku``, ``basic_arithmetic``,
        ``gsm8k``; :mod:`esorl.tasks`) instead of ``source``: prompt = the task's prompt,
        completion = a solution its reward accepts; split ``train`` = the task's train split,
        ``dev`` = its test split (held-out NELBO only), written as jsonl into ``cache_dir``
        (:func:`esorl.tasks.training.write_task_pairs`). Use the same ``task_rendering``
        and ``task_seed`` in the RL recipe (``prompts.task_rendering``, ``grpo.seed``).
        With a task, ``source`` is only read by GSM8K (a local directory or the hub name).
    task_rendering: ``compact`` (terse prompts and answers, for tiny models) or ``natural``.
    task_size: training questions (procedural tasks; GSM8K: a cap, 0 = all).
    task_seed: the task's split seed; evaluate with the same seed (``esorl eval --seed``).
    task_test_size: test questions kept out of the training questions (and written as ``dev``).
    """

    prompt_field: str = "prompt"
    completion_field: str = "completion"
    prompt_template: str = "{prompt}"
    completion_template: str = "{completion}"
    add_bos: bool = True
    prompt_words: int = 3

    def validate(self):
        super().validate()
        if self.prompt_words < 1:
            raise ValueError("data.prompt_words must be >= 1")
        for name, tmpl, key in (("prompt_template", self.prompt_template, "prompt"), ("completion_template", self.completion_template, "completion")):
            try:
                tmpl.format(**{key: "x"})
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(f"data.{name} {tmpl!r} must be a format string with only {{{key}}} ({type(e).__name__}: {e})") from None


def write_synthetic_pairs(cfg: SFTDataConfig) -> Path:
    """Prompt/completion jsonl files (``train``/``dev``/``test``) from the embedded synthetic
    corpus (:func:`esorl.data.write_synthetic_corpus`, cached like pretraining's): prompt =
    the first ``prompt_words`` words of a sentence, completion = the rest (sentences without
    a completion word are skipped). Returns the directory."""
    corpus = Path(resolve_source(DataConfig(source="synthetic", synthetic_size=cfg.synthetic_size, synthetic_seed=cfg.synthetic_seed, cache_dir=cfg.cache_dir)))
    out = Path(cfg.cache_dir) / f"sft-synthetic-{cfg.synthetic_size}-{cfg.synthetic_seed}-w{cfg.prompt_words}"
    out.mkdir(parents=True, exist_ok=True)
    n = cfg.prompt_words
    for split in ("train", "dev", "test"):
        lines = []
        for line in (corpus / f"{split}.tsv").read_text(encoding="utf-8").splitlines():
            words = line.split("\t", 1)[0].split()
            if len(words) > n:
                lines.append(json.dumps({"prompt": " ".join(words[:n]), "completion": " ".join(words[n:])}) + "\n")
        content = "".join(lines)
        write_if_changed(out / f"{split}.jsonl", content)
    return out


def resolve_sft_source(cfg: SFTDataConfig) -> str:
    if cfg.task:
        from esorl.tasks.training import write_task_pairs

        return str(write_task_pairs(cfg.cache_dir, cfg.task, cfg.task_rendering, cfg.task_size, cfg.task_seed, cfg.task_test_size, cfg.source))
    return str(write_synthetic_pairs(cfg)) if cfg.source == "synthetic" else cfg.source


def _encode(texts: list[str], tok) -> list[list[int]]:
    ids: list[list[int]] = []
    for i in range(0, len(texts), _TOKENIZE_BATCH):
        enc = tok(texts[i : i + _TOKENIZE_BATCH], add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False, verbose=False)
        ids.extend(enc["input_ids"])
    return ids


def encode_pairs(
    prompts: list[str],
    completions: list[str],
    tok,
    max_length: int,
    add_bos: bool = True,
    truncate: bool = False,
    where: str = "data",
) -> tuple[dict[str, torch.Tensor], int]:
    """Tokenize pairs into padded rows ``[BOS]? prompt completion EOS``.

    Prompt and completion are tokenized separately (the prompt exactly as the RL policy
    encodes it). Returns ``({"input_ids", "valid", "prompt_mask"}, dropped)``: ``(N, max_length)``
    tensors, ``valid`` False on padding, ``prompt_mask`` True on BOS + prompt; ``dropped``
    counts rows skipped under ``truncate`` because the prompt left no room for a completion
    token. A row longer than ``max_length`` raises ``ValueError`` naming it (``where``, index)
    unless ``truncate`` (then its completion is cut, EOS included).
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{where}: {len(prompts)} prompts but {len(completions)} completions")
    eos, pad = tok.eos_token_id, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if eos is None or pad is None:
        raise ValueError("SFT needs a tokenizer with an EOS token (completions end with EOS; padding defaults to it)")
    mask_id = getattr(tok, "mask_token_id", None)
    if mask_id is not None and pad == mask_id:
        raise ValueError(f"the tokenizer's pad id {pad} is its MASK id: never pad with MASK (set a pad token)")
    bos = [tok.bos_token_id] if add_bos and tok.bos_token_id is not None else []
    p_ids, c_ids = _encode(list(prompts), tok), _encode(list(completions), tok)
    rows, plens = [], []
    dropped = 0
    for i, (p, c) in enumerate(zip(p_ids, c_ids)):
        p = bos + p
        if not p:
            raise ValueError(f"{where} row {i}: empty prompt and no BOS token (add_bos with a tokenizer that has one): the completion would have no context")
        row = p + c + [eos]
        if len(row) > max_length:
            if not truncate:
                raise ValueError(
                    f"{where} row {i} is {len(row)} tokens long (prompt {len(p)} incl. BOS, completion {len(c) + 1} incl. EOS), "
                    f"longer than data.max_length={max_length}; raise data.max_length or set data.truncate=true (prompt: {prompts[i][:80]!r})"
                )
            if len(p) >= max_length:
                dropped += 1
                continue
            row = row[:max_length]
        rows.append(row)
        plens.append(len(p))
    if not rows:
        raise ValueError(f"{where}: no row fits data.max_length={max_length} ({dropped} prompts alone are too long)")
    N = len(rows)
    input_ids = torch.full((N, max_length), pad, dtype=torch.long)
    valid = torch.zeros(N, max_length, dtype=torch.bool)
    prompt_mask = torch.zeros(N, max_length, dtype=torch.bool)
    for i, (row, pl) in enumerate(zip(rows, plens)):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        valid[i, : len(row)] = True
        prompt_mask[i, :pl] = True
    return {"input_ids": input_ids, "valid": valid, "prompt_mask": prompt_mask}, dropped


def _source_stamp(source: str) -> list:
    """Sizes and mtimes of a local source (so an edited file invalidates the token cache)."""
    p = Path(source).expanduser()
    if not p.exists():
        return []
    files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.is_file())
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def load_pairs(cfg: SFTDataConfig, split: str) -> tuple[list[str], list[str]]:
    """Templated ``(prompts, completions)`` of a split."""
    from .datasets import load_prompt_completion_dataset

    src = resolve_sft_source(cfg)
    ds = load_prompt_completion_dataset(src, split=split, prompt_field=cfg.prompt_field, completion_field=cfg.completion_field)
    prompts = [cfg.prompt_template.format(prompt=str(p)) for p in ds["prompt"]]
    completions = [cfg.completion_template.format(completion=str(c)) for c in ds["completion"]]
    return prompts, completions


def prepare_pair_data(d: SFTDataConfig, model_dir: str, seed: int = 0):
    """Tokenizer and ``{"train": {...}, "eval": {...}}`` tensors (``input_ids``, ``valid``,
    ``prompt_mask``: ``(N, max_length)``) of the pairs ``d`` describes, for the model in
    ``model_dir`` (whose tokenizer is the default and must fit it); ``seed`` carves the
    held-out rows when ``d.eval_split`` is empty. Cached in ``d.cache_dir``."""
    from .tokenizer import load_tokenizer

    tok_spec = d.tokenizer or model_dir
    tok = load_tokenizer(tok_spec)
    _check_tokenizer(tok, model_dir)
    src = resolve_sft_source(d)
    key = _key({**asdict(d), "cache_dir": None, "tok": [str(tok_spec), len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id],
                "seed": seed, "stamp": _source_stamp(src), "v": 1})
    cache = Path(d.cache_dir) / f"sft-tokens-{key}.pt"
    if cache.exists():
        return tok, torch.load(cache, weights_only=True)

    def enc(split):
        p, c = load_pairs(d, split)
        out, dropped = encode_pairs(p, c, tok, d.max_length, d.add_bos, d.truncate, where=f"task {d.task} split {split!r}" if d.task else f"{d.source} split {split!r}")
        if dropped:
            print(f"[esorl] sft: dropped {dropped} rows of split {split!r} whose prompt leaves no room in max_length={d.max_length}")
        return out

    return tok, encode_splits(enc, d, seed, cache)


def _check_tokenizer(tok, model_dir: str) -> None:
    """The tokenizer must fit the model: no id beyond its vocabulary, the same MASK id."""
    f = Path(model_dir) / "config.json"
    if not f.is_file():
        return
    mc = json.loads(f.read_text())
    vocab, mask = mc.get("vocab_size"), mc.get("mask_token_id")
    if vocab is not None and len(tok) > vocab:
        raise ValueError(f"the tokenizer has {len(tok)} ids but the model {model_dir} only {vocab}: wrong data.tokenizer?")
    tmask = getattr(tok, "mask_token_id", None)
    if mask is not None and tmask is not None and tmask != mask:
        raise ValueError(f"the tokenizer's MASK id {tmask} differs from the model's {mask} ({model_dir}): wrong data.tokenizer?")
