"""``Rollout``: everything needed to score a generation again (docs/ESOLM.md §3, §7)."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from .schedule import Trajectory, validate_trajectory


@dataclass
class Rollout:
    """A batch of generations and their trajectories. Shapes: ``B`` samples, ``P`` prompt
    slots (left-padded), ``N`` completion positions, ``K`` steps.

    prompt_ids / prompt_mask: ``(B, P)``; ``prompt_mask`` False on left padding.
    completion_ids: ``(B, N)`` in position order (every sampled token, also after EOS).
    order: ``(B, N)`` σ, the completion position revealed i-th.
    step_sizes: ``(K,)`` shared by the batch. steps: ``(B, N)`` step index of each position.
    completion_mask: ``(B, N)`` positions that were generated (all True for sampled rollouts).
    text_mask: ``(B, N)`` positions up to and including the first EOS in position order:
        what the decoded text and the reward see (the log-prob counts every token, docs/ESOLM.md §7).
    logp_model / logp_behaviour: ``(B, N)`` log-probs the sampler saw (temperature only /
        after top-k/top-p filtering), detached.
    temperature / top_k / top_p: the sampling parameters (needed to reproduce the log-probs).
    sample_ids: ``(B,)`` global ids of the samples (key the MC estimators' noise).
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    order: torch.Tensor
    step_sizes: torch.Tensor
    steps: torch.Tensor
    completion_mask: torch.Tensor
    text_mask: torch.Tensor
    logp_model: torch.Tensor | None = None
    logp_behaviour: torch.Tensor | None = None
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    sample_ids: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.completion_ids.shape[0]

    @property
    def num_new(self) -> int:
        return self.completion_ids.shape[1]

    def validate(self, context: int | None = None) -> None:
        """Raise ``ValueError`` naming the field if the rollout is inconsistent."""
        B, N = self.completion_ids.shape
        for name in ("order", "steps", "completion_mask", "text_mask"):
            t = getattr(self, name)
            if tuple(t.shape) != (B, N):
                raise ValueError(f"rollout.{name} has shape {tuple(t.shape)}, expected {(B, N)}")
        if self.prompt_ids.shape != self.prompt_mask.shape or self.prompt_ids.shape[0] != B:
            raise ValueError(f"rollout.prompt_ids {tuple(self.prompt_ids.shape)} and prompt_mask {tuple(self.prompt_mask.shape)} must both be (B={B}, P)")
        for name in ("prompt_ids", "completion_ids", "order", "steps"):
            if getattr(self, name).is_floating_point():
                raise ValueError(f"rollout.{name} must hold integers, got {getattr(self, name).dtype}")
        check_left_padded(self.prompt_mask, "rollout.prompt_mask")
        if self.step_sizes.dim() != 1:
            raise ValueError(f"rollout.step_sizes must be one (K,) vector shared by the batch, got shape {tuple(self.step_sizes.shape)}")
        validate_trajectory(self.order, self.step_sizes, N)
        bad = (self.steps != Trajectory(self.order, self.step_sizes.to(self.order.device)).steps_by_position()).any(1)
        if bad.any():
            raise ValueError(f"rollout.steps is inconsistent with rollout.order and rollout.step_sizes (row {int(bad.nonzero()[0])}): "
                             "steps[b, order[b, i]] must be the 1-based step that reveals the i-th position")
        if context is not None:
            need = int(self.prompt_mask.long().sum(1).max()) + N
            if need > context:
                raise ValueError(f"rollout needs {need} positions (prompt + completion), but the model context is {context}")

    @classmethod
    def from_tokens(cls, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor, trajectory,
                    completion_mask: torch.Tensor | None = None, eos_token_id: int | None = None, temperature: float = 1.0,
                    top_k: int = 0, top_p: float = 1.0, sample_ids: torch.Tensor | None = None) -> "Rollout":
        """A rollout for *existing* tokens under a chosen trajectory, to score a text with any
        estimator (no sampler involved; ``logp_*`` are ``None``).

        Args:
            prompt_ids / prompt_mask: ``(B, P)`` left-padded prompts (:func:`esorl.sampling.left_pad`).
            completion_ids: ``(B, N)`` completion tokens in position order.
            trajectory: a :class:`esorl.schedule.Trajectory` with ``(B, N)`` order and step sizes
                (e.g. ``schedule.user_order(...)``, or ``ScheduleConfig(...).sample(B, N, gen)``).
            completion_mask: ``(B, N)`` positions that exist (default all; ragged completions
                padded on the right with ``False``).
        Raises ``ValueError`` naming the field if the pieces are inconsistent.
        """
        order, sizes = trajectory.order.to(completion_ids.device), trajectory.step_sizes.to(completion_ids.device)
        B, N = completion_ids.shape
        if tuple(order.shape) != (B, N):
            raise ValueError(f"trajectory.order has shape {tuple(order.shape)}, the completions {(B, N)}")
        steps = Trajectory(order, sizes).steps_by_position()
        cm = torch.ones_like(completion_ids, dtype=torch.bool) if completion_mask is None else completion_mask.bool()
        ro = cls(prompt_ids=prompt_ids, prompt_mask=prompt_mask.bool(), completion_ids=completion_ids, order=order, step_sizes=sizes,
                 steps=steps, completion_mask=cm, text_mask=first_eos_mask(completion_ids, eos_token_id) & cm, temperature=temperature,
                 top_k=top_k, top_p=top_p, sample_ids=torch.arange(B) if sample_ids is None else sample_ids)
        ro.validate()
        return ro

    def with_trajectory(self, order: torch.Tensor, step_sizes: torch.Tensor) -> "Rollout":
        """The same tokens scored along another trajectory (``order`` ``(B, N)``, ``step_sizes``
        ``(K,)``): the steps follow from them (``Trajectory.steps_by_position``)."""
        traj = Trajectory(order.to(self.order.device), step_sizes.to(self.order.device))
        return replace(self, order=traj.order, step_sizes=traj.step_sizes, steps=traj.steps_by_position())

    def to(self, device) -> "Rollout":
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)})

    def index(self, idx) -> "Rollout":
        """Sub-batch (rows ``idx``); step sizes are shared and kept."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v[idx] if isinstance(v, torch.Tensor) and f.name != "step_sizes" else v
        return Rollout(**out)

    def texts(self, tokenizer, skip_special_tokens: bool = True) -> list[str]:
        """Decoded completions, cut at the first EOS (docs/ESOLM.md §7)."""
        out = []
        for ids, m in zip(self.completion_ids, self.text_mask):
            toks = ids[m].tolist()
            if tokenizer.eos_token_id is not None and toks and toks[-1] == tokenizer.eos_token_id:
                toks = toks[:-1]
            out.append(tokenizer.decode(toks, skip_special_tokens=skip_special_tokens))
        return out


def check_left_padded(prompt_mask: torch.Tensor, name: str = "prompt_mask") -> None:
    """Raise ``ValueError`` unless every row of ``prompt_mask`` ``(B, P)`` is left-padded
    (False only before its first True): right padding would put pad slots between the
    prompt and the completion, which then attend to them."""
    pm = prompt_mask.bool()
    if pm.shape[1] > 1:
        bad = (pm[:, :-1] & ~pm[:, 1:]).any(1)
        if bad.any():
            raise ValueError(f"{name} row {int(bad.nonzero()[0])} is not left-padded (a True before a False): "
                             "pad prompts on the left (esorl.sampling.left_pad)")


def first_eos_mask(completion_ids: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    """``(B, N)`` True up to and including the first EOS in position order."""
    if eos_id is None:
        return torch.ones_like(completion_ids, dtype=torch.bool)
    is_eos = completion_ids == eos_id
    before = is_eos.long().cumsum(1) - is_eos.long()  # EOS strictly before j
    return before == 0
