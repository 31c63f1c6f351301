"""Layouts: turn tokens + a trajectory into the model's input array (docs/ESOLM.md §4).

Everything starts from a :class:`TokenTable`: a batch of tokens in *trajectory order*
(prompt / clean context left to right, then the completion in σ order), with their ids,
original positions, step indices and validity. A layout is a concatenation of *copies* of
table slots: clean copies (real ids) and query copies (``MASK`` embedding, same position).
A slot's rank is its index in the table, which is all the attention rule needs to know
about order (:mod:`esorl.attention`) – so the array order of the copies never matters.

* (a) exact single pass:  ``[clean copies of all slots | query copies of completion slots]``
* (b) sampler window:     ``[clean copies of step i−1 | query copies of step i]`` + KV cache
* (c) replay, step i:     ``[clean copies of slots with s < i | query copies of step i]``
* (d) diffusion training: one copy per slot, sorted ``[clean | masked]``, masked = queries at step 1
* (e) sequential training: ``[clean copies of all L | query copies of the masked slots]``,
  each masked slot its own step (the table is ``[clean z0 | masked z0 left to right]``)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import TokenDesc


@dataclass
class TokenTable:
    """Tokens in trajectory order; every field ``(B, M)``."""

    ids: torch.Tensor
    positions: torch.Tensor
    steps: torch.Tensor
    valid: torch.Tensor

    @property
    def shape(self):
        return self.ids.shape


@dataclass
class Layout:
    """A model input: ``ids``/``positions`` ``(B, L)``, the attention descriptors, and the
    table slot behind each array slot (``slot``, ``(B, L)``).

    ``causal_prefix``: the first this many slots of every row attend exactly causally among
    themselves under the attention rule (docs/ESOLM.md §4; e.g. the training layouts (d) and
    (e)), so the ``auto`` backend may use a cheaper mask for them; 0 = no such knowledge.
    A layout owns its mask: :meth:`attention_mask` / :meth:`run`.
    """

    ids: torch.Tensor
    positions: torch.Tensor
    desc: TokenDesc
    slot: torch.Tensor
    causal_prefix: int = 0

    def __len__(self) -> int:
        return self.ids.shape[1]

    def attention_mask(self, backend: str = "auto"):
        """The attention rule on this layout: ``attention.CAUSAL`` when the whole layout is
        causal, a :class:`~esorl.attention.PrefixCausalMask` when a prefix is (``auto`` only),
        else :func:`~esorl.attention.build_mask` for ``backend`` (dense bool ``(B, 1, L, L)`` or a
        flex BlockMask). The shortcuts are tested equal to the rule's mask."""
        from .attention import CAUSAL, PrefixCausalMask, build_mask

        if backend == "auto" and self.causal_prefix:
            return CAUSAL if self.causal_prefix >= len(self) else PrefixCausalMask.build(self.desc, self.causal_prefix)
        return build_mask(self.desc, self.desc, backend)

    def run(self, model, backend: str = "auto", **kwargs):
        """``model(ids, positions, mask, **kwargs)`` with this layout's mask (e.g.
        ``logits_slice=``, ``return_hidden=``): the one way a layout meets the model."""
        return model(self.ids, self.positions, self.attention_mask(backend), **kwargs)


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return t.gather(1, idx)


def copies(table: TokenTable, idx: torch.Tensor | slice, is_query, mask_id: int, idx_valid: torch.Tensor | None = None) -> Layout:
    """Copies of the table slots ``idx`` (a slice, or ``(B, n)`` indices).

    ``is_query``: bool, or a ``(B, n)`` bool tensor (one-copy layouts mix both kinds).
    ``idx_valid``: marks padding in a ragged ``idx``.
    """
    B, M = table.shape
    if isinstance(idx, slice):
        idx = torch.arange(M, device=table.ids.device)[idx].expand(B, -1)
    ids, pos, steps, valid = (_gather(t, idx) for t in (table.ids, table.positions, table.steps, table.valid))
    if idx_valid is not None:
        valid = valid & idx_valid
    q = torch.as_tensor(is_query, device=ids.device).expand_as(ids)
    ids = torch.where(q, torch.full_like(ids, mask_id), ids)
    return Layout(ids, pos, TokenDesc(steps, idx, q, valid), idx)


def concat(*parts: Layout) -> Layout:
    desc = parts[0].desc
    for p in parts[1:]:
        desc = desc.cat(p.desc)
    return Layout(
        torch.cat([p.ids for p in parts], 1),
        torch.cat([p.positions for p in parts], 1),
        desc,
        torch.cat([p.slot for p in parts], 1),
    )


def concat_rows(*parts: Layout) -> Layout:
    """Stack layouts of equal length along the batch."""
    d = [p.desc for p in parts]
    return Layout(
        torch.cat([p.ids for p in parts]), torch.cat([p.positions for p in parts]),
        TokenDesc(*(torch.cat(ts) for ts in zip(*(x.astuple() for x in d)))), torch.cat([p.slot for p in parts]),
    )


