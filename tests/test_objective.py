"""The hybrid objective (docs/ESOLM.md §5)."""

import pytest
import torch

from esorl.attention import build_mask
from esorl.layout import exact_layout, trajectory_table
from esorl.objective import ObjectiveConfig, hybrid_loss

from conftest import tiny_model


def _batch(B=6, L=12, seed=0, pad=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(5, 39, (B, L), generator=g)
    v = torch.ones(B, L, dtype=torch.bool)
    if pad:
        v[1, -4:] = False
    return x, v


def test_alpha0_zero_is_left_to_right_ar():
    """α0 = 0, κ = 0: the loss is the AR NLL replayed one token per step (layout (a))."""
    model = tiny_model()
    x, v = _batch(pad=False)
    B, L = x.shape
    out = hybrid_loss(model, x, v, ObjectiveConfig(alpha0=0.0, batch_split=0.0), 1, 0, torch.arange(B), B, backend="sdpa")
    total = 0.0
    with torch.no_grad():
        for j in range(L):
            tab = trajectory_table(x[:, :j], torch.ones(B, j, dtype=torch.bool), x[:, j:j + 1], torch.zeros(B, 1, dtype=torch.long), torch.ones(B, 1, dtype=torch.long))
            lay, qs = exact_layout(tab, j, 39)
            lg = model(lay.ids, lay.positions, build_mask(lay.desc, lay.desc, "sdpa"), logits_slice=qs)
            total += torch.log_softmax(lg, -1)[:, 0].gather(1, x[:, j:j + 1]).sum()
    assert out.mdm_tokens == 0
    assert torch.allclose(out.loss, -total / (B * L), atol=1e-10)


def test_alpha0_one_is_mdm_only_and_weights():
    model = tiny_model()
    x, v = _batch()
    B = len(x)
    elbo = hybrid_loss(model, x, v, ObjectiveConfig(alpha0=1.0, batch_split=1.0), 2, 0, torch.arange(B), B, backend="sdpa")
    lowv = hybrid_loss(model, x, v, ObjectiveConfig(alpha0=1.0, batch_split=1.0, mdm_weighting="low_var"), 2, 0, torch.arange(B), B, backend="sdpa")
    assert elbo.ar_sum == 0 and elbo.ar_tokens == 0 and elbo.masked_tokens > 0
    assert torch.allclose(elbo.loss, elbo.mdm_sum / v.sum())
    assert elbo.loss > lowv.loss > 0  # ELBO weights 1/t ≥ 1 scale every masked token up


def test_batch_split_and_shard_invariance():
    """The loss of the global batch equals the sum of shard losses with global counts: the
    number of ranks cannot change it (docs/ESOLM.md §5 / distributed training)."""
    model = tiny_model()
    x, v = _batch(B=8)
    cfg = ObjectiveConfig(alpha0=0.25, batch_split=0.5)
    full = hybrid_loss(model, x, v, cfg, 3, 7, torch.arange(8), 8, backend="sdpa")
    is_mdm = torch.arange(8) < 4
    counts = (float(v[is_mdm].sum()), float(v[~is_mdm].sum()))
    parts = [hybrid_loss(model, x[i::2], v[i::2], cfg, 3, 7, torch.arange(8)[i::2], 8, counts, backend="sdpa").loss for i in range(2)]
    assert torch.allclose(full.loss, sum(parts), atol=1e-12)
    assert full.mdm_tokens == counts[0] and full.ar_tokens == counts[1]


def test_padding_is_ignored():
    model = tiny_model()
    x, v = _batch()
    cfg = ObjectiveConfig(alpha0=0.25, batch_split=0.5)
    a = hybrid_loss(model, x, v, cfg, 4, 0, torch.arange(6), 6, backend="sdpa")
    x2 = x.clone()
    x2[~v] = 7  # different ids on padding
    b = hybrid_loss(model, x2, v, cfg, 4, 0, torch.arange(6), 6, backend="sdpa")
    assert torch.allclose(a.loss, b.loss, atol=1e-12)


def test_config_validation():
    with pytest.raises(ValueError, match="silently"):
        ObjectiveConfig(alpha0=1.0, batch_split=0.5).validate()
    with pytest.raises(ValueError, match="alpha0"):
        ObjectiveConfig(alpha0=1.2).validate()
    with pytest.raises(ValueError, match="mdm_weighting"):
        ObjectiveConfig(mdm_weighting="x").validate()


def test_single_forward_gives_the_same_loss():
    model = tiny_model()
    x, v = _batch(B=8)
    for a0, k in ((0.25, 0.5), (0.25, 0.25), (1.0, 1.0), (0.0, 0.0)):
        cfg = ObjectiveConfig(alpha0=a0, batch_split=k)
        a = hybrid_loss(model, x, v, cfg, 3, 1, torch.arange(8), 8, backend="sdpa")
        b = hybrid_loss(model, x, v, cfg, 3, 1, torch.arange(8), 8, backend="sdpa", single_forward=True)
        assert torch.allclose(a.loss, b.loss, atol=1e-12) and a.masked_tokens == b.masked_tokens


def test_training_layouts_causal_paths_give_the_same_loss():
    """Layout (d) — [prompt | clean | masked | padding] — allows every valid slot exactly the
    slots before it, and so do layout (e)'s clean copies, so ``backend="auto"`` runs them as
    causal attention (plus a mask for (e)'s query copies): the same loss and gradients as the
    rule's dense mask, with and without prompts, in two forwards or one."""
    from esorl.objective import _mdm_layout
    from esorl.schedule import EPS

    model = tiny_model()
    x, v = _batch(B=6, L=14, seed=3)
    pm = torch.zeros_like(v)
    pm[:3, :4] = True  # prompts on half of the rows
    g = torch.Generator().manual_seed(1)
    cfg = ObjectiveConfig(alpha0=1.0, batch_split=1.0)
    t = (1 - EPS) * torch.rand(6, generator=g, dtype=torch.float64) + EPS
    lay, _, _, _ = _mdm_layout(x, v, t, torch.rand(6, 14, generator=g, dtype=torch.float64),
                               torch.rand(6, 14, generator=g, dtype=torch.float64), cfg, "elbo", 40, pm)
    dense = build_mask(lay.desc, lay.desc, "sdpa")[:, 0]
    causal = torch.ones(14, 14, dtype=torch.bool).tril()
    rows = lay.desc.valid
    assert torch.equal(dense[rows], causal.expand(6, 14, 14)[rows])
    # layout (e): its clean copies (the first L slots) are causal too — the prefix-causal
    # split (flash for the prefix, a mask for the query copies) equals the rule's mask
    from esorl.objective import _ar_layout

    lay_e, _, _, M = _ar_layout(x, v, torch.rand(6, 14, generator=g, dtype=torch.float64),
                                torch.rand(6, 14, generator=g, dtype=torch.float64), ObjectiveConfig(alpha0=0.25), 40, pm)
    dense_e = build_mask(lay_e.desc, lay_e.desc, "sdpa")[:, 0, :M]
    rows_e = lay_e.desc.valid[:, :M]
    assert torch.equal(dense_e[rows_e], torch.ones(M, len(lay_e), dtype=torch.bool).tril().expand(6, M, -1)[rows_e])
    cases = [(a0, k, p, f) for a0, k in ((1.0, 1.0), (0.25, 0.5), (0.0, 0.0)) for p in (None, pm) for f in (False, True)]
    for a0, k, p, fused in cases:
        cfg = ObjectiveConfig(alpha0=a0, batch_split=k)
        losses, grads = [], []
        for backend in ("auto", "sdpa"):
            model.zero_grad()
            out = hybrid_loss(model, x, v, cfg, 5, 2, torch.arange(6), 6, backend=backend, prompt_mask=p, single_forward=fused)
            out.loss.backward()
            losses.append(out.loss.detach())
            grads.append(torch.cat([q.grad.flatten() for q in model.parameters() if q.grad is not None]))
        assert torch.allclose(losses[0], losses[1], atol=1e-12)
        assert torch.allclose(grads[0], grads[1], atol=1e-10)
