"""The estimator registry: one entry per estimator, asked by the RL configs, GRPO, PPO, the
comparison's diagnostics and ``esorl score``; adding an estimator is one function and one
entry (tested by adding one)."""

import pytest
import torch

from esorl.likelihood import REGISTRY, Estimator, exact, get_estimator, register
from esorl.policy import EstimatorConfig

from rl_fixtures import EvenIdReward, make_tiny_policy, recipe_dict


def test_entries_declare_what_the_callers_used_to_hard_code():
    assert list(REGISTRY) == ["exact", "replay", "mc_elbo", "one_step", "coupled", "elbo_lowvar", "espo_elbo", "step_merge"]
    assert {n for n, e in REGISTRY.items() if e.deterministic} == {"exact", "replay", "step_merge"}
    assert {n for n, e in REGISTRY.items() if e.equals_sampler} == {"exact", "replay"}
    assert {n for n, e in REGISTRY.items() if e.per_step} == {"exact", "replay", "one_step", "step_merge"}  # the others: sequence-level PPO
    cfg = EstimatorConfig("mc_elbo", mc_samples=8)
    assert cfg.params(0.5, 3) == {"n": 8, "alpha0": 0.5, "seed": 3}
    assert EstimatorConfig("mc_elbo", mc_alpha0=1.0).params(0.5, 3)["alpha0"] == 1.0
    assert EstimatorConfig("one_step", p_mask=0.3).params(1.0, 4) == {"p_mask": 0.3, "seed": 4}
    assert EstimatorConfig("exact").params(1.0, 4) == {}
    # token forwards of one sequence, P = 10, N = 6, three steps of 2
    cost = {n: e.forwards(10, 6, [2, 2, 2], e.kwargs(EstimatorConfig(n, 4), 1.0, 0)) for n, e in REGISTRY.items()}
    assert cost == {"exact": 22, "replay": (10 + 2) + (10 + 4) + (10 + 6), "mc_elbo": 4 * 16, "one_step": 16, "coupled": 48,
                    "elbo_lowvar": 4 * 16, "espo_elbo": 2 * 4 * 16, "step_merge": 22}
    assert EstimatorConfig("elbo_lowvar", 3).params(1.0, 5) == {"n": 3, "seed": 5}
    assert EstimatorConfig("step_merge", merge_segments=3).params(1.0, 5) == {"segments": 3}
    with pytest.raises(ValueError, match="unknown likelihood estimator 'nope'; choose from exact, replay"):
        get_estimator("nope")
    with pytest.raises(ValueError, match="already registered"):
        register(REGISTRY["exact"])


def test_adding_an_estimator_is_one_function_and_one_entry(tmp_path):
    """A new estimator (here a scaled copy of exact) is accepted by the configs and runs a
    GRPO step with a reference model and two inner iterations, with no other change."""
    from esorl.config import load_config
    from esorl.rl.grpo import GRPORecipe, run_grpo
    from esorl.train.common import read_metrics

    def half_exact(model, rollout, seed=0, **kw):
        out = exact(model, rollout, **kw)
        return (out[0] * 0.5,) + tuple(out[1:])

    register(Estimator("half_exact", half_exact, lambda cfg, a0, seed: {"seed": seed}, False, False, True, lambda P, N, s, kw: P + 2 * N,
                       "a test estimator"))
    try:
        EstimatorConfig("half_exact").validate()
        pol = make_tiny_policy(tmp_path)
        rec = load_config(GRPORecipe, None, [], base=recipe_dict(pol, tmp_path / "run", tmp_path / "cache", likelihood="half_exact",
                                                                 num_iterations=2, beta=0.1))
        run_grpo(rec, reward_funcs=[EvenIdReward(pol)], reward_weights=[1.0])
        recs = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
        assert len(recs) == 2 and recs[0]["grad_norm"] > 0 and torch.isfinite(torch.tensor(recs[1]["kl"]))
    finally:
        REGISTRY.pop("half_exact")
