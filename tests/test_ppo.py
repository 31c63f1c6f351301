"""PPO over denoising steps (docs/ESOLM.md §8): GAE over steps by hand, the value read-out slots
against a slow loop, values of the single exact pass = a clean-copies-only forward,
learning a trivially learnable reward, exact / one_step / mc_elbo (sequence-level) end to
end, kl_coef > 0 with the reloaded reference, resume, and the recipes."""

import copy
from pathlib import Path

import pytest
import torch

from esorl.config import load_config
from esorl.layout import trajectory_table
from esorl.likelihood import exact
from esorl.rl.ppo import (EsoPPOConfig, EsoPPOTrainer, PPORecipe, clean_values, gae_over_steps, global_whiten, load_value_head, ppo_policy_loss,
                          ppo_value_loss, step_rewards, token_kl, value_slots)
from esorl.schedule import ScheduleConfig
from esorl.train.common import read_metrics

from conftest import random_prompts
from rl_fixtures import EvenIdReward, make_tiny_policy

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    return make_tiny_policy(tmp_path_factory.mktemp("policy"))


def ppo_recipe_dict(policy_dir, out_dir, cache, **ppo) -> dict:
    p = {"output_dir": str(out_dir), "learning_rate": 3e-3, "max_steps": 2, "per_device_train_batch_size": 8, "num_iterations": 1,
         "num_mini_batches": 1, "max_completion_length": 6, "diffusion_steps": 3, "sampling_alpha0": 1.0, "kl_coef": 0.0, "save_steps": 0,
         "eval_steps": 0, "attention_backend": "sdpa", "log_completions": False, "num_completions_to_print": 0}
    p.update(ppo)
    return {
        "policy": {"init_from": str(policy_dir)},
        "prompts": {"source": "synthetic", "synthetic_size": 300, "prompt_words": 2, "eval_prompts": 0, "cache_dir": str(cache)},
        "rewards": [{"name": "keyword", "weight": 1.0, "kwargs": {"positive": ["great", "good", "wonderful"], "normalize": "words"}}],
        "ppo": p,
        "logging": {"wandb_mode": "disabled"},
    }


def trainer(policy_dir, tmp_path, **ppo):
    rec = load_config(PPORecipe, None, [], base=ppo_recipe_dict(policy_dir, tmp_path / "run", tmp_path / "cache", **ppo))
    return EsoPPOTrainer(rec, reward_funcs=[EvenIdReward(policy_dir)], reward_weights=[1.0])


# ----------------------------------------------------------------------------- pure pieces


def test_config_keeps_trl_names():
    import dataclasses

    ours = {f.name for f in dataclasses.fields(EsoPPOConfig)}
    trl_ppo = {"learning_rate", "num_iterations", "num_mini_batches", "per_device_train_batch_size", "gradient_accumulation_steps", "max_steps",
               "gamma", "lam", "epsilon", "cliprange_value", "vf_coef", "kl_coef", "kl_estimator", "whiten_rewards", "max_grad_norm", "seed",
               "output_dir", "logging_steps", "save_steps", "eval_steps", "save_total_limit", "temperature", "max_completion_length",
               "local_rollout_forward_batch_size", "missing_eos_penalty"}
    eso = {"likelihood", "mc_samples", "p_mask", "sampling_alpha0", "diffusion_steps", "schedule_kind", "attention_backend", "bf16", "fp16"}
    assert trl_ppo | eso <= ours, (trl_ppo | eso) - ours
    with pytest.raises(Exception, match="kl_estimator"):
        load_config(PPORecipe, None, ["ppo.kl_estimator=k2"])


def test_gae_over_steps_by_hand():
    r = torch.tensor([[0.0, 0.0, 1.0], [0.5, -1.0, 2.0]])
    v = torch.tensor([[0.5, 0.2, 0.8], [0.1, 0.3, -0.4]])
    adv, ret = gae_over_steps(r, v, gamma=0.9, lam=0.8)
    # row 0: δ3 = 1 − 0.8 = 0.2; δ2 = 0.9·0.8 − 0.2 = 0.52; δ1 = 0.9·0.2 − 0.5 = −0.32
    a3 = 0.2
    a2 = 0.52 + 0.72 * a3
    a1 = -0.32 + 0.72 * a2
    assert torch.allclose(adv[0], torch.tensor([a1, a2, a3]), atol=1e-6)
    assert torch.allclose(ret[0], torch.tensor([a1 + 0.5, a2 + 0.2, 1.0]), atol=1e-6)
    # γ = λ = 1: A_i = Σ_{j ≥ i} r_j − V_i (Monte Carlo returns)
    adv1, ret1 = gae_over_steps(r, v, 1.0, 1.0)
    mc = r.flip(1).cumsum(1).flip(1)
    assert torch.allclose(ret1, mc, atol=1e-6) and torch.allclose(adv1, mc - v, atol=1e-6)
    # λ = 0: one-step TD errors
    adv0, _ = gae_over_steps(r, v, 0.9, 0.0)
    nxt = torch.cat([v[:, 1:], torch.zeros(2, 1)], 1)
    assert torch.allclose(adv0, r + 0.9 * nxt - v, atol=1e-6)


