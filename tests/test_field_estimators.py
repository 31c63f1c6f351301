"""The field's estimators and objectives (issue 14, item 1) against their definitions on
hand-built cases: LLaDA's low-variance ELBO with VRPO's allocation, ESPO's coupled ELBO,
SPG's sandwich bounds, d2's StepMerge, and the ESPO / SPG / wd1 objectives."""

import dataclasses
import math

import pytest
import torch

from esorl.likelihood import REGISTRY, elbo_lowvar, espo_elbo, exact, mask_counts, masked_draws, sandwich_bounds, step_merge
from esorl.rl.objectives import espo_loss, spg_loss, wd1_loss, wd1_weights
from esorl.sampling import generate
from esorl.schedule import ScheduleConfig, Trajectory

from conftest import random_prompts, tiny_model
from test_likelihood import _causal_logp, enumerated_masked_expectation


def _small_rollout(model, B=2, P=2, N=3, seed=4):
    gen = torch.Generator().manual_seed(seed)
    pid = torch.randint(5, model.config.vocab_size - 1, (B, P), generator=gen)
    pm = torch.ones_like(pid, dtype=torch.bool)
    return generate(model, pid, pm, N, Trajectory(torch.arange(N).expand(B, N), torch.ones(N, dtype=torch.long)), generator=gen, backend="sdpa")


def _enumerated_elbo(model, r):
    """The discrete-time ELBO per token, enumerated: masked sets of size k weigh
    c(k) = (k−1)!(N−k)!/N! (= (1/N)·(N/k)/C(N, k): ℓ ~ U{1..N}, weight N/ℓ)."""
    N = r.completion_ids.shape[1]
    c = {k: math.factorial(k - 1) * math.factorial(N - k) / math.factorial(N) for k in range(1, N + 1)}
    return enumerated_masked_expectation(model, r, c)


def test_mask_counts_are_stratified_uniform_and_shared_by_seed():
    """LLaDA's stratified counts: ℓ ∈ {1..M}, n draws spread over the range (each count
    marginally uniform), exactly ℓ of the scored positions masked, one mask per count (VRPO's
    allocation), the same masks for the same seed (VRPO's antithetic sharing between policy and
    reference) and fresh ones for another seed."""
    model = tiny_model()
    r = _small_rollout(model, B=3, N=6)
    r = dataclasses.replace(r, sample_ids=torch.tensor([0, 1, 2]))
    ell, masked, key = mask_counts(r, 6, seed=3)
    assert ell.shape == (3, 6) and masked.shape == (3, 6, 6)
    assert ((ell >= 1) & (ell <= 6)).all()
    assert (masked.sum(2) == ell).all()
    # stratified: n = M draws cover every count exactly once
    assert all(sorted(row) == list(range(1, 7)) for row in ell.tolist())
    ell2, masked2, _ = mask_counts(r, 6, seed=3)
    assert torch.equal(ell, ell2) and torch.equal(masked, masked2)
    _, masked3, _ = mask_counts(r, 6, seed=4)
    assert not torch.equal(masked, masked3)
    # marginal uniformity of one draw's count over seeds
    counts = torch.zeros(7)
    for s in range(600):
        counts[mask_counts(r, 1, seed=s)[0][0, 0]] += 1
    assert counts[0] == 0 and (counts[1:] / 600 - 1 / 6).abs().max() < 0.06
    # unscored slots are never masked; ℓ counts only scored ones
    cm = r.completion_mask.clone()
    cm[:, 4:] = False
    r2 = dataclasses.replace(r, completion_mask=cm)
    ell4, masked4, _ = mask_counts(r2, 8, seed=1)
    assert not masked4[:, :, 4:].any() and (ell4 <= 4).all() and (masked4.sum(2) == ell4).all()
    # ESPO's counts include 0
    ellz, maskedz, _ = mask_counts(r, 7, seed=0, zero=True)
    assert all(sorted(row) == list(range(0, 7)) for row in ellz.tolist()) and (maskedz.sum(2) == ellz).all()


