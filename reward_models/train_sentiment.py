"""Train a small sentiment classifier from scratch, for use as a learned reward.

The result is an ordinary Hugging Face checkpoint (``BertForSequenceClassification``
+ ``PreTrainedTokenizerFast``) that :class:`reward_models.SequenceClassifierReward`
loads like any hub model::

    python -m reward_models.train_sentiment --out /tmp/rm_sst2
    # then: SequenceClassifierReward("/tmp/rm_sst2", label="positive")

Data: a TSV corpus, one ``text<TAB>label`` line per example, no header (the
SST-2 files under ``../shared/data/sst2/`` by default). Labels are integers
``0 .. num_labels-1``.

What it does:

1. trains a word-level tokenizer on the *train* split only (``tokenizers``
   ``WordLevel`` + ``Whitespace``, lower-casing, specials
   ``[PAD] [UNK] [CLS] [SEP] [MASK]``, ``[CLS] text [SEP]`` template);
2. builds a tiny randomly initialised BERT (hidden 128, 2 layers, 2 heads,
   intermediate 256, 128 positions, dropout 0.3; ~0.3 M parameters besides
   the word embeddings);
3. trains it with AdamW + linear warm-up/decay in a plain torch loop, with
   word dropout (10% of words → ``[UNK]``) and label smoothing 0.1, which
   regularise it and keep its probabilities away from 0/1 (a smoother reward);
4. reports dev accuracy after every epoch and saves the last epoch's weights
   (``select_best=True`` keeps the best dev epoch instead; its dev accuracy is
   then an optimistic estimate, since dev picked it);
5. writes ``save_pretrained`` model + tokenizer and ``metrics.json`` to ``--out``.

Determinism: every random draw (initialisation, dropout, shuffling) comes from
the seed; the caller's global RNG state is restored afterwards. Two runs with
the same arguments on the same machine produce the same weights.

Caching: :func:`train_sentiment_model` returns the stored metrics without
training when ``out_dir/metrics.json`` records the same arguments (and the
model files are present).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "SentimentTrainConfig",
    "DEFAULT_TRAIN_PATH",
    "DEFAULT_DEV_PATH",
    "read_tsv",
    "build_word_tokenizer",
    "build_tiny_bert",
    "train_sentiment_model",
    "main",
]

_REPO_ROOT = Path(__file__).resolve().parents[1]
_SHARED_SST2 = _REPO_ROOT.parent / "shared" / "data" / "sst2"
DEFAULT_TRAIN_PATH = str(_SHARED_SST2 / "train.tsv")
DEFAULT_DEV_PATH = str(_SHARED_SST2 / "dev.tsv")

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
METRICS_FILE = "metrics.json"


@dataclass
class SentimentTrainConfig:
    """Hyper-parameters of :func:`train_sentiment_model` (all recorded in metrics.json).

    Defaults were tuned on SST-2 dev for a ≤ 3 minute run on 2 CPU cores.
    """

    epochs: int = 4
    seed: int = 0
    max_steps: int | None = None  # stop after this many optimizer steps (None: no limit)
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    max_length: int = 64  # tokens incl. [CLS]/[SEP]; SST-2 sentences are ≤ 60 words
    min_frequency: int = 2  # tokenizer vocabulary: keep words seen at least this often
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 256
    dropout: float = 0.3
    token_dropout: float = 0.1  # training only: replace each word by [UNK] with this probability
    label_smoothing: float = 0.1  # cross-entropy label smoothing (softer, better-calibrated probabilities)
    max_position_embeddings: int = 128
    max_train_examples: int | None = None  # use only the first N train rows
    max_dev_examples: int | None = None  # use only the first N dev rows
    select_best: bool = False  # save the best dev epoch instead of the last (dev accuracy then optimistic)
    num_threads: int | None = None  # torch intra-op threads during training (None: leave as is)

    def validate(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {self.max_steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_length < 3 or self.max_length > self.max_position_embeddings:
            raise ValueError(
                f"max_length must be in [3, max_position_embeddings={self.max_position_embeddings}], "
                f"got {self.max_length}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
        if not 0 <= self.token_dropout < 1:
            raise ValueError(f"token_dropout must be in [0, 1), got {self.token_dropout}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.min_frequency < 1:
            raise ValueError(f"min_frequency must be >= 1, got {self.min_frequency}")


# --------------------------------------------------------------------------- data


def read_tsv(path: str | os.PathLike, limit: int | None = None) -> tuple[list[str], list[int]]:
    """Read ``text<TAB>label`` lines (no header). Blank lines are skipped.

    The label is the field after the *last* tab, so texts may contain tabs.
    Raises ``ValueError`` naming the file and line on a malformed line.
    """
    texts: list[str] = []
    labels: list[int] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n").rstrip("\r")
            if not line.strip():
                continue
            text, sep, label = line.rpartition("\t")
            if not sep:
                raise ValueError(f"{path}:{lineno}: expected 'text<TAB>label', got {line[:80]!r}")
            try:
                labels.append(int(label.strip()))
            except ValueError:
                raise ValueError(f"{path}:{lineno}: label {label!r} is not an integer") from None
            texts.append(text)
            if limit is not None and len(texts) >= limit:
                break
    if not texts:
        raise ValueError(f"{path}: no examples")
    return texts, labels


def build_word_tokenizer(texts: list[str], min_frequency: int = 1, max_length: int = 128):
    """Train a lower-casing word-level tokenizer on ``texts``.

    Returns a ``PreTrainedTokenizerFast`` that adds ``[CLS] ... [SEP]``, pads with
    ``[PAD]`` (id 0) and maps unseen words to ``[UNK]``.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from tokenizers.trainers import WordLevelTrainer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = WordLevelTrainer(special_tokens=SPECIAL_TOKENS, min_frequency=min_frequency, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=max_length,
        model_input_names=["input_ids", "attention_mask"],
        padding_side="right",
        truncation_side="right",
    )


