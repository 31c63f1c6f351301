"""Gradient checkpointing of the Eso-LM blocks (the ``transformers`` API TRL and ``Trainer``
call): the same parameter gradients as without it, under every mask kind a training or
scoring forward uses (dense Eso-LM mask of layout (a), ``CAUSAL`` and ``PrefixCausalMask``
of the hybrid objective), reentrant and not, with dropout, under bf16 autocast; and it stays
out of the way where it must (no_grad, a KV cache, after disabling); in eval mode with
gradients on (RL's loss passes, dropout off) it recomputes too."""

from __future__ import annotations

import pytest
import torch

from esorl.attention import FULL, build_mask
from esorl.likelihood import exact
from esorl.kv_cache import EsoKVCache
from esorl.objective import ObjectiveConfig, hybrid_loss
from esorl.rollout import Rollout
from esorl.schedule import ScheduleConfig

from conftest import random_prompts, tiny_model

REENTRANT = [pytest.param(True, id="reentrant"), pytest.param(False, id="non_reentrant")]


def _rollout(model, B=3, N=10, seed=0) -> Rollout:
    gen = torch.Generator().manual_seed(seed)
    pid, pm = random_prompts(B, 5, model.config.vocab_size, gen)
    traj = ScheduleConfig(alpha0=0.5, num_steps=4).sample(B, N, gen)
    comp = torch.randint(5, model.config.vocab_size - 1, (B, N), generator=gen)
    return Rollout.from_tokens(pid, pm, comp, traj)


def exact_loss(model):
    """``-Σ log p`` of a trajectory via ``likelihood.exact``: layout (a), dense Eso-LM mask."""
    lp, valid = exact(model, _rollout(model), backend="sdpa")
    return -(lp * valid).sum()


def hybrid(model, single_forward=False):
    """The hybrid objective (``auto`` backend: ``CAUSAL`` for layout (d), ``PrefixCausalMask``
    for layout (e); one padded ``PrefixCausalMask`` forward with ``single_forward``)."""
    gen = torch.Generator().manual_seed(1)
    B, L = 4, 12
    x = torch.randint(5, model.config.vocab_size - 1, (B, L), generator=gen)
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[1, 9:] = False
    out = hybrid_loss(model, x, valid, ObjectiveConfig(alpha0=0.25, batch_split=0.5), 3, 0, torch.arange(B), B, single_forward=single_forward)
    return out.loss


LOSSES = {"exact": exact_loss, "hybrid": hybrid, "hybrid_1f": lambda m: hybrid(m, single_forward=True)}


def grads(model, loss_fn, seed=0, autocast=None):
    """Parameter gradients ``{name: tensor}`` of one forward + backward in training mode."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # dropout
    ctx = torch.autocast("cpu", dtype=autocast) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        loss = loss_fn(model)
    loss.backward()
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert len(out) == len(list(model.parameters())), "every parameter gets a gradient"
    return out


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def spy(model) -> list:
    """Count the calls of the blocks' checkpoint functions (set by gradient_checkpointing_enable)."""
    calls = []
    for block in model.blocks:
        f = block._gradient_checkpointing_func

        def counted(*a, _f=f, **k):
            calls.append(1)
            return _f(*a, **k)

        block._gradient_checkpointing_func = counted
    return calls


