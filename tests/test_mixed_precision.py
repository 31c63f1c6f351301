"""Every precision a user can select, on CPU: bf16 autocast (what every shipped GPU recipe
sets), fp16 autocast, bf16 weights (DeepSpeed's bf16 casts the model), float64 (tests).

Regression: ``bf16`` (then ``mixed_precision=bf16``) crashed the first rollout (the static KV cache was
allocated in the parameters' float32 while autocast computes bf16 K/V). Each runner runs a
few steps under bf16 autocast; each sampler and estimator runs under each precision, and
its log-probs agree with the float32 ones to the precision's resolution.
"""

import math

import pytest
import torch

from esorl.config import load_config
from esorl.likelihood import ESTIMATORS, estimate, exact
from esorl.rl.grpo import GRPORecipe, run_grpo
from esorl.rl.ppo import EsoPPOTrainer, PPORecipe
from esorl.sampling import generate
from esorl.schedule import ScheduleConfig
from esorl.train.common import read_metrics
from esorl.train.pretrain import run_pretrain

from conftest import random_prompts, tiny_model
from rl_fixtures import EvenIdReward, make_tiny_policy, recipe_dict
from test_ppo import ppo_recipe_dict
from test_pretrain import tiny_cfg

ALL = sorted(ESTIMATORS)
PARAMS = {"mc_elbo": {"n": 2, "alpha0": 1.0, "seed": 0}, "one_step": {"seed": 0}, "coupled": {"seed": 0}}


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    return make_tiny_policy(tmp_path_factory.mktemp("policy"))


def _rollout(model, method, B=3, N=10, seed=0, autocast=None):
    gen = torch.Generator().manual_seed(seed)
    pid, pm = random_prompts(B, 4, model.config.vocab_size, gen)
    traj = ScheduleConfig(alpha0=0.5, num_steps=4).sample(B, N, torch.Generator().manual_seed(seed + 1))
    u = torch.rand(B, N, generator=gen, dtype=torch.float64)
    ctx = torch.autocast("cpu", dtype=autocast) if autocast else torch.autocast("cpu", enabled=False)
    with torch.no_grad(), ctx:
        return generate(model, pid, pm, N, traj, uniforms=u, eos_token_id=None, method=method, backend="sdpa")


# ----------------------------------------------------------------------------- samplers and estimators


@pytest.mark.parametrize("method", ["auto", "cache", "replay", "mdlm"])
@pytest.mark.parametrize("precision", ["bf16_autocast", "fp16_autocast", "bf16_weights"])
def test_samplers_and_estimators_under_each_precision(method, precision):
    ref_model = tiny_model(dtype=torch.float32, std=0.1)
    ref = _rollout(ref_model, method)
    if precision == "bf16_weights":
        model, ac = tiny_model(dtype=torch.float32, std=0.1).to(torch.bfloat16), None
    else:
        model, ac = ref_model, (torch.bfloat16 if precision == "bf16_autocast" else torch.float16)
    ro = _rollout(model, method, autocast=ac)
    assert torch.isfinite(ro.logp_model).all() and torch.isfinite(ro.logp_behaviour).all()
    # teacher-forced on the float32 trajectory, the log-probs match float32's to the precision's resolution
    ctx = torch.autocast("cpu", dtype=ac) if ac else torch.autocast("cpu", enabled=False)
    with torch.no_grad(), ctx:
        forced = generate(model, ref.prompt_ids, ref.prompt_mask, ref.num_new, _traj_of(ref), uniforms=None, eos_token_id=None,
                          method=method, backend="sdpa", teacher_tokens=ref.completion_ids)
        assert (forced.logp_model - ref.logp_model).abs().max() < 0.1
        for name in ALL:
            lp, valid = estimate(model, ref, name, backend="sdpa", **PARAMS.get(name, {}))
            assert lp.dtype in (torch.float32, torch.float64) and torch.isfinite(lp[valid]).all(), name
        lp, _ = exact(model, ref, backend="sdpa")
    assert (lp - ref.logp_model).abs().max() < 0.1


def _traj_of(ro):
    from esorl.schedule import Trajectory

    return Trajectory(ro.order, ro.step_sizes)


def test_float64_sampler_equals_exact():
    model = tiny_model(dtype=torch.float64)
    ro = _rollout(model, "auto")
    lp, _ = exact(model, ro, backend="sdpa")
    assert (lp - ro.logp_model).abs().max() < 1e-10


# ----------------------------------------------------------------------------- runners under bf16 autocast


def test_pretrain_and_sft_bf16(tmp_path):
    run_pretrain(tiny_cfg(tmp_path, **{"training.bf16": True, "training.max_steps": 3}))
    recs = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert all(math.isfinite(r["train/loss"]) for r in recs if "train/loss" in r)
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()


def test_sft_bf16(tmp_path, policy_dir):
    from esorl.train.sft import SFTConfig, run_sft

    cfg = load_config(SFTConfig, None, [], base={
        "model": {"init_from": str(policy_dir)},
        "data": {"source": "synthetic", "synthetic_size": 200, "max_length": 32, "truncate": True, "cache_dir": str(tmp_path / "cache")},
        "training": {"learning_rate": 3e-3,
                     "max_steps": 3, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "per_device_eval_batch_size": 8, "eval_steps": 3, "eval_batches": 1, "save_steps": 3,
                  "output_dir": str(tmp_path / "run"), "bf16": True, "attention_backend": "sdpa", "logging_steps": 1},
        "logging": {"wandb_mode": "disabled"}})
    run_sft(cfg)
    recs = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len([r for r in recs if "train/loss" in r]) == 3 and all(math.isfinite(r.get("train/loss", 0)) for r in recs)


@pytest.mark.parametrize("likelihood", ALL)
def test_grpo_bf16_every_estimator(policy_dir, tmp_path, likelihood):
    rec = load_config(GRPORecipe, None, [], base=recipe_dict(policy_dir, tmp_path / "run", tmp_path / "cache", bf16=True,
                                                             likelihood=likelihood, beta=0.05, num_iterations=2, mc_samples=2, save_steps=2))
    run_grpo(rec, reward_funcs=[EvenIdReward(policy_dir)], reward_weights=[1.0])
    recs = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert len(recs) == 2 and all(math.isfinite(r["loss"]) and math.isfinite(r["kl"]) for r in recs)


@pytest.mark.parametrize("likelihood", ["exact", "mc_elbo"])
def test_ppo_bf16(policy_dir, tmp_path, likelihood):
    rec = load_config(PPORecipe, None, [], base=ppo_recipe_dict(policy_dir, tmp_path / "run", tmp_path / "cache", bf16=True,
                                                                likelihood=likelihood, kl_coef=0.05, mc_samples=2, num_iterations=2))
    EsoPPOTrainer(rec, reward_funcs=[EvenIdReward(policy_dir)], reward_weights=[1.0]).run()
    recs = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(recs) == 2 and all(math.isfinite(r["loss/total"]) and math.isfinite(r["value/mean"]) for r in recs)
    assert (tmp_path / "run" / "value_head.safetensors").exists()


def test_compare_bf16_smoke(policy_dir, tmp_path):
    from test_compare import _cfg

    from esorl.compare.runner import run_compare

    cfg = _cfg(policy_dir, tmp_path)
    cfg.grpo.update(bf16=True, max_steps=2)
    cfg.diagnostics.policies = ["initial"]
    run_compare(cfg)
    assert "exact" in (tmp_path / "cmp" / "report.md").read_text()
