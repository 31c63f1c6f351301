"""The hybrid AR + MDM training objective of Eso-LMs (docs/ESOLM.md §5).

``loss = AR term + MDM term``. The global batch is split: samples with global index
``g < int(κ·G)`` get the MDM term (layout (d)), the others the AR term (layout (e)). Each
term's sum is divided by the number of valid tokens of its own *global* sub-batch, so the
sum estimates NELBO / L and the loss does not depend on how the batch is sharded.

All randomness (``t``, ``z0``/``z_t`` masks, shuffles) is drawn from a generator keyed by
``(seed, step, global sample index)``: the loss of a sample is the same on 1 or 8 ranks.

Prompts (SFT, docs/ESOLM.md §4/§7): an optional ``prompt_mask`` marks tokens that are clean context at
step 0 in both terms. They are never masked and never scored, sit first in the array, left
to right, before the other clean tokens (whatever the shuffle flags), and the normalisation
counts only the valid completion (non-prompt) tokens. Without a prompt mask the layouts and
the loss are bit-identical to the prompt-free objective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .modeling_esolm import model_config
from .attention import TokenDesc
from .layout import Layout, concat, concat_rows, one_copy_layout, sequential_layout, sorted_table
from .schedule import EPS, Stream, alpha, make_generator



@dataclass
class ObjectiveConfig:
    """Fields of the hybrid objective.

    alpha0: clean fraction of ``z0`` (0 = pure AR, 1 = pure MDM).
    batch_split: κ, the MDM share of the global batch.
    diffusion_shuffle: random order inside the clean and the masked part of layout (d)
        (Eso-LM (B) needs it on); off = left to right.
    sequential_shuffle: random order of ``z0``'s clean tokens in layout (e).
    mdm_weighting: ``elbo`` (``α0(1−ε)/(1−α_t)`` per masked token) or ``low_var`` (unweighted
        ``−log p``, used by the reference for pure MDM training). Evaluation always uses ELBO.
    """

    alpha0: float = 0.125
    batch_split: float = 0.5
    diffusion_shuffle: bool = True
    sequential_shuffle: bool = True
    mdm_weighting: str = "elbo"

    def validate(self) -> None:
        if not 0.0 <= self.alpha0 <= 1.0:
            raise ValueError(f"objective.alpha0 must be in [0, 1], got {self.alpha0}")
        if not 0.0 <= self.batch_split <= 1.0:
            raise ValueError(f"objective.batch_split must be in [0, 1], got {self.batch_split}")
        if self.mdm_weighting not in ("elbo", "low_var"):
            raise ValueError(f"objective.mdm_weighting must be 'elbo' or 'low_var', got {self.mdm_weighting!r}")
        if self.alpha0 >= 1.0 and self.batch_split < 1.0:
            raise ValueError(
                "objective: alpha0 = 1 leaves no token to the AR phase, so batch_split < 1 would silently "
                f"drop the AR share of the batch (batch_split={self.batch_split}); use batch_split = 1 for pure MDM"
            )
        if self.alpha0 <= 0.0 and self.batch_split > 0.0:
            raise ValueError(f"objective: alpha0 = 0 is pure AR; the MDM term would be empty – set batch_split = 0 (got {self.batch_split})")


@dataclass
class LossOutput:
    loss: torch.Tensor  # local contribution: (mdm_sum / mdm_count + ar_sum / ar_count), global counts
    mdm_sum: torch.Tensor
    ar_sum: torch.Tensor
    mdm_tokens: torch.Tensor  # valid tokens in the (global) MDM sub-batch used for normalising
    ar_tokens: torch.Tensor
    masked_tokens: torch.Tensor  # local number of masked (scored) tokens


# sort groups of the one-copy layouts: prompt (left to right), clean, masked, padding
_G_PROMPT, _G_CLEAN, _G_MASKED, _G_PAD = 0, 1, 2, 3


def _split_prompt(valid: torch.Tensor, prompt_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prompt, completion)`` bool masks ``(B, L)``: prompt tokens are valid tokens the mask
    marks; completion tokens are the other valid tokens (the only ones that can be scored)."""
    if prompt_mask is None:
        return torch.zeros_like(valid), valid
    if prompt_mask.shape != valid.shape:
        raise ValueError(f"prompt_mask has shape {tuple(prompt_mask.shape)}, expected {tuple(valid.shape)} (that of input_ids)")
    prompt = prompt_mask.to(valid.device).bool() & valid
    return prompt, valid & ~prompt


