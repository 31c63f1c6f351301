"""The KV-cached sampler with static shapes, replayable as one CUDA graph per step.

Same trajectory, same tokens and log-probs as ``generate(method="cache")`` (docs/ESOLM.md §4 b);
only the bookkeeping differs, so that every decoding step after the first has *the same
shapes* and reads its step index from a device tensor — the conditions for capturing the
step once (``torch.cuda.CUDAGraph``) and replaying it, with no Python, no allocation and no
host-device sync per step.

Why the masks become trivial. In the trajectory table (prompt, then the completion in σ
order) step indices never decrease. Give cache slot ``j`` to table slot ``j``: its clean
copy once known, its query copy (scratch) during its own step ``i`` (table slots
``[q0, q1)``). Then rules 1–4 of docs/ESOLM.md §4, for any slot ``j`` of the window, allow exactly
the cache slots ``k ≤ j``: a clean ``j`` sees the clean ``k ≤ j``; a query ``j`` sees the
clean ``k < q0`` (``s_k < i``) and the queries ``q0 ≤ k ≤ j`` (same step, rank ≤). The mask
is "causal in table order, minus the prompt's left padding" — a function of the slot index;
the step computes it from the rule itself (:func:`esorl.attention.rule`, the one statement
of it), with each slot's step and rank.

The static window of step ``i ≥ 1`` is the ``W`` table slots ending at ``q1`` (or the first
``W`` if ``q1 < W``), ``W = max_i (k_{i−1} + k_i)``: it always covers the previous step's
clean copies (whose query scratch it overwrites) and this step's queries. Older clean copies
it also covers are recomputed from the same inputs (same values); slots past ``q1`` are
written with junk that no real row can see (``k ≤ j < q1``) and is overwritten in their own
step. Logits are computed for ``Kmax = max_i k_i`` slots; picks past ``k_i`` go to a sink
column. Attention reads the first ``kv_len`` cache slots, rounded up to a bucket of
``bucket`` slots (one graph per bucket), so early steps do not pay for the whole cache.

The first step (prompt + first queries) runs eagerly. On CPU, or with ``cuda_graphs=False``,
every step runs eagerly through the same function (this is what the CPU tests check against
the reference samplers).
"""

from __future__ import annotations

import torch

from .attention import rule
from .kv_cache import StaticKVCache
from .modeling_esolm import model_config
from .logprobs import filter_logprobs, gather, model_logprobs, sample_inverse_cdf


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


class _State:
    """Static buffers of one generation (all on the model's device)."""

    def __init__(self, table, sizes, P, N, u_sigma, forced_sigma, mask_id, cache):
        dev = table.ids.device
        B, C = table.ids.shape
        self.B, self.C, self.P, self.N = B, C, P, N
        kmax = max(sizes)
        # ids with a sink column (C) for the padded picks; the window gathers from it
        self.ids = torch.cat([table.ids, torch.full((B, 1), mask_id, dtype=table.ids.dtype, device=dev)], 1)
        self.pos = table.positions.contiguous()
        self.key_ok = table.valid.contiguous()
        # log-probs in σ order, with a sink column (N)
        self.lp_m = torch.zeros(B, N + 1, dtype=torch.float64, device=dev)
        self.lp_b = torch.zeros_like(self.lp_m)
        pad = lambda t, v: torch.cat([t, torch.full((B, kmax), v, dtype=t.dtype, device=dev)], 1)  # noqa: E731
        self.u = pad(u_sigma.to(torch.float64), 0.5)
        self.forced = None if forced_sigma is None else pad(forced_sigma, 0)
        # per-step scalars: window start, q0, q1, number of completion tokens before the step
        rows, c = [], 0
        self.W = max((sizes[i - 1] + sizes[i] for i in range(1, len(sizes))), default=1)
        for i, k in enumerate(sizes):
            q0, q1 = P + c, P + c + k
            start = 0 if i == 0 else max(0, q1 - self.W)
            rows.append((start, q0, q1, c))
            c += k
        self.rows = rows
        self.sched = torch.tensor(rows, dtype=torch.long, device=dev)
        # the step of each table slot (prompt 0, then 1..K): the attention rule's s
        self.slot_step = torch.repeat_interleave(torch.arange(len(sizes) + 1, device=dev), torch.tensor([P, *sizes], device=dev))
        self.i = torch.zeros((), dtype=torch.long, device=dev)  # the step a replay runs
        self.mask_id = mask_id
        self.cache = cache


