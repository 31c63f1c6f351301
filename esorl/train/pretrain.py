"""``esorl pretrain``: train an Eso-LM with the hybrid AR + MDM objective on ``accelerate``.

Runs unchanged on one CPU, several CPU ranks (gloo), GPUs with DDP, and DeepSpeed ZeRO-2/3:
launch with ``accelerate launch --config_file accelerate_configs/<x>.yaml -m esorl.cli
pretrain --config ...``. The global batch (``per_device_train_batch_size ×
gradient_accumulation_steps × ranks``), the data order and all objective randomness are
functions of the seed and the global sample index, so a run's losses depend on the global
batch, not on how it is split over ranks and micro-batches, and ``--resume`` continues exactly.
The loop itself is :class:`esorl.train.loop.TrainLoop`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import load_config
from ..lora import LoraArgs
from ..configuration_esolm import EsoLMConfig
from ..modeling_esolm import EsoLMModel
from ..objective import ObjectiveConfig, hybrid_loss
from ..schedule import Stream
from .arguments import TrainingArgs, _help
from ..distributed import all_reduce_sum
from .common import LoggingConfig, check_finite
from ..data.corpus import DataConfig, prepare_data
from .loop import TrainLoop


# settings a resumed pretraining run cannot change (the rest is honoured from the new config)
RESUME_FIXED = {
    **{f"model.{k}": "the checkpoint holds weights of this architecture" for k in ("hidden_size", "n_layers", "n_heads", "cond_dim", "mlp_ratio")},
    **{f"data.{k}": "the rows, their order and the data position refer to this data" for k in
       ("max_length", "mode", "tokenizer", "tokenizer_vocab_size", "add_bos", "train_split", "text_field", "synthetic_size", "synthetic_seed",
        "eval_split", "eval_fraction", "truncate", "task", "task_rendering", "task_size", "task_seed", "task_test_size")},
    "training.seed": "the data order and the objective's noise are keyed by it",
    "lora.": "the checkpoint holds the parameters this LoRA setting trains (SFT)",
}
_EVAL_SEED = 12345

# fields of earlier esorl versions (before the one vocabulary): old → new. A recipe that uses
# one fails before any work naming its new name; an old checkpoint's recorded settings are
# read under the new names (the 1:1 renames) so that a resume still compares them
RENAMED = {
    "optim.lr": "training.learning_rate",
    "optim.weight_decay": "training.weight_decay",
    "optim.beta1": "training.adam_beta1",
    "optim.beta2": "training.adam_beta2",
    "optim.eps": "training.adam_epsilon",
    "optim.warmup_steps": "training.warmup_steps",
    "optim.lr_schedule": "training.lr_scheduler_type (transformers' names; the old cosine with a floor is cosine_with_min_lr "
                         "with training.lr_scheduler_kwargs: {min_lr_rate: 0.1})",
    "optim.min_lr_ratio": "training.lr_scheduler_kwargs: {min_lr_rate: ...} with training.lr_scheduler_type: cosine_with_min_lr",
    "optim.grad_clip": "training.max_grad_norm",
    "train.max_steps": "training.max_steps",
    "train.batch_size": "training.per_device_train_batch_size × training.gradient_accumulation_steps (× ranks: the global batch)",
    "train.micro_batch_size": "training.per_device_train_batch_size",
    "train.seed": "training.seed",
    "train.eval_every": "training.eval_steps",
    "train.eval_batches": "training.eval_batches",
    "train.save_every": "training.save_steps",
    "train.keep_last": "training.save_total_limit",
    "train.output_dir": "training.output_dir",
    "train.ema_decay": "training.ema_decay",
    "train.mixed_precision": "training.bf16 / training.fp16 (true or false; bf16 unset = on for a GPU that supports it)",
    "train.attention_backend": "training.attention_backend",
    "train.gradient_checkpointing": "training.gradient_checkpointing",
    "logging.log_every": "training.logging_steps",
    "logging.run_name": "training.run_name",
    "data.seq_len": "data.max_length",
}
# a half-migrated recipe (old field names under the new section) is told the same
RENAMED.update({f"training.{k.split('.', 1)[1]}": v for k, v in list(RENAMED.items())
                if k.startswith(("optim.", "train.", "logging.")) and not v.startswith(f"training.{k.split('.', 1)[1]}")})


@dataclass
class ModelArgs:
    """Architecture of a model trained from scratch (ignored when ``init_from`` is set).

    hidden_size / n_layers / n_heads / cond_dim / mlp_ratio: docs/ESOLM.md §9 sizes.
    dropout: residual dropout in training. init_from: a ``save_pretrained`` directory to
    start from instead (its architecture wins)."""

    hidden_size: int = 128
    n_layers: int = 4
    n_heads: int = 4
    cond_dim: int = 64
    mlp_ratio: int = 4
    dropout: float = 0.0
    init_from: str = ""


@dataclass
class PretrainArgs(TrainingArgs):
    """The loop of pretraining and SFT: ``transformers.TrainingArguments``' names (see
    :class:`~esorl.train.arguments.TrainingArgs`; ``max_steps`` counts optimizer steps) plus
    the EMA and the held-out evaluation. The global batch is ``per_device_train_batch_size ×
    gradient_accumulation_steps × ranks``; a run's losses do not depend on how it is split."""

    output_dir: str = "runs/pretrain"
    eval_steps: int = 200
    ema_decay: float = _help("EMA of the weights (0 = off); evaluation and the exported model use the EMA weights.", 0.999)
    eval_batches: int = _help("Held-out batches scored at each evaluation (NELBO per token and PPL; "
                              "the same rows whatever the number of ranks).", 8)
    per_device_eval_batch_size: int = _help("Held-out rows per evaluation batch.", 32)

    def validate(self):
        super().validate()
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"{self.section}.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.eval_batches < 1 or self.per_device_eval_batch_size < 1:
            raise ValueError(f"{self.section}.eval_batches and per_device_eval_batch_size must be >= 1")


