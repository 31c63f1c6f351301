"""Regressions of every training runner (pretraining, SFT through it, GRPO, PPO):

* a non-finite gradient with a finite loss never reaches the weights, the optimizer state or
  a checkpoint (the update is skipped and counted; a run of such updates stops, naming the
  step the logs show and a checkpoint known to be finite);
* the learning rate used by each ``optimizer.step`` is the schedule of the *current* config
  at that update, from the first update on and right after a resume with a longer schedule;
* a resumed run honours the optimizer settings of its new config, and refuses (before any
  work, naming the setting) a change it cannot honour.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from esorl.config import load_config
from esorl.rl.grpo import GRPORecipe, build_grpo_trainer, run_grpo
from esorl.rl.ppo import EsoPPOTrainer, PPORecipe
from esorl.train.arguments import lr_factor
from esorl.train.common import MAX_CONSECUTIVE_SKIPPED, CheckpointError, TrainingDiverged, read_metrics
from esorl.train.pretrain import run_pretrain

from rl_fixtures import EvenIdReward, make_tiny_policy, recipe_dict
from test_ppo import ppo_recipe_dict
from test_pretrain import tiny_cfg


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    return make_tiny_policy(tmp_path_factory.mktemp("policy"))


def grpo_recipe(policy_dir, out, **kw):
    return load_config(GRPORecipe, None, [], base=recipe_dict(policy_dir, out / "run", out / "cache", **kw))


def grpo_run(policy_dir, out, resume=False, **kw):
    """A GRPO run on the tiny policy (TRL's GRPOTrainer under esorl's run directory)."""
    return run_grpo(grpo_recipe(policy_dir, out, **kw), resume=resume, reward_funcs=[EvenIdReward(policy_dir)], reward_weights=[1.0])


def grpo_trainer(policy_dir, out, callbacks=None, **kw):
    return build_grpo_trainer(grpo_recipe(policy_dir, out, **kw), [EvenIdReward(policy_dir)], [1.0], callbacks=callbacks)


def ppo(policy_dir, out, **kw):
    rec = load_config(PPORecipe, None, [], base=ppo_recipe_dict(policy_dir, out / "run", out / "cache", **kw))
    return EsoPPOTrainer(rec, reward_funcs=[EvenIdReward(policy_dir)], reward_weights=[1.0])


@pytest.fixture
def lr_log(monkeypatch):
    """The learning rate of every ``AdamW.step`` call, in order."""
    seen = []
    real = torch.optim.AdamW.step

    def step(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return real(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    return seen


def poison_grad_once(param: torch.nn.Parameter, times: int = 1):
    """Multiply the next ``times`` gradients of ``param`` by NaN (a backward overflow)."""
    left = [times]

    def hook(g):
        if left[0] > 0:
            left[0] -= 1
            return g * float("nan")
        return g

    return param.register_hook(hook)


def all_finite_checkpoints(run: Path):
    ck = sorted((run / "checkpoints").glob("step-*"))
    assert ck, "no checkpoint written"
    for d in ck:
        for f in d.glob("*.safetensors"):
            for k, v in load_file(str(f)).items():
                assert torch.isfinite(v).all(), (d.name, f.name, k)
        for f in d.glob("optimizer*.bin"):
            st = torch.load(f, weights_only=True)
            for s in st["state"].values():
                for k, v in s.items():
                    if isinstance(v, torch.Tensor) and v.is_floating_point():
                        assert torch.isfinite(v).all(), (d.name, f.name, k)
        assert json.loads((d / "trainer_state.json").read_text())["verified_finite"] is True
    return ck


# ----------------------------------------------------------------------------- non-finite gradients


def trl_checkpoints_finite(run: Path):
    """Every ``checkpoint-*`` of a Trainer run holds finite weights and optimizer state."""
    ck = sorted(run.glob("checkpoint-*"), key=lambda d: int(d.name.split("-")[1]))
    assert ck, "no checkpoint written"
    for d in ck:
        for k, v in load_file(str(d / "model.safetensors")).items():
            assert torch.isfinite(v).all(), (d.name, k)
        st = torch.load(d / "optimizer.pt", weights_only=True)
        for s in st["state"].values():
            for k, v in s.items():
                if isinstance(v, torch.Tensor) and v.is_floating_point():
                    assert torch.isfinite(v).all(), (d.name, k)
    return ck


class _Poison:
    """A TrainerCallback that makes the gradient of ``param`` NaN at the given optimizer steps
    (1-based) and records the weights after every step."""

    def __new__(cls, param, steps, params):
        from transformers import TrainerCallback

        class P(TrainerCallback):
            snapshots = []

            def on_step_begin(self, args, state, control, **kw):
                if state.global_step + 1 in steps:
                    poison_grad_once(param)

            def on_step_end(self, args, state, control, **kw):
                self.snapshots.append([p.detach().clone() for p in params])

        return P()


def test_grpo_nan_gradient_is_skipped_not_applied_or_checkpointed(policy_dir, tmp_path):
    from esorl.policy import EsoPolicy  # noqa: F401  (the trainer's policy wraps the same model)

    rec = grpo_recipe(policy_dir, tmp_path, max_steps=3, save_steps=1)
    tr = build_grpo_trainer(rec, [EvenIdReward(policy_dir)], [1.0])
    params = [p for p in tr.model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    spy = _Poison(params[0], {1}, params)
    tr.add_callback(spy)
    tr.train()
    # step 1's update was dropped: weights equal the initial ones; step 2 updated again
    assert all(torch.equal(a, b) for a, b in zip(before, spy.snapshots[0]))
    assert not all(torch.equal(a, b) for a, b in zip(spy.snapshots[0], spy.snapshots[1]))
    recs = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert [r["train/skipped_updates"] for r in recs] == [1, 1, 1]
    assert recs[0]["grad_norm"] == "nan" and math.isfinite(recs[1]["grad_norm"])
    trl_checkpoints_finite(tmp_path / "run")


def test_grpo_repeated_nan_gradients_stop(policy_dir, tmp_path):
    rec = grpo_recipe(policy_dir, tmp_path, max_steps=MAX_CONSECUTIVE_SKIPPED + 3, save_steps=1, save_total_limit=None)
    tr = build_grpo_trainer(rec, [EvenIdReward(policy_dir)], [1.0])
    params = [p for p in tr.model.parameters() if p.requires_grad]
    tr.add_callback(_Poison(params[0], set(range(3, 100)), params))
    with pytest.raises(TrainingDiverged, match=rf"in {MAX_CONSECUTIVE_SKIPPED} consecutive updates up to step {MAX_CONSECUTIVE_SKIPPED + 2}"):
        tr.train()
    ck = trl_checkpoints_finite(tmp_path / "run")
    # the checkpoints of the skipped steps are finite and hold step 2's weights
    assert ck[-1].name == f"checkpoint-{MAX_CONSECUTIVE_SKIPPED + 1}"
    w2, wl = load_file(str(tmp_path / "run" / "checkpoint-2" / "model.safetensors")), load_file(str(ck[-1] / "model.safetensors"))
    assert all(torch.equal(w2[k], wl[k]) for k in w2)


def test_rl_nan_gradient_is_skipped_not_applied_or_checkpointed(policy_dir, tmp_path):
    make = ppo
    tr = make(policy_dir, tmp_path, max_steps=3, save_steps=1)
    params = [p for p in tr.model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    real_train_step = tr.train_step
    snapshots = []

    def train_step():
        if tr.step == 0:
            poison_grad_once(params[0])
        out = real_train_step()
        snapshots.append([p.detach().clone() for p in params])
        return out

    tr.train_step = train_step
    tr.run()
    # step 1's update was dropped: weights equal the initial ones; step 2 updated again
    assert all(torch.equal(a, b) for a, b in zip(before, snapshots[0]))
    assert not all(torch.equal(a, b) for a, b in zip(snapshots[0], snapshots[1]))
    assert all(torch.isfinite(p).all() for p in tr.model.parameters())
    recs = read_metrics(tmp_path / "run" / "metrics.jsonl")
    key = "skipped_updates"
    assert [r[key] for r in recs if key in r] == [1, 1, 1]
    grad_key = "grad_norm"
    assert not math.isfinite(recs[0][grad_key]) and math.isfinite(recs[1][grad_key])
    all_finite_checkpoints(tmp_path / "run")


def test_pretrain_nan_gradient_is_skipped(tmp_path, monkeypatch):
    import esorl.train.pretrain as pt

    real = pt.hybrid_loss
    snapshots = {}

    def poisoned(model, x, v, cfg, seed, step, *a, **k):
        out = real(model, x, v, cfg, seed, step, *a, **k)
        if model.training and step == 2 and not snapshots.get("hooked"):
            snapshots["hooked"] = True
            snapshots["before"] = [p.detach().clone() for p in model.parameters()]
            poison_grad_once(next(model.parameters()))
        if model.training and step == 3 and "after" not in snapshots:
            snapshots["after"] = [p.detach().clone() for p in model.parameters()]
        return out

    monkeypatch.setattr(pt, "hybrid_loss", poisoned)
    # one micro-batch per step, so the poisoned gradient is the step's whole gradient
    run_pretrain(tiny_cfg(tmp_path, **{"training.per_device_train_batch_size": 8, "training.gradient_accumulation_steps": 1, "training.save_steps": 1}))
    assert all(torch.equal(a, b) for a, b in zip(snapshots["before"], snapshots["after"]))
    recs = read_metrics(tmp_path / "run" / "metrics.jsonl")
    skipped = {r["step"]: r["train/skipped_updates"] for r in recs if "train/skipped_updates" in r}
    assert skipped[2] == 0 and skipped[3] == 1 and skipped[6] == 1
    all_finite_checkpoints(tmp_path / "run")


# ----------------------------------------------------------------------------- learning-rate schedule


def test_lr_factor_warmup_and_cosine():
    """transformers' schedules as pure functions of the update (the first warm-up update at 0,
    as Trainer's LambdaLR; cosine_with_min_lr floors at min_lr_rate)."""
    assert [lr_factor(s, "constant_with_warmup", 4, 5) for s in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert [lr_factor(s, "constant", 4, 5) for s in range(5)] == [1.0] * 5  # transformers' constant has no warm-up
    cos = [lr_factor(s, "cosine", 0, 4) for s in range(4)]
    assert cos[0] == 1.0 and all(a > b > 0 for a, b in zip(cos, cos[1:]))
    assert lr_factor(3, "cosine_with_min_lr", 0, 4, {"min_lr_rate": 0.1}) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 3 / 4)))
    with pytest.raises(ValueError, match="reduce_lr_on_plateau"):
        lr_factor(0, "reduce_lr_on_plateau", 0, 4)


