"""Policy objectives of the field that are not one of TRL's GRPO loss types (docs/ESOLM.md §10).

Each takes per-sequence quantities of one micro-batch and returns the loss to minimise (a
scalar, before gradient-accumulation scaling) and a dict of metrics. Sources are cited per
function; where esorl departs from the authors' code, the docstring says how and why.
"""

from __future__ import annotations

import torch

#: bound on a sequence's per-token log-ratio before it is exponentiated (as GRPO's targets)
LOG_RATIO_BOUND = 20.0


def espo_loss(seq_logp: torch.Tensor, old_seq_logp: torch.Tensor, ref_seq_logp: torch.Tensor | None, advantages: torch.Tensor, length: int,
              epsilon_low: float, epsilon_high: float, beta: float):
    """ESPO's sequence-level clipped objective (Ou et al. 2025, ML-GSAI/ESPO
    ``ESPOTrainer.compute_loss``).

    seq_logp, old_seq_logp, ref_seq_logp: ``[B]`` sequence ELBOs (nats) under the current,
        old and reference policies (the same masks: shared estimator seed).
    advantages: ``[B]``. length: ``L``, the completion length the ratio is normalised by (ESPO:
        the padded length).
    Loss: ``mean_b −min(ρ_b A_b, clip(ρ_b, 1−ε_low, 1+ε_high) A_b) + β · ½ (ELBO_θ − ELBO_ref)² / L``
    with ``ρ = exp((ELBO_θ − ELBO_old) / L)`` (the per-token normalisation that keeps ρ near 1)
    and ESPO's k2 KL on the sequence ELBO.
    """
    log_ratio = ((seq_logp - old_seq_logp) / length).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    ratio = log_ratio.exp()
    a = advantages.to(ratio.dtype)
    clipped = ratio.clamp(1 - epsilon_low, 1 + epsilon_high)
    pg = -torch.minimum(ratio * a, clipped * a)
    metrics = {"clip_ratio": ((ratio < 1 - epsilon_low) & (a < 0) | (ratio > 1 + epsilon_high) & (a > 0)).float().mean().item()}
    loss = pg.mean()
    if beta != 0.0 and ref_seq_logp is not None:
        kl = 0.5 * (seq_logp - ref_seq_logp).pow(2) / length
        loss = loss + beta * kl.mean()
        metrics["kl_k2"] = kl.mean().item()
    return loss, metrics


def spg_loss(lower: torch.Tensor, upper: torch.Tensor, advantages: torch.Tensor, lengths: torch.Tensor, mix_weight: float):
    """SPG's sandwiched policy gradient (Wang et al. 2025, facebookresearch/SPG
    ``SPGTrainer.compute_loss``).

    lower, upper: ``[B]`` per-token lower (ELBO) and upper (Rényi) bounds of each sequence's
        log-likelihood (:func:`esorl.likelihood.sandwich_bounds`). advantages: ``[B]``.
    lengths: ``[B]`` scored tokens per sequence. mix_weight: ``ω``; ``1`` is SPG's pure upper
        bound for negative advantages, ``0.5`` its mixture.
    Loss: ``−Σ_b A_b s_b |y_b| / Σ_b |y_b|`` with ``s_b`` the lower bound where ``A_b > 0`` and
    ``ω·upper + (1−ω)·lower`` otherwise: maximising a lower bound of the likelihood of good
    completions and minimising an upper bound of bad ones. No ratio, no clipping, no KL
    (SPG's code refuses β ≠ 0).
    """
    a = advantages.to(lower.dtype)
    s = torch.where(a > 0, lower, mix_weight * upper + (1 - mix_weight) * lower)
    w = lengths.to(lower.dtype)
    loss = -(a * s * w).sum() / w.sum().clamp(min=1)
    return loss, {"lower_mean": lower.mean().item(), "upper_mean": upper.mean().item()}


def wd1_weights(advantages: torch.Tensor, group_size: int, psi: float = 1.0) -> torch.Tensor:
    """wd1's per-completion weight ``w⁺ − w⁻`` with ``w± = softmax(±ψ A)`` over each group
    (Tang et al. 2025, "wd1", xiaohangt/wd1 ``RevDiffuGRPOTrainer.compute_loss``; its code
    has ``ψ = 1``). advantages: ``[B]`` in groups of ``group_size`` consecutive completions
    (TRL's order before its shuffle). Returns ``[B]``."""
    A = advantages.view(-1, group_size).double() * psi
    return (torch.softmax(A, 1) - torch.softmax(-A, 1)).reshape(-1).to(advantages.dtype)


def wd1_loss(seq_logp: torch.Tensor, weights: torch.Tensor, group_size: int):
    """wd1's ratio-free weighted likelihood objective: ``−Σ_b (w⁺_b − w⁻_b) log π̂(y_b)`` per
    group (:func:`wd1_weights`), averaged over the groups a micro-batch holds (``B / G``; TRL's
    shuffle spreads a group over micro-batches, so the weights are computed on the whole group
    at generation time). seq_logp: ``[B]`` (wd1: d1's one-step estimate summed over tokens)."""
    loss = -(weights.to(seq_logp.dtype) * seq_logp).sum() / (seq_logp.shape[0] / group_size)
    return loss, {"weight_abs_mean": weights.abs().mean().item()}


OBJECTIVES = ("grpo", "espo", "spg", "wd1")
