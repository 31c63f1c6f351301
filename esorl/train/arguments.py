"""The settings of every esorl training loop, under Hugging Face ``TrainingArguments`` names.

Pretraining and SFT (section ``training``), PPO (section ``ppo``) and GRPO (section ``grpo``,
``trl.GRPOConfig`` itself) name a setting the same way: ``learning_rate``, ``max_grad_norm``,
``per_device_train_batch_size`` × ``gradient_accumulation_steps``, ``logging_steps``,
``save_steps``/``save_total_limit``, ``lr_scheduler_type``/``lr_scheduler_kwargs``, ``bf16``,
... with the meaning ``transformers.TrainingArguments`` gives them. The learning-rate
schedule is transformers' own (:func:`lr_factor`), so GRPO on ``Trainer`` and the esorl loop
(:mod:`esorl.train.loop`) follow one schedule implementation.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch


def _help(text: str, default=None, factory=None):
    md = {"help": text}
    return field(default_factory=factory, metadata=md) if factory is not None else field(default=default, metadata=md)


# transformers' schedulers that are a function of the update number alone (LambdaLR);
# reduce_lr_on_plateau needs a metric and greedy a controller, so neither is offered
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt",
              "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay")
ATTENTION_BACKENDS = ("auto", "sdpa", "flex", "eager")


@dataclass
class TrainingArgs:
    """Optimizer, schedule, batch, bookkeeping and precision of a training run, with
    ``transformers.TrainingArguments``' names and meanings (``esorl config <command>`` lists
    each field with its help). ``section``: the recipe section these fields live in, for
    messages."""

    section = "training"

    output_dir: str = _help("Run directory: metrics.jsonl, config.yaml, checkpoints/, model/.", "runs/train")
    run_name: str = _help("wandb run name (default: the output directory's name).", "")
    learning_rate: float = _help("Peak AdamW learning rate.", 3e-4)
    weight_decay: float = _help("AdamW weight decay.", 0.0)
    adam_beta1: float = _help("AdamW beta1.", 0.9)
    adam_beta2: float = _help("AdamW beta2.", 0.999)
    adam_epsilon: float = _help("AdamW epsilon.", 1e-8)
    max_grad_norm: float = _help("Clip the global gradient norm to this (0 = no clipping; the norm is still logged).", 1.0)
    lr_scheduler_type: str = _help("transformers' schedule over optimizer updates: " + " | ".join(SCHEDULERS)
                                   + " (transformers.get_scheduler; 'constant' ignores warmup_steps, 'constant_with_warmup' uses them).",
                                   "cosine")
    lr_scheduler_kwargs: dict = _help("Extra arguments of the schedule, e.g. {min_lr_rate: 0.1} for cosine_with_min_lr.", factory=dict)
    warmup_steps: int = _help("Linear warm-up over this many optimizer updates (from 0, as transformers).", 0)
    max_steps: int = _help("Training steps (pretraining/SFT: optimizer steps; PPO: rollout steps).", 1000)
    per_device_train_batch_size: int = _help("Sequences per rank per forward (micro-batch).", 32)
    gradient_accumulation_steps: int = _help("Micro-batches per optimizer step: the global batch is "
                                             "per_device_train_batch_size × gradient_accumulation_steps × ranks.", 1)
    seed: int = _help("Seed of everything random (data order, noise, sampling).", 0)
    logging_steps: int = _help("Write metrics (metrics.jsonl, wandb) every this many steps (and at the last).", 10)
    eval_steps: int = _help("Evaluate every this many steps and after the last one (0 = only after the last).", 0)
    save_steps: int = _help("Checkpoint every this many steps and at the last (0 = only at the last).", 500)
    save_total_limit: int = _help("Checkpoints kept (the newest).", 2)
    bf16: bool | None = _help("bf16 mixed precision (autocast); unset = on for a GPU that supports it, off on CPU.", None)
    fp16: bool = _help("fp16 mixed precision with loss scaling.", False)
    gradient_checkpointing: bool = _help("Recompute each block in the backward pass (same gradients, less memory).", False)
    attention_backend: str = _help("Attention kernel: auto (flex on CUDA, SDPA elsewhere) | sdpa | flex | eager.", "auto")

    def mixed_precision(self) -> str:
        """accelerate's ``mixed_precision``: ``fp16``, ``bf16`` or ``no``."""
        if self.fp16:
            return "fp16"
        bf16 = self.bf16 if self.bf16 is not None else (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        return "bf16" if bf16 else "no"

    def lr_factor(self, update: int, total_updates: int) -> float:
        """The learning-rate multiplier at optimizer update ``update`` (0-based) of
        ``total_updates`` (:func:`lr_factor`)."""
        return lr_factor(update, self.lr_scheduler_type, self.warmup_steps, total_updates, self.lr_scheduler_kwargs)

    def validate(self):
        s = self.section
        if self.learning_rate <= 0:
            raise ValueError(f"{s}.learning_rate must be > 0, got {self.learning_rate}")
        for name in ("max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{s}.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_steps", "save_steps", "save_total_limit", "max_grad_norm", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{s}.{name} must be >= 0, got {getattr(self, name)}")
        if self.bf16 and self.fp16:
            raise ValueError(f"{s}.bf16 and {s}.fp16 are exclusive")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"{s}.attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {self.attention_backend!r}")
        if self.lr_scheduler_type == "constant" and self.warmup_steps:
            raise ValueError(f"{s}.lr_scheduler_type constant has no warm-up (transformers' meaning): use constant_with_warmup "
                             f"for {s}.warmup_steps={self.warmup_steps}")
        if self.lr_scheduler_type not in SCHEDULERS:
            raise ValueError(f"{s}.lr_scheduler_type must be one of {', '.join(SCHEDULERS)}, got {self.lr_scheduler_type!r}")
        try:  # the schedule's own checks (missing or unknown kwargs), before any work
            self.lr_factor(0, max(2, self.warmup_steps + 2))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{s}.lr_scheduler_type {self.lr_scheduler_type!r} with lr_scheduler_kwargs {self.lr_scheduler_kwargs}: {e}") from None


@functools.lru_cache(maxsize=64)
def _schedule(name: str, warmup: int, total: int, kwargs: tuple):
    from transformers import get_scheduler

    # the LambdaLR of transformers' schedule on a throw-away optimizer: its lambda is the
    # schedule as a pure function of the update number
    dummy = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    return get_scheduler(name, dummy, num_warmup_steps=warmup, num_training_steps=total, scheduler_specific_kwargs=dict(kwargs) or None).lr_lambdas[0]


def lr_factor(update: int, scheduler_type: str, warmup_steps: int, total_updates: int, scheduler_kwargs: dict | None = None) -> float:
    """Multiplier of the peak learning rate at optimizer update ``update`` (0-based) under
    transformers' ``scheduler_type`` schedule of ``total_updates`` updates with
    ``warmup_steps`` warm-up updates (exactly the factor ``Trainer``'s ``LambdaLR`` applies to
    that update, so the first warm-up update has factor 0). A pure function of the update and
    the *current* settings: a resumed run follows its new schedule from its first update
    (no scheduler state is saved)."""
    if scheduler_type not in SCHEDULERS:
        raise ValueError(f"unknown learning-rate schedule {scheduler_type!r}: use one of {', '.join(SCHEDULERS)}")
    fn = _schedule(scheduler_type, int(warmup_steps), int(total_updates), tuple(sorted((scheduler_kwargs or {}).items())))
    return float(fn(int(update)))


def set_learning_rate(optimizer, lr: float, **hparams) -> None:
    """Write the learning rate (and optionally ``betas``, ``eps``, ``weight_decay``) into every
    parameter group. Called before each update with values from the current config: loading
    an optimizer state restores the *saved* hyper-parameters, which would silently override a
    change the user made between a run and its resume."""
    for g in optimizer.param_groups:
        g["lr"] = lr
        for k, v in hparams.items():
            if k in g:
                g[k] = v


def make_optimizer(params, args: TrainingArgs, device=None):
    """AdamW over ``params`` with ``args``' settings; the fused CUDA kernel when training on a
    GPU (``device``; DeepSpeed keeps its own partitions: pass ``None``). The learning rate is
    set before every update (:func:`set_learning_rate` with :meth:`TrainingArgs.lr_factor`)."""
    fused = True if device is not None and torch.device(device).type == "cuda" else None
    return torch.optim.AdamW(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                             weight_decay=args.weight_decay, fused=fused)
