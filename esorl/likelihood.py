"""Per-token log-likelihood estimators of a rollout (docs/ESOLM.md §6).

Every estimator has the signature ``f(model, rollout, **params) -> (logp, valid)`` with
``logp`` ``(B, N)`` per completion *position* (differentiable) and ``valid`` ``(B, N)``;
with ``with_entropy=True`` it returns ``(logp, valid, entropy)``, ``entropy`` ``(B, N)`` the
entropy (nats, at the rollout's temperature) of the predictive distribution each token's
log-prob was read from, averaged over the forwards that read it (MC estimators; 0 where no
draw read it).

| name      | what                                    | forwards                         | bias / variance |
|-----------|-----------------------------------------|----------------------------------|-----------------|
| exact     | layout (a): one pass, trajectory log-lik | 1 × (P + 2N)                     | exact, no variance |
| replay    | layout (c): one pass per step            | K × (P + clean so far + k_i)     | identical to exact (oracle / cost baseline) |
| mc_elbo   | NELBO of y at the sampling α0, n draws   | n × (P + N) [+ n × (P+N+#masked z0) if α0<1] | a bound, averaged over orders; var ∝ 1/n |
| one_step  | d1: prompt masked w.p. p_mask, y all masked | 1 × (P + N)                  | biased (mean field) |
| coupled   | DiffuCoder: mask at t, complement, all-masked | 3 × (P + N)                | biased |

MC estimators draw their noise from ``make_generator(seed, purpose, sample_id)``: pass the
same ``seed`` to the current, old and reference passes of one inner iteration.
Array order of every MC layout (docs/ESOLM.md §6): prompt (clean, left to right), then the clean
completion tokens, then the masked ones, each part in a random order drawn per sample; a
masked prompt token (``one_step``) goes to the masked part.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch

from .modeling_esolm import model_config
from .layout import exact_layout, one_copy_layout, replay_layout, sequential_layout, sorted_table, trajectory_table
from .logprobs import entropy as _entropy
from .logprobs import token_logprobs
from .rollout import Rollout
from .schedule import EPS, Stream, alpha, make_generator



def _table(rollout: Rollout):
    return trajectory_table(rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.order, rollout.steps, rollout.completion_mask)


def _to_positions(vals_sigma: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(vals_sigma)
    return out.scatter_(1, order, vals_sigma)


def exact(model, rollout: Rollout, kind: str = "model", temperature: float | None = None, backend: str = "auto", return_hidden: bool = False,
          with_entropy: bool = False):
    """Exact trajectory log-likelihood, one forward over ``[prompt | clean | queries]``
    (``P + 2N`` tokens) whatever the number of steps (docs/ESOLM.md §4 a).

    ``kind``: ``model`` (temperature-scaled, unfiltered) or ``behaviour`` (after the rollout's
    top-k/top-p): reproduces the corresponding log-probs the sampler recorded.
    With ``return_hidden`` also returns the final hidden states of the clean copies of the
    table ``(B, P + N, d)`` (prompt, then completion in σ order) for value heads (docs/ESOLM.md §8).
    """
    T = rollout.temperature if temperature is None else temperature
    table = _table(rollout)
    P = rollout.prompt_ids.shape[1]
    lay, qs = exact_layout(table, P, model_config(model).mask_token_id)
    out = lay.run(model, backend, logits_slice=qs, return_hidden=return_hidden)
    logits, hidden = out if return_hidden else (out, None)
    lp = token_logprobs(logits, table.ids[:, P:], T, rollout.top_k, rollout.top_p, kind)
    res = (_to_positions(lp, rollout.order), rollout.completion_mask)
    if with_entropy:
        res = res + (_to_positions(_entropy(logits, T), rollout.order),)
    if return_hidden:
        return res + (hidden[:, : qs.start],)
    return res


def replay(model, rollout: Rollout, kind: str = "model", temperature: float | None = None, backend: str = "auto", with_entropy: bool = False):
    """The same numbers as :func:`exact` with one forward per step (layout (c)):
    ``[clean copies with s < i | queries of step i]``. The test oracle and the cost baseline
    of trajectory-aware scoring (TraceRL)."""
    T = rollout.temperature if temperature is None else temperature
    table = _table(rollout)
    P = rollout.prompt_ids.shape[1]
    chunks, ents, c = [], [], 0
    for k in rollout.step_sizes.tolist():
        lay, qs = replay_layout(table, P + c, P + c, P + c + k, model_config(model).mask_token_id)
        logits = lay.run(model, backend, logits_slice=qs)
        chunks.append(token_logprobs(logits, table.ids[:, P + c : P + c + k], T, rollout.top_k, rollout.top_p, kind))
        if with_entropy:
            ents.append(_entropy(logits, T))
        c += k
    res = (_to_positions(torch.cat(chunks, 1), rollout.order), rollout.completion_mask)
    return res + (_to_positions(torch.cat(ents, 1), rollout.order),) if with_entropy else res


# ----------------------------------------------------------------------------- MC estimators


def _prompt_completion(rollout: Rollout):
    """Ids / positions / validity of ``[prompt | completion]`` in *position* order, ``(B, P+N)``."""
    P = rollout.prompt_ids.shape[1]
    plen = rollout.prompt_mask.long().sum(1, keepdim=True)
    ppos = (torch.arange(P, device=plen.device)[None] - (P - plen)).clamp(min=0)
    cpos = plen + torch.arange(rollout.num_new, device=plen.device)[None]
    ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], 1)
    pos = torch.cat([ppos.expand(rollout.batch_size, -1), cpos.expand(rollout.batch_size, -1)], 1)
    valid = torch.cat([rollout.prompt_mask.bool(), rollout.completion_mask.bool()], 1)
    return ids, pos, valid


def _masked_pass(model, rollout: Rollout, masked: torch.Tensor, shuffle_key: torch.Tensor, temperature: float, backend: str, with_entropy: bool = False):
    """One forward over ``[prompt clean L→R | clean completion | masked]`` (random order
    inside each completion part via ``shuffle_key``); returns ``log p`` of every token at
    its position ``(B, P + N)`` (meaningful where ``masked``), and with ``with_entropy`` the
    predictive entropies ``(B, P + N)`` too."""
    ids, pos, valid = _prompt_completion(rollout)
    P = rollout.prompt_ids.shape[1]
    B, L = ids.shape
    is_prompt = torch.zeros_like(valid)
    is_prompt[:, :P] = True
    group = torch.where(masked, 2, torch.where(is_prompt, 0, 1))
    group = torch.where(valid, group, torch.full_like(group, 3))
    key = torch.where(is_prompt & ~masked, torch.arange(L, device=ids.device).expand(B, L), shuffle_key)
    table, sidx = sorted_table(ids, pos, valid, group, key)
    lay = one_copy_layout(table, table.steps == 2, model_config(model).mask_token_id)
    logits = lay.run(model, backend)
    lp_sorted = token_logprobs(logits, table.ids, temperature)
    lp = torch.empty_like(lp_sorted).scatter_(1, sidx, lp_sorted)
    if not with_entropy:
        return lp
    ent_sorted = _entropy(logits, temperature)
    return lp, torch.empty_like(ent_sorted).scatter_(1, sidx, ent_sorted)


def _draws(rollout: Rollout, seed: int, n_uniform: int, L: int):
    """Per-sample noise from (seed, sample id): ``(B, n_uniform)`` and ``(B, L)`` uniforms."""
    ids = rollout.sample_ids if rollout.sample_ids is not None else torch.arange(rollout.batch_size)
    us, ks = [], []
    for s in ids.tolist():
        g = make_generator(seed, Stream.MC, int(s))
        us.append(torch.rand(n_uniform, generator=g, dtype=torch.float64))
        ks.append(torch.rand(L, generator=g, dtype=torch.float64))
    return torch.stack(us), torch.stack(ks)


def mc_elbo(model, rollout: Rollout, n: int = 4, alpha0: float = 1.0, seed: int = 0, temperature: float | None = None, backend: str = "auto", chunk: int = 64,
            with_entropy: bool = False):
    """Monte Carlo NELBO of ``y`` given the prompt, for the sampling ``alpha0`` (docs/ESOLM.md §6).

    Per token: mean over ``n`` draws of ``[masked]·α0(1−ε)/(1−α_t)·log p`` (MDM term, layout
    (d)); for ``α0 < 1`` plus ``[masked in z0]·log p`` of the AR term (layout (e)) on a fresh
    ``z0`` per draw. ``t`` is stratified (antithetic) over the ``n`` draws of a sample; masks
    and the orders of the clean and masked parts are fresh per draw. The draws of up to
    ``chunk`` are batched into one forward.
    Cost: ``n`` forwards of ``P + N`` (+ ``n`` of ``P + N + #masked(z0)`` if ``α0 < 1``).
    A lower bound on ``log p(y | prompt)`` averaged over orders — not ``log p(y | σ, k)``.
    """
    T = rollout.temperature if temperature is None else temperature
    B, N = rollout.completion_ids.shape
    dev = rollout.completion_ids.device
    r, mu = _draws(rollout, seed, n, n * 3 * N)  # (B, n), (B, n·3N)
    mu = mu.view(B, n, 3 * N).to(dev)
    strata = torch.arange(n, dtype=torch.float64)[None]
    t = ((strata + r) / n) * (1 - EPS) + EPS  # (B, n), stratified per sample
    a_t = alpha(t, alpha0).to(dev)
    u_mask, u_order, u_z0 = mu[..., :N], mu[..., N : 2 * N], mu[..., 2 * N :]
    masked = (u_mask >= a_t[..., None]) & rollout.completion_mask[:, None]  # (B, n, N)
    # the MDM term: one forward per draw (layout (d)), the draws batched as masked_draws does
    out = masked_draws(model, rollout, masked, u_order, T, backend, chunk=chunk, with_entropy=with_entropy)
    lp, ents = out if with_entropy else (out, None)
    w = (alpha0 * (1 - EPS) / (1 - a_t)).to(lp.dtype)  # (B, n)
    vals = masked * w[..., None] * lp
    if alpha0 < 1.0:  # plus the AR term on a fresh z0 per draw (layout (e))
        for d0 in range(0, n, chunk):
            d1 = min(n, d0 + chunk)
            m = d1 - d0
            rep = rollout.index(torch.arange(B, device=dev).repeat_interleave(m))  # rows (b, draw)
            ar = _ar_term(model, rep, (u_z0[:, d0:d1] >= alpha0).reshape(B * m, N), u_order[:, d0:d1].reshape(B * m, N), T, backend)
            vals[:, d0:d1] = vals[:, d0:d1] + ar.view(B, m, N)
    total = vals.sum(1)
    if with_entropy:
        cnt = masked.sum(1)
        return total / n, rollout.completion_mask, (ents * masked).sum(1) / cnt.clamp(min=1)
    return total / n, rollout.completion_mask


def _ar_term(model, rollout: Rollout, masked_c: torch.Tensor, u_order: torch.Tensor, T: float, backend: str):
    """Per-position ``[masked in z0]·log p`` of the AR term: context = prompt + clean ``z0``
    tokens (random order), masked tokens left to right (layout (e))."""
    ids, pos, valid = _prompt_completion(rollout)
    B, L = ids.shape
    P = rollout.prompt_ids.shape[1]
    masked_c = masked_c & rollout.completion_mask
    masked = torch.cat([torch.zeros_like(rollout.prompt_mask, dtype=torch.bool), masked_c], 1)
    ar = torch.arange(L, device=ids.device).expand(B, L)
    is_prompt = ar < P
    group = torch.where(valid, torch.where(masked, 2, torch.where(is_prompt, 0, 1)), torch.full_like(ar, 3))
    key = torch.where(is_prompt | masked, ar, torch.cat([torch.zeros(B, P, device=ids.device), u_order], 1).argsort(1).argsort(1))
    table, sidx = sorted_table(ids, pos, valid, group, key)
    is_m = table.steps == 2
    table.steps = torch.where(is_m, is_m.long().cumsum(1), torch.zeros_like(table.steps))  # one AR step each
    lay, q_idx, q_valid = sequential_layout(table, model_config(model).mask_token_id)
    M = table.shape[1]
    logits = lay.run(model, backend, logits_slice=slice(M, None))
    lp = token_logprobs(logits, table.ids.gather(1, q_idx), T) * q_valid
    out = torch.zeros(B, L, dtype=lp.dtype, device=lp.device)
    out.scatter_add_(1, sidx.gather(1, q_idx), lp)
    return out[:, P:]


def one_step(model, rollout: Rollout, p_mask: float = 0.15, seed: int = 0, temperature: float | None = None, backend: str = "auto", with_entropy: bool = False):
    """d1's diffu-GRPO estimate: the prompt masked independently with ``p_mask`` (d1's runs:
    0.15), the completion fully masked; per token ``log p(y_j | masked prompt)`` (one forward
    of ``P + N``). Biased (mean field). Share ``seed`` between current/old/reference passes."""
    T = rollout.temperature if temperature is None else temperature
    B, N = rollout.completion_ids.shape
    P = rollout.prompt_ids.shape[1]
    dev = rollout.completion_ids.device
    _, mu = _draws(rollout, seed, 0, P + N)
    mu = mu.to(dev)
    masked = torch.cat([(mu[:, :P] < p_mask) & rollout.prompt_mask.bool(), rollout.completion_mask.bool()], 1)
    out = _masked_pass(model, rollout, masked, mu.argsort(1).argsort(1), T, backend, with_entropy)
    lp = (out[0] if with_entropy else out)[:, P:]
    res = (lp * rollout.completion_mask, rollout.completion_mask)
    return res + (out[1][:, P:] * rollout.completion_mask,) if with_entropy else res


def coupled(model, rollout: Rollout, seed: int = 0, t_min: float = 0.2, t_max: float = 0.8, temperature: float | None = None, backend: str = "auto",
            with_entropy: bool = False):
    """DiffuCoder's coupled-GRPO estimate: a completion mask at ``t ~ U(t_min, t_max)`` (one
    ``t`` per call, shared by the batch), its complement, and a fully-masked pass; the prompt
    is never masked. Per token ``(log p_all + log p_pair / w) / 2`` with ``w = t`` or ``1 − t``
    for the pass that scored it. Three forwards of ``P + N``; biased."""
    T = rollout.temperature if temperature is None else temperature
    B, N = rollout.completion_ids.shape
    P = rollout.prompt_ids.shape[1]
    dev = rollout.completion_ids.device
    g = make_generator(seed, Stream.MC, -1)
    t = float(t_min + (t_max - t_min) * torch.rand(1, generator=g, dtype=torch.float64))
    _, mu = _draws(rollout, seed, 0, 2 * N)
    mu = mu.to(dev)
    cm = rollout.completion_mask.bool()
    m_a = (mu[:, :N] < t) & cm
    key = torch.cat([torch.zeros(B, P, device=dev), mu[:, N:]], 1).argsort(1).argsort(1)
    zeros_p = torch.zeros_like(rollout.prompt_mask, dtype=torch.bool)
    outs = [_masked_pass(model, rollout, torch.cat([zeros_p, m], 1), key, T, backend, with_entropy) for m in (m_a, ~m_a & cm, cm)]
    lp_a, lp_b, lp_all = [(o[0] if with_entropy else o)[:, P:] for o in outs]
    pair = torch.where(m_a, lp_a / t, lp_b / (1 - t))
    res = ((lp_all + pair) / 2 * cm, rollout.completion_mask)
    if not with_entropy:
        return res
    e_a, e_b, e_all = [o[1][:, P:] for o in outs]
    return res + ((e_all + torch.where(m_a, e_a, e_b)) / 2 * cm,)


# ----------------------------------------------------------------------------- the field's ELBO estimators


def mask_counts(rollout: Rollout, n: int, seed: int, zero: bool = False):
    """Per sample, ``n`` stratified mask counts and the masks they draw (docs/ESOLM.md §6).

    ``ℓ_k = ((round(u + k·M/n) − 1) mod M) + 1`` for ``k = 0 … n−1`` with ``u ~ U{1..M}``
    (LLaDA's evaluation: each ``ℓ_k`` is marginally uniform on ``{1..M}``, the ``n`` draws
    spread over the range), ``M`` the sample's number of scored completion tokens; with
    ``zero`` (ESPO) ``ℓ_k = round(u + k·(M+1)/n) mod (M+1)`` on ``{0..M}``. Each draw masks
    ``ℓ_k`` of the scored positions uniformly without replacement. One mask per count: VRPO's
    allocation (budget ``n`` = ``n`` timesteps × 1 mask). The noise is keyed by
    ``(seed, sample id)``, so the current, old and reference passes that share ``seed`` share
    every mask (VRPO's antithetic sampling).

    Returns ``ell`` ``(B, n)`` long, ``masked`` ``(B, n, N)`` bool and ``key`` ``(B, n, N)``
    (the orders of the clean and masked parts inside each pass), on the rollout's device.
    """
    B, N = rollout.completion_ids.shape
    dev = rollout.completion_ids.device
    valid = rollout.completion_mask.bool()
    M = valid.long().sum(1).cpu()
    ids = rollout.sample_ids if rollout.sample_ids is not None else torch.arange(B)
    ells, masks, keys = [], [], []
    for b, s in enumerate(ids.tolist()):
        g = make_generator(seed, Stream.MC, int(s))
        m = int(M[b])
        span = m + 1 if zero else m
        u = float(torch.rand(1, generator=g, dtype=torch.float64)) * span
        k = torch.arange(n, dtype=torch.float64)
        if zero:
            ell = torch.floor(u + k * span / n).long() % span
        else:
            ell = (torch.floor(u + k * span / n).long() % span) + 1 if m > 0 else torch.zeros(n, dtype=torch.long)
        score = torch.rand(n, N, generator=g, dtype=torch.float64)
        score[:, ~valid[b].cpu()] = 2.0  # never masked: unscored slots
        rank = score.argsort(1).argsort(1)
        masks.append(rank < ell[:, None])
        keys.append(torch.rand(n, N, generator=g, dtype=torch.float64))
        ells.append(ell)
    return torch.stack(ells).to(dev), torch.stack(masks).to(dev), torch.stack(keys).to(dev)


def masked_draws(model, rollout: Rollout, masked: torch.Tensor, key: torch.Tensor, temperature: float | None = None, backend: str = "auto",
                 chunk: int = 64, with_entropy: bool = False):
    """``log p(y_j | prompt, clean part of draw k)`` of every completion position for each
    draw's mask: ``masked``/``key`` ``(B, n, N)`` as :func:`mask_counts` returns them. One
    forward of ``P + N`` per draw (layout (d), the prompt never masked), up to ``chunk``
    draws batched. Returns ``lp`` ``(B, n, N)`` (meaningful where ``masked``), and with
    ``with_entropy`` the predictive entropies ``(B, n, N)``."""
    T = rollout.temperature if temperature is None else temperature
    B, n, N = masked.shape
    P = rollout.prompt_ids.shape[1]
    lps, ents = [], []
    for d0 in range(0, n, chunk):
        d1 = min(n, d0 + chunk)
        m = d1 - d0
        rep = rollout.index(torch.arange(B, device=masked.device).repeat_interleave(m))  # rows (b, draw)
        mk = masked[:, d0:d1].reshape(B * m, N)
        full = torch.cat([torch.zeros(B * m, P, dtype=torch.bool, device=mk.device), mk], 1)
        kk = torch.cat([torch.zeros(B * m, P, dtype=key.dtype, device=key.device), key[:, d0:d1].reshape(B * m, N)], 1).argsort(1).argsort(1)
        out = _masked_pass(model, rep, full, kk, T, backend, with_entropy)
        lp = (out[0] if with_entropy else out)[:, P:]
        lps.append(lp.view(B, m, N))
        if with_entropy:
            ents.append(out[1][:, P:].view(B, m, N))
    lp = torch.cat(lps, 1)
    return (lp, torch.cat(ents, 1)) if with_entropy else lp


def _draw_mean(vals: torch.Tensor, masked: torch.Tensor, ents, with_entropy: bool, valid):
    out = (vals.mean(1), valid)
    if with_entropy:
        cnt = masked.sum(1)
        out = out + ((ents * masked).sum(1) / cnt.clamp(min=1),)
    return out


def elbo_lowvar(model, rollout: Rollout, n: int = 4, seed: int = 0, temperature: float | None = None, backend: str = "auto", with_entropy: bool = False):
    """LLaDA's low-variance ELBO of ``log p(y | prompt)`` with VRPO's allocation (LLaDA,
    Nie et al. 2025, conditional likelihood evaluation; VRPO, LLaDA 1.5, Zhu et al. 2025, §3).

    Per sample ``n`` stratified counts ``ℓ ~ U{1..M}``, one uniform mask of ``ℓ`` tokens each
    (:func:`mask_counts`); per token ``mean_k [j masked in k] · (M/ℓ_k) · log p(y_j | clean_k)``.
    The sequence sum is unbiased for the discrete-time ELBO ``E_ℓ E_mask[(M/ℓ) Σ_masked log p]``.
    Masks are shared by every pass with the same ``seed`` (VRPO's antithetic sampling).
    Cost: ``n`` forwards of ``P + N``. Eso-LM note: the masked tokens are predicted by the
    model's diffusion part (layout (d)), as in ``mc_elbo``; ``α0`` plays no role.
    """
    ell, masked, key = mask_counts(rollout, n, seed)
    out = masked_draws(model, rollout, masked, key, temperature, backend, with_entropy=with_entropy)
    lp, ents = (out if with_entropy else (out, None))
    M = rollout.completion_mask.sum(1).to(lp.dtype)
    w = M[:, None] / ell.clamp(min=1).to(lp.dtype)  # (B, n)
    vals = masked * w[:, :, None] * lp
    return _draw_mean(vals, masked, ents, with_entropy, rollout.completion_mask)


def espo_elbo(model, rollout: Rollout, n: int = 2, seed: int = 0, temperature: float | None = None, backend: str = "auto", with_entropy: bool = False):
    """ESPO's sequence ELBO (Ou et al. 2025, "ESPO", ML-GSAI/ESPO ``espo_trainer.py``): per
    draw ``ℓ ~ U{0..M}`` (stratified over the ``n`` draws), a mask of ``ℓ`` tokens and its
    complement, per token ``½ ([masked] (M+1)/ℓ log p(y_j | mask) + [not masked] (M+1)/(M−ℓ)
    log p(y_j | complement))``, averaged over draws. Both halves are unbiased for the same
    ELBO as :func:`elbo_lowvar`; the complement couples them. Cost: ``2n`` forwards of
    ``P + N``. Deviation from ESPO's code: the counts are stratified over one sequence's draws
    (keyed by its sample id), not across the sequences of a micro-batch, so a sequence's
    estimate does not depend on its batch neighbours."""
    ell, masked, key = mask_counts(rollout, n, seed, zero=True)
    valid = rollout.completion_mask.bool()
    comp = ~masked & valid[:, None]
    both = torch.cat([masked, comp], 1)
    out = masked_draws(model, rollout, both, torch.cat([key, key], 1), temperature, backend, with_entropy=with_entropy)
    lp, ents = (out if with_entropy else (out, None))
    M = rollout.completion_mask.sum(1).to(lp.dtype)[:, None]
    e = ell.to(lp.dtype)
    w1 = torch.where(ell > 0, (M + 1) / e.clamp(min=1), torch.zeros_like(e))
    w2 = torch.where(ell < M, (M + 1) / (M - e).clamp(min=1), torch.zeros_like(e))
    vals = 0.5 * (masked * w1[:, :, None] * lp[:, :n] + comp * w2[:, :, None] * lp[:, n:])
    res = (vals.mean(1), rollout.completion_mask)
    if with_entropy:
        cnt = both.sum(1)
        res = res + ((ents * both).sum(1) / cnt.clamp(min=1),)
    return res


def sandwich_bounds(model, rollout: Rollout, n: int = 2, eubo_beta: float = 1.0, seed: int = 0, temperature: float | None = None,
                    backend: str = "auto"):
    """SPG's lower and upper bounds of ``log p(y | prompt)`` per sequence, normalised per token
    (Wang et al. 2025, "SPG: Sandwiched Policy Gradient", facebookresearch/SPG
    ``spg_trainer.py``), from the ``n`` draws of :func:`mask_counts` (the masks of
    :func:`elbo_lowvar` with the same ``seed``).

    lower ``(B,)``: ``(1/n) Σ_k (1/ℓ_k) Σ_{j masked in k} log p_j`` (× M = :func:`elbo_lowvar`'s sum).
    upper ``(B,)``: the Rényi bound ``(1/|J|) Σ_{j∈J} (1/β) log[(1/n) Σ_k [j masked in k] p_j^β / t̂_k]``
    with ``t̂_k = ℓ_k / M`` and ``J`` the positions masked in at least one draw.
    Deviation from SPG's code: its masks are block-wise (LLaDA's semi-autoregressive blocks,
    plus 15 % prompt masking); Eso-LM rollouts have no blocks, so the masks are LLaDA's
    uniform ones. Cost: ``n`` forwards of ``P + N``.
    """
    ell, masked, key = mask_counts(rollout, n, seed)
    lp = masked_draws(model, rollout, masked, key, temperature, backend)
    mf = masked.to(lp.dtype)
    e = ell.clamp(min=1).to(lp.dtype)
    lower = ((mf * lp).sum(2) / e).mean(1)
    M = rollout.completion_mask.sum(1).to(lp.dtype)
    t_hat = e / M[:, None].clamp(min=1)
    # log[(1/n) Σ_k m_kj p^β / t̂_k] in log space (p^β underflows for long sequences)
    terms = torch.where(masked, eubo_beta * lp - t_hat.log()[:, :, None], torch.full_like(lp, -torch.inf))
    lse = torch.logsumexp(terms, 1) - math.log(ell.shape[1])  # (B, N)
    J = masked.any(1)
    upper = torch.where(J, lse / eubo_beta, torch.zeros_like(lse)).sum(1) / J.sum(1).clamp(min=1)
    return lower, upper


def step_merge(model, rollout: Rollout, segments: int = 2, kind: str = "model", temperature: float | None = None, backend: str = "auto",
               with_entropy: bool = False):
    """d2's StepMerge on an Eso-LM trajectory (Wang et al. 2025, "d2", kuleshov-group/d2
    ``d2StepMergeTrainer``): the rollout's ``K`` steps are cut into ``segments`` contiguous
    segments at d2's boundaries ``⌊s·K/S⌋`` (s = 1 … S−1; 1-based step ``i`` → segment
    ``⌈i·S/K⌉ − 1``, so K = 5, S = 2 gives 2 + 3 steps), and every token revealed in a segment is
    scored given the prompt and the tokens revealed *before the segment*: the exact
    likelihood of the coarser trajectory with the same order and merged steps.
    ``segments = K`` is :func:`exact`; ``segments = 1`` scores every token given the prompt
    only (d1's one-step estimate without prompt masking). On LLaDA this trades ``S`` forwards
    against accuracy; on an Eso-LM every ``S`` costs the one pass of :func:`exact`
    (``P + 2N``), so it is a bias-only baseline: it isolates how much of the trajectory's
    conditioning matters. Deviation from d2: no d1-style prompt masking (it regularises the
    one-step estimate; the conditioning here is exact)."""
    K = len(rollout.step_sizes)
    S = max(1, min(int(segments), K))
    seg = torch.div((torch.arange(K, device=rollout.step_sizes.device) + 1) * S - 1, K, rounding_mode="floor")  # step i (0-based) → segment
    sizes = torch.zeros(S, dtype=rollout.step_sizes.dtype, device=rollout.step_sizes.device).scatter_add_(0, seg, rollout.step_sizes)
    steps = seg.to(rollout.steps.device)[rollout.steps - 1] + 1
    keep = sizes > 0
    remap = torch.cumsum(keep.long(), 0)  # drop empty segments (a zero-sized step is not a step)
    merged = dataclasses.replace(rollout, step_sizes=sizes[keep], steps=remap.to(steps.device)[steps - 1])
    return exact(model, merged, kind=kind, temperature=temperature, backend=backend, with_entropy=with_entropy)


def estimate(model, rollout: Rollout, likelihood: str = "exact", **params):
    """The estimator named ``likelihood`` (:data:`REGISTRY`; the recipes' ``likelihood``
    field); unknown parameters raise ``TypeError`` naming them."""
    return get_estimator(likelihood).fn(model, rollout, **params)


def _checked(fn):
    """Every estimator validates its rollout first (cheap: O(B·N) index checks): steps that
    disagree with the order, right-padded prompts or a rollout longer than the model's
    context give wrong numbers without an error otherwise."""
    import functools

    @functools.wraps(fn)
    def wrapper(model, rollout: Rollout, *a, **k):
        if not isinstance(rollout, Rollout):
            raise TypeError(f"{fn.__name__}: expected a Rollout, got {type(rollout).__name__} (build one with Rollout.from_tokens or EsoPolicy.rollout_for)")
        rollout.validate(model_config(model).max_seq_len)
        return fn(model, rollout, *a, **k)

    return wrapper


exact, replay, mc_elbo, one_step, coupled, elbo_lowvar, espo_elbo, step_merge = (
    _checked(f) for f in (exact, replay, mc_elbo, one_step, coupled, elbo_lowvar, espo_elbo, step_merge))
sandwich_bounds = _checked(sandwich_bounds)


# ----------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Estimator:
    """What the rest of esorl needs to know about a likelihood estimator (docs/ESOLM.md §6).

    fn: ``fn(model, rollout, **kwargs) -> (logp [B, N], valid [B, N])`` (``with_entropy=True``
        adds the entropies [B, N]).
    kwargs: ``kwargs(cfg, sampling_alpha0, seed) -> dict``: its keyword arguments from an
        :class:`esorl.policy.EstimatorConfig`, the sampling α0 and the inner iteration's noise seed.
    deterministic: no noise: one scoring serves every inner iteration and seed.
    equals_sampler: its log-probs are the sampler's recorded ones (so an RL run takes the old
        log-probs from the rollout, with no forward).
    per_step: per-token log-probs tied to the trajectory's steps (PPO runs per-step GAE on
        them; the others run sequence-level PPO, docs/ESOLM.md §8).
    forwards: ``forwards(P, N, step_sizes, kwargs) -> int``: token forwards of one sequence
        (the cost model of the comparison and the benchmarks; expected values where random).
    summary: one line for help texts.
    """

    name: str
    fn: Callable
    kwargs: Callable
    deterministic: bool
    equals_sampler: bool
    per_step: bool
    forwards: Callable
    summary: str


REGISTRY: dict[str, Estimator] = {}


def register(est: Estimator) -> Estimator:
    """Add an estimator (``esorl`` knows it everywhere by its name: RL configs, the
    comparison, ``esorl score``, the benchmarks). Raises ``ValueError`` on a taken name."""
    if est.name in REGISTRY:
        raise ValueError(f"likelihood estimator {est.name!r} is already registered")
    REGISTRY[est.name] = est
    return est


def get_estimator(name: str) -> Estimator:
    """The registry entry of ``name``; ``ValueError`` listing the known names otherwise."""
    if name not in REGISTRY:
        raise ValueError(f"unknown likelihood estimator {name!r}; choose from {', '.join(REGISTRY)}")
    return REGISTRY[name]


def _mc_alpha0(cfg, sampling_alpha0: float) -> float:
    return sampling_alpha0 if getattr(cfg, "mc_alpha0", -1.0) < 0 else cfg.mc_alpha0


def _replay_forwards(P: int, N: int, sizes, kw) -> int:
    c, total = 0, 0
    for k in sizes:  # step i: the prompt, the c clean copies so far and the k queries
        total += P + c + k
        c += k
    return total


register(Estimator("exact", exact, lambda cfg, a0, seed: {}, True, True, True, lambda P, N, sizes, kw: P + 2 * N,
                   "the trajectory's exact log-likelihood in one pass (layout (a))"))
register(Estimator("replay", replay, lambda cfg, a0, seed: {}, True, True, True, _replay_forwards,
                   "the same numbers as exact, one pass per step (layout (c)): the test oracle and TraceRL's cost"))
register(Estimator("mc_elbo", mc_elbo, lambda cfg, a0, seed: {"n": cfg.mc_samples, "alpha0": _mc_alpha0(cfg, a0), "seed": seed}, False, False, False,
                   lambda P, N, sizes, kw: kw["n"] * (P + N) + (kw["n"] * (P + N + round(N * (1 - kw["alpha0"]))) if kw["alpha0"] < 1 else 0),
                   "Monte Carlo NELBO with n draws at the sampling α0 (a bound, averaged over orders)"))
register(Estimator("one_step", one_step, lambda cfg, a0, seed: {"p_mask": cfg.p_mask, "seed": seed}, False, False, True,
                   lambda P, N, sizes, kw: P + N, "d1's diffu-GRPO: prompt masked with p_mask, completion fully masked (mean field)"))
register(Estimator("coupled", coupled, lambda cfg, a0, seed: {"seed": seed}, False, False, False, lambda P, N, sizes, kw: 3 * (P + N),
                   "DiffuCoder's coupled-GRPO: a mask at t, its complement and a fully masked pass"))
register(Estimator("elbo_lowvar", elbo_lowvar, lambda cfg, a0, seed: {"n": cfg.mc_samples, "seed": seed}, False, False, False,
                   lambda P, N, sizes, kw: kw["n"] * (P + N),
                   "LLaDA's low-variance ELBO (ℓ ~ U{1..N}, weight N/ℓ) with VRPO's allocation: n counts × 1 mask, masks shared with the reference"))
register(Estimator("espo_elbo", espo_elbo, lambda cfg, a0, seed: {"n": cfg.mc_samples, "seed": seed}, False, False, False,
                   lambda P, N, sizes, kw: 2 * kw["n"] * (P + N), "ESPO's ELBO: ℓ ~ U{0..N} with weight (N+1)/ℓ, averaged with its complementary mask"))
register(Estimator("step_merge", step_merge, lambda cfg, a0, seed: {"segments": cfg.merge_segments}, True, False, True, lambda P, N, sizes, kw: P + 2 * N,
                   "d2's StepMerge: the trajectory's steps merged into `merge_segments` segments, scored exactly (one pass)"))

# name → function (the estimators' signature is shared; kept for callers that dispatch by name)
ESTIMATORS = {name: e.fn for name, e in REGISTRY.items()}
