"""GRPO on TRL's GRPOTrainer (EsoGRPOTrainer): the first-step loss and gradient of every
TRL loss type against a hand computation and against the numbers of the hand-written loop it
replaced, TRL's reward contract, advantages, resume, β with a reference model, every estimator,
LoRA, gradient checkpointing, bf16 autocast, evaluation and callbacks, and 1 process vs 2-rank
DDP / ZeRO-2 / ZeRO-3."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from esorl.config import load_config
from esorl.likelihood import exact
from esorl.rl.grpo import GRPORecipe, build_grpo_trainer, run_grpo
from esorl.rl.grpo_trainer import EsoGRPOConfig, EsoGRPOTrainer
from esorl.rollout import Rollout
from esorl.train.common import read_metrics

from rl_fixtures import EvenIdReward, make_tiny_policy, recipe_dict

REPO = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "fixtures" / "grpo_old_loop_first_step.pt"
LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo"]


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    return make_tiny_policy(tmp_path_factory.mktemp("policy"))


def recipe(policy_dir, tmp_path, **grpo):
    return load_config(GRPORecipe, None, [], base=recipe_dict(policy_dir, tmp_path / "run", tmp_path / "cache", **grpo))


def trainer(policy_dir, tmp_path, rewards=None, weights=None, **grpo) -> EsoGRPOTrainer:
    rewards = rewards or [EvenIdReward(policy_dir)]
    return build_grpo_trainer(recipe(policy_dir, tmp_path, **grpo), rewards, weights or [1.0] * len(rewards))


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def trl_first_step(tr: EsoGRPOTrainer, inputs: dict):
    """TRL's loss of one micro-batch (the whole generation batch) and its gradient."""
    tr.model.train()
    tr.current_gradient_accumulation_steps = 1
    tr.model.zero_grad()
    loss = tr.compute_loss(tr.model, inputs)
    loss.backward()
    return loss.detach(), grads(tr.model)


def hand_loss(lt: str, lp, old, adv, mask, args: EsoGRPOConfig, n_items):
    """TRL 1.16's loss types written out from their definitions (docs of GRPOConfig)."""
    r = torch.exp(lp - old)
    A = adv[:, None]
    eh = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    if lt in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        tok = -torch.min(r * A, r.clamp(1 - args.epsilon, 1 + eh) * A)
    elif lt == "cispo":
        tok = -(r.clamp(max=eh).detach() * A * lp)
    elif lt == "sapo":
        tau = torch.where(A > 0, torch.tensor(args.sapo_temperature_pos), torch.tensor(args.sapo_temperature_neg))
        tok = -(torch.sigmoid(tau * (r - 1)) * 4 / tau * A)
    else:  # vespo: φ(w) = e^λ w^k e^{−λw} of the sequence ratio, a detached weight on A·log π
        logw = ((lp - old) * mask).sum(1, keepdim=True).detach()
        k = torch.where(A >= 0, torch.tensor(args.vespo_k_pos), torch.tensor(args.vespo_k_neg))
        lam = torch.where(A >= 0, torch.tensor(args.vespo_lambda_pos), torch.tensor(args.vespo_lambda_neg))
        tok = -(torch.exp(lam + k * logw - lam * logw.exp()) * A * lp)
    m = mask.to(tok.dtype)
    if lt in ("grpo", "sapo"):
        return ((tok * m).sum(1) / m.sum(1).clamp(min=1)).mean()
    if lt == "bnpo":
        return (tok * m).sum() / m.sum()
    if lt == "dr_grpo":
        return (tok * m).sum() / (m.shape[0] * args.max_completion_length)
    if lt == "luspo":
        return (tok * m).sum(1).mean()
    return (tok * m).sum() / n_items  # dapo, cispo, vespo: tokens of the whole generation batch


