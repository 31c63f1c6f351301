"""``esorl ppo``: PPO for Eso-LMs over **denoising steps** (docs/ESOLM.md §8), on ``accelerate``
(DDP, DeepSpeed ZeRO-2/3), on the loop pretraining and SFT run on
(:class:`esorl.train.loop.TrainLoop`). TRL has no PPO any more; a setting GRPO also has keeps
``trl.GRPOConfig``'s name (``max_completion_length``, ``num_iterations``, ``epsilon``, ...),
the PPO-only ones the names and semantics of TRL's former ``PPOConfig`` / ``OnPolicyConfig``
(``num_mini_batches``, ``gamma``, ``lam``, ``cliprange_value``, ``vf_coef``, ``kl_coef``,
``kl_estimator``, ``whiten_rewards``, ``local_rollout_forward_batch_size``,
``missing_eos_penalty``).

The MDP
-------
A rollout of ``N`` tokens after a prompt of ``P`` slots (left-padded; slot ``P − 1`` is always
a real token: the policy prepends BOS) follows the trajectory ``(σ, k_1..k_K)``; the step
sizes are shared by the batch. Step ``i`` is one action: the set of ``k_i`` tokens it reveals.
The state before step ``i`` is the prompt plus the tokens revealed at steps ``< i``; it is
summarised, causally, at the **last clean copy with s < i** in array order, i.e. table slot
``P + c_{i−1} − 1`` with ``c_i = k_1 + … + k_i`` (:func:`value_slots`). A :class:`ValueHead`
(``Linear(d, 1)``) on the final hidden state of that clean copy is ``V(state_i)``.

Rewards per step: ``r_i = −kl_coef · Σ_{tokens of step i} KL_token`` (``k1``: ``log π_old −
log π_ref``; ``k3``: ``exp(ref − old) − (ref − old) − 1``), plus the sequence's reward at
step ``K`` (minus ``missing_eos_penalty`` for a completion without EOS). With
``whiten_rewards`` the scalar (sequence) rewards are whitened over the global batch first.
GAE runs over the ``K`` steps (:func:`gae_over_steps`, ``V(state_{K+1}) = 0``); returns =
advantages + values; advantages are broadcast to the tokens each step reveals and whitened
over the batch's tokens (as TRL did). The policy loss is TRL's clipped loss **per token**
(a per-step product of many token ratios would almost always clip); the value loss is TRL's
clipped value loss per step; ``loss = pg_loss + vf_coef · vf_loss``.

What the value head sees, per estimator
---------------------------------------
* ``exact``: one forward over layout (a) (``exact(..., return_hidden=True)``) gives every
  token's log-prob **and** the hidden states of the clean copies, hence every step's value,
  in the same pass. Clean copies never attend to query copies, so these are the same numbers
  as a clean-copies-only forward (tested). Old log-probs are the sampler's (free); the
  rollout-time values come from a clean-copies-only forward (``P + N − k_K`` tokens, cheaper
  than layout (a)).
* ``replay`` and ``one_step`` (per-token estimators): the policy term uses the estimator's
  per-token log-probs; the value head runs on a **separate** forward over the clean copies
  alone, ``[prompt | completion clean copies in σ order]`` (the clean half of layout (a), same
  attention rule, truncated after the last read-out slot), so it sees the true trajectory
  states. For ``one_step`` the actor's log-probs are mean-field (``log p(y_j | masked
  prompt)``, blind to the order) while the critic is trajectory-aware: per-step GAE then
  assigns credit with a critic that knows more than the actor's likelihood.
* ``mc_elbo`` and ``coupled`` (no per-step log-probs): **sequence-level PPO**. The whole
  completion is one action, advantage ``A = R − V(state_1)`` with ``R = reward − kl_coef ·
  Σ_tokens KL_token`` (no per-step GAE, no discounting); ``V(state_1)`` reads the prompt's
  last slot only (a forward over the ``P`` prompt tokens); the value target is ``R``. The
  ratio is still per token, on the estimator's per-token terms, with ``A`` broadcast.

Old log-probs of the Monte Carlo estimators are computed before any update, one estimator
seed per PPO epoch shared by the old, current and reference passes (as in GRPO); the KL in
the rewards uses epoch 0's seed. ``kl_coef > 0`` reloads a frozen reference model from the
policy's saved directory.

Batches (TRL's semantics): ``per_device_train_batch_size`` rollouts per micro-batch;
``gradient_accumulation_steps`` micro-batches per optimizer step (a mini-batch); the rollout
batch of a step is ``per_device_train_batch_size × gradient_accumulation_steps ×
num_mini_batches`` per rank; each step runs ``num_iterations × num_mini_batches`` optimizer
steps over it (shuffled per epoch).

The value head is trained jointly with the policy (shared trunk, one optimizer) inside one
``nn.Module`` (:class:`EsoLMWithValueHead`) that ``accelerate`` prepares; its EsoLM is its
``module`` attribute, so :func:`esorl.modeling_esolm.unwrap` (the sampler, ZeRO-3 gathering)
finds it through any wrapper. Checkpoints hold both; the export writes ``model/`` (the
policy, ``save_pretrained``) and ``value_head.safetensors`` next to it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..config import ConfigError, load_config
from ..layout import copies, trajectory_table
from ..lora import LoraArgs
from ..likelihood import exact
from ..modeling_esolm import EsoLMModel, model_config
from ..policy import EsoPolicy
from ..rollout import Rollout
from ..schedule import Stream, make_generator
from ..sampling import SamplingConfig
from ..schedule import ScheduleConfig
from ..policy import EstimatorConfig
from ..train.arguments import TrainingArgs, _help
from ..distributed import all_gather_cat, all_reduce_sum
from ..train.common import LoggingConfig, check_finite
from .base import RLTrainerBase
from .common import LOG_RATIO_CLAMP, PolicyArgs, PromptArgs, RewardSpec, peak_memory_mb


@dataclass
class EsoPPOConfig(TrainingArgs):
    """PPO settings. The loop's fields are ``transformers.TrainingArguments``' (as everywhere in
    esorl: :class:`~esorl.train.arguments.TrainingArgs`; ``warmup_steps`` and the schedule count
    optimizer updates, ``num_iterations × num_mini_batches`` per step); a setting GRPO also has
    carries ``trl.GRPOConfig``'s name (``max_completion_length``, ``num_iterations``,
    ``epsilon``, ``temperature``, ``reward_weights``, ``likelihood``, ...); the PPO-only ones keep
    the names of TRL's former ``PPOConfig`` (``num_mini_batches``, ``gamma``, ``lam``,
    ``cliprange_value``, ``vf_coef``, ``kl_coef``, ``kl_estimator``, ``whiten_rewards``,
    ``local_rollout_forward_batch_size``, ``missing_eos_penalty``). Batches follow TRL's
    semantics: ``per_device_train_batch_size`` rollouts per micro-batch,
    ``gradient_accumulation_steps`` micro-batches per optimizer step (a mini-batch),
    ``num_mini_batches`` mini-batches per rollout batch."""

    section = "ppo"

    output_dir: str = "runs/ppo"
    learning_rate: float = 1e-5
    lr_scheduler_type: str = "constant"
    max_steps: int = 100
    per_device_train_batch_size: int = 16
    logging_steps: int = 1
    save_steps: int = 50
    # --- shared with GRPO (trl.GRPOConfig's names) ---
    max_completion_length: int = _help("N, the completion length (every position is generated; the text stops at EOS).", 16)
    num_iterations: int = _help("Passes over each rollout batch (PPO's epochs; GRPO's μ).", 4)
    epsilon: float = _help("Clip range of the policy ratio (TRL's former cliprange).", 0.2)
    temperature: float = _help("Sampling temperature.", 1.0)
    top_p: float = _help("Nucleus sampling threshold (RL default 1 = off, docs/ESOLM.md §7).", 1.0)
    top_k: int = _help("Top-k sampling (0 = off).", 0)
    reward_weights: list[float] = _help("Weights of the reward functions (default: the recipe's weights).", factory=list)
    log_completions: bool = _help("Append sample completions to completions.jsonl at each logging step.", True)
    num_completions_to_print: int = _help("Completions printed every max(logging_steps, 10) steps.", 2)
    likelihood: str = _help("Likelihood estimator of the loss (esorl.likelihood.REGISTRY; docs/ESOLM.md §6); estimators without "
                            "per-step log-probs (mc_elbo, coupled, ...) run sequence-level PPO.", "exact")
    mc_samples: int = _help("Monte Carlo draws n of the ELBO estimators.", 4)
    p_mask: float = _help("one_step: prompt mask rate (d1: 0.15).", 0.15)
    merge_segments: int = _help("step_merge: segments the trajectory's steps are merged into (d2's StepMerge).", 2)
    sampling_alpha0: float = _help("Sampling schedule α0: the share of the completion revealed by diffusion steps.", 1.0)
    diffusion_steps: int = _help("Sampling schedule T: denoising steps of the diffusion part.", 8)
    schedule_kind: str = _help("Step-size schedule: unified (the paper's) | uniform | ...", "unified")
    # --- PPO only (TRL's former PPOConfig names) ---
    num_mini_batches: int = _help("Mini-batches per rollout batch; the rollout batch per rank is per_device_train_batch_size × "
                                  "gradient_accumulation_steps × num_mini_batches.", 1)
    local_rollout_forward_batch_size: int = _help("Chunk size of the no-grad passes (old / reference log-probs, rollout-time values).", 64)
    missing_eos_penalty: float | None = _help("Subtracted from the reward of completions without EOS (unset: off).", None)
    gamma: float = _help("Discount over denoising steps.", 1.0)
    lam: float = _help("GAE λ over denoising steps.", 0.95)
    cliprange_value: float = _help("Clip range of the value update.", 0.2)
    vf_coef: float = _help("Weight of the value loss.", 0.1)
    kl_coef: float = _help("KL penalty to the reference in the per-step rewards (0 = no reference model).", 0.05)
    kl_estimator: str = _help("k1 (log π − log π_ref) or k3 (as GRPO's β term).", "k1")
    whiten_rewards: bool = _help("Whiten the scalar rewards over the global batch before GAE.", False)
    value_head_init_std: float = _help("Std of the value head's initial weights (bias 0).", 1e-3)

    def validate(self):
        super().validate()
        if self.kl_estimator not in ("k1", "k3"):
            raise ConfigError(f"ppo.kl_estimator must be k1 or k3, got {self.kl_estimator!r}")
        if self.kl_coef < 0 or self.vf_coef < 0:
            raise ConfigError("ppo.kl_coef and ppo.vf_coef must be >= 0")
        if not (0.0 <= self.gamma <= 1.0 and 0.0 <= self.lam <= 1.0):
            raise ConfigError(f"ppo.gamma and ppo.lam must be in [0, 1], got {self.gamma}, {self.lam}")
        if self.epsilon <= 0 or self.cliprange_value <= 0:
            raise ConfigError("ppo.epsilon and ppo.cliprange_value must be > 0")
        for name in ("num_iterations", "num_mini_batches", "local_rollout_forward_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ppo.{name} must be >= 1, got {getattr(self, name)}")
        self.estimator().validate()
        self.sampling().validate()

    def estimator(self) -> EstimatorConfig:
        """The estimator settings (:class:`esorl.policy.EstimatorConfig`)."""
        return EstimatorConfig(self.likelihood, self.mc_samples, self.p_mask, merge_segments=self.merge_segments)

    def sampling(self) -> SamplingConfig:
        """The sampler settings: ``max_completion_length`` tokens along the ``(α0, T)`` schedule."""
        return SamplingConfig(self.max_completion_length, ScheduleConfig(kind=self.schedule_kind, alpha0=self.sampling_alpha0, num_steps=self.diffusion_steps),
                              self.temperature, self.top_k, self.top_p)

    @property
    def sequence_level(self) -> bool:
        """Estimators without per-step log-probs (mc_elbo, coupled, ...): one advantage per sequence."""
        return not self.estimator().per_token


# fields of earlier esorl versions: old → new (a recipe that uses one fails before any work)
RENAMED = {
    "ppo.response_length": "ppo.max_completion_length",
    "ppo.num_ppo_epochs": "ppo.num_iterations",
    "ppo.cliprange": "ppo.epsilon",
    "ppo.mixed_precision": "ppo.bf16 / ppo.fp16 (true or false; bf16 unset = on for a GPU that supports it)",
    "logging.log_every": "ppo.logging_steps",
    "logging.run_name": "ppo.run_name",
}


@dataclass
class PPORecipe:
    """A PPO recipe: starting policy, prompts, rewards (functions and reward models), PPO
    settings, ``lora`` (train LoRA adapters and the value head only; the exported policy has
    the adapters merged; a ``kl_coef > 0`` reference is the frozen starting model), logging."""

    RENAMED = RENAMED

    policy: PolicyArgs = field(default_factory=PolicyArgs)
    prompts: PromptArgs = field(default_factory=PromptArgs)
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec()])
    ppo: EsoPPOConfig = field(default_factory=EsoPPOConfig)
    lora: LoraArgs = field(default_factory=LoraArgs)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# ----------------------------------------------------------------------------- value head


class ValueHead(nn.Module):
    """``V = Linear(d, 1)(h)`` on final hidden states of clean copies (docs/ESOLM.md §8)."""

    def __init__(self, hidden_size: int, init_std: float = 1e-3):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        with torch.no_grad():
            self.linear.weight.normal_(0.0, init_std)
            self.linear.bias.zero_()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(..., d)`` → ``(...)`` in float32 (the hidden states are cast to the head's dtype,
        so bf16 autocast / DeepSpeed bf16 work)."""
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1).float()


