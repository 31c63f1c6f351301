"""``esorl sft``: prompt-conditional fine-tuning of an Eso-LM on prompt/completion pairs.

The released checkpoints are unconditional, so RL needs a model that has learned to continue
a prompt first (as d1 does before RL). Each row is ``[BOS]? prompt completion EOS`` (pad
mode); the prompt is clean context at step 0 for both terms of the hybrid objective (docs/ESOLM.md
§4/§5/§7): never masked, never scored, first in the array left to right, and the loss is
normalised by the number of completion tokens (:func:`esorl.objective.hybrid_loss` with
``prompt_mask``). Prompts are encoded exactly as the RL policy encodes them
(:meth:`esorl.policy.EsoPolicy.encode_prompts`: the tokenizer's BOS, then the prompt), so an
SFT model sees at RL time the context it was fine-tuned on.

The training loop is the pretraining one (:class:`esorl.train.pretrain.PretrainLoop` on
:class:`esorl.train.loop.TrainLoop`:
accelerate, DDP / DeepSpeed, checkpoints and exact ``--resume``, EMA, evaluation NELBO on the
held-out completions, ``metrics.jsonl``, wandb, export of ``<output_dir>/model``)::

    esorl sft --config recipes/sft/synthetic_prompt_cpu.yaml [key=value ...] [--resume]
    accelerate launch --config_file accelerate_configs/single_gpu.yaml -m esorl.cli sft --config recipes/sft/gsm8k_owt.yaml
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..config import load_config
from ..io import atomic_save, write_if_changed
from ..lora import LoraArgs
from ..objective import ObjectiveConfig
from .common import LoggingConfig
from .pretrain import RENAMED, PretrainArgs, run_pretrain

_TOKENIZE_BATCH = 1000


@dataclass
class SFTModelArgs:
    """The model to fine-tune.

    init_from: a ``save_pretrained`` directory (required): ``<pretrain run>/model`` or a
        released checkpoint converted with ``esorl convert-official``. Its architecture and
        dropout are used as saved.
    pretrain_recipe: if ``init_from`` does not exist yet, run this pretraining recipe first
        (with ``training.output_dir`` set to ``init_from``'s parent); empty = require the model.
    pretrain_overrides: ``key=value`` overrides for that pretraining run.
    """

    init_from: str = ""
    pretrain_recipe: str = ""
    pretrain_overrides: list[str] = field(default_factory=list)

    def validate(self):
        if not self.init_from:
            raise ValueError("model.init_from is required for SFT: a save_pretrained directory (e.g. runs/pretrain_synthetic_cpu/model "
                             "or the output of `esorl convert-official`)")


@dataclass
class SFTDataConfig:
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
    seq_len: tokens per row (≤ the model's context). A row that does not fit is an error
        naming it, unless ``truncate``.
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

    source: str = "synthetic"
    train_split: str = "train"
    eval_split: str = "dev"
    eval_fraction: float = 0.05
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    prompt_template: str = "{prompt}"
    completion_template: str = "{completion}"
    seq_len: int = 64
    truncate: bool = False
    add_bos: bool = True
    tokenizer: str = ""
    synthetic_size: int = 20000
    synthetic_seed: int = 0
    prompt_words: int = 3
    cache_dir: str = ".esorl_cache"
    task: str = ""
    task_rendering: str = "compact"
    task_size: int = 10000
    task_seed: int = 0
    task_test_size: int = 1000

    def validate(self):
        if self.task:
            from esorl.tasks.training import check_task_fields

            check_task_fields("data", self.task, self.task_rendering, self.task_size, self.task_test_size, self.source)
        if self.seq_len < 2:
            raise ValueError(f"data.seq_len must be >= 2, got {self.seq_len}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError("data.eval_fraction must be in [0, 1)")
        if self.prompt_words < 1:
            raise ValueError("data.prompt_words must be >= 1")
        for name, tmpl, key in (("prompt_template", self.prompt_template, "prompt"), ("completion_template", self.completion_template, "completion")):
            try:
                tmpl.format(**{key: "x"})
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(f"data.{name} {tmpl!r} must be a format string with only {{{key}}} ({type(e).__name__}: {e})") from None


@dataclass
class SFTArgs(PretrainArgs):
    __doc__ = PretrainArgs.__doc__
    output_dir: str = "runs/sft"


@dataclass
class SFTConfig:
    """An SFT recipe: the model to start from, prompt/completion data, the hybrid objective
    on completion tokens (prompt clean at step 0), ``training`` (the loop:
    ``transformers.TrainingArguments`` names), ``lora`` (train adapters only; the exported
    model has them merged), ``logging`` (wandb)."""

    RENAMED = RENAMED

    model: SFTModelArgs = field(default_factory=SFTModelArgs)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    training: SFTArgs = field(default_factory=SFTArgs)
    lora: LoraArgs = field(default_factory=LoraArgs)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# ----------------------------------------------------------------------------- data


def write_synthetic_pairs(cfg: SFTDataConfig) -> Path:
    """Prompt/completion jsonl files (``train``/``dev``/``test``) from the embedded synthetic
    corpus (:func:`esorl.data.write_synthetic_corpus`, cached like pretraining's): prompt =
    the first ``prompt_words`` words of a sentence, completion = the rest (sentences without
    a completion word are skipped). Returns the directory."""
    from .data_prep import DataConfig, resolve_source

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
    seq_len: int,
    add_bos: bool = True,
    truncate: bool = False,
    where: str = "data",
) -> tuple[dict[str, torch.Tensor], int]:
    """Tokenize pairs into padded rows ``[BOS]? prompt completion EOS``.

    Prompt and completion are tokenized separately (the prompt exactly as the RL policy
    encodes it). Returns ``({"input_ids", "valid", "prompt_mask"}, dropped)``: ``(N, seq_len)``
    tensors, ``valid`` False on padding, ``prompt_mask`` True on BOS + prompt; ``dropped``
    counts rows skipped under ``truncate`` because the prompt left no room for a completion
    token. A row longer than ``seq_len`` raises ``ValueError`` naming it (``where``, index)
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
        if len(row) > seq_len:
            if not truncate:
                raise ValueError(
                    f"{where} row {i} is {len(row)} tokens long (prompt {len(p)} incl. BOS, completion {len(c) + 1} incl. EOS), "
                    f"longer than data.seq_len={seq_len}; raise data.seq_len or set data.truncate=true (prompt: {prompts[i][:80]!r})"
                )
            if len(p) >= seq_len:
                dropped += 1
                continue
            row = row[:seq_len]
        rows.append(row)
        plens.append(len(p))
    if not rows:
        raise ValueError(f"{where}: no row fits data.seq_len={seq_len} ({dropped} prompts alone are too long)")
    N = len(rows)
    input_ids = torch.full((N, seq_len), pad, dtype=torch.long)
    valid = torch.zeros(N, seq_len, dtype=torch.bool)
    prompt_mask = torch.zeros(N, seq_len, dtype=torch.bool)
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
    from esorl.data import load_prompt_completion_dataset

    src = resolve_sft_source(cfg)
    ds = load_prompt_completion_dataset(src, split=split, prompt_field=cfg.prompt_field, completion_field=cfg.completion_field)
    prompts = [cfg.prompt_template.format(prompt=str(p)) for p in ds["prompt"]]
    completions = [cfg.completion_template.format(completion=str(c)) for c in ds["completion"]]
    return prompts, completions


def prepare_sft_data(cfg: SFTConfig, model_dir: str | None = None):
    """Tokenizer and ``{"train": {...}, "eval": {...}}`` tensors (``input_ids``, ``valid``,
    ``prompt_mask``), cached in ``data.cache_dir``."""
    from esorl.data import load_tokenizer, split_train_eval
    from .data_prep import _key

    d = cfg.data
    model_dir = model_dir or cfg.model.init_from
    tok_spec = d.tokenizer or model_dir
    tok = load_tokenizer(tok_spec)
    _check_tokenizer(tok, model_dir)
    src = resolve_sft_source(d)
    key = _key({**asdict(d), "cache_dir": None, "tok": [str(tok_spec), len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id],
                "seed": cfg.training.seed, "stamp": _source_stamp(src), "v": 1})
    cache = Path(d.cache_dir) / f"sft-tokens-{key}.pt"
    if cache.exists():
        return tok, torch.load(cache, weights_only=True)

    def enc(split):
        p, c = load_pairs(d, split)
        out, dropped = encode_pairs(p, c, tok, d.seq_len, d.add_bos, d.truncate, where=f"task {d.task} split {split!r}" if d.task else f"{d.source} split {split!r}")
        if dropped:
            print(f"[esorl] sft: dropped {dropped} rows of split {split!r} whose prompt leaves no room in seq_len={d.seq_len}")
        return out

    train = enc(d.train_split)
    if d.eval_split:
        ev = enc(d.eval_split)
    else:
        train, ev = split_train_eval(train, d.eval_fraction, cfg.training.seed)
    data = {"train": train, "eval": ev}
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(cache, lambda tmp: torch.save(data, tmp))
    return tok, data


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


# ----------------------------------------------------------------------------- run


def ensure_model(args: SFTModelArgs) -> Path:
    """The starting model directory; runs ``pretrain_recipe`` first if it does not exist yet."""
    from .pretrain import ensure_pretrained

    return ensure_pretrained(args, "model")


def run_sft(cfg: SFTConfig, resume: str | bool = False, overwrite: bool = False) -> dict:
    """Fine-tune; returns ``{"output_dir", "model_dir", "metrics"}``. Writes
    ``<training.output_dir>/{metrics.jsonl, config.yaml, checkpoints/, model/}`` like pretraining.
    ``train/loss`` and ``val/nelbo`` are per completion token (the prompt is never scored)."""
    model_dir = ensure_model(cfg.model)
    if str(model_dir) != cfg.model.init_from:
        cfg.model.init_from = str(model_dir)
    return run_pretrain(cfg, resume, data_fn=lambda: prepare_sft_data(cfg, str(model_dir)), name="sft", overwrite=overwrite)


def main(argv=None):
    from ..config import parse_recipe_args, recipe_argparser

    a = parse_recipe_args(recipe_argparser("esorl sft", __doc__.split("\n")[0], "training.learning_rate=1e-4"), argv)
    cfg = load_config(SFTConfig, a.config, a.overrides)
    res = run_sft(cfg, a.resume, a.overwrite)
    print(f"[esorl] model written to {res['model_dir']}")