def test_config_is_trls_with_the_eso_fields():
    from trl import GRPOConfig

    assert issubclass(EsoGRPOConfig, GRPOConfig)
    eso = {f.name for f in dataclasses.fields(EsoGRPOConfig)} - {f.name for f in dataclasses.fields(GRPOConfig)}
    assert eso == {"likelihood", "mc_samples", "p_mask", "sampling_alpha0", "diffusion_steps", "schedule_kind", "attention_backend",
                   "merge_segments", "objective", "spg_eubo_beta", "spg_mix_weight", "wd1_psi", "log_exact_kl"}
    c = EsoGRPOConfig(output_dir="x", scale_rewards=True, report_to="none")
    assert c.scale_rewards == "group" and not c.bf16  # TRL's booleans; bf16 only where CUDA has it
    assert EsoGRPOConfig(output_dir="x", scale_rewards=False, report_to="none").scale_rewards == "none"
    with pytest.raises(ValueError, match="likelihood must be one of"):
        EsoGRPOConfig(output_dir="x", likelihood="nope", report_to="none")
    with pytest.raises(ValueError, match="use_vllm"):
        EsoGRPOConfig(output_dir="x", use_vllm=True, report_to="none")


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_first_step_loss_and_gradient_by_hand(policy_dir, tmp_path, loss_type):
    """Every TRL loss type on the estimator's log-probs: the loss and the gradient of the
    first step equal the definition computed by hand with ``exact`` (old = the sampler's
    recorded log-probs), with a ragged loss mask so that the normalisations differ."""
    tr = trainer(policy_dir, tmp_path, loss_type=loss_type, epsilon_high=0.28)
    inputs = dict(tr.sample_batch(tr.rows_for(0), 0)["inputs"])
    B, N = inputs["completion_ids"].shape
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(B, N, generator=g) < 0.7).long()
    mask[0] = 0  # a sequence with no counted token
    inputs["completion_mask"] = mask
    inputs["num_items_in_batch"] = mask.sum()
    loss, g_trl = trl_first_step(tr, inputs)
    ro = tr._micro_batch_rollout(inputs)
    tr.model.zero_grad()
    lp, _ = exact(tr.model, ro)
    ref = hand_loss(loss_type, lp, inputs["old_per_token_logps"], inputs["advantages"], mask, tr.args, mask.sum())
    ref.backward()
    g_hand = grads(tr.model)
    assert torch.allclose(loss, ref.detach(), atol=1e-6), (loss, ref)
    assert any(v.abs().sum() > 0 for v in g_hand.values())
    for n, v in g_hand.items():
        assert torch.allclose(g_trl[n], v, atol=1e-6, rtol=1e-5), n


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_first_step_equals_the_replaced_hand_written_loop(policy_dir, tmp_path, loss_type):
    """The old loop's first-step loss and gradient (recorded before it was deleted,
    tests/fixtures/record_grpo_old_loop.py) on the same rollout and advantages."""
    fx = torch.load(FIXTURE, weights_only=False)
    tr = trainer(policy_dir, tmp_path, loss_type=loss_type)
    assert abs(sum(p.double().abs().sum().item() for p in tr.model.parameters()) - fx["weights_sum"]) < 1e-6 * fx["weights_sum"]
    ro = Rollout(**fx["rollout"])
    B, N = ro.completion_ids.shape
    inputs = {"prompt_ids": ro.prompt_ids, "prompt_mask": ro.prompt_mask.long(), "completion_ids": ro.completion_ids,
              "completion_mask": torch.ones(B, N, dtype=torch.long), "advantages": fx["advantages"].float(), "num_items_in_batch": torch.tensor(B * N),
              "old_per_token_logps": ro.logp_model, "eso_order": ro.order, "eso_steps": ro.steps, "eso_step_sizes": ro.step_sizes[None].expand(B, -1),
              "eso_sample_ids": ro.sample_ids}
    loss, g = trl_first_step(tr, inputs)
    old = fx["losses"][loss_type]
    flat = torch.cat([g[n].flatten().double() for n in old["param_norms"]])
    proj = torch.randn(3, flat.numel(), generator=torch.Generator().manual_seed(1234), dtype=torch.float64) @ flat
    assert abs(loss.item() - old["loss"]) < 1e-6
    assert flat.norm().item() == pytest.approx(old["grad_norm"], rel=1e-5)
    assert torch.allclose(proj, old["proj"], rtol=1e-4, atol=1e-6 * old["grad_norm"])