@dataclass
class PretrainConfig:
    """A pretraining recipe: model, data, objective (docs/ESOLM.md §5), ``training`` (the loop:
    ``transformers.TrainingArguments`` names), ``lora`` (continued pretraining of
    ``model.init_from`` with LoRA adapters only; the exported model has them merged) and
    ``logging`` (wandb)."""

    RENAMED = RENAMED

    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    training: PretrainArgs = field(default_factory=PretrainArgs)
    lora: LoraArgs = field(default_factory=LoraArgs)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self):
        if self.lora.enabled and not self.model.init_from:
            raise ValueError("lora.enabled trains adapters on a pretrained model: set model.init_from (continued pretraining), "
                             "or train every weight from scratch without lora")


def build_model(args: ModelArgs, tok, seq_len: int) -> EsoLMModel:
    if args.init_from:
        from ..configuration_esolm import check_model_dir

        return EsoLMModel.from_pretrained(str(check_model_dir(args.init_from, "model.init_from")))
    from ..data import tokenizer_ids

    ids = tokenizer_ids(tok)
    cfg = EsoLMConfig(
        vocab_size=ids["vocab_size"], mask_token_id=ids["mask"], hidden_size=args.hidden_size, n_layers=args.n_layers,
        n_heads=args.n_heads, cond_dim=args.cond_dim, mlp_ratio=args.mlp_ratio, max_seq_len=seq_len, dropout=args.dropout,
        pad_token_id=ids["pad"], eos_token_id=ids["eos"], bos_token_id=ids.get("bos"),
    )
    return EsoLMModel(cfg)


def global_batch_rows(position: int, G: int, n_rows: int, seed: int) -> torch.Tensor:
    """Row indices of the global batch that starts at data position ``position`` (rows
    consumed so far; ``step × G`` within one setting): every epoch is a seeded permutation of
    the rows, evaluated per position (:func:`esorl.data.shards.permute`: O(G) work and memory
    per batch whatever the number of rows), so a batch is a pure function of ``(seed,
    position)`` and resuming, on any number of ranks, needs only the position."""
    from ..data.shards import permute

    flat = np.arange(position, position + G, dtype=np.int64)
    epochs, within = flat // n_rows, flat % n_rows
    out = np.empty(G, dtype=np.int64)
    for e in np.unique(epochs).tolist():
        sel = epochs == e
        out[sel] = permute(within[sel], n_rows, seed, Stream.DATA, e)
    return torch.from_numpy(out)