# ----------------------------------------------------------------------------- tables


def trajectory_table(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    order: torch.Tensor,
    steps: torch.Tensor,
    completion_mask: torch.Tensor | None = None,
) -> TokenTable:
    """Table of a generation: ``[prompt (left-padded, step 0) | completion in σ order]``.

    Args:
        prompt_ids, prompt_mask: ``(B, P)``, prompts left-padded (``prompt_mask`` False on pads).
        completion_ids: ``(B, N)`` in *position* order.
        order: ``(B, N)``, ``order[b, i]`` = completion position revealed i-th (σ).
        steps: ``(B, N)`` step index (≥ 1) of each completion *position*.
        completion_mask: ``(B, N)`` valid completion positions (default: all).

    Original positions: prompt token p of a prompt of length P_b sits at ``p`` (pads
    excluded), completion position j at ``P_b + j``.
    """
    B, P = prompt_ids.shape
    plen = prompt_mask.long().sum(1, keepdim=True)
    ppos = (torch.arange(P, device=prompt_ids.device)[None] - (P - plen)).clamp(min=0)
    cpos = plen + order
    cvalid = torch.ones_like(completion_ids, dtype=torch.bool) if completion_mask is None else completion_mask.bool()
    return TokenTable(
        ids=torch.cat([prompt_ids, completion_ids.gather(1, order)], 1),
        positions=torch.cat([ppos, cpos], 1),
        steps=torch.cat([torch.zeros_like(prompt_ids), steps.gather(1, order)], 1),
        valid=torch.cat([prompt_mask.bool(), cvalid.gather(1, order)], 1),
    )


def sorted_table(ids: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, group: torch.Tensor, key: torch.Tensor):
    """Sort each row by ``(group, key)``; returns the table (steps = group) and the sort index.

    Used by every one-copy layout: e.g. group 0 = clean, 1 = masked, 2 = padding, and key a
    random permutation (shuffle on) or the position (shuffle off).
    """
    L = ids.shape[1]
    # key is a per-row rank in [0, L): combine into one integer sort key.
    sort_idx = torch.argsort(group.long() * (L + 1) + key.long(), dim=1, stable=True)
    g = lambda t: t.gather(1, sort_idx)  # noqa: E731
    return TokenTable(g(ids), g(positions), g(group).long(), g(valid.bool())), sort_idx


# ----------------------------------------------------------------------------- layouts


def exact_layout(table: TokenTable, n_prompt: int, mask_id: int) -> tuple[Layout, slice]:
    """Layout (a): clean copies of all slots, then query copies of the completion slots.

    Returns the layout and the array slice of the query copies (completion in σ order).
    """
    M = table.shape[1]
    lay = concat(copies(table, slice(0, M), False, mask_id), copies(table, slice(n_prompt, M), True, mask_id))
    return lay, slice(M, M + (M - n_prompt))


def replay_layout(table: TokenTable, clean_end: int, q_start: int, q_end: int, mask_id: int) -> tuple[Layout, slice]:
    """Layout (c) for one step: clean copies of slots ``[0, clean_end)`` and query copies of
    slots ``[q_start, q_end)`` (the step's tokens)."""
    lay = concat(copies(table, slice(0, clean_end), False, mask_id), copies(table, slice(q_start, q_end), True, mask_id))
    return lay, slice(clean_end, clean_end + q_end - q_start)


def one_copy_layout(table: TokenTable, is_query: torch.Tensor, mask_id: int) -> Layout:
    """Layouts (d) and the MC estimators: one copy per slot; query slots are MASKs at step 1,
    clean slots step 0 — i.e. plain causal attention over the sorted array."""
    lay = copies(table, slice(0, table.shape[1]), is_query, mask_id)
    lay.desc.step = is_query.long()
    return lay


def sequential_layout(table: TokenTable, mask_id: int) -> tuple[Layout, torch.Tensor, torch.Tensor]:
    """Layout (e): ``table`` holds ``[clean z0 | masked z0 left to right]`` with steps 0 for
    clean slots and 1, 2, ... for the masked ones (one per step). Array: clean copies of all
    slots, then query copies of the masked slots, right-padded to the batch maximum.

    Returns the layout, the query slots' table indices ``(B, Q)`` and their validity.
    """
    B, M = table.shape
    is_masked = (table.steps > 0) & table.valid
    n_masked = is_masked.sum(1)
    Q = int(n_masked.max()) if B else 0
    n_clean = M - n_masked - (~table.valid).sum(1)
    ar = torch.arange(Q, device=table.ids.device)[None]
    q_valid = ar < n_masked[:, None]
    q_idx = (n_clean[:, None] + ar).clamp(max=M - 1)
    lay = concat(copies(table, slice(0, M), False, mask_id), copies(table, q_idx, True, mask_id, idx_valid=q_valid))
    return lay, q_idx, q_valid
