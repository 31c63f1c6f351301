"""An independent, functional float64 re-implementation of the Eso-LM (B) backbone (docs/ESOLM.md §9).

It reads a reference state dict (names as in the released checkpoints, no ``backbone.``
prefix) directly and is written from docs/ESOLM.md alone, with explicit maths and loops: it
imports nothing from ``esorl``. The dense attention masks for the training layouts (docs/ESOLM.md §4
(d)/(e)) and for one replay step (docs/ESOLM.md §4 (c), rules 1–4) are built here too, token by token.

Slow by design (tiny models only); everything is float64.
"""

from __future__ import annotations

import math

import torch

# ----------------------------------------------------------------------------- parameters


def reference_parameter_order(n_layers: int) -> list[str]:
    """Order of the reference ``backbone.parameters()`` (the EMA ``shadow_params`` list)."""
    names = ["vocab_embed.embedding", "sigma_map.mlp.0.weight", "sigma_map.mlp.0.bias", "sigma_map.mlp.2.weight", "sigma_map.mlp.2.bias"]
    for i in range(n_layers):
        names += [
            f"blocks.{i}.norm1.weight",
            f"blocks.{i}.attn_qkv.weight",
            f"blocks.{i}.attn_out.weight",
            f"blocks.{i}.norm2.weight",
            f"blocks.{i}.mlp.0.weight",
            f"blocks.{i}.mlp.0.bias",
            f"blocks.{i}.mlp.2.weight",
            f"blocks.{i}.mlp.2.bias",
            f"blocks.{i}.adaLN_modulation.weight",
            f"blocks.{i}.adaLN_modulation.bias",
        ]
    names += [
        "output_layer.norm_final.weight",
        "output_layer.linear.weight",
        "output_layer.linear.bias",
        "output_layer.adaLN_modulation.weight",
        "output_layer.adaLN_modulation.bias",
    ]
    return names