def rank_slice(micro: int, world: int, rank: int, m: int) -> slice:
    """Global-batch slice of rank ``rank`` in micro-step ``m``: micro-batches of ``micro`` rows
    interleaved over the ``world`` ranks."""
    start = (m * world + rank) * micro
    return slice(start, start + micro)


@torch.no_grad()
def evaluate(model, data: dict, cfg: PretrainConfig, accelerator, n_batches: int) -> dict:
    """NELBO per token and PPL on the first ``n_batches × per_device_eval_batch_size`` held-out rows, with
    ELBO weights and the training α0/κ (docs/ESOLM.md §5), deterministic (fixed seed, batches of
    ``per_device_eval_batch_size``). Ranks score disjoint batches; sums are reduced. When ``data`` holds
    a ``prompt_mask`` (SFT), prompts are clean context and the NELBO is per completion token."""
    model.eval()
    ids_all, valid_all = data["input_ids"], data["valid"]
    pm_all = data.get("prompt_mask")
    B, W = cfg.training.per_device_eval_batch_size, accelerator.num_processes
    n = min(len(ids_all), n_batches * B)  # the same rows whatever the number of ranks
    starts = list(range(0, n, B))
    mine = starts[accelerator.process_index :: W]
    # every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively):
    # a rank with fewer batches repeats one and does not count it
    rounds = (len(starts) + W - 1) // W
    tot = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # nll sum, tokens
    for r in range(rounds):
        start = mine[r] if r < len(mine) else 0
        idx = torch.arange(start, min(start + B, n))
        x, v = ids_all[idx].to(accelerator.device), valid_all[idx].to(accelerator.device)
        pm = {} if pm_all is None else {"prompt_mask": pm_all[idx].to(accelerator.device)}
        # every eval batch is its own "global batch" of the κ split
        out = hybrid_loss(model, x, v, cfg.objective, _EVAL_SEED, int(start), torch.arange(len(idx)), len(idx), eval_weights=True,
                          backend=cfg.training.attention_backend, single_forward=W > 1, **pm)
        if r >= len(mine):
            continue
        n_mdm, n_ar = out.mdm_tokens.item(), out.ar_tokens.item()
        # NELBO/token of the batch = mdm_sum/n_mdm + ar_sum/n_ar; weight by the batch's tokens
        tokens = n_mdm + n_ar
        val = (out.mdm_sum.item() / n_mdm if n_mdm else 0.0) + (out.ar_sum.item() / n_ar if n_ar else 0.0)
        tot += torch.tensor([val * tokens, tokens], dtype=torch.float64, device=accelerator.device)
    tot = all_reduce_sum(tot)
    model.train()
    nelbo = (tot[0] / tot[1].clamp(min=1)).item()
    return {"val/nelbo": nelbo, "val/ppl": math.exp(min(nelbo, 50.0))}


