"""Estimator diagnostics on fixed trajectories (issue: "The comparison", item 3).

Monte Carlo estimators target a bound on ``E_σ log p(y | σ)``, while ``exact`` is
``log p(y | σ, k)`` for the trajectory that produced ``y``: different quantities. So each MC
estimator is compared (a) with *its own* large-``n`` reference (bias, variance), (b) with
``exact`` only through rank correlation across completions, (c) by the variance of the
policy gradient it induces — over repeated estimator draws on one batch (zero for ``exact``
by construction: it has no noise; reported, not a finding) and over fresh rollouts (total
variance) — and (d) by the cosine of its policy gradient to the ``exact`` policy gradient on
the same batch, i.e. the gradient of the expected reward under the sampler that produced the data.
"""

from __future__ import annotations

import math

import torch

from ..policy import EstimatorConfig


def _flat_grad(model) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().double() for p in model.parameters() if p.requires_grad])


def policy_gradient(policy, ro, adv: torch.Tensor, est: EstimatorConfig, alpha0: float, seed: int) -> torch.Tensor:
    """``∇ Σ_b A_b Σ_j log π̂(y_bj)`` / #tokens under the estimator (one noise draw)."""
    model = policy.model
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        lp, valid = policy.log_probs(ro, est.likelihood, **est.params(alpha0, seed))
        ((adv[:, None].to(lp.dtype) * lp * valid).sum() / valid.sum()).backward()
    g = _flat_grad(model)
    model.zero_grad(set_to_none=True)
    return g


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return _pearson(ra, rb)


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    d = (a.norm() * b.norm()).item()
    return (a @ b).item() / d if d > 0 else float("nan")


def _grad_var(gs: list[torch.Tensor]) -> float:
    """Trace of the covariance of gradient vectors (mean squared distance to their mean)."""
    G = torch.stack(gs)
    return ((G - G.mean(0)) ** 2).sum(1).mean().item() * len(gs) / max(len(gs) - 1, 1)


def estimator_diagnostics(policy, batches: list[dict], estimators: dict[str, EstimatorConfig], alpha0: float, draws: int = 8, ref_n: int = 64) -> dict:
    """Diagnostics of every estimator on the same trajectories.

    ``batches``: rollouts with advantages (``{"rollout", "advantages"}``) from *fresh*
    rollouts of one policy; the first is the fixed batch. Returns ``{name: metrics}``.
    """
    fixed = batches[0]
    ro, adv = fixed["rollout"], fixed["advantages"]
    exact_cfg = EstimatorConfig("exact")
    with torch.no_grad():
        exact_lp = policy.log_probs(ro, "exact")[0].sum(1)
    g_exact = policy_gradient(policy, ro, adv, exact_cfg, alpha0, 0)
    out = {}
    for name, est in estimators.items():
        m: dict = {}
        sums = []
        with torch.no_grad():
            for d in range(draws):
                sums.append(policy.log_probs(ro, est.likelihood, **est.params(alpha0, 1000 + d))[0].sum(1))
        S = torch.stack(sums)  # (draws, B) sequence log-likelihood estimates
        if est.info().deterministic:
            ref = exact_lp
        else:
            with torch.no_grad():
                if est.likelihood == "mc_elbo":
                    big = EstimatorConfig("mc_elbo", ref_n, est.p_mask, est.mc_alpha0)
                    ref = policy.log_probs(ro, "mc_elbo", **big.params(alpha0, 999))[0].sum(1)
                else:  # its own expectation over the mask noise
                    ref = torch.stack([policy.log_probs(ro, est.likelihood, **est.params(alpha0, 5000 + k))[0].sum(1) for k in range(ref_n // 4)]).mean(0)
        m["bias_vs_own_reference"] = (S.mean(0) - ref).mean().item()
        m["abs_error_vs_own_reference"] = (S - ref).abs().mean().item()
        m["std_over_draws"] = S.std(0).mean().item() if draws > 1 else 0.0
        m["mean_seq_logp"] = S.mean().item()
        m["mean_seq_logp_exact"] = exact_lp.mean().item()
        m["pearson_vs_exact"] = _pearson(S[0], exact_lp)
        m["spearman_vs_exact"] = _spearman(S[0], exact_lp)
        gs = [policy_gradient(policy, ro, adv, est, alpha0, 2000 + d) for d in range(draws)]
        m["grad_var_fixed_batch"] = 0.0 if est.info().deterministic else _grad_var(gs)
        gbar = torch.stack(gs).mean(0)
        m["cos_to_exact_grad_single_draw"] = torch.nn.functional.cosine_similarity(gs[0], g_exact, dim=0).item()
        m["cos_to_exact_grad_mean_of_draws"] = torch.nn.functional.cosine_similarity(gbar, g_exact, dim=0).item()
        fresh = [policy_gradient(policy, b["rollout"], b["advantages"], est, alpha0, 3000 + i) for i, b in enumerate(batches)]
        m["grad_var_fresh_rollouts"] = _grad_var(fresh) if len(fresh) > 1 else float("nan")
        m["grad_norm"] = gbar.norm().item()
        out[name] = m
    return out


def mc_elbo_fixed_batch_variance(policy, ro, adv, n: int, alpha0: float, draws: int = 12) -> float:
    """Gradient variance of ``mc_elbo(n)`` over repeated draws on one batch (falls as 1/n)."""
    est = EstimatorConfig("mc_elbo", n)
    return _grad_var([policy_gradient(policy, ro, adv, est, alpha0, 7000 + d) for d in range(draws)])
