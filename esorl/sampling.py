"""Samplers (docs/ESOLM.md §4 b): the KV-cached sampler, its no-cache twin, and an MDLM-style baseline.

All of them follow the same trajectory ``(σ, k)`` and draw each token by inverse CDF from one
pre-drawn uniform per (sample, position), so for the same noise they emit the same tokens;
they differ only in cost (token-forwards, docs/ESOLM.md §4 b):

* ``cache``:   step i forwards the clean copies of step i−1 and the queries of step i
  against a preallocated KV cache — ``P + 2N − k_K`` token-forwards per sample;
* ``static``:  the same KV-cached sampler with static shapes (a fixed window of ``W`` slots,
  one cache slot per token): one CUDA graph per step on GPU (:mod:`esorl.static_sampling`);
  the default;
* ``replay``:  recomputes ``[clean s < i | queries of step i]`` every step — ``≈ K·P + N(K+1)/2``;
* ``mdlm``:    runs the whole ``P + N`` sequence every step (MDLM-style) — ``K·(P + N)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import build_mask
from .modeling_esolm import model_config
from .layout import concat, copies, one_copy_layout, replay_layout, trajectory_table
from .logprobs import filter_logprobs, gather, model_logprobs, sample_inverse_cdf
from .kv_cache import EsoKVCache
from .rollout import Rollout, check_left_padded, first_eos_mask
from .schedule import ScheduleConfig, Stream, Trajectory, make_generator
from .static_sampling import static_decode



@dataclass
class SamplingConfig:
    """How completions are generated.

    max_completion_length: completion length N (every position is generated; text stops at EOS).
    schedule: the trajectory (unified ``(alpha0, num_steps)`` by default, docs/ESOLM.md §3).
    temperature / top_k / top_p: sampling distribution (RL recipes keep ``top_p = 1``).
    """

    max_completion_length: int = 32
    schedule: ScheduleConfig = None  # type: ignore[assignment]
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.schedule is None:
            self.schedule = ScheduleConfig()

    def validate(self):
        if self.max_completion_length < 1:
            raise ValueError(f"sampling.max_completion_length must be >= 1, got {self.max_completion_length}")
        if self.temperature <= 0:
            raise ValueError(f"sampling.temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError("sampling.top_k must be >= 0")


def rollout_noise(seed: int, step: int, sample_ids: torch.Tensor, n: int, batch_traj: int | None = None) -> torch.Tensor:
    """``(B, n)`` uniforms keyed by (seed, step, sample): identical across estimators/runs."""
    return torch.stack([torch.rand(n, generator=make_generator(seed, Stream.ROLLOUT, step, int(s)), dtype=torch.float64) for s in sample_ids])


def _pick(logits, u, temperature, top_k, top_p, forced=None):
    lp_model = model_logprobs(logits, temperature)
    lp_beh = filter_logprobs(lp_model, top_k, top_p)
    tok = sample_inverse_cdf(lp_beh, u) if forced is None else forced
    return tok, gather(lp_model, tok), gather(lp_beh, tok)


@torch.no_grad()
def generate(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    max_completion_length: int,
    trajectory: Trajectory | ScheduleConfig | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    uniforms: torch.Tensor | None = None,
    eos_token_id: int | None = None,
    method: str = "auto",
    sample_ids: torch.Tensor | None = None,
    backend: str = "auto",
    teacher_tokens: torch.Tensor | None = None,
    cuda_graphs: bool | None = None,
) -> Rollout:
    """Generate ``max_completion_length`` tokens after each (left-padded) prompt.

    Args:
        trajectory: a :class:`Trajectory` (order per row, shared step sizes) or a
            :class:`ScheduleConfig` to draw one with ``generator`` (default: unified α0=1, T=32).
        uniforms: ``(B, N)`` pre-drawn noise, one per (sample, position); drawn from
            ``generator`` if omitted.
        method: ``static`` (KV-cached with static shapes, CUDA graphs on GPU; the default,
            ``auto``), ``cache`` (KV-cached, the readable mask-per-window version),
            ``replay`` (no cache), ``mdlm`` (full sequence per step). All emit the same
            tokens for the same noise; ``backend`` applies to ``cache``/``replay``/``mdlm``
            (``static`` builds its own dense mask, see :mod:`esorl.static_sampling`).
        teacher_tokens: ``(B, N)`` tokens to emit instead of sampling (teacher forcing: the
            log-probs are those the sampler assigns to them; used to check fixtures).
        cuda_graphs: ``static`` only: capture each step once and replay it (default: on CUDA).

    Returns a :class:`Rollout` with both log-probs of docs/ESOLM.md §7.
    """
    device = prompt_ids.device
    B, P = prompt_ids.shape
    N = max_completion_length
    cfg = model_config(model)
    if N < 1:
        raise ValueError(f"max_completion_length must be >= 1, got {N}")
    if prompt_mask.shape != prompt_ids.shape:
        raise ValueError(f"prompt_mask {tuple(prompt_mask.shape)} must have the shape of prompt_ids {tuple(prompt_ids.shape)}")
    check_left_padded(prompt_mask)
    if teacher_tokens is not None and tuple(teacher_tokens.shape) != (B, N):
        raise ValueError(f"teacher_tokens has shape {tuple(teacher_tokens.shape)}, expected (B, max_completion_length) = {(B, N)}")
    plen = int(prompt_mask.long().sum(1).max()) if P else 0
    if plen > cfg.max_seq_len:
        raise ValueError(f"prompt of {plen} tokens is longer than the model context max_seq_len={cfg.max_seq_len}")
    if plen + N > cfg.max_seq_len:
        raise ValueError(f"max_completion_length={N} does not fit: longest prompt {plen} + {N} > model context max_seq_len={cfg.max_seq_len}")
    if trajectory is None:
        trajectory = ScheduleConfig()
    if isinstance(trajectory, ScheduleConfig):
        trajectory = trajectory.sample(B, N, generator)
    trajectory.validate(N)
    if trajectory.order.shape[0] != B:
        raise ValueError(f"trajectory has {trajectory.order.shape[0]} rows, the batch {B}")
    order = trajectory.order.to(device)
    sizes = trajectory.step_sizes.tolist()
    steps = trajectory.steps_by_position().to(device)
    if uniforms is None:
        uniforms = torch.rand(B, N, generator=generator, dtype=torch.float64)
    uniforms = uniforms.to(device)
    u_sigma = uniforms.gather(1, order)  # noise in σ order (noise belongs to a position)

    # completion ids are filled in as they are sampled; placeholder = MASK
    table = trajectory_table(prompt_ids, prompt_mask, torch.full((B, N), cfg.mask_token_id, device=device), order, steps)
    dtype = next(model.parameters()).dtype
    forced_sigma = None if teacher_tokens is None else teacher_tokens.to(device).gather(1, order)
    method = "static" if method == "auto" else method
    if method == "static":
        ids_sigma, lm_sigma, lb_sigma = static_decode(model, table, sizes, P, N, u_sigma, temperature, top_k, top_p, forced_sigma,
                                                      cuda_graphs=cuda_graphs)
    elif method in ("cache", "replay", "mdlm"):
        ids_sigma, lm_sigma, lb_sigma = _window_decode(model, method, table, sizes, P, N, u_sigma, temperature, top_k, top_p,
                                                       forced_sigma, backend)
    else:
        raise ValueError(f"sampling method must be 'auto', 'static', 'cache', 'replay' or 'mdlm', got {method!r}")
    logp_m = torch.zeros(B, N, device=device, dtype=torch.float64).scatter_(1, order, lm_sigma.to(torch.float64))
    logp_b = torch.zeros(B, N, device=device, dtype=torch.float64).scatter_(1, order, lb_sigma.to(torch.float64))

    completion = torch.empty(B, N, dtype=torch.long, device=device)
    completion.scatter_(1, order, ids_sigma)
    return Rollout(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask.bool(), completion_ids=completion, order=order,
        step_sizes=trajectory.step_sizes.clone(), steps=steps, completion_mask=torch.ones_like(completion, dtype=torch.bool),
        text_mask=first_eos_mask(completion, eos_token_id), logp_model=logp_m.float() if dtype != torch.float64 else logp_m,
        logp_behaviour=logp_b.float() if dtype != torch.float64 else logp_b, temperature=temperature, top_k=top_k, top_p=top_p,
        sample_ids=sample_ids if sample_ids is not None else torch.arange(B),
    )


def _window_decode(model, method, table, sizes, P, N, u_sigma, temperature, top_k, top_p, forced_sigma, backend):
    """The ``cache`` / ``replay`` / ``mdlm`` loops: each step builds its window and its mask
    with :mod:`esorl.layout` and :mod:`esorl.attention` (the readable reference for
    :mod:`esorl.static_sampling`). Returns ids and log-probs in σ order."""
    cfg = model_config(model)
    B = table.ids.shape[0]
    device = table.ids.device
    mask_id = cfg.mask_token_id
    lm_sigma = torch.zeros(B, N, device=device, dtype=torch.float64)
    lb_sigma = torch.zeros_like(lm_sigma)
    cache = EsoKVCache(cfg, B, P + N, device) if method == "cache" else None
    c_prev = 0
    for i, k in enumerate(sizes):
        q0, q1 = P + c_prev, P + c_prev + k
        if method == "cache":
            w0 = 0 if i == 0 else P + c_prev - sizes[i - 1]  # clean copies of the previous step
            window = concat(copies(table, slice(w0, q0), False, mask_id), copies(table, slice(q0, q1), True, mask_id))
            n_write = q0 - w0
            mask = build_mask(window.desc, cache.keys_desc(window.desc, n_write), backend)
            logits = model(window.ids, window.positions, mask, cache=cache, logits_slice=slice(n_write, None))
            cache.commit_desc(window.desc, n_write)
        elif method == "replay":
            lay, qs = replay_layout(table, q0, q0, q1, mask_id)
            logits = lay.run(model, backend, logits_slice=qs)
        else:  # mdlm: whole sequence: clean copies of what is known, MASKs for the rest, in σ order
            is_q = torch.zeros_like(table.valid)
            is_q[:, q0:] = True
            lay = one_copy_layout(table, is_q, mask_id)
            logits = lay.run(model, backend, logits_slice=slice(q0, q1))
        forced = None if forced_sigma is None else forced_sigma[:, c_prev : c_prev + k]
        tok, lm, lb = _pick(logits, u_sigma[:, c_prev : c_prev + k], temperature, top_k, top_p, forced=forced)
        table.ids[:, q0:q1] = tok
        lm_sigma[:, c_prev : c_prev + k] = lm.to(torch.float64)
        lb_sigma[:, c_prev : c_prev + k] = lb.to(torch.float64)
        c_prev += k
    return table.ids[:, P:], lm_sigma, lb_sigma


def left_pad(seqs: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts to one ``(B, P)`` tensor and its mask."""
    P = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), P), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), P, dtype=torch.bool)
    for b, s in enumerate(seqs):
        if s:
            ids[b, P - len(s) :] = torch.tensor(s)
            mask[b, P - len(s) :] = True
    return ids.to(device), mask.to(device)
