"""``esorl pretrain``: train an Eso-LM with the hybrid AR + MDM objective on ``accelerate``.

Runs unchanged on one CPU, several CPU ranks (gloo), GPUs with DDP, and DeepSpeed ZeRO-2/3:
launch with ``accelerate launch --config_file accelerate_configs/<x>.yaml -m esorl.cli
pretrain --config ...``. The global batch, the data order and all objective randomness are
functions of the seed and the global sample index, so a run's losses do not depend on the
number of ranks, and ``--resume`` continues exactly.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import load_config, save_config
from ..configuration_esolm import EsoLMConfig
from ..modeling_esolm import EsoLMModel
from ..objective import ObjectiveConfig, hybrid_loss
from ..schedule import Stream
from .common import (EMA, Checkpointer, LoggingConfig, NonFiniteGuard, OptimConfig, RunLogger, all_reduce_sum, check_finite, check_resume,
                     configure_deepspeed, flat_config, make_accelerator, make_optimizer, read_metrics, set_learning_rate)
from .data_prep import DataConfig, prepare_data
from .run_dir import GracefulStop, RunInterrupted, claim, resume_command


# settings a resumed pretraining run cannot change (the rest is honoured from the new config)
RESUME_FIXED = {
    **{f"model.{k}": "the checkpoint holds weights of this architecture" for k in ("hidden_size", "n_layers", "n_heads", "cond_dim", "mlp_ratio")},
    **{f"data.{k}": "the rows, their order and the data position refer to this data" for k in
       ("seq_len", "mode", "tokenizer", "tokenizer_vocab_size", "add_bos", "train_split", "text_field", "synthetic_size", "synthetic_seed",
        "eval_split", "eval_fraction", "truncate", "task", "task_rendering", "task_size", "task_seed", "task_test_size")},
    "train.seed": "the data order and the objective's noise are keyed by it",
    "lora.": "the checkpoint holds the parameters this LoRA setting trains (SFT)",
}
_EVAL_SEED = 12345


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
class TrainArgs:
    """Loop settings.

    max_steps: optimizer steps. batch_size: GLOBAL sequences per optimizer step.
    micro_batch_size: sequences per rank per forward (gradient accumulation fills the rest:
    ``batch_size = micro_batch_size × accumulation × ranks``). seed: everything random.
    eval_every / eval_batches: periodic NELBO/PPL on the held-out split (0 = only at the end).
    save_every: checkpoint period (0 = only at the end). keep_last: checkpoints kept.
    output_dir: run directory. ema_decay: EMA of weights (0 = off); eval and the exported
    model use the EMA weights. mixed_precision: ``auto`` (bf16 on GPU), ``no``, ``bf16``.
    attention_backend: ``auto`` (flex on CUDA, SDPA elsewhere), ``sdpa``, ``flex``.
    gradient_checkpointing: recompute each block in the backward pass instead of keeping its
        activations (same gradients; less memory, one more forward of the blocks; see
        ``benchmarks/README.md``).
    """

    max_steps: int = 1000
    batch_size: int = 32
    micro_batch_size: int = 32
    seed: int = 0
    eval_every: int = 200
    eval_batches: int = 8
    save_every: int = 500
    keep_last: int = 2
    output_dir: str = "runs/pretrain"
    ema_decay: float = 0.999
    mixed_precision: str = "auto"
    attention_backend: str = "auto"
    gradient_checkpointing: bool = False

    def validate(self):
        if self.max_steps < 1:
            raise ValueError("train.max_steps must be >= 1")
        if self.batch_size < 1 or self.micro_batch_size < 1:
            raise ValueError("train.batch_size and train.micro_batch_size must be >= 1")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError("train.ema_decay must be in [0, 1)")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ValueError(f"train.mixed_precision must be auto, no, bf16 or fp16, got {self.mixed_precision!r}")


@dataclass
class PretrainConfig:
    """A pretraining recipe: model, data, objective (docs/ESOLM.md §5), optimizer, loop, logging."""

    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainArgs = field(default_factory=TrainArgs)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


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


def rank_slice(G: int, micro: int, world: int, rank: int, accum: int, m: int) -> slice:
    """Global-batch slice of rank ``rank`` in micro-step ``m``."""
    start = (m * world + rank) * micro
    return slice(start, start + micro)


@torch.no_grad()
def evaluate(model, data: dict, cfg: PretrainConfig, accelerator, n_batches: int) -> dict:
    """NELBO per token and PPL on the first ``n_batches × micro_batch_size`` held-out rows, with
    ELBO weights and the training α0/κ (docs/ESOLM.md §5), deterministic (fixed seed, batches of
    ``micro_batch_size``). Ranks score disjoint batches; sums are reduced. When ``data`` holds
    a ``prompt_mask`` (SFT), prompts are clean context and the NELBO is per completion token."""
    model.eval()
    ids_all, valid_all = data["input_ids"], data["valid"]
    pm_all = data.get("prompt_mask")
    B, W = cfg.train.micro_batch_size, accelerator.num_processes
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
                          backend=cfg.train.attention_backend, single_forward=W > 1, **pm)
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


def export_model(accelerator, model, ema: EMA | None, tok, out_dir: Path) -> None:
    """``save_pretrained`` (safetensors) of the EMA weights (or the live ones) + tokenizer."""
    if ema is not None:
        ema.swap()
    try:
        unwrapped = accelerator.unwrap_model(model)
        peft = hasattr(unwrapped, "peft_config")
        sd = None if peft else accelerator.get_state_dict(model)
        if accelerator.is_main_process:
            tmp = out_dir.with_name(out_dir.name + ".tmp")
            if peft:  # LoRA: the adapters merged into a plain Eso-LM
                from ..lora import merge_and_export

                merge_and_export(unwrapped, tmp)
            else:
                unwrapped.save_pretrained(str(tmp), state_dict=sd, safe_serialization=True)
            tok.save_pretrained(str(tmp))
            from ..io import replace_dir

            replace_dir(tmp, out_dir)
    finally:
        if ema is not None:
            ema.swap()
    accelerator.wait_for_everyone()


def run_pretrain(cfg: PretrainConfig, resume: str | bool = False, data_fn=None, name: str = "pretrain", overwrite: bool = False) -> dict:
    """Train; returns the final metrics. Writes ``<output_dir>/{metrics.jsonl, config.yaml,
    checkpoints/, model/}``.

    Hooks for other loops that reuse this one (SFT, :mod:`esorl.train.sft`):
    ``data_fn()`` returns ``(tokenizer, {"train": {...}, "eval": {...}})`` instead of
    :func:`prepare_data` (run on the main process first); a split may carry a row-level
    ``prompt_mask`` ``(N, L)`` bool, whose tokens are then clean context at step 0 and never
    scored (:func:`esorl.objective.hybrid_loss`). ``cfg`` only needs the sections ``model``,
    ``data`` (``seq_len``, ``source``), ``objective``, ``optim``, ``train``, ``logging``.
    ``name``: progress-bar label. ``resume``: ``False`` (a new run: an ``output_dir`` that
    holds a run is refused unless ``overwrite``), ``"latest"``/``True``, ``"auto"`` (resume if
    possible) or a checkpoint directory. SIGINT/SIGTERM save a checkpoint at the next step
    boundary and raise :class:`~esorl.train.run_dir.RunInterrupted`."""
    tcfg = cfg.train
    out_dir = Path(tcfg.output_dir)
    G, micro = tcfg.batch_size, tcfg.micro_batch_size
    # world size from the launcher's environment: touching PartialState before the Accelerator
    # exists would initialise the process group without the gloo backend CPU ranks need
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if G % (micro * world):
        raise ValueError(f"train.batch_size={G} must be a multiple of micro_batch_size × ranks = {micro} × {world}")
    accum = G // (micro * world)
    # micro-batches are accumulated by hand (losses pre-normalised over the global batch), so
    # accelerate must not divide them by its own accumulation count
    accelerator = make_accelerator(tcfg.mixed_precision, 1)
    torch.manual_seed(tcfg.seed)  # dropout RNG; the objective never uses global state

    lock = claim(out_dir, resume, overwrite, accelerator)  # before any work: one owner, one history
    try:
        # a resume that cannot be honoured is refused before data, model, logs or config.yaml
        ckpt = Checkpointer(out_dir, tcfg.keep_last)
        path = ckpt.resolve(resume)
        if path is not None:
            changed = check_resume(Checkpointer.read_state(path), path, accelerator, flat_config(cfg), RESUME_FIXED)
        with accelerator.main_process_first():
            tok, data = data_fn() if data_fn is not None else prepare_data(cfg.data, tcfg.seed)
        train = data["train"]
        if len(train["input_ids"]) == 0:
            raise ValueError(f"data: the training split of {cfg.data.source!r} is empty")
        model = build_model(cfg.model, tok, cfg.data.seq_len)
        if cfg.data.seq_len > model.config.max_seq_len:  # (model is not wrapped yet here)
            raise ValueError(f"data.seq_len={cfg.data.seq_len} exceeds the model context max_seq_len={model.config.max_seq_len}")
        if tcfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if getattr(cfg, "lora", None) is not None:  # SFT: adapters only (pretraining trains every weight)
            model = cfg.lora.apply(model)
        # the fused AdamW kernel on GPUs (DeepSpeed keeps its own optimizer partitions: foreach)
        ds = getattr(accelerator.state, "deepspeed_plugin", None) is not None
        opt = make_optimizer(model.parameters(), cfg.optim, device=None if ds else accelerator.device)
        configure_deepspeed(accelerator, micro, accum, cfg.optim.grad_clip)
        model, opt = accelerator.prepare(model, opt)
        ema = EMA(model.parameters(), tcfg.ema_decay) if tcfg.ema_decay > 0 else None

        guard = NonFiniteGuard(accelerator, model, opt, ckpt)
        resuming = resume not in (False, None, "", "false")
        logger = RunLogger(out_dir, cfg.logging, asdict(cfg), enabled=accelerator.is_main_process, resume=resuming)
        if accelerator.is_main_process:
            save_config(cfg, out_dir / "config.yaml")
        step = 0
        # data position = rows consumed so far: step × batch_size within one setting, carried
        # over a resume so that a changed batch size continues where the data stopped
        pos0, step0 = 0, 0
        if path is not None:
            state, extras = Checkpointer.load(accelerator, path, ["ema"] if ema else [])
            step = step0 = state["step"]
            pos0 = int(state.get("data_position", step * G))
            guard.load_state_dict(state)
            if ema:
                ema.load_state_dict(extras["ema"])
                ema.decay = tcfg.ema_decay  # the current setting, not the saved one
            accelerator.print(f"[esorl] resumed from {path} at step {step}" + (f" with changed settings: {'; '.join(changed)}" if changed else ""))

        if resuming:
            logger.truncate_after(step if step else -1)  # records after the checkpoint (or of a run with none) are redone
        n_rows = len(train["input_ids"])
        bar = tqdm(total=tcfg.max_steps, initial=step, desc=name, disable=not accelerator.is_main_process, dynamic_ncols=True)
        last = {}
        model.train()
        t0 = time.time()
        with GracefulStop() as stop:
            while step < tcfg.max_steps:
                rows = global_batch_rows(pos0 + (step - step0) * G, G, n_rows, tcfg.seed)
                x_all, v_all = train["input_ids"][rows], train["valid"][rows].bool()
                pm_all = train["prompt_mask"][rows].bool() if "prompt_mask" in train else None
                scored = v_all if pm_all is None else v_all & ~pm_all  # prompts are context, never scored
                is_mdm = torch.arange(G) < int(cfg.objective.batch_split * G)
                counts = (scored[is_mdm].sum().item(), scored[~is_mdm].sum().item())  # global: every rank sees `rows`
                # the learning rate (and AdamW settings) of this step from the current config
                o = cfg.optim
                set_learning_rate(opt, o.lr * o.factor(step, tcfg.max_steps), betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
                loss_sum = 0.0
                for m in range(accum):
                    sl = rank_slice(G, micro, world, accelerator.process_index, accum, m)
                    gidx = torch.arange(G)[sl]
                    x, v = x_all[sl].to(accelerator.device), v_all[sl].to(accelerator.device)
                    pm = {} if pm_all is None else {"prompt_mask": pm_all[sl].to(accelerator.device)}
                    with accelerator.autocast():
                        out = hybrid_loss(model, x, v, cfg.objective, tcfg.seed, step, gidx, G, counts, backend=tcfg.attention_backend, single_forward=world > 1, **pm)
                    # DDP/ZeRO average gradients over ranks: scale back so the summed gradient is that
                    # of (global sums / global counts)
                    guard.backward(out.loss * world, m == accum - 1, world)
                    loss_sum += out.loss.detach().float()
                loss = all_reduce_sum(torch.as_tensor(loss_sum, device=accelerator.device)).item()
                if not math.isfinite(loss):
                    opt.zero_grad(set_to_none=True)
                    check_finite(loss, step + 1, ckpt)  # before any update: a NaN loss never reaches the weights
                gnorm, applied = guard.step(o.grad_clip, step + 1)
                if ema and applied:
                    ema.update()
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}")
                if step % cfg.logging.log_every == 0 or step == tcfg.max_steps:
                    last = {"train/loss": loss, "train/lr": opt.param_groups[0]["lr"], "train/step_time": (time.time() - t0) / cfg.logging.log_every,
                            "train/grad_norm": gnorm, "train/skipped_updates": guard.skipped_updates}
                    t0 = time.time()
                if (tcfg.eval_every and step % tcfg.eval_every == 0) or step == tcfg.max_steps:
                    if ema:
                        ema.swap()
                    last.update(evaluate(model, data["eval"], cfg, accelerator, tcfg.eval_batches))
                    if ema:
                        ema.swap()
                    accelerator.print(f"[esorl] step {step}: loss {loss:.4f}  val NELBO {last['val/nelbo']:.4f}  val PPL {last['val/ppl']:.2f}")
                if last and (step % cfg.logging.log_every == 0 or step == tcfg.max_steps or "val/nelbo" in last):
                    logger.log(last, step)
                    last = {}
                save = lambda: ckpt.save(accelerator, step, {"data_position": pos0 + (step - step0) * G, "config": flat_config(cfg), **guard.state_dict()},  # noqa: E731
                                         {"ema": ema.state_dict()} if ema else None, verify=(model, opt))
                saved = (tcfg.save_every and step % tcfg.save_every == 0) or step == tcfg.max_steps
                if saved:
                    save()
                if step < tcfg.max_steps and stop.requested(accelerator.device):
                    path = save() if not saved else ckpt.latest()
                    bar.close()
                    logger.finish()
                    raise RunInterrupted(f"{name} stopped by {stop.signame or 'a signal on another rank'} at step {step} of {tcfg.max_steps}; "
                                         f"checkpoint {path}. Resume with: {resume_command()}")
        bar.close()
        export_model(accelerator, model, ema, tok, out_dir / "model")
        metrics = read_metrics(out_dir / "metrics.jsonl") if accelerator.is_main_process else []
        logger.finish()
        return {"output_dir": str(out_dir), "model_dir": str(out_dir / "model"), "metrics": metrics}
    finally:
        lock.release()


def main(argv=None):
    from ..config import parse_recipe_args, recipe_argparser

    a = parse_recipe_args(recipe_argparser("esorl pretrain", "train an Eso-LM with the hybrid AR + MDM objective", "optim.lr=1e-3"), argv)
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
    ``args.pretrain_recipe`` (with ``args.pretrain_overrides`` and ``train.output_dir`` set to
    ``init_from``'s parent) first. How the CPU recipes chain pretraining → SFT / RL."""
    check_model_source(args, what)
    p = Path(args.init_from)
    if (p / "config.json").exists():
        return p
    from ..config import load_config

    cfg = load_config(PretrainConfig, args.pretrain_recipe, list(args.pretrain_overrides) + [f"train.output_dir={p.parent}"])
    print(f"[esorl] no {what} at {p}: pretraining it with {args.pretrain_recipe}")
    res = run_pretrain(cfg, resume="auto")
    return Path(res["model_dir"])