def _step(model, st: _State, W: int, kmax: int, kv_len: int, temperature: float, top_k: int, top_p: float) -> None:
    """One decoding step, shapes fixed by ``(W, kmax, kv_len)``, the step index read from
    ``st.i`` (and advanced): everything here may be captured in a CUDA graph."""
    dev = st.ids.device
    start, q0, q1, c0 = st.sched.index_select(0, st.i.view(1))[0].unbind()
    slots = start + torch.arange(W, device=dev)  # (W,) table = cache slots of the window
    is_q = (slots >= q0) & (slots < q1)
    ids = torch.where(is_q, st.mask_id, st.ids.index_select(1, slots))
    pos = st.pos.index_select(1, slots)
    kidx = torch.arange(kv_len, device=dev)
    # the attention rule (docs/ESOLM.md §4) with rank = table slot and the cache slots of this
    # step's queries holding their query copies; it comes out as causal in table order (module
    # docstring). A row always sees itself (left padding would leave a pad row with no key:
    # its output is never read, but must stay finite)
    # (steps, ranks and copy kinds are the batch's: the rule runs on (W, kv_len); validity is per row)
    k_query = (kidx >= q0) & (kidx < q1)
    allow = rule(st.slot_step.index_select(0, slots)[:, None], slots[:, None], is_q[:, None], st.slot_step[:kv_len], kidx, k_query, True)
    allow = (allow & st.key_ok[:, None, :kv_len]) | (kidx == slots[:, None])
    # additive mask in the attention dtype, built once per step (a boolean mask would be
    # converted by every layer's attention call)
    # (the first step runs before the cache knows the attention dtype: a boolean mask there)
    bias = allow if st.cache.dtype is None else torch.zeros(allow.shape, dtype=st.cache.dtype, device=dev).masked_fill_(~allow, float("-inf"))
    st.cache.slots, st.cache.kv_len = slots, kv_len
    ar = torch.arange(kmax, device=dev)
    qsel = (q0 - start + ar).clamp(max=W - 1)  # window slots of this step's queries (+ padding)
    logits = model(ids, pos, bias[:, None], cache=st.cache, logits_slice=qsel)
    live = ar < (q1 - q0)
    u = st.u.index_select(1, c0 + ar)
    lp_model = model_logprobs(logits, temperature)
    lp_beh = filter_logprobs(lp_model, top_k, top_p)
    tok = sample_inverse_cdf(lp_beh, u) if st.forced is None else st.forced.index_select(1, c0 + ar)
    st.ids.index_copy_(1, torch.where(live, q0 + ar, st.C), tok)
    dest = torch.where(live, c0 + ar, st.N)
    st.lp_m.index_copy_(1, dest, gather(lp_model, tok).to(torch.float64))
    st.lp_b.index_copy_(1, dest, gather(lp_beh, tok).to(torch.float64))
    st.i += 1


def static_decode(model, table, sizes: list[int], P: int, N: int, u_sigma: torch.Tensor, temperature: float, top_k: int,
                  top_p: float, forced_sigma: torch.Tensor | None = None, cuda_graphs: bool | None = None, bucket: int = 256):
    """Run every step of the trajectory over ``table`` (prompt + MASK placeholders in σ order).

    Returns ``(ids (B, N), logp_model (B, N), logp_behaviour (B, N))``, all in σ order.
    ``cuda_graphs``: capture and replay the steps after the first (default: on CUDA, except
    under DeepSpeed ZeRO-3, whose module hooks must run every step).
    ``bucket``: attention reads the cache in multiples of this many slots (one graph each).
    """
    cfg = model_config(model)
    dev = table.ids.device
    B, C = table.ids.shape
    if bucket < 1:
        raise ValueError(f"bucket must be >= 1, got {bucket}")
    cache = StaticKVCache(cfg, B, C, dev)
    st = _State(table, sizes, P, N, u_sigma, forced_sigma, cfg.mask_token_id, cache)
    # DeepSpeed ZeRO-3 keeps forward hooks on the modules (parameter fetch/release, possibly
    # collectives): they must run on every forward, which a replayed graph would skip
    from .distributed import is_partitioned

    zero3 = is_partitioned(model)
    use_graphs = (dev.type == "cuda" and not zero3) if cuda_graphs is None else cuda_graphs
    if use_graphs and dev.type != "cuda":
        raise ValueError("cuda_graphs=True needs the model on a CUDA device")
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    # step 0: the prompt and the first queries, eagerly (its shape is its own)
    _step(model, st, st.rows[0][2], sizes[0], st.rows[0][2], **kw)
    if len(sizes) > 1:
        W, kmax = st.W, max(sizes[1:])
        # steps grouped by the cache length they need (non-decreasing): one graph per group
        groups: list[tuple[int, int]] = []  # (kv_len, number of steps)
        for start, q0, q1, c in st.rows[1:]:
            kv = min(C, _round_up(max(q1, start + W), bucket))
            if groups and groups[-1][0] == kv:
                groups[-1] = (kv, groups[-1][1] + 1)
            else:
                groups.append((kv, 1))
        pool = torch.cuda.graph_pool_handle() if use_graphs else None
        for kv, n in groups:
            run = lambda: _step(model, st, W, kmax, kv, **kw)  # noqa: E731
            if not use_graphs or n < 3:
                for _ in range(n):
                    run()
                continue
            # the group's first step runs eagerly on a side stream (warm-up: kernels pick
            # their workspaces outside the capture), then the step is captured once and
            # replayed for the rest of the group
            side = torch.cuda.Stream(device=dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                run()
            torch.cuda.current_stream(dev).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                run()
            for _ in range(n - 1):
                graph.replay()
    return st.ids[:, P:C], st.lp_m[:, :N], st.lp_b[:, :N]