def _groups(valid: torch.Tensor, prompt: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Sort group per slot. Without a prompt this is the old ``clean 0 / masked 1 / pad 2``
    shifted by one, which gives the same (stable) sort."""
    return torch.where(~valid, _G_PAD, torch.where(prompt, _G_PROMPT, _G_CLEAN + masked.long()))


def _per_sample_noise(seed: int, step: int, gidx: torch.Tensor, L: int):
    """Uniforms for one sample each: ``(t_offset (B,), mask_u (B, L), shuffle (B, L))``."""
    r, mu, sh = [], [], []
    for g in gidx.tolist():
        gen = make_generator(seed, Stream.TRAIN, step, g)
        r.append(torch.rand(1, generator=gen, dtype=torch.float64))
        mu.append(torch.rand(L, generator=gen, dtype=torch.float64))
        sh.append(torch.rand(L, generator=gen, dtype=torch.float64))
    return torch.cat(r), torch.stack(mu), torch.stack(sh)


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``−log p(target)`` per token; ``logits`` is ``targets.shape + (vocab,)``."""
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none").view(targets.shape)


def _mdm_layout(x, valid, t, mask_u, shuffle_u, cfg: ObjectiveConfig, weighting: str, mask_id: int, prompt_mask=None):
    """Layout (d) of the MDM rows: ``(layout, targets (B, L), scored (B, L), weight (B,))``.

    Array order: ``[prompt left to right | clean completion | masked completion | padding]``."""
    B, L = x.shape
    dev = x.device
    prompt, comp = _split_prompt(valid, prompt_mask)
    a_t = alpha(t, cfg.alpha0).to(dev)  # (B,)
    masked = (mask_u.to(dev) >= a_t[:, None]) & comp  # keep with probability α_t; prompts always clean
    pos = torch.arange(L, device=dev).expand(B, L)
    group = _groups(valid, prompt, masked)
    key = shuffle_u.to(dev).argsort(1).argsort(1) if cfg.diffusion_shuffle else pos
    key = torch.where(prompt, pos, key)  # the prompt stays left to right
    table, _ = sorted_table(x, pos, valid, group, key)
    is_q = table.steps == _G_MASKED
    lay = one_copy_layout(table, is_q, mask_id)
    w = cfg.alpha0 * (1 - EPS) / (1 - a_t) if weighting == "elbo" else torch.ones_like(a_t)
    return lay, table.ids, is_q, w


def _ar_layout(x, valid, mask_u, shuffle_u, cfg: ObjectiveConfig, mask_id: int, prompt_mask=None):
    """Layout (e) of the AR rows: ``(layout, targets (B, Q), scored (B, Q), first query slot)``.

    Table order: ``[prompt left to right | clean z0 | masked z0 left to right | padding]``."""
    B, L = x.shape
    dev = x.device
    prompt, comp = _split_prompt(valid, prompt_mask)
    masked = (mask_u.to(dev) >= cfg.alpha0) & comp  # z0 keeps each token with probability α0; prompts always clean
    pos = torch.arange(L, device=dev).expand(B, L)
    group = _groups(valid, prompt, masked)
    clean_key = shuffle_u.to(dev).argsort(1).argsort(1) if cfg.sequential_shuffle else pos
    key = torch.where(masked | prompt, pos, clean_key)  # masked tokens and the prompt always left to right
    table, _ = sorted_table(x, pos, valid, group, key)
    is_m = table.steps == _G_MASKED
    table.steps = torch.where(is_m, is_m.long().cumsum(1), torch.zeros_like(table.steps))
    lay, q_idx, q_valid = sequential_layout(table, mask_id)
    return lay, table.ids.gather(1, q_idx), q_valid, table.shape[1]


def mdm_term(model, x, valid, t, mask_u, shuffle_u, cfg: ObjectiveConfig, weighting: str, backend="auto", prompt_mask=None):
    """Weighted MDM sum per sample ``(B,)`` and masked counts, with layout (d); ``prompt_mask``
    tokens are clean context at step 0 (never masked or scored)."""
    lay, tgt, is_q, w = _mdm_layout(x, valid, t, mask_u, shuffle_u, cfg, weighting, model_config(model).mask_token_id, prompt_mask)
    # Layout (d) sorted [prompt | clean (step 0) | masked (step 1) | padding] is plain causal
    # attention for every valid slot (rules 1-3 allow exactly the slots before it; padding
    # comes last), so it needs no mask tensor (tested against the rule's mask).
    lay.causal_prefix = len(lay)
    # the LM head runs on the masked slots only (about half the array, and the logits are
    # the largest activation of the step)
    nll = _nll(lay.run(model, backend, logits_slice=is_q), tgt[is_q])
    per_sample = torch.zeros(x.shape[0], dtype=nll.dtype, device=nll.device).index_add_(0, is_q.nonzero()[:, 0], nll)
    return per_sample * w.to(nll.dtype), is_q.sum()


def ar_term(model, x, valid, mask_u, shuffle_u, cfg: ObjectiveConfig, backend="auto", prompt_mask=None):
    """AR sum per sample ``(B,)`` over the masked tokens of ``z0``, with layout (e);
    ``prompt_mask`` tokens are clean context at step 0 (never masked or scored)."""
    lay, tgt, q_valid, M = _ar_layout(x, valid, mask_u, shuffle_u, cfg, model_config(model).mask_token_id, prompt_mask)
    # the M clean copies come first in table order (padding last): causal among themselves
    lay.causal_prefix = M
    logits = lay.run(model, backend, logits_slice=slice(M, None))
    nll = _nll(logits, tgt) * q_valid
    return nll.sum(1), q_valid.sum()


def _pad_layout(lay: Layout, length: int, mask_id: int) -> Layout:
    """Right-pad a layout with invalid slots (never attended, outputs unused)."""
    extra = length - len(lay)
    if extra == 0:
        return lay
    B, dev = lay.ids.shape[0], lay.ids.device
    z = torch.zeros(B, extra, dtype=torch.long, device=dev)
    f = torch.zeros(B, extra, dtype=torch.bool, device=dev)
    pad = Layout(z + mask_id, z, TokenDesc(z, z, f, f), z)
    return concat(lay, pad)


def _fused_terms(model, x_m, v_m, t, mu_m, sh_m, x_a, v_a, mu_a, sh_a, cfg, weighting, backend, p_m=None, p_a=None):
    """Both terms from ONE forward: layouts (d) and (e) padded to one length and stacked.

    DDP and DeepSpeed expect one forward per backward on every rank (DDP broadcasts buffers
    and ZeRO-3 gathers parameters collectively in each forward), whatever the rank's MDM/AR
    mix; two forwards would deadlock or desynchronise ranks with different mixes.
    """
    mask_id = model_config(model).mask_token_id
    lm, tm, qm, w = _mdm_layout(x_m, v_m, t, mu_m, sh_m, cfg, weighting, mask_id, p_m)
    la, ta, qa, M = _ar_layout(x_a, v_a, mu_a, sh_a, cfg, mask_id, p_a)
    n = max(len(lm), len(la))
    lay = concat_rows(_pad_layout(lm, n, mask_id), _pad_layout(la, n, mask_id))
    bm, ba = x_m.shape[0], x_a.shape[0]
    # both kinds of rows start with L slots that attend causally: layout (d) entirely, layout
    # (e) its clean copies (padding last in both); only the rest needs a mask
    L = x_m.shape[1] if bm else x_a.shape[1]
    lay.causal_prefix = L
    # scored slots of both kinds of rows; the LM head runs on these only
    sel = torch.zeros(bm + ba, n, dtype=torch.bool, device=lay.ids.device)
    tgt = torch.zeros(bm + ba, n, dtype=torch.long, device=lay.ids.device)
    sel[:bm, : tm.shape[1]], tgt[:bm, : tm.shape[1]] = qm, tm
    sel[bm:, M : M + ta.shape[1]], tgt[bm:, M : M + ta.shape[1]] = qa, ta
    nll = _nll(lay.run(model, backend, logits_slice=sel), tgt[sel])
    rows = sel.nonzero()[:, 0]
    is_m = rows < bm
    w_tok = w.to(nll.dtype)[rows.clamp(max=max(bm - 1, 0))] if bm else torch.zeros_like(nll)
    return (nll * w_tok * is_m).sum(), qm.sum(), (nll * ~is_m).sum(), qa.sum()


def hybrid_loss(
    model,
    input_ids: torch.Tensor,
    valid: torch.Tensor,
    cfg: ObjectiveConfig,
    seed: int,
    step: int,
    global_index: torch.Tensor,
    global_batch_size: int,
    global_valid_counts: tuple[float, float] | None = None,
    eval_weights: bool = False,
    backend: str = "auto",
    single_forward: bool = False,
    prompt_mask: torch.Tensor | None = None,
) -> LossOutput:
    """The hybrid loss of a (local shard of a) global batch.

    Args:
        input_ids, valid: ``(B, L)`` tokens and their validity (False on padding).
        global_index: ``(B,)`` index of each sample in the global batch ``[0, G)``.
        global_batch_size: ``G``; the first ``int(κ·G)`` global samples get the MDM term.
        global_valid_counts: ``(mdm_tokens, ar_tokens)`` of the global batch for normalising:
            valid *completion* (non-prompt) tokens of each global sub-batch; default: this
            shard's counts (single process).
        eval_weights: use ELBO weights whatever ``cfg.mdm_weighting`` (evaluation / NELBO).
        single_forward: compute both terms in one forward (padded); required under DDP /
            DeepSpeed, where every rank must run the same forwards. Same numbers.
        prompt_mask: optional ``(B, L)`` bool, True on prompt tokens (SFT). Prompt tokens are
            clean context at step 0 in both terms: never masked, never scored, first in the
            array left to right (before the other clean tokens, whatever the shuffle flags);
            each term is divided by its sub-batch's number of valid non-prompt tokens. The
            prompt should be a prefix of the row (positions are array indices). ``None`` (or
            all False) gives exactly the prompt-free loss.
    """
    B, L = input_ids.shape
    dev = input_ids.device
    valid = valid.bool()
    _, scored = _split_prompt(valid, prompt_mask)
    pm = None if prompt_mask is None else prompt_mask.to(dev).bool()
    sub = (lambda idx: None) if pm is None else (lambda idx: pm[idx])  # noqa: E731
    n_mdm = int(cfg.batch_split * global_batch_size)
    is_mdm = global_index.to(dev) < n_mdm
    r, mask_u, shuffle_u = _per_sample_noise(seed, step, global_index, L)
    # antithetic (stratified) t over the global MDM sub-batch: one stratum per sample
    u = (global_index.double() + r) / max(n_mdm, 1)
    t = (1 - EPS) * u + EPS
    zero = torch.zeros((), device=dev)
    mdm_sum = ar_sum = zero
    masked = torch.zeros((), device=dev, dtype=torch.long)
    mdm_idx, ar_idx = is_mdm.nonzero().flatten(), (~is_mdm).nonzero().flatten()
    w = "elbo" if eval_weights else cfg.mdm_weighting
    if single_forward:
        mc, ac = mdm_idx.cpu(), ar_idx.cpu()
        mdm_sum, mm, ar_sum, am = _fused_terms(
            model, input_ids[mdm_idx], valid[mdm_idx], t[mc], mask_u[mc], shuffle_u[mc],
            input_ids[ar_idx], valid[ar_idx], mask_u[ac], shuffle_u[ac], cfg, w, backend, sub(mdm_idx), sub(ar_idx),
        )
        masked = mm + am
    elif mdm_idx.numel():
        s, m = mdm_term(model, input_ids[mdm_idx], valid[mdm_idx], t[mdm_idx.cpu()], mask_u[mdm_idx.cpu()], shuffle_u[mdm_idx.cpu()], cfg, w, backend, sub(mdm_idx))
        mdm_sum, masked = s.sum(), masked + m
    if not single_forward and ar_idx.numel():
        s, m = ar_term(model, input_ids[ar_idx], valid[ar_idx], mask_u[ar_idx.cpu()], shuffle_u[ar_idx.cpu()], cfg, backend, sub(ar_idx))
        ar_sum, masked = s.sum(), masked + m
    if global_valid_counts is None:
        global_valid_counts = (float(scored[is_mdm].sum()), float(scored[~is_mdm].sum()))
    mdm_n, ar_n = global_valid_counts
    loss = (mdm_sum / mdm_n if mdm_n > 0 else zero) + (ar_sum / ar_n if ar_n > 0 else zero)
    return LossOutput(loss, mdm_sum, ar_sum, torch.tensor(mdm_n), torch.tensor(ar_n), masked)