def test_value_slots_against_slow_loop():
    gen = torch.Generator().manual_seed(3)
    for alpha0, T, N in ((1.0, 3, 7), (0.5, 4, 9), (1.0, 1, 5), (0.0, 1, 4)):
        B = 4
        pid, pm = random_prompts(B, 5, 40, gen)
        traj = ScheduleConfig(kind="unified", alpha0=alpha0, num_steps=T).sample(B, N, gen)
        steps = traj.steps_by_position()
        table = trajectory_table(pid, pm, torch.randint(5, 39, (B, N), generator=gen), traj.order, steps)
        P = pid.shape[1]
        fast = value_slots(traj.step_sizes, P)
        K = len(traj.step_sizes)
        assert fast.shape == (K,)
        for b in range(B):
            for i in range(1, K + 1):
                # the last clean copy with s < i in array order (the table's order)
                slow = max(j for j in range(table.shape[1]) if table.valid[b, j] and table.steps[b, j] < i)
                assert int(fast[i - 1]) == slow, (alpha0, T, b, i)
        assert bool(pm[:, P - 1].all())  # slot P − 1 is always a real prompt token


def test_step_rewards_losses_and_whitening():
    steps = torch.tensor([[1, 2, 1, 3], [3, 1, 2, 1]])
    kl = torch.tensor([[0.1, 0.2, 0.3, 0.4], [1.0, 2.0, 3.0, 4.0]])
    r = step_rewards(torch.tensor([1.0, -1.0]), steps, 3, kl, torch.ones(2, 4, dtype=torch.bool), kl_coef=0.5)
    assert torch.allclose(r, torch.tensor([[-0.2, -0.1, 1 - 0.2], [-3.0, -1.5, -1 - 0.5]]))
    assert torch.allclose(token_kl(torch.tensor([0.0]), torch.tensor([0.5]), "k1"), torch.tensor([-0.5]))
    assert token_kl(torch.tensor([0.0]), torch.tensor([0.5]), "k3").item() == pytest.approx(float(torch.exp(torch.tensor(0.5))) - 1.5)
    lp = torch.log(torch.tensor([[1.5, 0.5, 1.0]]))
    loss, clipped, _ = ppo_policy_loss(lp, torch.zeros(1, 3), torch.tensor([[1.0, 1.0, -2.0]]), torch.ones(1, 3), 0.2)
    assert torch.allclose(loss, torch.tensor([[-1.2, -0.5, 2.0]])) and clipped.tolist() == [[True, False, False]]
    # value 1 (old 0, clipped to 0.2) with return 2: the clipped error 1.8² wins; 0.1 → 0: unclipped
    vl, vclip = ppo_value_loss(torch.tensor([1.0, 0.1]), torch.tensor([0.0, 0.0]), torch.tensor([2.0, 0.0]), 0.2)
    assert torch.allclose(vl, torch.tensor([0.5 * 1.8**2, 0.5 * 0.01])) and vclip.tolist() == [True, False]
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 5.0]])
    m = torch.tensor([[True, True, True], [True, False, True]])
    w = global_whiten(x, m)
    assert abs(w[m].mean()) < 1e-6 and abs(w[m].std() - 1) < 1e-4 and w[1, 1] == 0


# ----------------------------------------------------------------------------- the value head