@pytest.mark.parametrize("name", ["elbo_lowvar", "espo_elbo"])
def test_elbo_estimators_converge_to_the_enumerated_elbo(name):
    """Both are unbiased for the same discrete ELBO: their mean over many (stratified) draws
    matches the enumeration to well within the Monte Carlo error."""
    model = tiny_model(vocab=12, hidden=16)
    r = _small_rollout(model)
    expect = _enumerated_elbo(model, r)
    fn = {"elbo_lowvar": elbo_lowvar, "espo_elbo": espo_elbo}[name]
    with torch.no_grad():
        est, valid = fn(model, r, n=6000, seed=0)
    assert valid.all()
    err = (est - expect).abs().max().item()
    assert err < 0.1, (name, est, expect)
    # and a couple of draws are a noisy estimate of it
    with torch.no_grad():
        small = torch.stack([fn(model, r, n=2, seed=s)[0] for s in range(40)])
    assert small.std(0).mean() > 0.05 and (small.mean(0) - expect).abs().max() < 1.0


def test_elbo_lowvar_is_its_formula_on_the_draws():
    """Per token: mean over draws of [masked]·(M/ℓ)·log p(y_j | clean part), with the log-probs
    of :func:`masked_draws` on :func:`mask_counts`' masks."""
    model = tiny_model()
    r = _small_rollout(model, B=3, N=5)
    with torch.no_grad():
        val, _ = elbo_lowvar(model, r, n=3, seed=9)
        ell, masked, key = mask_counts(r, 3, 9)
        lp = masked_draws(model, r, masked, key)
    hand = torch.zeros(3, 5, dtype=torch.float64)
    for b in range(3):
        for k in range(3):
            for j in range(5):
                if masked[b, k, j]:
                    hand[b, j] += 5 / ell[b, k].item() * lp[b, k, j].item() / 3
    assert torch.allclose(val, hand, atol=1e-12)


def test_masked_draws_log_probs_are_the_mdm_conditionals():
    """A draw's log-prob of a masked token equals the model's prediction given the prompt and
    the clean completion tokens, for the draw's own order of the clean and masked parts
    (checked by hand on the order the key gives)."""
    model = tiny_model()
    r = _small_rollout(model, B=2, N=4)
    ell, masked, key = mask_counts(r, 2, 5)
    with torch.no_grad():
        lp = masked_draws(model, r, masked, key)
    P = r.prompt_ids.shape[1]
    for b in range(2):
        for k in range(2):
            m = masked[b, k].tolist()
            clean = sorted([j for j in range(4) if not m[j]], key=lambda j: key[b, k, j].item())
            mk = sorted([j for j in range(4) if m[j]], key=lambda j: key[b, k, j].item())
            seq = clean + mk
            ids = torch.cat([r.prompt_ids[b], r.completion_ids[b, seq]])[None]
            pos = torch.cat([torch.arange(P), P + torch.tensor(seq)])[None]
            isq = torch.tensor([False] * (P + len(clean)) + [True] * len(mk))[None]
            with torch.no_grad():
                ref = _causal_logp(model, ids, pos, isq)[0, P + len(clean):]
            for j, v in zip(mk, ref):
                assert abs(lp[b, k, j].item() - v.item()) < 1e-10


def test_sandwich_bounds_by_hand():
    """SPG: lower = mean_k (1/ℓ_k) Σ_{masked} log p (so M·lower = elbo_lowvar's sum on the same
    masks); upper = mean over positions masked at least once of (1/β) log[(1/n) Σ_k
    [masked] p^β / (ℓ_k / M)]."""
    model = tiny_model()
    r = _small_rollout(model, B=3, N=5)
    n, beta = 3, 1.5
    with torch.no_grad():
        lower, upper = sandwich_bounds(model, r, n=n, eubo_beta=beta, seed=2)
        ell, masked, key = mask_counts(r, n, 2)
        lp = masked_draws(model, r, masked, key)
        lv, _ = elbo_lowvar(model, r, n=n, seed=2)
    assert torch.allclose(5 * lower, lv.sum(1), atol=1e-12)
    for b in range(3):
        terms = []
        for j in range(5):
            s = sum(math.exp(beta * lp[b, k, j].item()) / (ell[b, k].item() / 5) for k in range(n) if masked[b, k, j])
            if s > 0:
                terms.append(math.log(s / n) / beta)
        assert abs(upper[b].item() - sum(terms) / len(terms)) < 1e-10
        lo = sum(sum(lp[b, k, j].item() for j in range(5) if masked[b, k, j]) / ell[b, k].item() for k in range(n)) / n
        assert abs(lower[b].item() - lo) < 1e-12


