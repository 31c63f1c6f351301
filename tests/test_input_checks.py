"""Public entry points check their inputs' invariants and name the field (regressions of
inputs that used to give wrong numbers silently), and the one-call way to score an existing
text under a chosen order."""

import dataclasses

import pytest
import torch

from esorl.attention import FULL
from esorl.likelihood import ESTIMATORS, estimate, exact, replay
from esorl.policy import EsoPolicy
from esorl.rollout import Rollout
from esorl.sampling import SamplingConfig, generate, left_pad
from esorl.schedule import ScheduleConfig, Trajectory, user_order

from conftest import random_prompts, tiny_model
from rl_fixtures import make_tiny_policy

PARAMS = {"mc_elbo": {"n": 2, "seed": 0}, "one_step": {"seed": 0}, "coupled": {"seed": 0}}


def _rollout(model, B=3, N=8):
    gen = torch.Generator().manual_seed(0)
    pid, pm = random_prompts(B, 5, model.config.vocab_size, gen, min_len=2)
    return generate(model, pid, pm, N, ScheduleConfig(alpha0=0.5, num_steps=3), generator=gen, backend="sdpa")


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_estimators_refuse_steps_that_disagree_with_the_order(name):
    model = tiny_model()
    ro = _rollout(model)
    steps = ro.steps.clone()
    steps[1, ro.order[1, 0]] += 1  # the first revealed position claims the next step
    with pytest.raises(ValueError, match=r"rollout\.steps is inconsistent.*row 1"):
        estimate(model, dataclasses.replace(ro, steps=steps), name, **PARAMS.get(name, {}))


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_estimators_and_sampler_refuse_right_padded_prompts(name):
    model = tiny_model()
    ro = _rollout(model)
    # right-pad row 0 (its prompt was left-padded): same tokens, pad after them
    n = int(ro.prompt_mask[0].sum())
    P = ro.prompt_ids.shape[1]
    pid, pm = ro.prompt_ids.clone(), ro.prompt_mask.clone()
    pid[0, :n], pm[0, :n], pm[0, n:] = ro.prompt_ids[0, P - n :], True, False
    if n < P:
        with pytest.raises(ValueError, match=r"prompt_mask row 0 is not left-padded"):
            estimate(model, dataclasses.replace(ro, prompt_ids=pid, prompt_mask=pm), name, **PARAMS.get(name, {}))
        with pytest.raises(ValueError, match=r"prompt_mask row 0 is not left-padded"):
            generate(model, pid, pm, 4, backend="sdpa")


def test_estimators_refuse_a_rollout_longer_than_the_context_and_non_rollouts():
    ro = _rollout(tiny_model(context=64), N=14)
    small = tiny_model(context=16)  # prompt (≤ 5) + 14 positions do not fit
    with pytest.raises(ValueError, match="model context is 16"):
        exact(small, ro)
    model = small
    with pytest.raises(TypeError, match="expected a Rollout"):
        exact(model, {"completion_ids": ro.completion_ids})


def test_model_forward_needs_an_explicit_mask():
    model = tiny_model()
    ids, pos = torch.zeros(1, 5, dtype=torch.long), torch.arange(5)[None]
    with pytest.raises(ValueError, match="mask is required"):
        model(ids, pos)
    with pytest.raises(ValueError, match=r"positions \(1, 4\)"):
        model(ids, pos[:, :4], FULL)
    model(ids, pos, FULL)  # unmasked only when asked for


def test_from_tokens_scores_an_existing_completion_like_the_sampler():
    """The one-call rollout of existing tokens under the sampler's own trajectory gives the
    sampler's log-probs (exact and replay)."""
    model = tiny_model()
    ro = _rollout(model)
    built = Rollout.from_tokens(ro.prompt_ids, ro.prompt_mask, ro.completion_ids, Trajectory(ro.order, ro.step_sizes))
    assert torch.equal(built.steps, ro.steps)
    for f in (exact, replay):
        lp, _ = f(model, built)
        assert (lp - ro.logp_model).abs().max() < 1e-10
    with pytest.raises(ValueError, match="trajectory.order has shape"):
        Rollout.from_tokens(ro.prompt_ids, ro.prompt_mask, ro.completion_ids[:, :4], Trajectory(ro.order, ro.step_sizes))


def test_policy_rollout_for_texts(tmp_path):
    from esorl import EsoLMModel
    from esorl.data import load_tokenizer

    pdir = make_tiny_policy(tmp_path)
    model = EsoLMModel.from_pretrained(str(pdir)).double().eval()
    pol = EsoPolicy(model, load_tokenizer(str(pdir)), SamplingConfig(6, ScheduleConfig(alpha0=1.0, num_steps=3)))
    ro = pol.rollout_for(["the pasta", "the phone was"], ["was great", "good"])
    assert ro.completion_mask.tolist() == [[True, True], [True, False]]
    lp, valid = pol.log_probs(ro, "exact")
    # left to right, one token per step = the AR factorisation; under another order the value differs
    r2 = pol.rollout_for(["the pasta"], ["was great"], user_order(torch.tensor([[1, 0]]), [1, 1]))
    lp2, _ = pol.log_probs(r2, "exact")
    assert torch.isfinite(lp[valid]).all() and abs(float(lp2.sum() - lp[0].sum())) > 1e-6
    with pytest.raises(ValueError, match="2 prompts for 1 completions"):
        pol.rollout_for(["a", "b"], ["c"])


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_an_over_long_prompt_fails_at_set_up_naming_file_and_row(tmp_path, algo):
    """Regression: one 61-token prompt for a context of 48 used to kill the run when its step
    came. Now the trainer refuses at construction (before the reward model is built or any
    step runs), naming the source, the row and the limit; eval prompts are checked too."""
    import json

    from esorl.config import load_config
    from esorl.rl.grpo import GRPORecipe, build_grpo_trainer
    from esorl.rl.ppo import EsoPPOTrainer, PPORecipe

    from rl_fixtures import recipe_dict
    from test_ppo import ppo_recipe_dict

    pdir = make_tiny_policy(tmp_path)
    data = tmp_path / "prompts"
    data.mkdir()
    short = [{"prompt": "the pasta was"} for _ in range(12)]
    long_row = {"prompt": " ".join(["good"] * 60)}  # 60 words + BOS = 61 tokens > 48
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in short[:7] + [long_row] + short[7:]))
    (data / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in short))
    base = recipe_dict(pdir, tmp_path / "run", tmp_path / "cache") if algo == "grpo" else ppo_recipe_dict(pdir, tmp_path / "run", tmp_path / "cache")
    base["prompts"] = {"source": str(data), "prompt_field": "prompt", "eval_prompts": 4}
    (tmp_path / "rm.py").write_text("class Never:\n    def __init__(self, **kw):\n        raise RuntimeError('the reward was built')\n")
    base["rewards"] = [{"name": f"{tmp_path / 'rm.py'}:Never", "kwargs": {"x": 1}}]  # set-up must fail before rewards are built
    make = (lambda b: build_grpo_trainer(load_config(GRPORecipe, None, [], base=b))) if algo == "grpo" else (lambda b: EsoPPOTrainer(load_config(PPORecipe, None, [], base=b)))
    with pytest.raises(ValueError, match=r"prompts '.*prompts' split 'train'.*row 7, has 61 tokens.*max_seq_len=48.*room for 42"):
        make(base)
    assert not (tmp_path / "run").exists()  # nothing written
    # the same row in the eval split is caught too
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in short))
    (data / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in short[:2] + [long_row]))
    with pytest.raises(ValueError, match=r"split 'dev'.*row 2, has 61 tokens"):
        make(base)