def test_ppo_warmup_lr_at_each_optimizer_step(policy_dir, tmp_path, lr_log):
    ppo(policy_dir, tmp_path, learning_rate=1e-3, warmup_steps=4, max_steps=5, lr_scheduler_type="constant_with_warmup").run()
    assert lr_log == pytest.approx([0.0, 2.5e-4, 5e-4, 7.5e-4, 1e-3])  # transformers' warm-up, as GRPO's


def test_grpo_lr_is_transformers_schedule_over_optimizer_updates(policy_dir, tmp_path, lr_log):
    """GRPO follows TRL: ``max_steps`` and ``warmup_steps`` count optimizer updates (μ per
    generation batch) and the LR is transformers' schedule (its warm-up starts at 0)."""
    grpo_run(policy_dir, tmp_path, learning_rate=1e-3, warmup_steps=3, max_steps=4, num_iterations=2, lr_scheduler_type="constant_with_warmup")
    assert lr_log == pytest.approx([0.0, 1e-3 / 3, 2e-3 / 3, 1e-3])


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_rl_resume_with_a_longer_cosine_schedule(policy_dir, tmp_path, lr_log, algo):
    if algo == "grpo":
        grpo_run(policy_dir, tmp_path, learning_rate=1e-3, lr_scheduler_type="cosine", max_steps=2, save_steps=1)
    else:
        ppo(policy_dir, tmp_path, learning_rate=1e-3, lr_scheduler_type="cosine", max_steps=2, save_steps=1).run()
    assert lr_log == pytest.approx([1e-3, 1e-3 * 0.5 * (1 + math.cos(math.pi / 2))])
    lr_log.clear()
    # resumed into a 6-step schedule with another peak LR and weight decay: both honoured
    kw = dict(learning_rate=2e-3, lr_scheduler_type="cosine", max_steps=6, save_steps=1, weight_decay=0.1)
    if algo == "grpo":
        opt = grpo_run(policy_dir, tmp_path, resume="latest", **kw)["trainer"].optimizer
    else:
        tr = ppo(policy_dir, tmp_path, **kw)
        tr.run(resume="latest")
        opt = tr.opt
    assert lr_log == pytest.approx([2e-3 * 0.5 * (1 + math.cos(math.pi * s / 6)) for s in range(2, 6)])
    assert opt.param_groups[0]["weight_decay"] == 0.1


