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
    P = rollout.prompt_ids.shape[1]
    dev = rollout.completion_ids.device
    r, mu = _draws(rollout, seed, n, n * 3 * N)  # (B, n), (B, n·3N)
    mu = mu.view(B, n, 3 * N)
    total, ent_sum, ent_cnt = 0.0, 0.0, 0.0
    for d0 in range(0, n, chunk):
        d1 = min(n, d0 + chunk)
        m = d1 - d0
        rep = rollout.index(torch.arange(B).repeat_interleave(m))  # rows (b, draw)
        strata = torch.arange(d0, d1, dtype=torch.float64)[None]
        t = (((strata + r[:, d0:d1]) / n) * (1 - EPS) + EPS).reshape(-1)
        a_t = alpha(t, alpha0).to(dev)
        u = mu[:, d0:d1].reshape(B * m, 3 * N).to(dev)
        u_mask, u_order, u_z0 = u[:, :N], u[:, N : 2 * N], u[:, 2 * N :]
        masked_c = (u_mask >= a_t[:, None]) & rep.completion_mask
        masked = torch.cat([torch.zeros_like(rep.prompt_mask, dtype=torch.bool), masked_c], 1)
        key = torch.cat([torch.zeros(B * m, P, device=dev, dtype=u.dtype), u_order], 1).argsort(1).argsort(1)
        lp = _masked_pass(model, rep, masked, key, T, backend, with_entropy)
        if with_entropy:
            lp, ent = lp[0][:, P:], lp[1][:, P:]
            ent_sum = ent_sum + (ent * masked_c).view(B, m, N).sum(1)
            ent_cnt = ent_cnt + masked_c.view(B, m, N).sum(1)
        else:
            lp = lp[:, P:]
        w = (alpha0 * (1 - EPS) / (1 - a_t)).to(lp.dtype)
        val = masked_c * w[:, None] * lp
        if alpha0 < 1.0:
            val = val + _ar_term(model, rep, u_z0 >= alpha0, u_order, T, backend)
        total = total + val.view(B, m, N).sum(1)
    if with_entropy:
        return total / n, rollout.completion_mask, ent_sum / torch.as_tensor(ent_cnt).clamp(min=1)
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


def estimate(model, rollout: Rollout, estimator: str = "exact", **params):
    """Dispatch by name (:data:`REGISTRY`); unknown parameters raise ``TypeError`` naming them."""
    return get_estimator(estimator).fn(model, rollout, **params)


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


exact, replay, mc_elbo, one_step, coupled = (_checked(f) for f in (exact, replay, mc_elbo, one_step, coupled))


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

# name → function (the estimators' signature is shared; kept for callers that dispatch by name)
ESTIMATORS = {name: e.fn for name, e in REGISTRY.items()}