def test_python_api_and_trls_reward_contract(policy_dir, tmp_path):
    """The ~10-line use from the README, with rewards that take ``completion_ids``, read
    ``trainer_state`` and dataset columns, and log through ``log_metric`` / ``log_extra``."""
    from datasets import Dataset

    seen = {"steps": [], "ids": None, "answers": None}

    def ids_reward(prompts, completions, completion_ids, **kwargs):
        seen["ids"], seen["texts"] = completion_ids, completions
        return [len(c) / 6 for c in completion_ids]

    def state_reward(prompts, completions, trainer_state, log_metric, log_extra, answer, **kwargs):
        seen["steps"].append(trainer_state.global_step)
        seen["answers"] = answer
        log_metric("my_metric", 1.5)
        log_extra("my_column", ["x"] * len(prompts))
        return [None if a == "skip" else 0.0 for a in answer]

    ds = Dataset.from_list([{"prompt": p, "answer": a} for p, a in [("the movie", "1"), ("a film", "skip"), ("this was", "2"), ("i think", "3")] * 4])
    args = EsoGRPOConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=8, num_generations=4, max_completion_length=6,
                         diffusion_steps=3, learning_rate=1e-3, report_to="none", save_strategy="no", gradient_checkpointing=False, logging_steps=1,
                         log_completions=True)
    trainer = EsoGRPOTrainer(model=str(policy_dir), reward_funcs=[ids_reward, state_reward], args=args, train_dataset=ds)
    trainer.train()
    assert seen["steps"] == [0, 1]
    assert set(seen["answers"]) <= {"1", "2", "3", "skip"}
    tok = trainer.processing_class
    for ids, text in zip(seen["ids"], seen["texts"]):
        # (the tiny policy rarely emits EOS, so this mostly checks the uncut case; the cut
        # itself is checked in test_mask_truncated_completions_means_no_eos, where EOS is likely)
        assert 1 <= len(ids) <= 6 and (tok.eos_token_id not in ids[:-1])
        assert ids[-1] == tok.eos_token_id or len(ids) == 6  # cut just after the first EOS, or uncut (all N tokens)
        assert tok.decode([i for i in ids if i != tok.eos_token_id], skip_special_tokens=True) == text
    recs = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert [r["step"] for r in recs if "loss" in r] == [1, 2]
    assert recs[0]["my_metric"] == 1.5 and recs[0]["rewards/ids_reward/mean"] > 0 and recs[0]["entropy"] > 0
    assert list((tmp_path / "out" / "completions").glob("completions_*.parquet"))  # TRL's completion log


def test_advantages_weights_and_scale_rewards(policy_dir, tmp_path):
    """Several weighted reward functions and each ``scale_rewards`` give TRL's advantages."""

    def len_reward(prompts, completions, **kw):
        return [float(len(c.split())) for c in completions]

    even = EvenIdReward(policy_dir)
    for scale in ("group", "batch", "none"):
        tr = trainer(policy_dir, tmp_path / scale, rewards=[even, len_reward], weights=[1.0, 0.5], scale_rewards=scale)
        b = tr.sample_batch(tr.rows_for(0), 0)
        texts = tr.policy.texts(b["rollout"])
        prompts = [r["prompt"] for r in tr.rows_for(0)]
        r = torch.tensor(even(prompts, texts)) + 0.5 * torch.tensor(len_reward(prompts, texts))
        grp = r.view(-1, 4)
        adv = (grp - grp.mean(1, keepdim=True)).flatten()
        if scale == "group":
            adv = adv / (grp.std(1).repeat_interleave(4) + 1e-4)
        elif scale == "batch":
            adv = adv / (r.std() + 1e-4)
        assert torch.allclose(b["advantages"].float(), adv.float(), atol=1e-5), scale


def test_rollouts_are_keyed_by_seed_step_and_sample(policy_dir, tmp_path):
    tr = trainer(policy_dir, tmp_path)
    a, b = tr.sample_batch(tr.rows_for(0), 0)["rollout"], tr.sample_batch(tr.rows_for(0), 0)["rollout"]
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.order, b.order)
    c = tr.sample_batch(tr.rows_for(0), 1)["rollout"]
    assert not torch.equal(a.completion_ids, c.completion_ids)
    fresh, _ = exact(tr.model, a)  # the sampler's recorded log-probs are exact's
    assert (fresh.detach() - a.logp_model).abs().max() < 1e-5