def random_reference_state_dict(n_layers, hidden, n_heads, cond_dim, vocab, mlp_ratio=4, freq=256, seed=0) -> dict:
    """Random, non-zero weights under the reference names (adaLN and output layer included),
    float32, plus the buffer ``rotary_emb.inv_freq`` (base 10000)."""
    g = torch.Generator().manual_seed(seed)
    d, m = hidden, mlp_ratio * hidden

    def w(out_f, in_f, gain=1.0):
        return gain * torch.randn(out_f, in_f, generator=g) / math.sqrt(in_f)

    def b(n):
        return 0.3 * torch.randn(n, generator=g)

    def ln(n):
        return 1 + 0.2 * torch.randn(n, generator=g)

    sd = {
        "vocab_embed.embedding": torch.randn(vocab, d, generator=g),
        "sigma_map.mlp.0.weight": w(cond_dim, freq),
        "sigma_map.mlp.0.bias": b(cond_dim),
        "sigma_map.mlp.2.weight": w(cond_dim, cond_dim),
        "sigma_map.mlp.2.bias": b(cond_dim),
    }
    for i in range(n_layers):
        sd.update(
            {
                f"blocks.{i}.norm1.weight": ln(d),
                f"blocks.{i}.attn_qkv.weight": w(3 * d, d, 2.5),
                f"blocks.{i}.attn_out.weight": w(d, d),
                f"blocks.{i}.norm2.weight": ln(d),
                f"blocks.{i}.mlp.0.weight": w(m, d),
                f"blocks.{i}.mlp.0.bias": b(m),
                f"blocks.{i}.mlp.2.weight": w(d, m),
                f"blocks.{i}.mlp.2.bias": b(d),
                f"blocks.{i}.adaLN_modulation.weight": w(6 * d, cond_dim),
                f"blocks.{i}.adaLN_modulation.bias": b(6 * d),
            }
        )
    sd.update(
        {
            "output_layer.norm_final.weight": ln(d),
            "output_layer.linear.weight": w(vocab, d),
            "output_layer.linear.bias": b(vocab),
            "output_layer.adaLN_modulation.weight": w(2 * d, cond_dim),
            "output_layer.adaLN_modulation.bias": b(2 * d),
        }
    )
    head_dim = d // n_heads
    sd["rotary_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    return sd


# ----------------------------------------------------------------------------- the model


def _silu(x):
    return x / (1 + torch.exp(-x))


def _gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _layer_norm(x, weight, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight


def _linear(x, sd, name, bias=True):
    y = torch.einsum("...i,oi->...o", x, sd[name + ".weight"])
    return y + sd[name + ".bias"] if bias else y


def _rotate(x, positions, inv_freq):
    """Rotate-half rotary on ``x (B, L, H, D)`` with angles = original position × inv_freq."""
    ang = positions[..., None].double() * inv_freq[None, None]  # (B, L, D/2)
    ang = torch.cat([ang, ang], -1)[:, :, None]  # (B, L, 1, D)
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * torch.cos(ang) + rot * torch.sin(ang)


def reference_logits(sd: dict, ids, positions, allowed, n_heads: int, eps: float = 1e-5) -> torch.Tensor:
    """Raw logits ``(B, L, V)`` (MASK logit kept) in float64.

    Args:
        sd: reference-named state dict (tensors of any float dtype).
        ids, positions: ``(B, L)`` token ids in array order and their original positions.
        allowed: ``(B, L, L)`` bool, ``allowed[b, i, j]``: array slot i may attend to slot j.
        n_heads: attention heads.
    """
    sd = {k: v.detach().double() for k, v in sd.items()}
    ids, positions = torch.as_tensor(ids).long(), torch.as_tensor(positions).long()
    allowed = torch.as_tensor(allowed).bool()
    B, L = ids.shape
    d = sd["vocab_embed.embedding"].shape[1]
    H = n_heads
    D = d // H
    n_layers = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})

    # adaLN input: SiLU(MLP(sinusoid(σ = 0))); the sinusoid is cat[cos, sin] = [1…1, 0…0].
    freq = sd["sigma_map.mlp.0.weight"].shape[1]
    emb = torch.cat([torch.ones(freq // 2), torch.zeros(freq - freq // 2)]).double()
    c = _silu(_linear(_silu(_linear(emb, sd, "sigma_map.mlp.0")), sd, "sigma_map.mlp.2"))

    x = sd["vocab_embed.embedding"][ids]  # (B, L, d)
    inv_freq = sd["rotary_emb.inv_freq"]
    for i in range(n_layers):
        p = f"blocks.{i}."
        mod = _linear(c, sd, p + "adaLN_modulation")
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (mod[j * d : (j + 1) * d] for j in range(6))

        h = _layer_norm(x, sd[p + "norm1.weight"], eps) * (1 + scale_msa) + shift_msa
        qkv = _linear(h, sd, p + "attn_qkv", bias=False).reshape(B, L, 3, H, D)  # rows (three, head, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q, k = _rotate(q, positions, inv_freq), _rotate(k, positions, inv_freq)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        att = torch.softmax(scores, dim=-1)
        o = torch.einsum("bhqk,bkhd->bqhd", att, v).reshape(B, L, d)
        x = x + gate_msa * _linear(o, sd, p + "attn_out", bias=False)

        h = _layer_norm(x, sd[p + "norm2.weight"], eps) * (1 + scale_mlp) + shift_mlp
        x = x + gate_mlp * _linear(_gelu_tanh(_linear(h, sd, p + "mlp.0")), sd, p + "mlp.2")

    mod = _linear(c, sd, "output_layer.adaLN_modulation")
    shift, scale = mod[:d], mod[d:]
    h = _layer_norm(x, sd["output_layer.norm_final.weight"], eps) * (1 + scale) + shift
    return _linear(h, sd, "output_layer.linear")


# ----------------------------------------------------------------------------- masks


def diffusion_allowed(B: int, L: int) -> torch.Tensor:
    """docs/ESOLM.md §4 (d): plain causal attention over the sorted array ``[clean | masked]``."""
    m = torch.zeros(B, L, L, dtype=torch.bool)
    for i in range(L):
        for j in range(L):
            m[:, i, j] = j <= i
    return m


def sequential_allowed(B: int, L: int) -> torch.Tensor:
    """docs/ESOLM.md §4 (e): ``[z0 | x]`` of length ``2L`` in the same sorted order. First-half slot i
    sees itself and second-half slots ``L + j`` with ``j < i``; the second half is causal over
    itself (and never sees the first half)."""
    m = torch.zeros(B, 2 * L, 2 * L, dtype=torch.bool)
    for i in range(L):
        m[:, i, i] = True
        for j in range(i):
            m[:, i, L + j] = True
        for j in range(i + 1):
            m[:, L + i, L + j] = True
    return m


def diffusion_reference(sd, x, masked, order, n_heads, mask_id):
    """Logits ``(B, L, V)`` by original position for layout (d).

    ``order[b]``: positions in array order (clean ones first, then masked ones), ``masked``:
    ``(B, L)`` bool by position. Array slot i holds position ``order[b, i]``.
    """
    B, L = x.shape
    zt = torch.where(masked, torch.full_like(x, mask_id), x)
    ids = zt.gather(1, order)
    lg = reference_logits(sd, ids, order, diffusion_allowed(B, L), n_heads)
    out = torch.empty_like(lg)
    for b in range(B):
        for i in range(L):
            out[b, order[b, i]] = lg[b, i]
    return out


def sequential_reference(sd, x, masked, order, n_heads, mask_id):
    """Logits ``(B, L, V)`` by original position for layout (e) (first half of ``[z0 | x]``).

    ``order[b]``: the clean positions of ``z0`` (any order), then its masked positions left
    to right. Only the masked positions' logits are meaningful.
    """
    B, L = x.shape
    z0 = torch.where(masked, torch.full_like(x, mask_id), x)
    ids = torch.cat([z0.gather(1, order), x.gather(1, order)], 1)
    pos = torch.cat([order, order], 1)
    lg = reference_logits(sd, ids, pos, sequential_allowed(B, L), n_heads)[:, :L]
    out = torch.empty_like(lg)
    for b in range(B):
        for i in range(L):
            out[b, order[b, i]] = lg[b, i]
    return out


def replay_allowed(steps: list[int], is_query: list[bool], ranks: list[int]) -> torch.Tensor:
    """docs/ESOLM.md §4 rules 1–4 for one array, token by token: ``(L, L)`` bool."""
    L = len(steps)
    m = torch.zeros(L, L, dtype=torch.bool)
    for i in range(L):
        for j in range(L):
            if not is_query[i] and not is_query[j]:
                m[i, j] = ranks[j] <= ranks[i]
            elif is_query[i] and not is_query[j]:
                m[i, j] = steps[j] < steps[i]
            elif is_query[i] and is_query[j]:
                m[i, j] = steps[j] == steps[i] and ranks[j] <= ranks[i]
    return m


def reference_trajectory_logits(sd, prompt, completion, order, step_sizes, n_heads, mask_id):
    """Per-position logits of a trajectory by replay (docs/ESOLM.md §4 (c)): ``(B, N, V)`` float64.

    For each step s: forward ``[clean copies of prompt + tokens of steps < s | query copies of
    step s]`` with :func:`replay_allowed`, and read each step-s token's logits at its query
    copy. ``prompt (B, P)`` (no padding), ``completion (B, N)`` by position, ``order (B, N)``
    the reveal order σ, ``step_sizes`` k_1..k_K (shared by the rows). This is the oracle for
    the KV-cached sampler (docs/ESOLM.md §4 (b)) and the single-pass layout (a).
    """
    prompt, completion, order = (torch.as_tensor(t).long() for t in (prompt, completion, order))
    B, P = prompt.shape
    N = completion.shape[1]
    V = sd["output_layer.linear.weight"].shape[0]
    out = torch.zeros(B, N, V, dtype=torch.float64)
    for b in range(B):
        # trajectory order: prompt left to right, then σ; step of each trajectory slot
        ids = prompt[b].tolist() + [int(completion[b, j]) for j in order[b].tolist()]
        pos = list(range(P)) + [P + j for j in order[b].tolist()]
        steps = [0] * P
        for s, k in enumerate(step_sizes, start=1):
            steps += [s] * k
        assert len(steps) == P + N, "step sizes must add up to the completion length"
        start = P
        for s, k in enumerate(step_sizes, start=1):
            clean = list(range(start))
            query = list(range(start, start + k))
            arr_ids = [ids[r] for r in clean] + [mask_id] * k
            arr_pos = [pos[r] for r in clean + query]
            arr_steps = [steps[r] for r in clean + query]
            arr_q = [False] * len(clean) + [True] * k
            arr_rank = clean + query
            allowed = replay_allowed(arr_steps, arr_q, arr_rank)[None]
            lg = reference_logits(sd, torch.tensor([arr_ids]), torch.tensor([arr_pos]), allowed, n_heads)[0]
            for t, r in enumerate(query):
                out[b, pos[r] - P] = lg[len(clean) + t]
            start += k
    return out