class PretrainLoop(TrainLoop):
    """Pretraining (and SFT) on :class:`~esorl.train.loop.TrainLoop`: the hybrid AR + MDM loss
    (:func:`esorl.objective.hybrid_loss`) of the global batch at the data position, split into
    this rank's micro-batches; the held-out NELBO; the data position in the checkpoint.

    ``data_fn()`` returns ``(tokenizer, {"train": {...}, "eval": {...}})`` instead of
    :func:`prepare_data` (SFT; run on the main process first); a split may carry a row-level
    ``prompt_mask`` ``(N, L)`` bool, whose tokens are then clean context at step 0 and never
    scored. ``cfg`` needs the sections ``model``, ``data`` (``max_length``, ``source``),
    ``objective``, ``training``, ``lora``, ``logging``."""

    kind = "pretrain"
    fixed_on_resume = RESUME_FIXED
    # the optimizer state of earlier versions' checkpoints (LoRA SFT) covers every parameter
    optimize_frozen = True
    renamed = {k: v for k, v in RENAMED.items() if " " not in v}  # the 1:1 renames

    def __init__(self, cfg, data_fn=None, kind: str = "pretrain"):
        super().__init__(cfg, cfg.training)
        self.cfg, self.data_fn, self.kind = cfg, data_fn, kind
        self.start_accelerator()

    def build(self) -> None:
        cfg, a, acc = self.cfg, self.args, self.accelerator
        with acc.main_process_first():
            self.tokenizer, self.data = self.data_fn() if self.data_fn is not None else prepare_data(cfg.data, a.seed)
        self.train_rows = self.data["train"]
        if len(self.train_rows["input_ids"]) == 0:
            raise ValueError(f"data: the training split of {cfg.data.source!r} is empty")
        model = build_model(cfg.model, self.tokenizer, cfg.data.max_length)
        if cfg.data.max_length > model.config.max_seq_len:
            raise ValueError(f"data.max_length={cfg.data.max_length} exceeds the model context max_seq_len={model.config.max_seq_len}")
        if a.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = cfg.lora.apply(model)  # LoRA: adapters only (as is when off)
        self.prepare_model(model)
        self.G = a.per_device_train_batch_size * a.gradient_accumulation_steps * self.world
        # data position = rows consumed so far: step × G within one setting, carried over a
        # resume so that a changed batch size continues where the data stopped
        self.pos0, self.step0 = 0, 0
        self.model.train()

    def checkpoint_state(self) -> dict:
        return {"data_position": self.pos0 + (self.step - self.step0) * self.G}

    def load_checkpoint_state(self, state: dict) -> None:
        self.step0 = self.step
        self.pos0 = int(state.get("data_position", self.step * self.G))

    def train_step(self) -> dict:
        cfg, a, acc = self.cfg, self.args, self.accelerator
        t0 = time.time()
        G, micro, accum, world, step = self.G, a.per_device_train_batch_size, a.gradient_accumulation_steps, self.world, self.step
        train = self.train_rows
        rows = global_batch_rows(self.pos0 + (step - self.step0) * G, G, len(train["input_ids"]), a.seed)
        x_all, v_all = train["input_ids"][rows], train["valid"][rows].bool()
        pm_all = train["prompt_mask"][rows].bool() if "prompt_mask" in train else None
        scored = v_all if pm_all is None else v_all & ~pm_all  # prompts are context, never scored
        is_mdm = torch.arange(G) < int(cfg.objective.batch_split * G)
        counts = (scored[is_mdm].sum().item(), scored[~is_mdm].sum().item())  # global: every rank sees `rows`
        loss_sum = 0.0
        for m in range(accum):
            sl = rank_slice(micro, world, acc.process_index, m)
            gidx = torch.arange(G)[sl]
            x, v = x_all[sl].to(acc.device), v_all[sl].to(acc.device)
            pm = {} if pm_all is None else {"prompt_mask": pm_all[sl].to(acc.device)}
            with acc.autocast():
                out = hybrid_loss(self.model, x, v, cfg.objective, a.seed, step, gidx, G, counts, backend=a.attention_backend, single_forward=world > 1, **pm)
            # DDP/ZeRO average gradients over ranks: scale back so the summed gradient is that
            # of (global sums / global counts)
            self.backward(out.loss * world, m == accum - 1)
            loss_sum += out.loss.detach().float()
        loss = all_reduce_sum(torch.as_tensor(loss_sum, device=acc.device)).item()
        if not math.isfinite(loss):
            self.opt.zero_grad(set_to_none=True)
            check_finite(loss, step + 1, self.ckpt)  # before any update: a NaN loss never reaches the weights
        gnorm, _ = self.update()
        return {"train/loss": loss, "train/lr": self.opt.param_groups[0]["lr"], "train/step_time": time.time() - t0,
                "train/grad_norm": gnorm, "train/skipped_updates": self.guard.skipped_updates}

    def evaluate(self) -> dict:
        m = evaluate(self.model, self.data["eval"], self.cfg, self.accelerator, self.args.eval_batches)
        self.accelerator.print(f"[esorl] step {self.step}: val NELBO {m['val/nelbo']:.4f}  val PPL {m['val/ppl']:.2f}")
        return m

    def postfix(self, m: dict) -> dict:
        return {"loss": f"{m['train/loss']:.3f}"}


