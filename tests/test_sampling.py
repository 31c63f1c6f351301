"""The KV-cached sampler emits the same tokens as the no-cache sampler (and the MDLM-style
one) for the same noise, across schedules, prompts of mixed length and top-p; so does the
static-shape sampler (the CUDA-graph path, run eagerly here); bad input gives clear errors."""

import functools

import pytest
import torch

import esorl.sampling as sampling_mod
from esorl.static_sampling import static_decode

from esorl.rollout import Rollout, first_eos_mask
from esorl.sampling import generate
from esorl.schedule import ScheduleConfig, Trajectory, block_ar, fixed_k

from conftest import random_prompts, tiny_model


@pytest.mark.parametrize("alpha0", [0.0, 0.125, 1.0])
@pytest.mark.parametrize("T", [3, 8, 24])
@pytest.mark.parametrize("top_p", [1.0, 0.7])
def test_cached_equals_uncached_tokens(alpha0, T, top_p):
    model = tiny_model()  # float64
    gen = torch.Generator().manual_seed(int(alpha0 * 1000) + T)
    pid, pm = random_prompts(4, 6, 40, gen)
    N = 16
    traj = ScheduleConfig(alpha0=alpha0, num_steps=T).sample(4, N, gen)
    u = torch.rand(4, N, generator=gen, dtype=torch.float64)
    kw = dict(top_p=top_p, temperature=0.9, uniforms=u, eos_token_id=2, backend="sdpa")
    cached = generate(model, pid, pm, N, traj, method="cache", **kw)
    for method in ("replay", "mdlm"):
        other = generate(model, pid, pm, N, traj, method=method, **kw)
        assert torch.equal(cached.completion_ids, other.completion_ids), method
        assert torch.allclose(cached.logp_model, other.logp_model, atol=1e-12)
        assert torch.allclose(cached.logp_behaviour, other.logp_behaviour, atol=1e-12)
    cached.validate(model.config.max_seq_len)
    if alpha0 == 0.0:
        assert torch.equal(cached.order, torch.arange(N).expand(4, N))  # pure AR: left to right
        assert cached.step_sizes.tolist() == [1] * N


@pytest.mark.parametrize("alpha0", [0.0, 0.125, 1.0])
@pytest.mark.parametrize("T", [1, 5, 24])
@pytest.mark.parametrize("bucket", [3, 256])
def test_static_sampler_equals_cached(alpha0, T, bucket, monkeypatch):
    """The static-shape sampler (one fixed window, causal mask over cache slots, padded picks
    into a sink) against the mask-per-window KV-cached sampler, in float64: the same tokens
    and log-probs. ``bucket=3`` makes the cache length change many times (one graph per
    length on GPU); mixed-length prompts exercise the left-padding mask."""
    monkeypatch.setattr(sampling_mod, "static_decode", functools.partial(static_decode, bucket=bucket))
    model = tiny_model()
    gen = torch.Generator().manual_seed(11 + T + int(alpha0 * 100))
    pid, pm = random_prompts(5, 7, 40, gen)
    N = 18
    traj = ScheduleConfig(alpha0=alpha0, num_steps=T).sample(5, N, gen)
    u = torch.rand(5, N, generator=gen, dtype=torch.float64)
    for top_k, top_p in ((0, 1.0), (6, 0.8)):
        kw = dict(top_k=top_k, top_p=top_p, temperature=0.8, uniforms=u, eos_token_id=2, backend="sdpa")
        a = generate(model, pid, pm, N, traj, method="cache", **kw)
        b = generate(model, pid, pm, N, traj, method="static", **kw)
        assert torch.equal(a.completion_ids, b.completion_ids)
        assert torch.allclose(a.logp_model, b.logp_model, atol=1e-12)
        assert torch.allclose(a.logp_behaviour, b.logp_behaviour, atol=1e-12)
        b.validate(model.config.max_seq_len)


