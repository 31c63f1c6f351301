"""``esorl grpo``: GRPO for Eso-LMs, with the exact single-pass likelihood or a Monte Carlo
estimate (spec §6), on ``accelerate`` (DDP, DeepSpeed ZeRO-2/3).

Why not a subclass of TRL's ``GRPOTrainer``: its hooks score completions with
``_get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep)``
— a left-to-right model's signature, with nowhere to carry the rollout's order σ and steps
— and its generation, reference-model rebuild and importance-sampling paths assume an AR
``generate``. Overriding them all would leave a TRL-shaped shell around a different
algorithm. So the loop is ours, but the configuration keeps ``trl.GRPOConfig``'s field
names and semantics (``tests/test_grpo.py`` checks the names against TRL), and reward
functions follow TRL's ``f(prompts, completions, **columns)``.

One *step* = sample a generation batch, score it, then ``num_iterations`` optimizer steps
over it (each accumulating ``gradient_accumulation_steps`` micro-batches per rank).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import load_config
from ..modeling_esolm import EsoLMModel
from ..policy import EsoPolicy
from ..rollout import Rollout
from ..train.common import LoggingConfig, all_reduce_sum, check_finite, configure_deepspeed
from .base import EsoRLArgs, RLTrainerBase
from .common import LOG_RATIO_CLAMP, PolicyArgs, PromptArgs, RewardSpec, all_gather_cat, peak_memory_mb

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


@dataclass
class EsoGRPOConfig(EsoRLArgs):
    """GRPO settings; names and meanings follow ``trl.GRPOConfig`` (TRL 1.16), plus the
    Eso-LM fields at the end.

    learning_rate, adam_beta1, adam_beta2, adam_epsilon, weight_decay, max_grad_norm, warmup_steps,
    lr_scheduler_type (``constant`` | ``cosine``): the optimizer.
    max_steps: generation steps. per_device_train_batch_size: completions per rank per
        micro-batch. gradient_accumulation_steps: micro-batches per optimizer step; the
        generation batch is ``per_device_train_batch_size × gradient_accumulation_steps ×
        ranks`` completions = that / ``num_generations`` prompts.
    num_generations: completions per prompt (the group). max_completion_length: N.
    temperature / top_p / top_k: sampling (RL default ``top_p = 1``, spec §7).
    beta: KL coefficient to the reference (k3 estimator; 0 = no reference model).
    epsilon / epsilon_high: clipping range ``[1 − ε, 1 + ε_high]`` (``epsilon_high`` < 0:
        same as ``epsilon``). loss_type: ``grpo`` | ``bnpo`` | ``dr_grpo`` | ``dapo``.
    scale_rewards: ``group`` | ``batch`` | ``none`` (divide advantages by the std).
    num_iterations: μ, optimizer steps per generation batch.
    reward_weights: weights of the reward functions (default: the recipe's weights).
    seed, logging_steps, save_steps, save_total_limit, eval_steps, output_dir.
    log_completions / num_completions_to_print: sample completions in the log.
    likelihood / mc_samples / p_mask: the estimator (spec §6).
    sampling_alpha0 / diffusion_steps: the unified sampling schedule ``(α0, T)``.
    attention_backend, mixed_precision: as in pretraining.
    """

    output_dir: str = "runs/grpo"  # (TRL: required)
    adam_beta2: float = 0.99
    num_generations: int = 8
    max_completion_length: int = 16
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float = -1.0
    loss_type: str = "dapo"
    scale_rewards: str = "group"
    num_iterations: int = 1

    def validate(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"grpo.loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.scale_rewards not in ("group", "batch", "none"):
            raise ValueError(f"grpo.scale_rewards must be group, batch or none, got {self.scale_rewards!r}")
        if self.num_generations < 2:
            raise ValueError("grpo.num_generations must be >= 2 (advantages are group-relative)")
        if self.num_iterations < 1 or self.max_steps < 1:
            raise ValueError("grpo.num_iterations and grpo.max_steps must be >= 1")
        if self.lr_scheduler_type not in ("constant", "cosine"):
            raise ValueError("grpo.lr_scheduler_type must be constant or cosine")
        self.estimator().validate()
        self.sampling().validate()




@dataclass
class GRPORecipe:
    """A GRPO recipe: starting ``policy``, ``prompts``, ``rewards`` (a list of reward
    functions / models with weights), ``grpo`` settings, ``logging``."""

    policy: PolicyArgs = field(default_factory=PolicyArgs)
    prompts: PromptArgs = field(default_factory=PromptArgs)
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec()])
    grpo: EsoGRPOConfig = field(default_factory=EsoGRPOConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def group_advantages(rewards: torch.Tensor, G: int, scale: str) -> torch.Tensor:
    """TRL's GRPO advantages: reward minus its group mean, optionally divided by the group
    (or batch) std (+1e-4)."""
    r = rewards.view(-1, G)
    adv = r - r.mean(1, keepdim=True)
    if scale == "group":
        adv = adv / (r.std(1, keepdim=True) + 1e-4)
    elif scale == "batch":
        adv = adv / (rewards.std() + 1e-4)
    return adv.flatten()


def grpo_token_loss(logp, old_logp, adv, mask, eps_low, eps_high, beta=0.0, ref_logp=None):
    """Per-token GRPO loss ``−min(ρA, clip(ρ)A) + β·KL_k3`` and the clip indicators.

    Log-ratios are clamped to ``±LOG_RATIO_CLAMP`` before ``exp``: with an importance-weighted
    estimator (``mc_elbo``'s per-token values carry ``1/t`` weights up to ``1/ε``) a log-ratio
    of hundreds is possible and ``exp`` would overflow to ``inf``; the clamp keeps such a step
    finite (and visible in the logged KL) instead of ending the run. ``exact`` log-ratios stay
    far inside it."""
    ratio = torch.exp((logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    a = adv[:, None].to(logp.dtype)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    loss = -torch.min(ratio * a, clipped * a)
    kl = None
    if beta > 0 and ref_logp is not None:
        d = (ref_logp - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        kl = torch.exp(d) - d - 1
        loss = loss + beta * kl
    low = (ratio < 1 - eps_low) & (a < 0)
    high = (ratio > 1 + eps_high) & (a > 0)
    return loss * mask, kl, low, high


def aggregate(loss_tok: torch.Tensor, mask: torch.Tensor, loss_type: str, n_global_tokens: float, n_global_seqs: int, max_len: int, world: int) -> torch.Tensor:
    """The loss of a micro-batch such that the gradients summed over micro-batches and
    averaged over ranks give the loss type's normalisation of the whole generation batch."""
    m = mask.to(loss_tok.dtype)
    if loss_type == "grpo":  # mean over each sequence's tokens, mean over sequences
        per_seq = loss_tok.sum(1) / m.sum(1).clamp(min=1)
        return per_seq.sum() / n_global_seqs * world
    if loss_type == "dr_grpo":  # constant normaliser: sequences × max completion length
        return loss_tok.sum() / (n_global_seqs * max_len) * world
    # bnpo / dapo: tokens of the batch (TRL: bnpo local batch, dapo global); here both global
    return loss_tok.sum() / max(n_global_tokens, 1.0) * world


class EsoGRPOTrainer(RLTrainerBase):
    """GRPO over Eso-LM rollouts. ``run()`` trains; the pieces are public for the comparison
    runner (:mod:`esorl.compare`), which measures estimators on the same batches."""

    kind = "grpo"

    def __init__(self, recipe: GRPORecipe, reward_funcs=None, reward_weights=None):
        c = recipe.grpo
        # checked before any set-up work (policy, rewards, logging): ranks come from the launcher
        world = int(os.environ.get("WORLD_SIZE", "1"))
        gen_batch = c.per_device_train_batch_size * c.gradient_accumulation_steps * world
        if gen_batch % c.num_generations:
            raise ValueError(f"grpo: the generation batch per_device_train_batch_size × gradient_accumulation_steps × ranks = "
                             f"{c.per_device_train_batch_size} × {c.gradient_accumulation_steps} × {world} = {gen_batch} "
                             f"must be a multiple of num_generations={c.num_generations}")
        self.setup(recipe, c, reward_funcs, reward_weights)
        acc = self.accelerator
        model = EsoLMModel.from_pretrained(str(self.model_dir))
        self.opt = torch.optim.AdamW(model.parameters(), lr=c.learning_rate, betas=(c.adam_beta1, c.adam_beta2), eps=c.adam_epsilon, weight_decay=c.weight_decay)
        configure_deepspeed(acc, c.per_device_train_batch_size, c.gradient_accumulation_steps, c.max_grad_norm)
        self.model, self.opt = acc.prepare(model, self.opt)
        self.updates_per_step = c.num_iterations
        self.make_guard()
        self.ref = None
        self.policy = EsoPolicy(self.model, self.tokenizer, c.sampling(), acc, c.attention_backend)
        self.ref_policy = self.make_reference(c.beta > 0)
        self._old_cache: dict = {}
        self.gen_batch = gen_batch

    # ------------------------------------------------------------------ batches
    def rollout(self, step: int) -> dict:
        """Generate this rank's share of the step's batch and score it (rewards, advantages)."""
        c = self.cfg
        batch = self.sample_and_score(step, self.gen_batch // c.num_generations, c.num_generations, self.gen_batch // self.world)
        batch["advantages"] = group_advantages(batch["all_rewards"], c.num_generations, c.scale_rewards)[batch["slice"]]
        return batch

    def score(self, policy: EsoPolicy, ro: Rollout, seed: int, grad: bool):
        est = self.cfg.estimator()
        params = est.params(self.cfg.sampling_alpha0, seed)
        ctx = torch.enable_grad() if grad else torch.no_grad()
        with ctx:
            return policy.log_probs(ro, est.likelihood, **params)

    def micro_batches(self, n_local: int):
        mb = self.cfg.per_device_train_batch_size
        return [torch.arange(i, min(i + mb, n_local)) for i in range(0, n_local, mb)]

    # ------------------------------------------------------------------ one step
    def train_step(self, batch: dict) -> dict:
        c = self.cfg
        acc = self.accelerator
        ro: Rollout = batch["rollout"].to(acc.device)
        adv = batch["advantages"].to(acc.device)
        eps_high = c.epsilon if c.epsilon_high < 0 else c.epsilon_high
        mbs = self.micro_batches(ro.batch_size)
        n_tok = all_reduce_sum(torch.tensor(float(ro.completion_mask.sum()), device=acc.device)).item()
        self.model.eval()  # sampling and scoring in eval mode (spec §6): no dropout
        t_score = t_update = 0.0
        stats = {"loss": 0.0, "kl": 0.0, "clip_low": 0.0, "clip_high": 0.0, "ratio_dev": 0.0}
        grad_norms = []
        for it in range(c.num_iterations):
            seed = self.estimator_seed(self.step, it)
            t0 = time.time()
            # old log-probs: an exact run takes them from the sampler (free, spec §6); an MC run
            # with μ > 1 scored the old weights under every iteration's seed before the first
            # update (precompute_old); with μ = 1 they are the current ones detached (ratio 1)
            if c.likelihood == "exact":
                old = ro.logp_model.to(acc.device)
            else:
                old = self._old_cache.get(it)
            ref = self.score(self.ref_policy, ro, seed, grad=False)[0] if self.ref_policy is not None else None
            t_score += time.time() - t0
            t0 = time.time()
            for j, idx in enumerate(mbs):
                sub = ro.index(idx)
                lp, mask = self.score(self.policy, sub, seed, grad=True)
                old_mb = lp.detach() if old is None else old[idx]
                loss_tok, kl, low, high = grpo_token_loss(lp, old_mb, adv[idx], mask, c.epsilon, eps_high, c.beta, None if ref is None else ref[idx])
                loss = aggregate(loss_tok, mask, c.loss_type, n_tok, self.gen_batch, c.max_completion_length, self.world)
                self.guard.backward(loss, j == len(mbs) - 1, self.world)
                m = mask.float()
                stats["loss"] += loss.item() / self.world
                stats["clip_low"] += (low.float() * m).sum().item()
                stats["clip_high"] += (high.float() * m).sum().item()
                stats["ratio_dev"] += ((lp.detach() - old_mb).abs() * m).sum().item()
                if kl is not None:
                    stats["kl"] += (kl.detach() * m).sum().item()
            gn, _ = self.update(it)
            grad_norms.append(gn)
            t_update += time.time() - t0
        self._old_cache = {}
        tot = all_reduce_sum(torch.tensor([stats["clip_low"], stats["clip_high"], stats["ratio_dev"], stats["kl"]], device=acc.device, dtype=torch.float64)) / (n_tok * c.num_iterations)
        loss = all_reduce_sum(torch.tensor(stats["loss"], device=acc.device)).item() / c.num_iterations
        check_finite(loss, self.step + 1, self.ckpt)
        return {"loss": loss, "skipped_updates": self.guard.skipped_updates, "learning_rate": self.opt.param_groups[0]["lr"], "clip_ratio/low": tot[0].item(), "clip_ratio/high": tot[1].item(), "clip_ratio/region": (tot[0] + tot[1]).item(),
                "ratio_abs_log_dev": tot[2].item(), "kl": tot[3].item(), "grad_norm": sum(grad_norms) / len(grad_norms),
                "time/score": t_score, "time/update": t_update}

    def precompute_old(self, ro: Rollout):
        """For MC estimators with μ > 1: score the old policy under every iteration's seed
        before any update (no grad)."""
        c = self.cfg
        self._old_cache = {}
        if c.likelihood == "exact" or c.num_iterations == 1:
            return 0.0
        t0 = time.time()
        for it in range(c.num_iterations):
            self._old_cache[it] = self.score(self.policy, ro.to(self.accelerator.device), self.estimator_seed(self.step, it), grad=False)[0]
        return time.time() - t0

    # ------------------------------------------------------------------ eval, logging
    def log_step(self, batch, st, t_step):
        c = self.cfg
        ro = batch["rollout"]
        rw = batch["all_rewards"]
        text_len = all_gather_cat(ro.text_mask.sum(1).float().to(self.accelerator.device)).mean().item()
        nll = all_gather_cat((-ro.logp_model).mean(1).to(self.accelerator.device)).mean().item()
        m = {"reward": rw.mean().item(), "reward_std": rw.std().item(), "completion_length": text_len,
             "entropy": nll, "time/step": t_step, "time/rollout": batch["t_generate"], "tokens_per_s": self.gen_batch * c.max_completion_length / max(t_step, 1e-9),
             "memory/peak_mb": peak_memory_mb(self.accelerator.device), **{f"train/{k}" if "/" not in k else k: v for k, v in st.items()}}
        for k, v in batch["per_reward"].items():
            m[f"rewards/{k}/mean"] = torch.nanmean(v).item()
            m[f"rewards/{k}/std"] = v[~v.isnan()].std().item() if (~v.isnan()).sum() > 1 else 0.0
        return m

    # ------------------------------------------------------------------ loop
    def step_once(self, t0: float) -> tuple[dict, dict]:
        batch = self.rollout(self.step)
        t_old = self.precompute_old(batch["rollout"])
        st = self.train_step(batch)
        st["time/score"] += t_old
        self.step += 1
        return batch, self.log_step(batch, st, time.time() - t0)

    def postfix(self, m: dict) -> dict:
        return {"reward": f"{m['reward']:.3f}", "kl": f"{m.get('train/kl', 0):.3f}"}

    def export_all(self) -> dict:
        self.export(self.out / "model")
        return {"model_dir": str(self.out / "model")}

    def export(self, out_dir: Path):
        acc = self.accelerator
        sd = acc.get_state_dict(self.model)
        if acc.is_main_process:
            tmp = out_dir.with_name(out_dir.name + ".tmp")
            acc.unwrap_model(self.model).save_pretrained(str(tmp), state_dict=sd, safe_serialization=True)
            self.tokenizer.save_pretrained(str(tmp))
            import shutil

            if out_dir.exists():
                shutil.rmtree(out_dir)
            tmp.replace(out_dir)
        acc.wait_for_everyone()


def main(argv=None):
    from ..config import parse_recipe_args, recipe_argparser

    a = parse_recipe_args(recipe_argparser("esorl grpo", "GRPO fine-tuning of an Eso-LM (exact or Monte Carlo likelihoods)", "grpo.learning_rate=1e-5"), argv)
    recipe = load_config(GRPORecipe, a.config, a.overrides)
    from ..train.run_dir import precheck

    precheck(recipe.grpo.output_dir, a.resume, a.overwrite, "grpo.output_dir")  # before any set-up work
    EsoGRPOTrainer(recipe).run(a.resume, a.overwrite)