def test_exact_pass_values_equal_clean_copies_forward(policy_dir, tmp_path):
    tr = trainer(policy_dir, tmp_path, max_completion_length=8, diffusion_steps=3)
    # the trainer's own forward (float32, one pass) gives log-probs and per-step values
    lp32, _, v32 = tr.forward_mb(tr.rollout(0)["rollout"], 0)
    assert v32.shape == (8, 3) and lp32.shape == (8, 8) and lp32.requires_grad and v32.requires_grad
    model = copy.deepcopy(tr.model).double().eval()
    head = model.value_head
    torch.nn.init.normal_(head.linear.weight, 0, 1.0)  # non-trivial values
    # mixed prompt lengths (left padding) and steps with k_i > 1
    prompts = ["great", "the movie was really good and", "a", "this film is"]
    tr.policy.model = model
    ro = tr.policy.generate(prompts, 0, 0, torch.arange(4))
    assert (~ro.prompt_mask).any() and ro.step_sizes.max() > 1 and len(ro.step_sizes) > 1
    slots = value_slots(ro.step_sizes, ro.prompt_ids.shape[1])
    with torch.no_grad():
        lp, _, hidden = exact(model, ro, return_hidden=True, backend="sdpa")
        v_exact = head(hidden[:, slots])
        v_clean = clean_values(model, head, ro, slots, "sdpa")
        # the clean forward over every slot gives the same hidden states as the exact pass
        all_slots = torch.arange(hidden.shape[1])
        v_all = clean_values(model, head, ro, all_slots, "sdpa")
    assert torch.allclose(v_exact, v_clean, atol=1e-6, rtol=1e-6), (v_exact - v_clean).abs().max()
    valid = torch.cat([ro.prompt_mask, ro.completion_mask], 1)
    assert torch.allclose(head(hidden)[valid], v_all[valid], atol=1e-6, rtol=1e-6)
    assert v_exact.std() > 1e-2


# ----------------------------------------------------------------------------- training


