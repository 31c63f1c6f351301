"""``EsoPolicy``: an Eso-LM + tokenizer as an RL policy (docs/ESOLM.md §6).

``generate`` samples rollouts with the KV-cached sampler; ``log_probs`` scores rollouts with
any estimator of :mod:`esorl.likelihood`. The same object serves the current, old and
reference policies, so RL runs differ only in the estimator. Rollout randomness (order,
step sizes, sampling noise) is keyed by ``(seed, step, sample id)`` and never touches the
estimators' noise, so runs with different estimators see identical rollouts.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .likelihood import estimate
from .modeling_esolm import unwrap
from .rollout import Rollout
from .sampling import SamplingConfig, generate, left_pad, rollout_noise
from .schedule import Stream, make_generator



@dataclass
class EstimatorConfig:
    """Which likelihood the RL loss uses (docs/ESOLM.md §6).

    likelihood: an estimator of :data:`esorl.likelihood.REGISTRY` (``exact`` | ``replay`` |
        ``mc_elbo`` | ``one_step`` | ``coupled`` | ``elbo_lowvar`` | ``espo_elbo`` | ``step_merge``).
    mc_samples: draws ``n`` of ``mc_elbo``, ``elbo_lowvar`` and ``espo_elbo``.
    p_mask: prompt mask rate of ``one_step`` (d1: 0.15).
    mc_alpha0: α0 of ``mc_elbo``'s NELBO (default: the sampling α0, docs/ESOLM.md §6).
    merge_segments: segments ``S`` of ``step_merge`` (d2's StepMerge).
    """

    likelihood: str = "exact"
    mc_samples: int = 4
    p_mask: float = 0.15
    mc_alpha0: float = -1.0
    merge_segments: int = 2

    def validate(self):
        from .likelihood import REGISTRY

        if self.likelihood not in REGISTRY:
            raise ValueError(f"likelihood must be one of {', '.join(REGISTRY)}, got {self.likelihood!r}")
        if self.mc_samples < 1:
            raise ValueError("mc_samples must be >= 1")
        if not 0.0 <= self.p_mask <= 1.0:
            raise ValueError("p_mask must be in [0, 1]")
        if self.merge_segments < 1:
            raise ValueError("merge_segments must be >= 1")

    def info(self):
        """The estimator's registry entry (:class:`esorl.likelihood.Estimator`)."""
        from .likelihood import get_estimator

        return get_estimator(self.likelihood)

    def params(self, sampling_alpha0: float, seed: int) -> dict:
        """Keyword arguments of the estimator (``seed`` = the inner iteration's noise seed)."""
        return self.info().kwargs(self, sampling_alpha0, seed)

    @property
    def per_token(self) -> bool:
        """Whether the estimator gives per-token log-probs tied to the trajectory's steps
        (PPO runs per-step GAE on them; docs/ESOLM.md §8)."""
        return self.info().per_step


@contextlib.contextmanager
def gathered_for_generation(model, accelerator=None):
    """Gather ZeRO-3 partitioned parameters for the many small sampler forwards (as TRL's
    ``unwrap_model_for_generation``); a no-op otherwise. Yields the bare EsoLMModel."""
    from .distributed import zero_stage

    if zero_stage(accelerator) == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            yield unwrap(model)
    else:
        yield unwrap(model)


class EsoPolicy:
    """An Eso-LM (possibly wrapped by DDP / DeepSpeed) and its tokenizer."""

    def __init__(self, model, tokenizer, sampling: SamplingConfig, accelerator=None, backend: str = "auto"):
        self.model = model
        self.tokenizer = tokenizer
        self.sampling = sampling
        self.accelerator = accelerator
        self.backend = backend
        self.eos_id = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.pad_id = pad

    @property
    def device(self):
        return next(unwrap(self.model).parameters()).device

    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        if self.tokenizer.bos_token_id is not None:
            # a start token gives every prompt (even an empty one) a clean step-0 context (docs/ESOLM.md §8)
            ids = [[self.tokenizer.bos_token_id] + x for x in ids]
        if any(len(x) == 0 for x in ids):
            raise ValueError("empty prompt and no BOS token: the first step would have no context")
        return left_pad(ids, self.pad_id, self.device)

    @torch.no_grad()
    def generate(self, prompts: list[str], seed: int, step: int, sample_ids: torch.Tensor, sampling: SamplingConfig | None = None) -> Rollout:
        """Sample completions; the trajectory and noise depend only on ``(seed, step)`` and the
        sample ids. Runs in eval mode (dropout off)."""
        s = sampling or self.sampling
        pid, pm = self.encode_prompts(prompts)
        N = s.max_completion_length
        # step sizes: one draw per (seed, step), shared by the whole global batch; orders: one
        # draw per (seed, step, sample) — the same rollout on any number of ranks
        rows = [make_generator(seed, Stream.TRAJ, step, int(i)) for i in sample_ids]
        traj = s.schedule.sample(len(prompts), N, make_generator(seed, Stream.TRAJ, step), rows)
        u = rollout_noise(seed, step, sample_ids, N)
        was_training = self.model.training
        self.model.eval()
        with self.autocast(), gathered_for_generation(self.model, self.accelerator) as m:
            r = generate(m, pid, pm, N, traj, s.temperature, s.top_k, s.top_p, uniforms=u, eos_token_id=self.eos_id,
                         method="auto", sample_ids=sample_ids, backend=self.backend)
        self.model.train(was_training)
        return r

    def autocast(self):
        """The accelerator's mixed-precision context (a no-op without one or in full precision).
        Sampling and every scoring pass of the current, old and reference policies run under
        it, so the sampler's recorded log-probs and ``exact``'s are computed in the same
        precision (accelerate only patches the ``forward`` of the module it prepared, which is
        not always the bare Eso-LM the sampler calls)."""
        return self.accelerator.autocast() if self.accelerator is not None else contextlib.nullcontext()

    def log_probs(self, rollout: Rollout, likelihood: str = "exact", **params):
        """Per-token log-probs ``(B, N)`` and validity under the estimator named ``likelihood`` (with
        ``with_entropy=True`` also the predictive entropies ``(B, N)``; see :mod:`esorl.likelihood`)."""
        with self.autocast():
            return estimate(self.model, rollout, likelihood, backend=self.backend, **params)

    def rollout_for(self, prompts: list[str], completions: list[str], trajectory=None, seed: int = 0) -> Rollout:
        """A :class:`Rollout` of existing texts, to score them with :meth:`log_probs`.

        ``trajectory``: ``None`` (left to right, one token per step: the AR factorisation), a
        :class:`~esorl.schedule.ScheduleConfig` (drawn with ``seed``), or a
        :class:`~esorl.schedule.Trajectory` over the longest completion. Completions are
        tokenized without special tokens and right-padded with unscored slots.
        """
        from .schedule import ScheduleConfig, Trajectory

        if len(prompts) != len(completions):
            raise ValueError(f"rollout_for: {len(prompts)} prompts for {len(completions)} completions")
        pid, pm = self.encode_prompts(prompts)
        ids = [self.tokenizer(c, add_special_tokens=False)["input_ids"] for c in completions]
        N = max((len(x) for x in ids), default=0)
        if N == 0:
            raise ValueError("rollout_for: every completion is empty; there is nothing to score")
        comp = torch.full((len(ids), N), self.pad_id, dtype=torch.long)
        cm = torch.zeros(len(ids), N, dtype=torch.bool)
        for b, x in enumerate(ids):
            comp[b, : len(x)] = torch.tensor(x, dtype=torch.long)
            cm[b, : len(x)] = True
        B = len(ids)
        if trajectory is None:
            trajectory = Trajectory(torch.arange(N).expand(B, N).clone(), torch.ones(N, dtype=torch.long))
        elif isinstance(trajectory, ScheduleConfig):
            trajectory = trajectory.sample(B, N, make_generator(seed, Stream.TRAJ, -1))
        s = self.sampling
        return Rollout.from_tokens(pid, pm, comp.to(pid.device), trajectory, cm.to(pid.device), self.eos_id, s.temperature, s.top_k, s.top_p)

    def texts(self, rollout: Rollout) -> list[str]:
        return rollout.texts(self.tokenizer)