def test_pretrain_resume_honours_a_new_schedule_and_batch_size(tmp_path, lr_log):
    run_pretrain(tiny_cfg(tmp_path, **{"training.max_steps": 3, "training.warmup_steps": 0, "training.lr_scheduler_type": "cosine_with_min_lr"}))
    first = list(lr_log)
    assert first[0] == pytest.approx(3e-3)
    lr_log.clear()
    # longer schedule, larger LR, larger batch: every change is honoured from the first resumed step
    cfg = tiny_cfg(tmp_path, **{"training.max_steps": 5, "training.warmup_steps": 0, "training.lr_scheduler_type": "cosine_with_min_lr", "training.learning_rate": 6e-3,
                                "training.per_device_train_batch_size": 8, "training.gradient_accumulation_steps": 2})
    run_pretrain(cfg, resume="latest")
    expected = [6e-3 * lr_factor(s, "cosine_with_min_lr", 0, 5, {"min_lr_rate": 0.1}) for s in (3, 4)]
    assert lr_log == pytest.approx(expected)
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-0000005" / "trainer_state.json").read_text())
    assert state["data_position"] == 3 * 8 + 2 * 16  # rows consumed, carried across the batch-size change


def test_resume_refuses_what_it_cannot_honour_before_any_work(policy_dir, tmp_path):
    run_pretrain(tiny_cfg(tmp_path, **{"training.max_steps": 3}))
    with pytest.raises(CheckpointError, match=r"training\.seed 0 → 1.*data order"):
        run_pretrain(tiny_cfg(tmp_path, **{"training.max_steps": 5, "training.seed": 1}), resume="latest")
    with pytest.raises(CheckpointError, match=r"model\.hidden_size 32 → 64"):
        run_pretrain(tiny_cfg(tmp_path, **{"training.max_steps": 5, "model.hidden_size": 64}), resume="latest")
    grpo_run(policy_dir, tmp_path / "g", max_steps=1, save_steps=1)
    with pytest.raises(CheckpointError, match=r"grpo\.seed 42 → 3"):
        grpo_run(policy_dir, tmp_path / "g", resume="latest", max_steps=2, seed=3, save_steps=1)