def run_pretrain(cfg: PretrainConfig, resume: str | bool = False, data_fn=None, name: str = "pretrain", overwrite: bool = False) -> dict:
    """Train (:class:`PretrainLoop`); returns ``{"output_dir", "model_dir", "metrics"}``. Writes
    ``<output_dir>/{metrics.jsonl, config.yaml, checkpoints/, model/}``. ``name``: the run's
    kind (``pretrain`` / ``sft``). ``resume`` / ``overwrite``: :meth:`TrainLoop.run`."""
    return PretrainLoop(cfg, data_fn, name).run(resume, overwrite)


def main(argv=None):
    from ..config import parse_recipe_args, recipe_argparser

    a = parse_recipe_args(recipe_argparser("esorl pretrain", "train an Eso-LM with the hybrid AR + MDM objective", "training.learning_rate=1e-3"), argv)
    cfg = load_config(PretrainConfig, a.config, a.overrides)
    res = run_pretrain(cfg, a.resume, overwrite=a.overwrite)
    print(f"[esorl] model written to {res['model_dir']}")


def check_model_source(args, what: str = "model") -> None:
    """Fail before any work if ``args.init_from`` (an Eso-LM ``save_pretrained`` directory)
    can neither be loaded nor built: it is not a model directory and there is no existing
    ``args.pretrain_recipe`` to build it. Errors name ``<what>.init_from`` /
    ``<what>.pretrain_recipe``."""
    from ..configuration_esolm import check_model_dir

    p = Path(args.init_from)
    if p.exists() or not args.pretrain_recipe:
        check_model_dir(p, f"{what}.init_from")  # exists: must be an Eso-LM; else: says what it is
        return
    if not Path(args.pretrain_recipe).is_file():
        raise FileNotFoundError(f"{what}.pretrain_recipe: no such file {args.pretrain_recipe}")


def ensure_pretrained(args, what: str = "model") -> Path:
    """The model directory ``args.init_from``; if it does not exist yet, run
    ``args.pretrain_recipe`` (with ``args.pretrain_overrides`` and ``training.output_dir`` set to
    ``init_from``'s parent) first. How the CPU recipes chain pretraining → SFT / RL."""
    check_model_source(args, what)
    p = Path(args.init_from)
    if (p / "config.json").exists():
        return p
    from ..config import load_config

    cfg = load_config(PretrainConfig, args.pretrain_recipe, list(args.pretrain_overrides) + [f"training.output_dir={p.parent}"])
    print(f"[esorl] no {what} at {p}: pretraining it with {args.pretrain_recipe}")
    res = run_pretrain(cfg, resume="auto")
    return Path(res["model_dir"])


def prepare_data_main(argv=None):
    """``esorl prepare-data --config <pretrain recipe> [key=value ...] [--num-proc N] [--rebuild]``:
    tokenize the recipe's corpus into memory-mapped shards (what ``esorl pretrain`` with
    ``data.storage: shards`` would do on its first start), with a progress bar; resumable, and a
    no-op when the shards exist."""
    import argparse

    import json

    from ..data.corpus import prepare_shard_data

    p = argparse.ArgumentParser(prog="esorl prepare-data", description="tokenize a pretraining recipe's corpus into memory-mapped shards")
    p.add_argument("--config", required=True, help="a pretraining recipe (its data section; training.seed picks the held-out documents)")
    p.add_argument("--num-proc", type=int, default=None, help="tokenizer processes (default: data.num_proc)")
    p.add_argument("--rebuild", action="store_true", help="tokenize again even if shards of other inputs are there")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.shards_dir=/scratch/owt")
    a = p.parse_args(argv)
    cfg = load_config(PretrainConfig, a.config, a.overrides)
    cfg.data.storage = "shards"
    if a.num_proc:
        cfg.data.num_proc = a.num_proc
    tok, splits = prepare_shard_data(cfg.data, cfg.training.seed, rebuild=a.rebuild)
    root = splits["train"].shards.root
    idx = json.loads((root / "index.json").read_text())
    size = sum(f.stat().st_size for f in root.glob("*.bin"))
    print(f"[esorl] shards in {root}: " + ", ".join(f"{k} {v:,} tokens" for k, v in idx["tokens"].items())
          + f" ({idx['dtype']}, {size / 2**20:.1f} MiB); train with data.storage=shards data.shards_dir={root}")