def test_static_sampler_teacher_forcing_and_default():
    """Teacher-forced static sampling records the cached sampler's log-probs of the forced
    tokens; ``method="auto"`` (the default) is the static sampler; graphs need CUDA."""
    model = tiny_model()
    gen = torch.Generator().manual_seed(5)
    pid, pm = random_prompts(3, 5, 40, gen)
    traj = fixed_k(3, 10, 3, gen)
    forced = torch.randint(5, 39, (3, 10), generator=gen)
    a = generate(model, pid, pm, 10, traj, teacher_tokens=forced, method="cache", backend="sdpa")
    b = generate(model, pid, pm, 10, traj, teacher_tokens=forced)
    assert torch.equal(b.completion_ids, forced) and torch.allclose(a.logp_model, b.logp_model, atol=1e-12)
    with pytest.raises(ValueError, match="CUDA"):
        generate(model, pid, pm, 10, traj, cuda_graphs=True)
    with pytest.raises(ValueError, match="sampling method"):
        generate(model, pid, pm, 10, traj, method="fast")


def test_other_schedules_and_top_k():
    model = tiny_model()
    gen = torch.Generator().manual_seed(7)
    pid, pm = random_prompts(3, 5, 40, gen)
    for traj in (fixed_k(3, 12, 5, gen), block_ar(3, 12, 4, 2, gen)):
        u = torch.rand(3, 12, generator=gen, dtype=torch.float64)
        a = generate(model, pid, pm, 12, traj, top_k=5, uniforms=u, backend="sdpa")
        b = generate(model, pid, pm, 12, traj, top_k=5, uniforms=u, method="replay", backend="sdpa")
        assert torch.equal(a.completion_ids, b.completion_ids)
        # top-k: behaviour log-probs renormalised over 5 ids, >= model log-probs
        assert (a.logp_behaviour >= a.logp_model - 1e-12).all()


def test_seeded_generator_reproducible():
    model = tiny_model()
    pid, pm = random_prompts(2, 4, 40, torch.Generator().manual_seed(0))
    r1 = generate(model, pid, pm, 10, ScheduleConfig(alpha0=0.5, num_steps=4), generator=torch.Generator().manual_seed(3))
    r2 = generate(model, pid, pm, 10, ScheduleConfig(alpha0=0.5, num_steps=4), generator=torch.Generator().manual_seed(3))
    assert torch.equal(r1.completion_ids, r2.completion_ids) and torch.equal(r1.order, r2.order)


def test_eos_mask_stops_at_first_eos_in_position_order():
    ids = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8]])
    assert first_eos_mask(ids, 2).tolist() == [[True, True, False, False], [True] * 4]


def test_bad_input_errors():
    model = tiny_model(context=16)
    pid, pm = random_prompts(2, 4, 40, torch.Generator().manual_seed(0), min_len=4)
    with pytest.raises(ValueError, match="does not fit"):
        generate(model, pid, pm, 13)
    long_prompt = torch.ones(1, 17, dtype=torch.long) * 5
    with pytest.raises(ValueError, match="longer than the model context"):
        generate(model, long_prompt, torch.ones_like(long_prompt, dtype=torch.bool), 2)
    with pytest.raises(ValueError, match="not a permutation"):
        generate(model, pid, pm, 4, Trajectory(torch.tensor([[0, 0, 1, 2], [0, 1, 2, 3]]), torch.tensor([2, 2])))
    with pytest.raises(ValueError, match="sum to"):
        generate(model, pid, pm, 4, Trajectory(torch.tensor([[0, 1, 2, 3]] * 2), torch.tensor([2, 1])))


def test_rollout_validate_catches_inconsistent_steps():
    model = tiny_model()
    pid, pm = random_prompts(2, 3, 40, torch.Generator().manual_seed(0))
    r = generate(model, pid, pm, 6, ScheduleConfig(alpha0=1.0, num_steps=3), generator=torch.Generator().manual_seed(0))
    bad = Rollout(**{**r.__dict__, "steps": r.steps.flip(1)})
    with pytest.raises(ValueError, match="inconsistent"):
        bad.validate()
    with pytest.raises(ValueError, match="context"):
        r.validate(context=4)
