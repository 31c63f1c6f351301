"""The Eso-LM attention rule (docs/ESOLM.md §4) and the attention backends.

Every token in an array is described by four per-slot tensors (a :class:`TokenDesc`):

* ``step``  – its step index ``s`` (prompt / clean context: 0; revealed at step i: i),
* ``rank``  – its index in *trajectory order* (prompt left to right, then σ order); both
  copies of a token share the rank, so "array index k ≤ j" of docs/ESOLM.md §4 becomes
  ``rank_k <= rank_j``, whatever the array actually looks like,
* ``is_query`` – query copy (MASK embedding) or clean copy,
* ``valid`` – False for padding.

The rule (one rule, every layout):

1. clean j → clean k  iff ``rank_k <= rank_j``;
2. query j → clean k  iff ``step_k < step_j``;
3. query j → query k  iff ``step_k == step_j and rank_k <= rank_j``;
4. clean → query never; nobody attends to an invalid (pad) key.

Layouts (:mod:`esorl.layout`) only fill these tensors. Two backends evaluate the rule: a
dense boolean mask for SDPA (the default everywhere up to 2^28 mask entries, and the
reference in float64) and a ``flex_attention`` BlockMask (CUDA; beyond that size, or on
request). Where the rule reduces to plain causal attention, SDPA's causal path needs no mask
at all: layout (d) (:data:`CAUSAL`), layout (e)'s clean copies (:class:`PrefixCausalMask`)
and the static sampler's windows (:mod:`esorl.static_sampling`); tests check each shortcut
against the rule's mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class TokenDesc:
    """Per-slot description of an array of tokens; every field has shape ``(B, L)``."""

    step: torch.Tensor
    rank: torch.Tensor
    is_query: torch.Tensor
    valid: torch.Tensor

    def cat(self, other: "TokenDesc") -> "TokenDesc":
        return TokenDesc(*(torch.cat([a, b], dim=1) for a, b in zip(self.astuple(), other.astuple())))

    def slice(self, sl: slice) -> "TokenDesc":
        return TokenDesc(*(a[:, sl] for a in self.astuple()))

    def astuple(self):
        return (self.step, self.rank, self.is_query, self.valid)

    def to(self, device) -> "TokenDesc":
        return TokenDesc(*(a.to(device) for a in self.astuple()))

    def __len__(self) -> int:
        return self.step.shape[1]


def rule(q_step, q_rank, q_query, k_step, k_rank, k_query, k_valid):
    """The attention rule (docs/ESOLM.md §4), elementwise on broadcastable tensors: may a
    query slot with (step, rank, is-query copy) attend to a key slot with (step, rank,
    is-query copy, valid)?

    1. a clean copy sees the clean copies of rank ≤ its own (causal over the revealed order);
    2. a query copy sees the clean copies of earlier steps;
    3. a query copy sees the query copies of its own step with rank ≤ its own;
    4. nothing else (in particular no clean copy sees a query copy), and no invalid key.

    The one statement of the rule: the dense masks (:func:`allowed`), flex's ``mask_mod``
    (:func:`flex_block_mask`) and the static-shape sampler's per-step mask
    (:mod:`esorl.static_sampling`) call it; :func:`reference_allowed` is its independent slow
    twin for tests."""
    rule1 = ~q_query & ~k_query & (k_rank <= q_rank)
    rule2 = q_query & ~k_query & (k_step < q_step)
    rule3 = q_query & k_query & (k_step == q_step) & (k_rank <= q_rank)
    return (rule1 | rule2 | rule3) & k_valid


def allowed(q: TokenDesc, k: TokenDesc) -> torch.Tensor:
    """Dense boolean mask ``(B, Lq, Lk)``: True where query slot i may attend to key slot j.

    A row with no allowed key (only possible for invalid query slots) is opened to every key
    so that softmax stays finite; such outputs are never read.
    """
    m = rule(q.step[:, :, None], q.rank[:, :, None], q.is_query[:, :, None], k.step[:, None, :], k.rank[:, None, :], k.is_query[:, None, :],
             k.valid[:, None, :])
    return m | ~m.any(dim=-1, keepdim=True)


def reference_allowed(q: TokenDesc, k: TokenDesc) -> torch.Tensor:
    """Token-by-token loop over rules 1–4: the slow, obviously-right twin of :func:`allowed`."""
    B, Lq = q.step.shape
    Lk = k.step.shape[1]
    out = torch.zeros(B, Lq, Lk, dtype=torch.bool)
    for b in range(B):
        for i in range(Lq):
            for j in range(Lk):
                if not bool(k.valid[b, j]):
                    continue
                qi_query, kj_query = bool(q.is_query[b, i]), bool(k.is_query[b, j])
                if not qi_query and not kj_query:
                    ok = int(k.rank[b, j]) <= int(q.rank[b, i])
                elif qi_query and not kj_query:
                    ok = int(k.step[b, j]) < int(q.step[b, i])
                elif qi_query and kj_query:
                    ok = int(k.step[b, j]) == int(q.step[b, i]) and int(k.rank[b, j]) <= int(q.rank[b, i])
                else:
                    ok = False
                out[b, i, j] = ok
            if not out[b, i].any():
                out[b, i] = True
    return out


# ----------------------------------------------------------------------------- backends


def flex_available(device: torch.device) -> bool:
    """flex_attention is used on CUDA only: on CPU it has no backward (ENVIRONMENT.md)."""
    if device.type != "cuda":
        return False
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:  # pragma: no cover - old torch
        return False
    return True


def flex_block_mask(q: TokenDesc, k: TokenDesc):
    """The same rule as :func:`allowed`, as a flex_attention ``BlockMask`` (CUDA).

    Fully masked rows (invalid query slots) output zeros under flex; they are never read.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    qs, qr, qq = q.step, q.rank, q.is_query
    ks, kr, kq, kv = k.step, k.rank, k.is_query, k.valid

    def mask_mod(b, h, qi, kj):
        return rule(qs[b, qi], qr[b, qi], qq[b, qi], ks[b, kj], kr[b, kj], kq[b, kj], kv[b, kj])

    B, Lq = qs.shape
    return create_block_mask(mask_mod, B, None, Lq, ks.shape[1], device=qs.device, _compile=qs.device.type == "cuda")