def load_value_head(path: str | Path) -> ValueHead:
    """A :class:`ValueHead` from an exported ``value_head.safetensors``."""
    from safetensors.torch import load_file

    sd = load_file(str(path))
    head = ValueHead(sd["linear.weight"].shape[1])
    head.load_state_dict(sd)
    return head


class EsoLMWithValueHead(nn.Module):
    """The EsoLM (attribute ``module``, so :func:`esorl.modeling_esolm.unwrap` reaches it
    through DDP / DeepSpeed and this container) and its value head, prepared together.

    ``forward`` is the EsoLM's forward (the likelihood estimators call the prepared wrapper,
    so DDP / DeepSpeed see every model call); the head is applied to hidden states outside it.
    """

    def __init__(self, policy: EsoLMModel, head: ValueHead):
        super().__init__()
        self.module = policy
        self.value_head = head

    @property
    def config(self):
        return self.module.config

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


# ----------------------------------------------------------------------------- MDP pieces


def value_slots(step_sizes: torch.Tensor, n_prompt: int) -> torch.Tensor:
    """Table slots of ``V(state_i)``, ``i = 1..K``: the last clean copy with ``s < i`` in
    array order, ``P + c_{i−1} − 1`` (``c_0 = 0``: the last prompt slot)."""
    c = torch.cumsum(step_sizes.long(), 0)
    prev = torch.cat([torch.zeros(1, dtype=torch.long, device=c.device), c[:-1]])
    return n_prompt + prev - 1


