"""The attention rule (docs/ESOLM.md §4): the vectorised masks of every layout equal a token-by-token
loop over rules 1–4, and the SDPA and flex backends give the same outputs."""

import torch

from esorl.attention import allowed, build_mask, reference_allowed
from esorl.layout import concat, copies, exact_layout, one_copy_layout, replay_layout, sequential_layout, sorted_table, trajectory_table
from esorl.schedule import unified

from conftest import random_prompts, tiny_model


def _table(gen, B=3, N=9, alpha0=0.5, T=4):
    pid, pm = random_prompts(B, 5, 40, gen)
    traj = unified(B, N, alpha0, T, gen)
    comp = torch.randint(5, 39, (B, N), generator=gen)
    return trajectory_table(pid, pm, comp, traj.order, traj.steps_by_position()), pid.shape[1], traj


def test_layout_a_and_c_masks_match_reference():
    gen = torch.Generator().manual_seed(0)
    for trial in range(4):
        table, P, traj = _table(gen, alpha0=[0.0, 0.3, 1.0, 0.6][trial])
        lay, _ = exact_layout(table, P, 39)
        assert torch.equal(allowed(lay.desc, lay.desc), reference_allowed(lay.desc, lay.desc))
        c = 0
        for k in traj.step_sizes.tolist():
            lay, _ = replay_layout(table, P + c, P + c, P + c + k, 39)
            assert torch.equal(allowed(lay.desc, lay.desc), reference_allowed(lay.desc, lay.desc))
            c += k


def test_layout_a_mask_spot_checks():
    """Hand-checked facts of rules 1–4 on one trajectory with a prompt."""
    pid = torch.tensor([[7, 8]])
    pm = torch.ones_like(pid, dtype=torch.bool)
    order = torch.tensor([[2, 0, 1]])  # σ: position 2 first, then 0, then 1
    steps = torch.tensor([[2, 2, 1]])  # step 1 reveals pos 2; step 2 reveals pos 0 then 1
    table = trajectory_table(pid, pm, torch.tensor([[10, 11, 12]]), order, steps)
    lay, qs = exact_layout(table, 2, 39)
    m = allowed(lay.desc, lay.desc)[0]
    # array: [p0 p1 c(pos2) c(pos0) c(pos1) | q(pos2) q(pos0) q(pos1)]
    q_pos2, q_pos0, q_pos1 = 5, 6, 7
    assert m[q_pos2].nonzero().flatten().tolist() == [0, 1, 5]  # prompt + itself
    assert m[q_pos0].nonzero().flatten().tolist() == [0, 1, 2, 6]  # + clean of step 1, itself
    assert m[q_pos1].nonzero().flatten().tolist() == [0, 1, 2, 6, 7]  # + same-step query before it
    assert m[4].nonzero().flatten().tolist() == [0, 1, 2, 3, 4]  # clean: causal in rank order
    assert not m[:5, 5:].any()  # rule 4


def test_training_layout_masks_match_reference():
    gen = torch.Generator().manual_seed(1)
    B, L = 3, 10
    x = torch.randint(5, 39, (B, L), generator=gen)
    pos = torch.arange(L).expand(B, L)
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[1, -3:] = False  # padding
    masked = torch.rand(B, L, generator=gen) < 0.5
    group = torch.where(valid, masked.long(), 2)
    key = torch.rand(B, L, generator=gen).argsort(1).argsort(1)
    table, _ = sorted_table(x, pos, valid, group, key)
    lay = one_copy_layout(table, table.steps == 1, 39)  # (d)
    m = allowed(lay.desc, lay.desc)
    assert torch.equal(m, reference_allowed(lay.desc, lay.desc))
    # (d) is plain causal attention over the valid part of the sorted array
    for b in range(B):
        n = int(valid[b].sum())
        assert torch.equal(m[b, :n, :n], torch.ones(n, n, dtype=torch.bool).tril())
    tab_e, _ = sorted_table(x, pos, valid, torch.where(valid, masked.long(), 2), torch.where(masked, pos, key))
    tab_e.steps = torch.where(tab_e.steps == 1, (tab_e.steps == 1).long().cumsum(1), 0)
    lay_e, _, _ = sequential_layout(tab_e, 39)  # (e)
    assert torch.equal(allowed(lay_e.desc, lay_e.desc), reference_allowed(lay_e.desc, lay_e.desc))


def test_cache_window_masks_match_reference():
    """The sampler's per-step window against the cache uses the same rule (layout (b))."""
    gen = torch.Generator().manual_seed(2)
    table, P, traj = _table(gen, alpha0=1.0, T=4)
    c_prev, sizes = 0, traj.step_sizes.tolist()
    for i, k in enumerate(sizes):
        q0 = P + c_prev
        w0 = 0 if i == 0 else q0 - sizes[i - 1]
        window = concat(copies(table, slice(w0, q0), False, 39), copies(table, slice(q0, q0 + k), True, 39))
        keys = concat(copies(table, slice(0, q0), False, 39), copies(table, slice(q0, q0 + k), True, 39))
        assert torch.equal(allowed(window.desc, keys.desc), reference_allowed(window.desc, keys.desc))
        c_prev += k


def test_flex_backend_matches_sdpa():
    """flex_attention (eager on CPU; compiled on CUDA) gives the SDPA outputs."""
    gen = torch.Generator().manual_seed(3)
    model = tiny_model(dtype=torch.float32)
    table, P, _ = _table(gen, N=12)
    lay, qs = exact_layout(table, P, model.config.mask_token_id)
    with torch.no_grad():
        a = model(lay.ids, lay.positions, build_mask(lay.desc, lay.desc, "sdpa"), logits_slice=qs)
        b = model(lay.ids, lay.positions, build_mask(lay.desc, lay.desc, "flex"), logits_slice=qs)
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