def build_mask(q: TokenDesc, k: TokenDesc, backend: str = "auto"):
    """Mask object for :func:`attend`: dense ``(B, 1, Lq, Lk)`` bool (``"sdpa"``) or a
    BlockMask (``"flex"``). ``"auto"`` picks SDPA up to 2^28 entries, flex beyond (CUDA)."""
    if backend == "auto":
        # Dense masks with SDPA's fused (memory-efficient) kernel up to 2^28 entries (every
        # layout of issue 6's sizes: a training step, ``exact`` of 64 rollouts of 1024
        # tokens, a sampler window); flex only beyond, where the dense mask's memory gets
        # costly. On an H200 the compiled flex kernel ran these layouts at a small fraction
        # of SDPA's speed, and compiles for every new shape.
        big = q.step.shape[0] * q.step.shape[1] * k.step.shape[1] > 2**28
        backend = "flex" if big and flex_available(q.step.device) else "sdpa"
    if backend == "flex":
        return flex_block_mask(q, k)
    if backend == "sdpa":
        return allowed(q, k)[:, None]
    raise ValueError(f"attention backend must be 'auto', 'sdpa' or 'flex', got {backend!r}")


_compiled_flex = None

#: a mask that is plain causal attention in array order (see :func:`is_causal_layout`):
#: SDPA's ``is_causal`` path (FlashAttention on GPUs), no mask tensor at all
CAUSAL = "causal"
# an explicit "every slot sees every slot": the model refuses ``mask=None``, so that a
# forward without its layout's mask is an error, never silently bidirectional
FULL = "full"


@dataclass
class PrefixCausalMask:
    """The first ``n`` array slots attend causally among themselves (and to nothing after);
    the other rows follow ``rest``, a dense mask ``(B, 1, Lq − n, Lk)`` from :func:`build_mask`.

    Layout (e) (sequential training) is this shape: its clean copies come first in table
    order, where rule 1 is plain causal attention. The prefix then runs as SDPA's causal
    (FlashAttention) path and only the query copies need a mask — about half the dense work.
    """

    n: int
    rest: torch.Tensor

    @staticmethod
    def build(desc: TokenDesc, n: int) -> "PrefixCausalMask":
        """For an array whose first ``n`` slots are clean copies with ranks ``0..n−1`` and
        padding only after the valid ones (callers guarantee it; tests check the equivalence)."""
        return PrefixCausalMask(n, allowed(desc.slice(slice(n, None)), desc)[:, None])


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
    """Scaled dot-product attention ``(B, H, Lq, D)`` under a mask from :func:`build_mask`
    (or :data:`CAUSAL`, or a :class:`PrefixCausalMask`)."""
    if isinstance(mask, PrefixCausalMask):
        n = mask.n
        head = F.scaled_dot_product_attention(q[:, :, :n], k[:, :, :n], v[:, :, :n], is_causal=True)
        return torch.cat([head, attend(q[:, :, n:], k, v, mask.rest)], dim=2)
    if isinstance(mask, str):
        if mask not in (CAUSAL, FULL):
            raise ValueError(f"unknown mask {mask!r}: use a mask from build_mask, attention.CAUSAL or attention.FULL")
        return F.scaled_dot_product_attention(q, k, v, is_causal=mask == CAUSAL)
    if isinstance(mask, torch.Tensor) and mask.is_floating_point() and mask.dtype != q.dtype:
        mask = mask.to(q.dtype)  # an additive mask in another precision (e.g. built before autocast)
    if isinstance(mask, torch.Tensor) or mask is None:
        if q.is_cuda and mask is not None:
            # cuDNN's SDPA pays a large set-up cost for every new shape, and a sampler's
            # windows change shape every step (measured on an H200: 10.5 vs 56+ ms/step)
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    from torch.nn.attention.flex_attention import flex_attention

    if q.device.type != "cuda":  # CPU: eager flex (forward only), used by tests to compare backends
        return flex_attention(q, k, v, block_mask=mask)
    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=mask)