def gae_over_steps(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over ``K`` steps: ``δ_i = r_i + γ V_{i+1} − V_i`` (``V_{K+1} = 0``), ``A_i = δ_i +
    γλ A_{i+1}``. Returns ``(advantages, returns = advantages + values)``, both ``(B, K)``."""
    B, K = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for i in reversed(range(K)):
        nxt = values[:, i + 1] if i + 1 < K else torch.zeros_like(last)
        delta = rewards[:, i] + gamma * nxt - values[:, i]
        last = delta + gamma * lam * last
        adv[:, i] = last
    return adv, adv + values


def token_kl(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL estimate of π from π_ref at the sampled tokens."""
    if estimator == "k1":
        return logp - ref_logp
    d = (ref_logp - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # see LOG_RATIO_CLAMP
    return torch.exp(d) - d - 1


def step_rewards(scores: torch.Tensor, steps: torch.Tensor, num_steps: int, kl_tok: torch.Tensor | None = None, mask: torch.Tensor | None = None, kl_coef: float = 0.0) -> torch.Tensor:
    """``(B, K)`` per-step rewards: ``−kl_coef · Σ_{tokens of step i} KL`` plus ``scores`` at
    the last step. ``steps``: ``(B, N)`` step index (1..K) of each completion position."""
    B = scores.shape[0]
    r = torch.zeros(B, num_steps, dtype=torch.float32, device=scores.device)
    if kl_tok is not None and kl_coef > 0:
        m = torch.ones_like(kl_tok) if mask is None else mask.to(kl_tok.dtype)
        r.scatter_add_(1, (steps - 1).long(), (-kl_coef * kl_tok * m).float())
    r[:, -1] += scores.float()
    return r


def ppo_policy_loss(logp, old_logp, adv_tok, mask, cliprange):
    """TRL's clipped policy loss per token ``max(−Aρ, −A·clip(ρ))`` (masked), the clip
    indicators and the ratio."""
    ratio = torch.exp((logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))  # see LOG_RATIO_CLAMP
    a = adv_tok.to(logp.dtype)
    l1 = -a * ratio
    l2 = -a * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    return torch.max(l1, l2) * mask, (l2 > l1) & mask.bool(), ratio


def ppo_value_loss(v, old_v, returns, cliprange_value):
    """TRL's clipped value loss per entry ``½ max((v − R)², (clip(v) − R)²)`` and the clip
    indicators."""
    vc = old_v + torch.clamp(v - old_v, -cliprange_value, cliprange_value)
    l1 = (v - returns) ** 2
    l2 = (vc - returns) ** 2
    return 0.5 * torch.max(l1, l2), l2 > l1


def global_whiten(x: torch.Tensor, mask: torch.Tensor | None = None, shift_mean: bool = True) -> torch.Tensor:
    """Whiten ``x`` over its (masked) entries on every rank together (unbiased variance)."""
    m = torch.ones_like(x, dtype=torch.float64) if mask is None else mask.to(torch.float64)
    xd = x.to(torch.float64)
    s = all_reduce_sum(torch.stack([(xd * m).sum(), m.sum()]))
    mean = s[0] / s[1].clamp(min=1)
    var = all_reduce_sum(((xd - mean) ** 2 * m).sum()) / (s[1] - 1).clamp(min=1)
    out = (xd - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return (out * m).to(x.dtype)


def clean_values(model, head: ValueHead, rollout: Rollout, slots: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``(B, len(slots))`` values from a forward over the clean copies alone:
    ``[prompt | completion clean copies in σ order]`` (the clean half of layout (a), same
    attention rule), truncated after the last read-out slot (attention is causal)."""
    table = trajectory_table(rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.order, rollout.steps, rollout.completion_mask)
    M = int(slots.max()) + 1
    lay = copies(table, slice(0, M), False, model_config(model).mask_token_id)
    _, hidden = lay.run(model, backend, logits_slice=slice(0, 0), return_hidden=True)
    return head(hidden[:, slots.to(hidden.device)])


def explained_variance(values: torch.Tensor, returns: torch.Tensor) -> float:
    """``1 − Var(R − V) / Var(R)`` over every rank's entries."""
    v, r = values.double().flatten(), returns.double().flatten()
    s = all_reduce_sum(torch.stack([r.sum(), (r * r).sum(), (r - v).sum(), ((r - v) ** 2).sum(), torch.tensor(float(r.numel()), dtype=torch.float64, device=r.device)]))
    n = s[4]
    var_r = s[1] / n - (s[0] / n) ** 2
    var_d = s[3] / n - (s[2] / n) ** 2
    return float("nan") if var_r <= 0 else float(1 - var_d / var_r)


# ----------------------------------------------------------------------------- trainer


class EsoPPOTrainer(RLTrainerBase):
    """PPO over Eso-LM denoising steps. ``run()`` trains; the pieces are public."""

    kind = "ppo"
    renamed = {k: v for k, v in RENAMED.items() if " " not in v}  # an earlier version's checkpoint: its settings under today's names

    def __init__(self, recipe: PPORecipe, reward_funcs=None, reward_weights=None):
        c = recipe.ppo
        self.setup(recipe, c, reward_funcs, reward_weights)
        acc = self.accelerator
        lm = EsoLMModel.from_pretrained(str(self.model_dir))
        if c.gradient_checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lm = recipe.lora.apply(lm)
        head = ValueHead(lm.config.hidden_size, c.value_head_init_std)
        container = EsoLMWithValueHead(lm, head)
        self.prepare_model(container)  # fused AdamW over the trainable parameters and the head, accelerate, the guard
        self.updates_per_step = c.num_iterations * c.num_mini_batches
        self.head: ValueHead = acc.unwrap_model(self.model).value_head
        self.ref = None
        self.policy = EsoPolicy(self.model, self.tokenizer, c.sampling(), acc, c.attention_backend)
        self.ref_policy = self.make_reference(c.kl_coef > 0)
        self.mini_batch = c.per_device_train_batch_size * c.gradient_accumulation_steps  # per rank
        self.local_batch = self.mini_batch * c.num_mini_batches
        self.gen_batch = self.local_batch * self.world

    # ------------------------------------------------------------------ batches
    def rollout(self, step: int) -> dict:
        """Generate this rank's share of the step's batch and score it."""
        c = self.cfg

        def missing_eos(ro, total):
            if c.missing_eos_penalty is None or self.tokenizer.eos_token_id is None:
                return total
            no_eos = ~(ro.completion_ids == self.tokenizer.eos_token_id).any(1).cpu()
            return total - c.missing_eos_penalty * no_eos.to(total.dtype)

        return self.sample_and_score(step, self.gen_batch, 1, self.local_batch, missing_eos)

    # ------------------------------------------------------------------ scoring
    def _chunks(self, n: int, size: int):
        return [torch.arange(i, min(i + size, n)) for i in range(0, n, size)]

    @torch.no_grad()
    def _score_nograd(self, policy: EsoPolicy, ro: Rollout, seed: int) -> torch.Tensor:
        est = self.cfg.estimator()
        params = est.params(self.cfg.sampling_alpha0, seed)
        out = [policy.log_probs(ro.index(idx), est.likelihood, **params)[0] for idx in self._chunks(ro.batch_size, self.cfg.local_rollout_forward_batch_size)]
        return torch.cat(out).detach()

    def slots(self, ro: Rollout) -> torch.Tensor:
        """Read-out slots: every step's (per-step PPO) or only ``state_1``'s (sequence-level)."""
        s = value_slots(ro.step_sizes, ro.prompt_ids.shape[1]).to(ro.completion_ids.device)
        return s[:1] if self.cfg.sequence_level else s

    @torch.no_grad()
    def rollout_values(self, ro: Rollout) -> torch.Tensor:
        slots = self.slots(ro)
        out = [clean_values(self.model, self.head, ro.index(idx), slots, self.cfg.attention_backend) for idx in self._chunks(ro.batch_size, self.cfg.local_rollout_forward_batch_size)]
        return torch.cat(out)

    def forward_mb(self, sub: Rollout, seed: int):
        """Current per-token log-probs ``(b, N)``, validity and values ``(b, K')`` (with grad)."""
        c = self.cfg
        slots = self.slots(sub)
        if c.likelihood == "exact":  # one pass: log-probs and every step's value (docs/ESOLM.md §8)
            lp, mask, hidden = exact(self.model, sub, backend=c.attention_backend, return_hidden=True)
            return lp, mask, self.head(hidden[:, slots])
        params = c.estimator().params(c.sampling_alpha0, seed)
        lp, mask = self.policy.log_probs(sub, c.likelihood, **params)
        return lp, mask, clean_values(self.model, self.head, sub, slots, c.attention_backend)

    def needs_old(self) -> bool:
        c = self.cfg
        return not c.estimator().info().equals_sampler and (c.num_iterations * c.num_mini_batches > 1 or c.kl_coef > 0)

    @torch.no_grad()
    def prepare(self, batch: dict) -> dict:
        """Old log-probs (per epoch for MC estimators), reference log-probs, values, rewards per
        step, GAE advantages (broadcast to tokens, whitened) and returns."""
        c = self.cfg
        acc = self.accelerator
        ro: Rollout = batch["rollout"].to(acc.device)
        self.model.eval()
        t0 = time.time()
        E = c.num_iterations
        if c.estimator().info().equals_sampler:  # the sampler's log-probs: no forward
            old = [ro.logp_model.to(acc.device)] * E  # the sampler's = exact's (docs/ESOLM.md §6)
        elif self.needs_old():
            old = [self._score_nograd(self.policy, ro, self.estimator_seed(self.step, e)) for e in range(E)]
        else:
            old = [None] * E  # one update per batch: ratio ≡ 1, old = current detached
        mask = ro.completion_mask
        kl_tok = None
        if self.ref_policy is not None:
            seed0 = self.estimator_seed(self.step, 0)
            ref = self._score_nograd(self.ref_policy, ro, seed0)
            kl_tok = token_kl(old[0], ref, c.kl_estimator) * mask
        values = self.rollout_values(ro)
        scores = batch["rewards"].to(acc.device).float()
        if c.whiten_rewards:
            scores = global_whiten(scores)
        K = len(ro.step_sizes)
        r_step = step_rewards(scores, ro.steps, K, kl_tok, mask, c.kl_coef)
        if c.sequence_level:
            ret = r_step.sum(1, keepdim=True)  # R = reward − kl_coef·Σ KL, one action
            adv_seq = ret - values
            adv_tok = adv_seq.expand(-1, ro.num_new)
        else:
            adv_step, ret = gae_over_steps(r_step, values, c.gamma, c.lam)
            adv_tok = adv_step.gather(1, (ro.steps - 1).long())
        adv_tok = global_whiten(adv_tok, mask)
        return {"rollout": ro, "old": old, "values": values, "returns": ret, "adv_tok": adv_tok, "kl_tok": kl_tok, "r_step": r_step,
                "scores": scores, "t_prepare": time.time() - t0}

    # ------------------------------------------------------------------ update
    def optimize(self, data: dict) -> dict:
        """The ``num_iterations × num_mini_batches`` updates over a prepared rollout batch."""
        c = self.cfg
        acc = self.accelerator
        ro: Rollout = data["rollout"]
        mask = ro.completion_mask
        self.model.eval()  # scoring in eval mode (docs/ESOLM.md §6): no dropout
        n_val_entries = data["values"].shape[1]
        st = {k: 0.0 for k in ("pg_loss", "vf_loss", "pg_clip", "vf_clip", "approx_kl", "ratio", "n_tok", "n_val")}
        grad_norms = []
        t0 = time.time()
        for e in range(c.num_iterations):
            seed = self.estimator_seed(self.step, e)
            perm = torch.randperm(self.local_batch, generator=make_generator(c.seed, Stream.SHUFFLE, self.step, e)).to(mask.device)
            old_e = data["old"][e]
            for mb in range(c.num_mini_batches):
                mb_idx = perm[mb * self.mini_batch : (mb + 1) * self.mini_batch]
                n_tok = all_reduce_sum(mask[mb_idx].sum().double()).item()
                n_val = float(self.mini_batch * self.world * n_val_entries)
                micro = mb_idx.split(c.per_device_train_batch_size)
                for j, idx in enumerate(micro):
                    sub = ro.index(idx)
                    lp, m, v = self.forward_mb(sub, seed)
                    old_mb = lp.detach() if old_e is None else old_e[idx]
                    pg_tok, pg_clip, ratio = ppo_policy_loss(lp, old_mb, data["adv_tok"][idx], m, c.epsilon)
                    vf, vf_clip = ppo_value_loss(v, data["values"][idx], data["returns"][idx], c.cliprange_value)
                    pg = pg_tok.sum() / max(n_tok, 1.0)
                    vl = vf.sum() / n_val
                    loss = (pg + c.vf_coef * vl) * self.world
                    self.backward(loss, j == len(micro) - 1)
                    mf = m.float()
                    st["pg_loss"] += pg.item()
                    st["vf_loss"] += vl.item()
                    st["pg_clip"] += (pg_clip.float() * mf).sum().item()
                    st["vf_clip"] += vf_clip.float().sum().item()
                    st["approx_kl"] += (0.5 * (lp.detach() - old_mb) ** 2 * mf).sum().item()
                    st["ratio"] += (ratio.detach() * mf).sum().item()
                    st["n_tok"] += mf.sum().item()
                    st["n_val"] += vf.numel()
                gn, _ = self.update(e * c.num_mini_batches + mb)
                grad_norms.append(gn)
        t_update = time.time() - t0
        n_updates = c.num_iterations * c.num_mini_batches
        tot = all_reduce_sum(torch.tensor([st[k] for k in ("pg_loss", "vf_loss", "pg_clip", "vf_clip", "approx_kl", "ratio", "n_tok", "n_val")], device=acc.device, dtype=torch.float64))
        pg_loss, vf_loss = tot[0].item() / n_updates, tot[1].item() / n_updates  # sums over ranks of per-rank shares
        loss = pg_loss + c.vf_coef * vf_loss
        check_finite(loss, self.step + 1, self.ckpt)
        return {"loss/policy": pg_loss, "skipped_updates": self.guard.skipped_updates, "loss/value": vf_loss, "loss/total": loss,
                "policy/clipfrac": (tot[2] / tot[6]).item(), "value/clipfrac": (tot[3] / tot[7]).item(),
                "policy/approx_kl": (tot[4] / tot[6]).item(), "policy/ratio_mean": (tot[5] / tot[6]).item(),
                "grad_norm": sum(grad_norms) / len(grad_norms), "time/update": t_update}

    # ------------------------------------------------------------------ eval, logging
    def log_step(self, batch: dict, data: dict, st: dict, t_step: float) -> dict:
        c = self.cfg
        dev = self.accelerator.device
        ro: Rollout = data["rollout"]
        rw = batch["all_rewards"]
        mask = ro.completion_mask.float()
        g = lambda t: all_gather_cat(t.to(dev).contiguous())  # noqa: E731
        text_len = g(ro.text_mask.sum(1).float()).mean().item()
        ent = g((-ro.logp_model * mask).sum(1) / mask.sum(1).clamp(min=1)).mean().item()
        non_score = g(data["r_step"].sum(1) - data["scores"]).mean().item()
        m = {"reward": rw.mean().item(), "reward_std": rw.std().item() if rw.numel() > 1 else 0.0, "completion_length": text_len, "entropy": ent,
             "objective/non_score_reward": non_score, "objective/rlhf_reward": rw.mean().item() + non_score,
             "value/mean": g(data["values"]).mean().item(), "value/returns_mean": g(data["returns"]).mean().item(),
             "value/explained_variance": explained_variance(data["values"], data["returns"]),
             "num_steps": len(ro.step_sizes), "sequence_level": int(c.sequence_level), "lr": self.opt.param_groups[0]["lr"],
             "time/step": t_step, "time/sample": batch["t_sample"], "time/reward": batch["t_reward"], "time/rollout": batch["t_sample"] + batch["t_reward"],
             "time/prepare": data["t_prepare"], "tokens_per_s": self.gen_batch * c.max_completion_length / max(t_step, 1e-9),
             "memory/peak_mb": peak_memory_mb(dev), **st}
        if data["kl_tok"] is not None:
            m["kl"] = g(data["kl_tok"].sum(1)).mean().item()  # Σ over tokens, mean over sequences (TRL's objective/kl)
        for k, v in batch["per_reward"].items():
            m[f"rewards/{k}/mean"] = torch.nanmean(v).item()
            m[f"rewards/{k}/std"] = v[~v.isnan()].std().item() if (~v.isnan()).sum() > 1 else 0.0
        for k, vals in getattr(self, "_reward_metrics", {}).items():  # log_metric from reward functions (this rank's)
            m[k] = sum(vals) / len(vals)
        return m

    # ------------------------------------------------------------------ loop
    def train_step(self) -> dict:
        """One PPO step: rollout and rewards, old/reference log-probs, values and advantages,
        then the updates; returns the step's metrics."""
        t0 = time.time()
        batch = self.rollout(self.step)
        data = self.prepare(batch)
        st = self.optimize(data)
        self._batch = batch
        return self.log_step(batch, data, st, time.time() - t0)

    def progress_desc(self) -> str:
        return f"ppo[{self.cfg.likelihood},{'seq' if self.cfg.sequence_level else 'step'}]"

    def postfix(self, m: dict) -> dict:
        return {"reward": f"{m['reward']:.3f}", "vf": f"{m['loss/value']:.3f}"}

    def export(self) -> dict:
        """``<output_dir>/model`` (the policy, ``save_pretrained`` + tokenizer) and
        ``<output_dir>/value_head.safetensors`` (load with :func:`load_value_head`)."""
        from safetensors.torch import save_file

        from ..train.loop import export_model

        sd = export_model(self.accelerator, self.model, self.tokenizer, self.out / "model", submodule="module")
        if self.accelerator.is_main_process:
            vh = {k[len("value_head.") :]: v.detach().cpu().contiguous() for k, v in sd.items() if k.startswith("value_head.")}
            from ..io import atomic_save

            atomic_save(self.out / "value_head.safetensors", lambda tmp: save_file(vh, str(tmp), metadata={
                "read_out": "final hidden state of the last clean copy with s < i (table slot P + c_{i-1} - 1)", "hidden_size": str(vh["linear.weight"].shape[1])}))
        self.accelerator.wait_for_everyone()
        return {"model_dir": str(self.out / "model"), "value_head": str(self.out / "value_head.safetensors")}


def main(argv=None):
    from ..config import parse_recipe_args, recipe_argparser

    a = parse_recipe_args(recipe_argparser("esorl ppo", "PPO over denoising steps for an Eso-LM (value head on the clean copies)", "ppo.learning_rate=1e-5"), argv)
    recipe = load_config(PPORecipe, a.config, a.overrides)
    from ..train.run_dir import precheck

    precheck(recipe.ppo.output_dir, a.resume, a.overwrite, "ppo.output_dir")  # before any set-up work
    EsoPPOTrainer(recipe).run(a.resume, a.overwrite)
