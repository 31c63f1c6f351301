"""From logits to log-probabilities: temperature, top-k / top-p filtering (docs/ESOLM.md §7).

Two log-probabilities exist for a sampled token:

* **model** log-prob: ``log_softmax(logits / T)`` – temperature only, unfiltered (what TRL uses);
* **behaviour** log-prob: the same after top-k / top-p filtering and renormalisation – the
  distribution the token was actually drawn from.

With ``top_k = 0`` and ``top_p = 1`` (the RL default) they coincide. The sampler and every
estimator call these functions, so the numbers they produce agree by construction.
"""

from __future__ import annotations

import torch


def _work_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def model_logprobs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``log_softmax(logits / T)`` over the vocabulary, in float32 (float64 stays float64)."""
    if temperature == 1.0:  # one pass: the up-cast happens inside the softmax kernel
        return torch.log_softmax(logits, dim=-1, dtype=_work_dtype(logits))
    return torch.log_softmax(logits.to(_work_dtype(logits)) / temperature, dim=-1)


def filter_logprobs(logp: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Renormalised log-probs after top-k and nucleus (top-p) filtering; removed ids get -inf.

    Nucleus keeps the smallest prefix of the sorted distribution whose mass reaches
    ``top_p`` (the most likely token is always kept).
    """
    if top_k and top_k > 0 and top_k < logp.shape[-1]:
        kth = logp.topk(top_k, dim=-1).values[..., -1:]
        logp = logp.masked_fill(logp < kth, float("-inf"))
    if top_p < 1.0:
        srt, idx = logp.sort(dim=-1, descending=True)
        probs = srt.exp()
        before = probs.cumsum(-1) - probs  # mass strictly before each sorted token
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
        logp = logp.masked_fill(drop, float("-inf"))
    if (top_k and top_k > 0) or top_p < 1.0:
        logp = logp - torch.logsumexp(logp, dim=-1, keepdim=True)
    return logp


def entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy (nats) of ``softmax(logits / T)`` over the last dimension, in float32 (float64
    stays float64): the entropy of the model distribution a token was sampled from, TRL's
    ``entropy`` metric. Shape: ``logits.shape[:-1]``."""
    lp = model_logprobs(logits, temperature)
    p = lp.exp()
    # -inf log-probs (the MASK logit) have p = 0: count them as 0, not 0 · inf = nan
    return -(p * lp.masked_fill(p == 0, 0.0)).sum(-1)


def gather(logp: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return logp.gather(-1, tokens[..., None]).squeeze(-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, kind: str = "model") -> torch.Tensor:
    """Log-prob of ``tokens`` under the model (``kind='model'``) or behaviour distribution."""
    lp = model_logprobs(logits, temperature)
    if kind == "behaviour":
        lp = filter_logprobs(lp, top_k, top_p)
    elif kind != "model":
        raise ValueError(f"log-prob kind must be 'model' or 'behaviour', got {kind!r}")
    return gather(lp, tokens)


def sample_inverse_cdf(logp: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Draw one id per row from ``exp(logp)`` with pre-drawn uniforms ``u`` (same leading shape).

    One uniform per (sample, position) makes a trajectory a deterministic function of the
    noise: the cached and the no-cache sampler then emit the same tokens.
    """
    # probabilities in the log-probs' precision, accumulated in float64 (the CDF of a 50k
    # vocabulary in float32 would drift by ~1e-4)
    cdf = logp.exp().cumsum(-1, dtype=torch.float64)
    target = u.to(torch.float64)[..., None] * cdf[..., -1:]
    idx = torch.searchsorted(cdf.contiguous(), target.contiguous(), right=True).squeeze(-1)
    return idx.clamp(max=logp.shape[-1] - 1)
