"""Schedules (docs/ESOLM.md §3): sizes, phases, reproducibility."""

import pytest
import torch

from esorl.schedule import ScheduleConfig, Stream, Trajectory, block_ar, fixed_k, subcontext, unified, unified_step_sizes, user_order


def test_unified_sizes_and_phases():
    g = torch.Generator().manual_seed(0)
    for a0 in (0.0, 0.125, 0.5, 1.0):
        for T in (1, 4, 32, 100):
            tr = unified(3, 40, a0, T, g)
            tr.validate(40)
            sizes, n_diff = unified_step_sizes(40, a0, T, torch.Generator().manual_seed(1))
            assert sum(sizes) == 40
            if a0 == 1.0:
                assert n_diff == 40 and len(sizes) <= T  # pure diffusion: nothing left over
            if a0 == 0.0:
                assert sizes == [1] * 40 and torch.equal(tr.order, torch.arange(40).expand(3, 40))
    # sequential phase is left to right, after the diffusion positions
    sizes, n_diff = unified_step_sizes(64, 0.25, 8, torch.Generator().manual_seed(2))
    tr = unified(2, 64, 0.25, 8, torch.Generator().manual_seed(2))
    seq = tr.order[:, n_diff:]
    assert torch.equal(seq, seq.sort(1).values)
    assert tr.step_sizes.tolist()[len(sizes) - (64 - n_diff):] == [1] * (64 - n_diff)


def test_unified_diffusion_share_is_alpha0_on_average():
    shares = [unified_step_sizes(200, 0.25, 16, torch.Generator().manual_seed(s))[1] / 200 for s in range(200)]
    assert abs(sum(shares) / len(shares) - 0.25) < 0.02


def test_reproducible_and_seed_dependent():
    a = unified(4, 30, 0.5, 8, torch.Generator().manual_seed(3))
    b = unified(4, 30, 0.5, 8, torch.Generator().manual_seed(3))
    c = unified(4, 30, 0.5, 8, torch.Generator().manual_seed(4))
    assert torch.equal(a.order, b.order) and torch.equal(a.step_sizes, b.step_sizes)
    assert not torch.equal(a.order, c.order)
    assert len({tuple(r) for r in a.order.tolist()}) == 4  # σ per sample


def test_other_orders():
    g = torch.Generator().manual_seed(0)
    t = fixed_k(2, 10, 3, g)
    assert t.step_sizes.tolist() == [3, 3, 3, 1]
    t = block_ar(2, 10, 4, 2, g)
    t.validate(10)
    assert t.order[:, :4].sort(1).values.tolist() == [[0, 1, 2, 3]] * 2  # first block first
    t = subcontext(1, 12, 4, generator=g)
    assert t.order[0, :3].tolist() == [0, 4, 8] and t.step_sizes.tolist() == [3] * 4
    t = subcontext(1, 12, 4, alpha0=0.5, generator=g)
    assert t.step_sizes.tolist() == [3, 3] + [1] * 6
    assert ScheduleConfig(kind="fixed_k", k=5).sample(2, 10).step_sizes.tolist() == [5, 5]


def test_steps_by_position_and_errors():
    t = Trajectory(torch.tensor([[2, 0, 1]]), torch.tensor([1, 2]))
    assert t.steps_by_position().tolist() == [[2, 2, 1]]
    with pytest.raises(ValueError, match="not a permutation"):
        user_order([[0, 0, 1]], [3])
    with pytest.raises(ValueError, match="sum to"):
        user_order([[0, 1, 2]], [1, 1])
    with pytest.raises(ValueError, match="alpha0"):
        unified(1, 4, 1.5, 4)
    with pytest.raises(ValueError, match="schedule kind"):
        ScheduleConfig(kind="nope").sample(1, 4)


def test_orders_keyed_per_sample_do_not_depend_on_the_batch():
    """Rank 1 of 2 must draw the same σ for its samples as a single process does."""
    from esorl.schedule import make_generator

    rows = lambda ids: [make_generator(7, Stream.TRAJ, 0, i) for i in ids]  # noqa: E731
    for cfg in (ScheduleConfig(alpha0=0.5, num_steps=4), ScheduleConfig(kind="fixed_k", k=3), ScheduleConfig(kind="block_ar", block_size=4, num_steps=2)):
        full = cfg.sample(8, 12, make_generator(7, Stream.TRAJ, 0), rows(range(8)))
        half = cfg.sample(4, 12, make_generator(7, Stream.TRAJ, 0), rows(range(4, 8)))
        assert torch.equal(full.order[4:], half.order) and torch.equal(full.step_sizes, half.step_sizes)