# ----------------------------------------------------------------------------- review regressions


def test_gradient_does_not_depend_on_micro_batching(tmp_path):
    """The accumulated gradient is that of the global batch, whatever micro_batch_size (an
    accelerate accumulation count divided it by the number of micro-batches)."""
    norms = []
    for micro in (8, 4, 2):
        run_pretrain(tiny_cfg(tmp_path / str(micro), **{"training.max_steps": 1, "training.per_device_train_batch_size": micro, "training.gradient_accumulation_steps": 8 // micro, "training.eval_steps": 0}))
        norms.append(read_metrics(tmp_path / str(micro) / "run" / "metrics.jsonl")[0]["train/grad_norm"])
    assert norms[1] == pytest.approx(norms[0], rel=1e-5) and norms[2] == pytest.approx(norms[0], rel=1e-5), norms


def test_checkpoints_of_the_previous_version_resume(tmp_path):
    """A checkpoint as the previous version wrote it (the LR scheduler saved as accelerate's
    custom object, no recorded settings) resumes."""
    run_pretrain(tiny_cfg(tmp_path, **{"training.max_steps": 3}))
    ck = tmp_path / "run" / "checkpoints" / "step-0000003"
    torch.save({"base_lrs": [3e-3], "last_epoch": 3, "_step_count": 4}, ck / "custom_checkpoint_0.pkl")
    st = json.loads((ck / "trainer_state.json").read_text())
    for k in ("config", "zero_stage", "verified_finite", "skipped_updates"):
        st.pop(k, None)
    (ck / "trainer_state.json").write_text(json.dumps(st))
    run_pretrain(tiny_cfg(tmp_path, **{"training.max_steps": 5}), resume="latest")
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "train/loss" in r] == [1, 2, 3, 4, 5]


def test_a_refused_resume_writes_nothing(policy_dir, tmp_path):
    run_pretrain(tiny_cfg(tmp_path, **{"training.max_steps": 2}))
    run = tmp_path / "run"
    before = {f: (run / f).read_bytes() for f in ("config.yaml", "metrics.jsonl")}
    with pytest.raises(CheckpointError, match="training.seed"):
        run_pretrain(tiny_cfg(tmp_path, **{"training.max_steps": 4, "training.seed": 7}), resume="latest")
    assert {f: (run / f).read_bytes() for f in before} == before
    grpo_run(policy_dir, tmp_path / "g", max_steps=1, save_steps=1)
    g = tmp_path / "g" / "run"
    before = {f: (g / f).read_bytes() for f in ("config.yaml", "metrics.jsonl")}
    with pytest.raises(CheckpointError, match="grpo.seed"):
        grpo_run(policy_dir, tmp_path / "g", resume="latest", max_steps=2, seed=9, save_steps=1)
    assert {f: (g / f).read_bytes() for f in before} == before


def test_resume_with_nothing_saved_starts_from_step_zero(tmp_path, policy_dir):
    run_pretrain(tiny_cfg(tmp_path, **{"training.max_steps": 2}), resume="latest")
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "train/loss" in r] == [1, 2]
    grpo_run(policy_dir, tmp_path / "g", resume="latest", max_steps=1)
    assert [r["step"] for r in read_metrics(tmp_path / "g" / "run" / "metrics.jsonl") if "loss" in r] == [1]


def test_resume_honours_moved_data_and_cache_dirs(tmp_path):
    run_pretrain(tiny_cfg(tmp_path, **{"training.max_steps": 2}))
    run_pretrain(tiny_cfg(tmp_path, **{"training.max_steps": 3, "data.cache_dir": str(tmp_path / "moved_cache")}), resume="latest")
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "train/loss" in r] == [1, 2, 3]