def test_grpo_learns_a_trivial_reward(policy_dir, tmp_path):
    rec = recipe(policy_dir, tmp_path, max_steps=25, learning_rate=1e-2, per_device_train_batch_size=16, num_generations=8)
    run_grpo(rec, reward_funcs=[EvenIdReward(policy_dir)], reward_weights=[1.0])
    rw = [r["reward"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "reward" in r]
    assert sum(rw[-5:]) / 5 > sum(rw[:5]) / 5 + 0.15, rw
    assert (tmp_path / "run" / "model" / "model.safetensors").exists() and (tmp_path / "run" / "reward_curve.png").exists()


@pytest.mark.parametrize("est", ["exact", "replay", "mc_elbo", "one_step", "coupled"])
def test_every_estimator_with_reference_and_two_iterations(policy_dir, tmp_path, est):
    """μ = 2 (ratios and clipping exercised), β > 0 (reference model rebuilt by TRL through
    AutoModelForCausalLM): finite losses, a KL that grows from 0, entropies from the
    estimator's logits, and at the first iteration the ratio is exactly 1 for MC estimators
    (old log-probs under the same noise seed) and sampler-vs-exact for exact."""
    rec = recipe(policy_dir, tmp_path, likelihood=est, num_iterations=2, max_steps=2, beta=0.1)
    res = run_grpo(rec, reward_funcs=[EvenIdReward(policy_dir)], reward_weights=[1.0])
    assert res["trainer"].ref_model is not None
    recs = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert len(recs) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in recs)
    assert recs[0]["grad_norm"] > 0 and recs[0]["entropy"] > 0
    assert recs[0]["kl"] == pytest.approx(0.0, abs=1e-6) and recs[1]["kl"] > 0
    assert recs[0]["clip_ratio/region_mean"] == 0.0