def build_tiny_bert(cfg: SentimentTrainConfig, vocab_size: int, pad_token_id: int, num_labels: int = 2):
    """A randomly initialised ``BertForSequenceClassification`` sized by ``cfg``."""
    from transformers import BertConfig, BertForSequenceClassification

    if num_labels == 2:
        id2label = {0: "negative", 1: "positive"}
    else:
        id2label = {i: f"LABEL_{i}" for i in range(num_labels)}
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
        classifier_dropout=cfg.dropout,
        max_position_embeddings=cfg.max_position_embeddings,
        type_vocab_size=2,
        pad_token_id=pad_token_id,
        num_labels=num_labels,
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
    )
    return BertForSequenceClassification(config)


def _encode(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    enc = tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=True)
    return enc["input_ids"]


def _file_digest(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _cache_key(train_path: str, dev_path: str, cfg: SentimentTrainConfig) -> dict[str, Any]:
    # The data files are identified by content digest (a changed corpus
    # retrains, a moved one does not); num_threads does not change the result.
    args = {k: v for k, v in asdict(cfg).items() if k != "num_threads"}
    return {
        "train_sha256_16": _file_digest(train_path),
        "dev_sha256_16": _file_digest(dev_path),
        **args,
    }


def _load_cached(out_dir: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    mf = out_dir / METRICS_FILE
    if not mf.is_file():
        return None
    try:
        metrics = json.loads(mf.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if metrics.get("args") != key:
        return None
    has_weights = any((out_dir / n).is_file() for n in ("model.safetensors", "pytorch_model.bin"))
    if not (has_weights and (out_dir / "config.json").is_file() and (out_dir / "tokenizer.json").is_file()):
        return None
    return metrics


# --------------------------------------------------------------------------- training


def train_sentiment_model(
    train_path: str | os.PathLike = DEFAULT_TRAIN_PATH,
    dev_path: str | os.PathLike = DEFAULT_DEV_PATH,
    out_dir: str | os.PathLike = "rm_sst2",
    epochs: int = SentimentTrainConfig.epochs,
    seed: int = SentimentTrainConfig.seed,
    *,
    max_steps: int | None = None,
    progress: bool = True,
    force: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """Train (or reuse) a tiny BERT sentiment classifier; return its metrics.

    Args:
        train_path, dev_path: ``text<TAB>label`` TSV files.
        out_dir: where model, tokenizer and ``metrics.json`` are written.
        epochs, seed, max_steps: see :class:`SentimentTrainConfig`.
        progress: show a tqdm bar.
        force: retrain even if a matching ``metrics.json`` exists.
        **overrides: any other :class:`SentimentTrainConfig` field.

    Returns:
        ``metrics`` dict: ``dev_accuracy`` and ``saved_epoch`` (of the saved weights),
        ``dev_accuracy_per_epoch``, ``best_dev_accuracy``, ``best_epoch``, ``train_size``, ``dev_size``,
        ``seed``, ``train_time_s``, ``steps``, ``vocab_size``, ``num_parameters``,
        ``args`` (the cache key) and ``cached`` (True when nothing was trained).

    Cost: about 11 s per SST-2 epoch on 2 idle CPU cores with the defaults (~45 s in all).
    """
    valid = {f.name for f in fields(SentimentTrainConfig)}
    unknown = set(overrides) - valid
    if unknown:
        raise TypeError(f"unknown training option(s) {sorted(unknown)}; valid: {sorted(valid)}")
    cfg = SentimentTrainConfig(epochs=epochs, seed=seed, max_steps=max_steps, **overrides)
    cfg.validate()
    out = Path(out_dir)
    for p in (train_path, dev_path):
        if not Path(p).is_file():
            raise FileNotFoundError(f"data file not found: {p}")
    key = _cache_key(str(train_path), str(dev_path), cfg)
    if not force:
        cached = _load_cached(out, key)
        if cached is not None:
            cached["cached"] = True
            return cached

    prev_threads = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    try:
        with torch.random.fork_rng(devices=[]):
            metrics = _train(Path(train_path), Path(dev_path), out, cfg, progress)
    finally:
        torch.set_num_threads(prev_threads)
    metrics["train_path"] = str(Path(train_path).resolve())
    metrics["dev_path"] = str(Path(dev_path).resolve())
    metrics["args"] = key
    metrics["cached"] = False
    out.mkdir(parents=True, exist_ok=True)
    from esorl.io import atomic_write

    atomic_write(out / METRICS_FILE, json.dumps(metrics, indent=2) + "\n")  # written last: its presence means the checkpoint is complete
    return metrics


def _trainer_class():
    """``transformers.Trainer`` with esorl's guards and the word-level token dropout."""
    from transformers import Trainer

    from esorl.train.callbacks import RecordsGradNorm

    class SentimentTrainer(RecordsGradNorm, Trainer):
        """Training-only token dropout: each non-special word becomes ``[UNK]`` with
        probability ``token_dropout`` (a regulariser for a tiny vocabulary model), drawn from
        its own seeded generator so that a run is reproducible."""

        def __init__(self, *a, token_dropout: float = 0.0, unk_id: int = 0, special_ids=(), seed: int = 0, **k):
            super().__init__(*a, **k)
            self.token_dropout, self.unk_id = token_dropout, unk_id
            self.special_ids = torch.tensor(sorted(special_ids), dtype=torch.long)
            self.dropout_gen = torch.Generator().manual_seed(seed)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training and self.token_dropout > 0:
                ids = inputs["input_ids"]
                drop = torch.rand(ids.shape, generator=self.dropout_gen) < self.token_dropout
                drop = drop.to(ids.device) & inputs["attention_mask"].bool() & ~torch.isin(ids, self.special_ids.to(ids.device))
                inputs = {**inputs, "input_ids": ids.masked_fill(drop, self.unk_id)}
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    return SentimentTrainer


def _train(train_path: Path, dev_path: Path, out: Path, cfg: SentimentTrainConfig, progress: bool) -> dict[str, Any]:
    """Train with ``transformers.Trainer`` (AdamW with weight decay off for biases and
    LayerNorm, linear warm-up and decay, label smoothing, clipping, a dev evaluation per
    epoch, non-finite updates skipped by :class:`esorl.train.callbacks.NonFiniteGradients`)."""
    import shutil

    from datasets import Dataset
    from transformers import DataCollatorWithPadding, TrainingArguments

    from esorl.train.callbacks import NonFiniteGradients

    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    train_texts, train_labels = read_tsv(train_path, cfg.max_train_examples)
    dev_texts, dev_labels = read_tsv(dev_path, cfg.max_dev_examples)
    num_labels = max(max(train_labels), max(dev_labels)) + 1
    if min(train_labels + dev_labels) < 0 or num_labels < 2:
        raise ValueError(f"labels must be integers in 0..K-1 with K >= 2; got max {num_labels - 1}")

    tokenizer = build_word_tokenizer(train_texts, cfg.min_frequency, cfg.max_length)
    train_ds = Dataset.from_dict({"input_ids": _encode(tokenizer, train_texts, cfg.max_length), "labels": train_labels})
    dev_ds = Dataset.from_dict({"input_ids": _encode(tokenizer, dev_texts, cfg.max_length), "labels": dev_labels})
    model = build_tiny_bert(cfg, len(tokenizer), tokenizer.pad_token_id, num_labels)
    steps_per_epoch = math.ceil(len(train_ds) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs if cfg.max_steps is None else min(steps_per_epoch * cfg.epochs, cfg.max_steps)
    work = out / "_trainer"  # Trainer's own checkpoints (select_best); removed afterwards
    args = TrainingArguments(
        output_dir=str(work), per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=256, learning_rate=cfg.lr,
        weight_decay=cfg.weight_decay, warmup_steps=int(cfg.warmup_ratio * total), lr_scheduler_type="linear", max_grad_norm=cfg.max_grad_norm,
        num_train_epochs=cfg.epochs, max_steps=cfg.max_steps or -1, label_smoothing_factor=cfg.label_smoothing, eval_strategy="epoch",
        save_strategy="epoch" if cfg.select_best else "no", save_total_limit=1 if cfg.select_best else None,
        load_best_model_at_end=cfg.select_best, metric_for_best_model="accuracy", seed=cfg.seed, data_seed=cfg.seed, report_to="none",
        disable_tqdm=not progress, logging_strategy="epoch", use_cpu=not torch.cuda.is_available(), dataloader_pin_memory=False,
    )

    def accuracy(pred) -> dict:
        return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}

    trainer = _trainer_class()(model=model, args=args, train_dataset=train_ds, eval_dataset=dev_ds, processing_class=tokenizer,
                               data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy, token_dropout=cfg.token_dropout,
                               unk_id=tokenizer.unk_token_id, special_ids=tokenizer.all_special_ids, seed=cfg.seed)
    guard = NonFiniteGradients(trainer)
    trainer.add_callback(guard)
    trainer.train()
    per_epoch = [r["eval_accuracy"] for r in trainer.state.log_history if "eval_accuracy" in r]
    saved_acc = trainer.evaluate()["eval_accuracy"]  # the weights being saved (the best epoch's with select_best)
    if not per_epoch:  # max_steps ended training inside the first epoch
        per_epoch = [saved_acc]
    best_acc = max(per_epoch)
    best_epoch = per_epoch.index(best_acc) + 1
    saved_epoch = best_epoch if cfg.select_best else len(per_epoch)
    model = trainer.model.eval()

    out.mkdir(parents=True, exist_ok=True)
    stale = out / METRICS_FILE
    if stale.exists():
        stale.unlink()  # never leave old metrics next to new weights
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    shutil.rmtree(work, ignore_errors=True)
    elapsed = time.perf_counter() - t0
    return {
        "dev_accuracy": saved_acc,
        "saved_epoch": saved_epoch,
        "dev_accuracy_per_epoch": per_epoch,
        "best_dev_accuracy": best_acc,
        "best_epoch": best_epoch,
        "train_size": len(train_ds),
        "dev_size": len(dev_ds),
        "seed": cfg.seed,
        "epochs": cfg.epochs,
        "steps": trainer.state.global_step,
        "skipped_updates": guard.skipped_updates,
        "vocab_size": len(tokenizer),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "train_time_s": round(elapsed, 2),
        "torch_threads": torch.get_num_threads(),
        "label_names": {int(k): v for k, v in model.config.id2label.items()},
    }


# --------------------------------------------------------------------------- CLI


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = SentimentTrainConfig()
    p = argparse.ArgumentParser(
        prog="python -m reward_models.train_sentiment",
        description="Train a tiny BERT sentiment classifier (reward model) from scratch on a text<TAB>label TSV.",
    )
    p.add_argument("--train", default=DEFAULT_TRAIN_PATH, help="train TSV (default: shared SST-2 train)")
    p.add_argument("--dev", default=DEFAULT_DEV_PATH, help="dev TSV (default: shared SST-2 dev)")
    p.add_argument("--out", required=True, help="output directory for model, tokenizer and metrics.json")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio)
    p.add_argument("--max-length", type=int, default=d.max_length)
    p.add_argument("--min-frequency", type=int, default=d.min_frequency)
    p.add_argument("--hidden-size", type=int, default=d.hidden_size)
    p.add_argument("--num-layers", type=int, default=d.num_layers)
    p.add_argument("--num-heads", type=int, default=d.num_heads)
    p.add_argument("--intermediate-size", type=int, default=d.intermediate_size)
    p.add_argument("--dropout", type=float, default=d.dropout)
    p.add_argument("--token-dropout", type=float, default=d.token_dropout)
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    p.add_argument("--max-train-examples", type=int, default=None)
    p.add_argument("--max-dev-examples", type=int, default=None)
    p.add_argument("--num-threads", type=int, default=None)
    p.add_argument("--select-best", action="store_true", help="save the best dev epoch, not the last")
    p.add_argument("--force", action="store_true", help="retrain even if --out holds a matching run")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = _parse_args(argv)
    metrics = train_sentiment_model(
        a.train,
        a.dev,
        a.out,
        epochs=a.epochs,
        seed=a.seed,
        max_steps=a.max_steps,
        progress=not a.no_progress,
        force=a.force,
        batch_size=a.batch_size,
        lr=a.lr,
        weight_decay=a.weight_decay,
        warmup_ratio=a.warmup_ratio,
        max_length=a.max_length,
        min_frequency=a.min_frequency,
        hidden_size=a.hidden_size,
        num_layers=a.num_layers,
        num_heads=a.num_heads,
        intermediate_size=a.intermediate_size,
        dropout=a.dropout,
        token_dropout=a.token_dropout,
        label_smoothing=a.label_smoothing,
        max_train_examples=a.max_train_examples,
        max_dev_examples=a.max_dev_examples,
        num_threads=a.num_threads,
        select_best=a.select_best,
    )
    state = "reused cached run" if metrics.get("cached") else f"trained in {metrics['train_time_s']:.1f} s"
    print(
        f"{state}: dev accuracy {metrics['dev_accuracy']:.4f} (epoch {metrics['saved_epoch']}, "
        f"train {metrics['train_size']} / dev {metrics['dev_size']} examples, seed {metrics['seed']}) -> {a.out}"
    )
    return metrics


if __name__ == "__main__":
    main()