def test_ppo_learns_a_trivial_reward(policy_dir, tmp_path):
    tr = trainer(policy_dir, tmp_path, max_steps=20, learning_rate=1e-2, per_device_train_batch_size=16, num_iterations=2, num_mini_batches=1)
    tr.run()
    rw = [r["reward"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert sum(rw[-5:]) / 5 > sum(rw[:5]) / 5 + 0.15, rw


@pytest.mark.parametrize("est", ["exact", "one_step", "mc_elbo"])
def test_end_to_end(policy_dir, tmp_path, est):
    # 2 epochs × 2 mini-batches × 2 micro-batches: exercises shuffling, accumulation and the
    # per-epoch old log-probs of the MC estimators
    tr = trainer(policy_dir, tmp_path, likelihood=est, max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                 num_mini_batches=2, num_iterations=2, mc_samples=2, whiten_rewards=est == "one_step")
    assert tr.cfg.sequence_level == (est == "mc_elbo")
    out = tr.run()
    recs = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(recs) == 2
    for r in recs:
        for k in ("loss/policy", "loss/value", "value/explained_variance", "policy/clipfrac", "value/clipfrac", "entropy", "time/prepare", "memory/peak_mb"):
            assert k in r and (r[k] is None or torch.isfinite(torch.tensor(float(r[k])))), (k, r.get(k))
        assert r["grad_norm"] > 0 and r["sequence_level"] == int(est == "mc_elbo")
    assert recs[1]["policy/approx_kl"] > 0  # later mini-batches / epochs saw moved weights
    head = load_value_head(out["value_head"])
    assert torch.equal(head.linear.weight, tr.head.linear.weight.detach().cpu())
    assert (Path(out["model_dir"]) / "config.json").exists()


def test_kl_reference_model_and_resume(policy_dir, tmp_path):
    tr = trainer(policy_dir, tmp_path, kl_coef=0.1, kl_estimator="k3", max_steps=2, save_steps=1, num_iterations=2)
    assert tr.ref is not None  # reloaded from the policy's saved directory
    tr.run()
    recs = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert recs[0]["kl"] < 1e-6 < recs[-1]["kl"]  # step 1: policy = reference; then it moved
    assert recs[-1]["objective/non_score_reward"] < 0
    opt_state = {i: {k: v.clone() for k, v in s.items() if torch.is_tensor(v)} for i, s in tr.opt.state_dict()["state"].items()}
    head_w = tr.head.linear.weight.detach().clone()
    tr2 = trainer(policy_dir, tmp_path, kl_coef=0.1, kl_estimator="k3", max_steps=3, save_steps=1, num_iterations=2)
    tr2.resume("latest")
    assert tr2.step == 2
    assert torch.equal(tr2.head.linear.weight, head_w)  # the value head is in the checkpoint
    st2 = tr2.opt.state_dict()["state"]
    assert set(st2) == set(opt_state)
    for i, s in opt_state.items():
        for k, v in s.items():
            assert torch.equal(v, st2[i][k]), (i, k)
    tr2.run(resume="latest")
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3]


# ----------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("name", ["ppo_sst2_sentiment_cpu", "ppo_synthetic_sentiment_cpu"])
def test_recipes_load(name):
    rec = load_config(PPORecipe, REPO / "recipes" / "rl" / f"{name}.yaml")
    assert rec.ppo.likelihood == "exact" and rec.ppo.top_p == 1.0 and rec.rewards[0].name == "sentiment"
    if "sst2" in name:
        assert rec.prompts.source == "../shared/data/sst2" and rec.policy.init_from == "runs/pretrain_sst2_cpu/model"
        assert rec.policy.pretrain_recipe == "recipes/pretrain/sst2_cpu.yaml"
        assert rec.rewards[0].kwargs == {"model_dir": ".esorl_cache/reward_sentiment_sst2", "train": "../shared/data/sst2/train.tsv",
                                         "dev": "../shared/data/sst2/dev.tsv", "epochs": 2}
    else:
        assert rec.prompts.source == "synthetic"


def test_ppo_takes_trls_reward_contract(policy_dir, tmp_path):
    """The same reward functions as GRPO: ``completion_ids`` (cut at the first EOS, like the
    text), ``trainer_state``, ``log_metric`` and ``log_extra``."""
    seen = {"steps": []}

    def contract_reward(prompts, completions, completion_ids, trainer_state, log_metric, log_extra, **kw):
        seen["steps"].append(trainer_state.global_step)
        seen["ids"], seen["texts"] = completion_ids, completions
        log_metric("my_metric", 2.0)
        log_extra("my_column", ["x"] * len(prompts))
        return [len(ids) / 6 for ids in completion_ids]

    rec = load_config(PPORecipe, None, [], base=ppo_recipe_dict(policy_dir, tmp_path / "run", tmp_path / "cache", log_completions=True))
    tr = EsoPPOTrainer(rec, reward_funcs=[contract_reward], reward_weights=[1.0])
    tr.run()
    assert seen["steps"] == [0, 1]
    eos = tr.tokenizer.eos_token_id
    assert all(1 <= len(ids) <= 6 and eos not in ids[:-1] for ids in seen["ids"])
    recs = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert recs[0]["my_metric"] == 2.0
    assert '"my_column": "x"' in (tmp_path / "run" / "completions.jsonl").read_text()


def test_ppo_gradient_checkpointing_keeps_the_gradient(policy_dir, tmp_path):
    """``ppo.gradient_checkpointing``: the blocks are recomputed in the backward (also in the
    eval-mode loss pass), with the same first-step gradient."""
    norms = []
    for gc in (False, True):
        tr = trainer(policy_dir, tmp_path / str(gc), max_steps=1, gradient_checkpointing=gc)
        from esorl.modeling_esolm import unwrap

        assert unwrap(tr.model).is_gradient_checkpointing == gc
        tr.run()
        norms.append(read_metrics(tmp_path / str(gc) / "run" / "metrics.jsonl")[0]["grad_norm"])
    assert norms[1] == pytest.approx(norms[0], rel=1e-5)


def test_ppo_with_lora_trains_adapters_and_value_head(policy_dir, tmp_path):
    """``lora.enabled``: the policy's adapters and the value head train, nothing else; the
    exported policy is a plain Eso-LM with the adapters merged."""
    from esorl.modeling_esolm import EsoLMModel

    d = ppo_recipe_dict(policy_dir, tmp_path / "run", tmp_path / "cache", learning_rate=1e-2, kl_coef=0.05)
    d["lora"] = {"enabled": True, "r": 4, "lora_alpha": 8}
    tr = EsoPPOTrainer(load_config(PPORecipe, None, [], base=d), reward_funcs=[EvenIdReward(policy_dir)], reward_weights=[1.0])
    trainable = [n for n, p in tr.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "value_head" in n for n in trainable)
    tr.run()
    base = dict(EsoLMModel.from_pretrained(str(policy_dir)).named_parameters())
    out = EsoLMModel.from_pretrained(str(tmp_path / "run" / "model"))
    changed = {n for n, p in out.named_parameters() if not torch.equal(p, base[n])}
    assert changed and all(n.startswith("blocks.") and ("attn" in n or "mlp" in n) for n in changed), changed


def test_resume_redoes_completion_logs_once(policy_dir, tmp_path):
    """A run resumed from an earlier checkpoint drops the metrics and completion records of the
    steps it redoes: each step appears once in metrics.jsonl and completions.jsonl."""
    import json

    trainer(policy_dir, tmp_path, max_steps=2, save_steps=1, log_completions=True).run()
    first = (tmp_path / "run" / "completions.jsonl").read_text().splitlines()
    ck = tmp_path / "run" / "checkpoints" / "step-0000001"
    trainer(policy_dir, tmp_path, max_steps=2, save_steps=1, log_completions=True).run(resume=str(ck))
    recs = [json.loads(x) for x in (tmp_path / "run" / "completions.jsonl").read_text().splitlines()]
    assert len(recs) == len(first) and sorted({r["step"] for r in recs}) == [1, 2]
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2]