def test_resume_from_a_trainer_checkpoint_reproduces_the_run(policy_dir, tmp_path):
    from transformers import TrainerCallback

    full = recipe(policy_dir, tmp_path / "a", max_steps=4, save_steps=2)
    run_grpo(full, reward_funcs=[EvenIdReward(policy_dir)], reward_weights=[1.0])
    want = [(r["step"], r["loss"], r["reward"], r["grad_norm"]) for r in read_metrics(tmp_path / "a" / "run" / "metrics.jsonl") if "loss" in r]

    class Crash(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.global_step == 2:
                raise KeyboardInterrupt  # a killed run, just after its step-2 checkpoint

    part = recipe(policy_dir, tmp_path / "b", max_steps=4, save_steps=2)
    tr = build_grpo_trainer(part, [EvenIdReward(policy_dir)], [1.0], callbacks=[Crash()])
    with pytest.raises(KeyboardInterrupt):
        tr.train()
    assert (tmp_path / "b" / "run" / "checkpoint-2").is_dir()
    run_grpo(part, resume="latest", reward_funcs=[EvenIdReward(policy_dir)], reward_weights=[1.0])
    got = [(r["step"], r["loss"], r["reward"], r["grad_norm"]) for r in read_metrics(tmp_path / "b" / "run" / "metrics.jsonl") if "loss" in r]
    assert [g[0] for g in got] == [1, 2, 3, 4]
    for w, g in zip(want, got):
        assert g[0] == w[0] and g[2] == pytest.approx(w[2], abs=1e-9) and g[1] == pytest.approx(w[1], abs=1e-6) and g[3] == pytest.approx(w[3], rel=1e-5)


def test_sync_ref_model_and_eval_strategy_and_callbacks(policy_dir, tmp_path):
    from transformers import TrainerCallback

    logged = []

    class Spy(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            logged.append(dict(logs or {}))

    rec = recipe(policy_dir, tmp_path, beta=0.1, sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=0.5, max_steps=2,
                 eval_strategy="steps", eval_steps=1, num_generations_eval=2, per_device_eval_batch_size=4)
    rec.prompts.eval_prompts = 4
    tr = build_grpo_trainer(rec, [EvenIdReward(policy_dir)], [1.0], callbacks=[Spy()])
    ref0 = [p.detach().clone() for p in tr.ref_model.parameters()]
    tr.train()
    assert any(not torch.equal(a, b) for a, b in zip(ref0, tr.ref_model.parameters()))  # the reference followed the policy
    assert any("eval_reward" in r for r in logged) and any("loss" in r for r in logged)


def test_gradient_accumulation_and_gradient_checkpointing_keep_the_gradient(policy_dir, tmp_path):
    """One micro-batch of 8 vs 2 accumulated micro-batches of 4 vs gradient checkpointing:
    the same first-step gradient norm (dapo normalises by the whole generation batch)."""
    norms = {}
    for name, kw in {"plain": {}, "accum": {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2},
                     "ckpt": {"gradient_checkpointing": True}}.items():
        run_grpo(recipe(policy_dir, tmp_path / name, max_steps=1, **kw), reward_funcs=[EvenIdReward(policy_dir)], reward_weights=[1.0])
        norms[name] = read_metrics(tmp_path / name / "run" / "metrics.jsonl")[0]
    for name in ("accum", "ckpt"):
        assert norms[name]["reward"] == pytest.approx(norms["plain"]["reward"], abs=1e-9), name
        assert norms[name]["grad_norm"] == pytest.approx(norms["plain"]["grad_norm"], rel=1e-5), name


def test_mask_truncated_completions_means_no_eos(policy_dir, tmp_path):
    tr = trainer(policy_dir, tmp_path, mask_truncated_completions=True)
    eos = tr.processing_class.eos_token_id
    with torch.no_grad():  # make EOS likely, so that some completions have one and some not
        tr.model.output_layer.linear.bias[eos] += 5.5
    b = tr.sample_batch(tr.rows_for(0), 0)
    has_eos = (b["rollout"].completion_ids == eos).any(1)
    assert has_eos.any() and not has_eos.all()
    cm = b["inputs"]["completion_mask"]
    assert torch.equal(cm.bool().all(1), has_eos) and torch.equal(~cm.bool().any(1), ~has_eos)
    assert int(b["inputs"]["num_items_in_batch"]) == int(cm.sum())
    # what the reward functions receive (with EOS likely here, so the cut is exercised):
    # the ids up to and including the first EOS, the full row where there is none
    N = b["rollout"].completion_ids.shape[1]
    for ids, row, e in zip(tr._reward_ids, b["rollout"].completion_ids.tolist(), has_eos.tolist()):
        if e:
            assert ids == row[: row.index(eos) + 1] and ids.count(eos) == 1
        else:
            assert ids == row and len(ids) == N


def test_lora_trains_adapters_only_and_exports_merged(policy_dir, tmp_path):
    from esorl.modeling_esolm import EsoLMModel

    rec = recipe(policy_dir, tmp_path, beta=0.1, max_steps=2, learning_rate=1e-2)
    rec.lora.enabled = True
    base = {n: p.detach().clone() for n, p in EsoLMModel.from_pretrained(str(policy_dir)).named_parameters()}
    res = run_grpo(rec, reward_funcs=[EvenIdReward(policy_dir)], reward_weights=[1.0])
    tr = res["trainer"]
    assert tr.ref_model is None  # the reference is the base model with the adapters disabled
    trainable = [n for n, p in tr.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    recs = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert recs[1]["kl"] > 0
    merged = EsoLMModel.from_pretrained(res["model_dir"])
    changed = [n for n, p in merged.named_parameters() if not torch.equal(p, base[n])]
    assert changed and all(("attn" in n or "mlp" in n) for n in changed)
    ro = tr.sample_batch(tr.rows_for(5), 5)["rollout"]
    with torch.no_grad():
        a, _ = exact(tr.model, ro)
        b, _ = exact(merged, ro)
    assert (a - b).abs().max() < 1e-4


def test_bf16_autocast_runs(policy_dir, tmp_path):
    rec = recipe(policy_dir, tmp_path, bf16=True, num_iterations=2, beta=0.1)
    run_grpo(rec, reward_funcs=[EvenIdReward(policy_dir)], reward_weights=[1.0])
    recs = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert len(recs) == 2 and all(torch.isfinite(torch.tensor([r["loss"], r["grad_norm"]])).all() for r in recs)


def _launch(policy_dir, tmp_path, name, launcher, over):
    d = recipe_dict(policy_dir, tmp_path / name, tmp_path / "cache", max_steps=1)
    d["rewards"] = [{"name": str(REPO / "tests" / "rl_fixtures.py") + ":even_id_reward_factory", "kwargs": {"policy_dir": str(policy_dir)}}]
    f = tmp_path / f"{name}.yaml"
    f.write_text(yaml.safe_dump(d))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(launcher + ["-m", "esorl.cli", "grpo", "--config", str(f), *over], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return [r for r in read_metrics(tmp_path / name / "metrics.jsonl") if "loss" in r]


@pytest.mark.slow
def test_grpo_ddp_and_zero_match_single_process(policy_dir, tmp_path):
    """The same generation batch of 8: one process × 8, or 2 ranks × 2 completions × 2
    accumulated micro-batches; identical rollouts and rewards, the same loss and gradient."""
    single = _launch(policy_dir, tmp_path, "single", [sys.executable], ["grpo.per_device_train_batch_size=8"])
    for name in ("cpu_ddp_2proc", "cpu_zero2_2proc", "cpu_zero3_2proc"):
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "accelerate_configs" / f"{name}.yaml")]
        multi = _launch(policy_dir, tmp_path, name, launch, ["grpo.per_device_train_batch_size=2", "grpo.gradient_accumulation_steps=2"])
        assert len(multi) == 1
        assert multi[0]["reward"] == pytest.approx(single[0]["reward"], abs=1e-9), name  # identical rollouts
        assert multi[0]["grad_norm"] == pytest.approx(single[0]["grad_norm"], rel=1e-4), (name, multi[0], single[0])


def test_the_readme_python_example_runs(policy_dir, tmp_path, monkeypatch):
    """The README's ~10-line Python use, as printed (the tiny policy and 2 steps swapped in)."""
    import re

    text = (REPO / "README.md").read_text()
    code = re.search(r"In Python:\n\n```python\n(.*?)```", text, re.S).group(1)
    assert "EsoGRPOTrainer(" in code and "trainer.train()" in code
    code = code.replace('"runs/pretrain_synthetic_cpu/model"', repr(str(policy_dir))).replace("max_steps=50", "max_steps=2")
    code = code.replace('output_dir="runs/my_grpo"', f"output_dir={str(tmp_path / 'out')!r}, report_to='none', gradient_checkpointing=False")
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["trainer"].state.global_step == 2
    assert read_metrics(tmp_path / "out" / "metrics.jsonl")[-1]["step"] == 2


def test_wandb_offline_after_another_wandb_run_in_the_process(policy_dir, tmp_path, monkeypatch):
    """Regression (the main job on a fresh clone): a chained pretraining had started wandb
    (offline) in the process; the GRPO run's wandb then ignored WANDB_MODE and asked for an
    API key. The recipe's mode reaches wandb however the process started it."""
    import wandb

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    wandb.init(project="esorl-test", mode="offline", dir=str(tmp_path)).finish()
    rec = recipe(policy_dir, tmp_path, max_steps=1)
    rec.logging.wandb_mode = "offline"
    run_grpo(rec, reward_funcs=[EvenIdReward(policy_dir)], reward_weights=[1.0])
    assert (tmp_path / "run" / ".wandb_run_id").exists() and list((tmp_path / "run" / "wandb").glob("offline-run-*"))


def test_disable_dropout_reaches_the_eso_lm_blocks(tmp_path):
    """A policy trained with dropout: TRL's disable_dropout only zeroes nn.Dropout modules, the
    Eso-LM's blocks use their own rate. With it (the default), two loss passes on one batch
    give identical gradients, and the exported config keeps the model's dropout."""
    import json

    from esorl.modeling_esolm import EsoLMModel

    src = make_tiny_policy(tmp_path / "p")
    cfg = json.loads((src / "config.json").read_text())
    cfg["dropout"] = 0.3
    (src / "config.json").write_text(json.dumps(cfg))
    tr = trainer(src, tmp_path)
    assert EsoLMModel.from_pretrained(str(src)).config.dropout == 0.3
    inputs = tr.sample_batch(tr.rows_for(0), 0)["inputs"]
    _, g1 = trl_first_step(tr, dict(inputs))
    _, g2 = trl_first_step(tr, dict(inputs))
    assert all(torch.equal(g1[n], g2[n]) for n in g1)
    assert inputs["old_per_token_logps"] is not None


@pytest.mark.parametrize("est", ["exact", "one_step"])
def test_several_updates_per_generation_batch(policy_dir, tmp_path, est):
    """``steps_per_generation`` > ``gradient_accumulation_steps`` (TRL): two optimizer updates
    share one generation batch; the second is off-policy, so old log-probs are used (for
    ``one_step`` scored under the same noise seed as the current pass: ratio 1 at the first
    update, clipping measured at the second)."""
    rec = recipe(policy_dir, tmp_path, likelihood=est, per_device_train_batch_size=4, steps_per_generation=2, max_steps=4,
                 learning_rate=5e-2)
    run_grpo(rec, reward_funcs=[EvenIdReward(policy_dir)], reward_weights=[1.0])
    recs = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert len(recs) == 4 and all(torch.isfinite(torch.tensor(r["grad_norm"])) for r in recs)
    assert [("reward" in r) for r in recs] == [True, False, True, False]  # one generation per two updates
    assert recs[0]["clip_ratio/region_mean"] == 0.0