def test_step_merge_is_exact_on_the_merged_trajectory():
    """d2's StepMerge: S = K is exact; S = 2 of K = 4 steps is exact on the hand-merged
    trajectory (steps 1-2 → 1, 3-4 → 2); S = 1 scores every token given the prompt only."""
    model = tiny_model()
    gen = torch.Generator().manual_seed(1)
    pid, pm = random_prompts(3, 4, model.config.vocab_size, gen)
    r = generate(model, pid, pm, 8, ScheduleConfig(alpha0=1.0, num_steps=4), generator=gen, backend="sdpa")
    K = len(r.step_sizes)
    assert K == 4
    with torch.no_grad():
        assert torch.allclose(step_merge(model, r, segments=K)[0], exact(model, r)[0], atol=1e-12)
        sizes = r.step_sizes
        merged = dataclasses.replace(r, step_sizes=torch.stack([sizes[:2].sum(), sizes[2:].sum()]), steps=(r.steps + 1) // 2)
        assert torch.allclose(step_merge(model, r, segments=2)[0], exact(model, merged)[0], atol=1e-12)
        one = dataclasses.replace(r, step_sizes=sizes.sum()[None], steps=torch.ones_like(r.steps))
        v1 = step_merge(model, r, segments=1)[0]
        assert torch.allclose(v1, exact(model, one)[0], atol=1e-12)
        assert (v1 - exact(model, r)[0]).abs().max() > 1e-3  # the conditioning matters
    assert REGISTRY["step_merge"].deterministic and not REGISTRY["step_merge"].equals_sampler
    # K = 5 steps into S = 2 segments: d2's boundary ⌊1·5/2⌋ = 2, so steps 1-2 and 3-5
    r5 = generate(model, pid, pm, 8, ScheduleConfig(alpha0=1.0, num_steps=5), generator=gen, backend="sdpa")
    assert len(r5.step_sizes) == 5
    s5 = r5.step_sizes
    m5 = dataclasses.replace(r5, step_sizes=torch.stack([s5[:2].sum(), s5[2:].sum()]), steps=torch.where(r5.steps <= 2, 1, 2))
    with torch.no_grad():
        assert torch.allclose(step_merge(model, r5, segments=2)[0], exact(model, m5)[0], atol=1e-12)


def test_espo_loss_by_hand():
    seq = torch.tensor([-10.0, -12.0, -8.0], requires_grad=True)
    old = torch.tensor([-10.5, -11.0, -8.0])
    ref = torch.tensor([-9.0, -12.0, -7.0])
    adv = torch.tensor([1.0, -1.0, 0.5])
    L, eps, beta = 5, 0.05, 0.1
    loss, m = espo_loss(seq, old, ref, adv, L, eps, eps, beta)
    rho = [math.exp(0.5 / 5), math.exp(-1.0 / 5), 1.0]
    pg = [-min(r * a, min(max(r, 1 - eps), 1 + eps) * a) for r, a in zip(rho, adv.tolist())]
    kl = [0.5 * (s - f) ** 2 / L for s, f in zip(seq.tolist(), ref.tolist())]
    assert loss.item() == pytest.approx(sum(pg) / 3 + beta * sum(kl) / 3, abs=1e-6)
    assert m["clip_ratio"] == pytest.approx(2 / 3)  # rows 0 (ρ > 1+ε, A > 0) and 1 (ρ < 1−ε, A < 0)
    loss.backward()
    # clipped rows carry only the KL gradient
    assert seq.grad[0].item() == pytest.approx(beta * (seq[0] - ref[0]).item() / L / 3, abs=1e-6)


def test_spg_loss_uses_the_bound_of_each_advantage_sign():
    lower = torch.tensor([-2.0, -3.0, -1.0])
    upper = torch.tensor([-1.0, -2.0, -0.5])
    adv = torch.tensor([1.0, -1.0, -0.5])
    lens = torch.tensor([4, 4, 2])
    for w in (0.0, 0.5, 1.0):
        loss, _ = spg_loss(lower, upper, adv, lens, w)
        s = [-2.0, w * -2.0 + (1 - w) * -3.0, w * -0.5 + (1 - w) * -1.0]
        assert loss.item() == pytest.approx(-(1 * s[0] * 4 - 1 * s[1] * 4 - 0.5 * s[2] * 2) / 10)


def test_wd1_weights_and_loss():
    adv = torch.tensor([1.0, -1.0, 0.0, 0.0, 2.0, 0.0, -1.0, -1.0])
    w = wd1_weights(adv, 4)
    for g in range(2):
        a = adv[g * 4 : (g + 1) * 4]
        want = torch.softmax(a, 0) - torch.softmax(-a, 0)
        assert torch.allclose(w[g * 4 : (g + 1) * 4], want, atol=1e-6)
        assert abs(w[g * 4 : (g + 1) * 4].sum().item()) < 1e-6
    seq = torch.randn(8)
    loss, _ = wd1_loss(seq, w, 4)
    assert loss.item() == pytest.approx(-(w * seq).sum().item() / 2, abs=1e-6)
    # ψ sharpens the weights
    assert wd1_weights(adv, 4, psi=5.0).abs().max() > w.abs().max()


def test_registry_knows_the_new_estimators():
    for name in ("elbo_lowvar", "espo_elbo", "step_merge"):
        e = REGISTRY[name]
        assert e.summary and e.forwards(4, 5, [1] * 5, {"n": 2, "segments": 2}) > 0
    assert REGISTRY["espo_elbo"].forwards(4, 5, [], {"n": 2}) == 2 * REGISTRY["elbo_lowvar"].forwards(4, 5, [], {"n": 2})


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    from rl_fixtures import make_tiny_policy

    return make_tiny_policy(tmp_path_factory.mktemp("policy"))


@pytest.mark.parametrize("extra", [{"likelihood": "espo_elbo", "objective": "espo", "beta": 0.01, "mc_samples": 1},
                                   {"likelihood": "elbo_lowvar", "objective": "spg", "mc_samples": 2},
                                   {"likelihood": "one_step", "objective": "wd1"},
                                   {"likelihood": "step_merge", "merge_segments": 2, "beta": 0.04}])
def test_objectives_train_in_the_grpo_trainer(policy_dir, tmp_path, extra):
    """Each objective trains 2 steps with μ = 2 (the second inner iteration has a ratio ≠ 1)
    with finite losses and gradients, and logs its metrics."""
    from esorl.config import load_config
    from esorl.rl.grpo import GRPORecipe, run_grpo
    from esorl.train.common import read_metrics

    from rl_fixtures import EvenIdReward, recipe_dict

    rec = load_config(GRPORecipe, None, [], base=recipe_dict(policy_dir, tmp_path / "run", tmp_path / "cache", num_iterations=2, max_steps=2,
                                                              scale_rewards="none", **extra))
    run_grpo(rec, reward_funcs=[EvenIdReward(policy_dir)], reward_weights=[1.0])
    recs = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert len(recs) == 2 and all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in recs)
    obj = extra.get("objective")
    if obj:
        assert any(k.startswith(f"{obj}/") for k in recs[0])


def test_objective_settings_are_checked_before_any_work():
    from esorl.rl.grpo_trainer import EsoGRPOConfig

    with pytest.raises(ValueError, match="objective spg has no KL"):
        EsoGRPOConfig(output_dir="x", objective="spg", likelihood="elbo_lowvar", beta=0.1)
    with pytest.raises(ValueError, match="objective wd1 has no KL"):
        EsoGRPOConfig(output_dir="x", objective="wd1", likelihood="one_step", beta=0.04)
    with pytest.raises(ValueError, match="spg reads its bounds from elbo_lowvar"):
        EsoGRPOConfig(output_dir="x", objective="spg", likelihood="mc_elbo")
    with pytest.raises(ValueError, match="grpo.objective must be one of"):
        EsoGRPOConfig(output_dir="x", objective="ppo")
    with pytest.raises(ValueError, match="merge_segments"):
        EsoGRPOConfig(output_dir="x", likelihood="step_merge", merge_segments=0)