def saved_bytes(model, loss_fn) -> int:
    """Bytes of the tensors autograd keeps for the backward of one forward."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_fn(model)
    return total[0]


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("reentrant", REENTRANT)
def test_same_gradients_float64(loss, reentrant):
    model = tiny_model(layers=3)
    ref = grads(model, LOSSES[loss])
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    calls = spy(model)
    got = grads(model, LOSSES[loss])
    assert len(calls) >= 3  # every block went through the checkpoint
    assert max_diff(ref, got) < 1e-6
    assert max(float(g.abs().max()) for g in ref.values()) > 1e-3  # not trivially zero


@pytest.mark.parametrize("reentrant", REENTRANT)
def test_same_gradients_with_dropout(reentrant):
    """Dropout is replayed in the recomputation (the checkpoint restores the RNG state)."""
    model = tiny_model(layers=3)
    for b in model.blocks:
        b.dropout = 0.3
    ref = grads(model, hybrid, seed=5)
    other = grads(model, hybrid, seed=6)
    assert max_diff(ref, other) > 1e-3  # dropout really acts
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert max_diff(ref, grads(model, hybrid, seed=5)) < 1e-6


@pytest.mark.parametrize("loss", ["hybrid", "hybrid_1f"])
@pytest.mark.parametrize("reentrant", REENTRANT)
def test_same_gradients_under_bf16_autocast(reentrant, loss):
    """float32 weights, bf16 autocast, dropout: the recomputation runs under the same autocast
    state. Tolerance, per parameter: max |Δ| ≤ 1e-2 · max |g| (bf16 keeps 8 significant bits,
    2^-8 ≈ 4e-3). It is needed: with two forwards in one autocast region (``hybrid``), the
    plain graph shares autocast's cached bf16 copy of each weight between them and sums the
    two weight gradients in bf16, while a reentrant recomputation casts per forward and sums
    in float32 (measured: ~2e-3 relative; with ``cache_enabled=False`` or one forward, 0)."""
    model = tiny_model(layers=3, dtype=torch.float32, std=0.1)
    for b in model.blocks:
        b.dropout = 0.1
    ref = grads(model, LOSSES[loss], seed=2, autocast=torch.bfloat16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    got = grads(model, LOSSES[loss], seed=2, autocast=torch.bfloat16)
    for k in ref:
        assert float((ref[k] - got[k]).abs().max()) <= 1e-2 * float(ref[k].abs().max()), k


def test_default_kwargs_and_memory():
    """``gradient_checkpointing_enable()`` as TRL calls it (no kwargs: non-reentrant) keeps
    fewer tensors for the backward; ``every_n_layers`` checkpoints blocks 0, n, 2n, ..."""
    model = tiny_model(layers=4)
    plain = saved_bytes(model, hybrid)
    model.gradient_checkpointing_enable()
    assert model.is_activation_checkpointing and all(b.gradient_checkpointing for b in model.blocks)
    assert model.blocks[0]._gradient_checkpointing_func.keywords == {"use_reentrant": False}
    ckpt = saved_bytes(model, hybrid)
    assert ckpt < 0.6 * plain, (ckpt, plain)
    model.activation_checkpointing_enable(every_n_layers=2)
    assert [b.gradient_checkpointing for b in model.blocks] == [True, False, True, False]
    assert ckpt < saved_bytes(model, hybrid) < plain


def test_off_without_grad_and_with_cache_on_in_eval_with_grad():
    model = tiny_model(layers=2)
    ref = grads(model, exact_loss)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    calls = spy(model)
    model.eval()
    # eval mode with gradients (RL's loss passes: dropout off): recomputed, same gradients
    assert max_diff(ref, grads(model, exact_loss)) < 1e-6 and len(calls) == 2
    calls.clear()
    model.train()
    with torch.no_grad():
        exact_loss(model)
    assert not calls
    # a KV-cached forward (the sampler's path) in training mode with gradients on: runs as is,
    # writes its cache once, and gives the plain model's logits
    ids = torch.randint(5, 39, (2, 6))
    pos = torch.arange(6).expand(2, 6)
    caches = [EsoKVCache(model.config, 2, 8, "cpu") for _ in range(2)]
    out = model(ids, pos, FULL, cache=caches[0])
    assert not calls and out.requires_grad
    model.gradient_checkpointing_disable()
    ref = model(ids, pos, FULL, cache=caches[1])
    assert torch.equal(out, ref)
    assert all(torch.equal(a, b) for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v))


def test_disable_restores_plain_forward():
    model = tiny_model(layers=3)
    plain = saved_bytes(model, exact_loss)
    ref = grads(model, exact_loss)
    model.gradient_checkpointing_enable()
    assert saved_bytes(model, exact_loss) < plain
    model.gradient_checkpointing_disable()
    assert not model.is_activation_checkpointing and not any(b.gradient_checkpointing for b in model.blocks)
    calls = spy(model)
    assert saved_bytes(model, exact_loss) == plain
    assert max_diff(ref, grads(model, exact_loss)) == 0
    assert not calls


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex_attention has no backward on CPU")
@pytest.mark.parametrize("reentrant", REENTRANT)
def test_flex_block_mask_cuda(reentrant):
    """A flex ``BlockMask`` (a non-tensor mask object) passes through the checkpoint."""
    model = tiny_model(layers=2, dtype=torch.float32).cuda()
    ro = _rollout(model).to("cuda")

    def loss(m):
        lp, valid = exact(m, ro, backend="flex")
        return -(lp * valid).sum()

    ref = grads(model, loss)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert max_diff(ref, grads(model, loss)) < 1e-4


def test_dense_mask_is_a_real_eso_mask():
    """(Guard for the tests above: layout (a)'s mask is not all-True, so a mask lost on the
    way through the checkpoint would change the gradients.)"""
    from esorl.layout import exact_layout, trajectory_table

    ro = _rollout(tiny_model())
    table = trajectory_table(ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.order, ro.steps, ro.completion_mask)
    lay, _ = exact_layout(table, ro.prompt_ids.shape[1], 39)
    m = build_mask(lay.desc, lay.desc, "sdpa")
    assert m.dtype == torch.bool and 0.2 < m.float().mean() < 0.8
