"""The comparison: end to end with its report, the 1/n gradient variance of mc_elbo, and
identical rollouts across estimators."""

import json
from pathlib import Path

import pytest
import torch

from esorl.compare.diagnostics import mc_elbo_fixed_batch_variance
from esorl.compare.runner import CompareConfig, run_compare
from esorl.config import load_config
from esorl.rl.grpo import GRPORecipe, build_grpo_trainer
from esorl.train.common import read_metrics

from rl_fixtures import EvenIdReward, make_tiny_policy, recipe_dict

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    return make_tiny_policy(tmp_path_factory.mktemp("policy"))


def _cfg(policy_dir, tmp_path, **extra):
    base = recipe_dict(policy_dir, tmp_path / "unused", tmp_path / "cache", max_steps=3, beta=0.05)
    g = base["grpo"]
    g.pop("output_dir")
    g.update(save_strategy="steps", save_steps=10)
    d = {"output_dir": str(tmp_path / "cmp"), "policy": base["policy"], "prompts": base["prompts"], "grpo": g,
         "rewards": [{"name": "rl_fixtures:EvenIdReward", "kwargs": {"policy_dir": str(policy_dir)}}],
         "estimators": [{"name": "exact", "likelihood": "exact"}, {"name": "mc4", "likelihood": "mc_elbo", "mc_samples": 4}],
         "seeds": [0], "reward_threshold": 0.6,
         "diagnostics": {"draws": 3, "fresh_batches": 2, "ref_n": 8, "when": ["initial", "final"], "mc_n_scaling": [4, 16]},
         "logging": {"wandb_mode": "disabled"}}
    d.update(extra)
    return load_config(CompareConfig, None, [], base=d)


def test_compare_end_to_end_report(policy_dir, tmp_path):
    cfg = _cfg(policy_dir, tmp_path)
    res = run_compare(cfg)
    out = tmp_path / "cmp"
    report = (out / "report.md").read_text()
    for p in ("reward_vs_step.png", "reward_vs_time.png", "kl_vs_step.png", "cost_per_step.png", "grad_variance_and_logprob_error.png"):
        assert (out / p).stat().st_size > 1000, p
        assert p in report
    # the table's numbers are the metrics' numbers
    for name in ("exact", "mc4"):
        recs = [r for r in read_metrics(out / "runs" / f"{name}-s0" / "metrics.jsonl") if "loss" in r]
        assert len(recs) == 3
        final = sum(r["reward"] for r in recs[-5:]) / len(recs[-5:])
        row = next(line for line in report.splitlines() if line.startswith(f"| {name} |") and "±" in line)
        cells = [c.strip() for c in row.split("|")]
        assert cells[8] == "—"  # not diverged
        assert float(cells[2]) == pytest.approx(recs[0]["reward"], abs=5e-4)
        assert float(cells[3].split("±")[0]) == pytest.approx(final, abs=5e-4)
        step_time = sum(r["step_time"] for r in recs) / len(recs)
        assert float(cells[5]) == pytest.approx(step_time, abs=6e-3)
    diag = json.loads((out / "diagnostics.json").read_text())
    assert diag["initial"]["estimators"]["exact"]["grad_var_fixed_batch"] == 0.0
    assert "final" in diag
    # a finished run is not run again
    mtime = (out / "runs" / "exact-s0" / "metrics.jsonl").stat().st_mtime
    run_compare(_cfg(policy_dir, tmp_path, diagnostics={"enabled": False}))
    assert (out / "runs" / "exact-s0" / "metrics.jsonl").stat().st_mtime == mtime


def test_mc_elbo_gradient_variance_falls_like_one_over_n(policy_dir, tmp_path):
    rec = load_config(GRPORecipe, None, [], base=recipe_dict(policy_dir, tmp_path / "run", tmp_path / "cache", per_device_train_batch_size=16))
    tr = build_grpo_trainer(rec, [EvenIdReward(policy_dir)], [1.0])
    b = tr.sample_batch(tr.rows_for(0), 0)
    adv = torch.randn(b["rollout"].batch_size, generator=torch.Generator().manual_seed(0))  # non-degenerate advantages
    v4 = mc_elbo_fixed_batch_variance(tr.policy, b["rollout"], adv, 4, 1.0, draws=24)
    v16 = mc_elbo_fixed_batch_variance(tr.policy, b["rollout"], adv, 16, 1.0, draws=24)
    assert v4 > 0 and v16 > 0
    assert 2.0 < v4 / v16 < 8.0, (v4, v16)  # ≈ 4 for 1/n


def test_identical_rollouts_across_estimators(policy_dir, tmp_path):
    ros = []
    for est in ("exact", "mc_elbo", "one_step", "coupled"):
        rec = load_config(GRPORecipe, None, [], base=recipe_dict(policy_dir, tmp_path / est, tmp_path / "cache", likelihood=est, seed=3))
        tr = build_grpo_trainer(rec, [EvenIdReward(policy_dir)], [1.0])
        ros.append(tr.sample_batch(tr.rows_for(0), 0)["rollout"])
    for r in ros[1:]:
        assert torch.equal(r.completion_ids, ros[0].completion_ids)
        assert torch.equal(r.order, ros[0].order) and torch.equal(r.step_sizes, ros[0].step_sizes)


def test_a_diverged_run_is_reported_not_fatal(policy_dir, tmp_path, monkeypatch):
    import esorl.rl.grpo_trainer as gt
    from esorl.train.common import TrainingDiverged

    real = gt.EsoGRPOTrainer._compute_loss

    def boom(self, model, inputs):
        if self.args.likelihood == "mc_elbo" and self.state.global_step == 1:
            raise TrainingDiverged("loss is inf at step 1: stopping (test)")
        return real(self, model, inputs)

    monkeypatch.setattr(gt.EsoGRPOTrainer, "_compute_loss", boom)
    cfg = _cfg(policy_dir, tmp_path, diagnostics={"enabled": False})
    run_compare(cfg)
    out = tmp_path / "cmp"
    assert (out / "runs" / "mc4-s0" / "DIVERGED").exists()
    assert (out / "runs" / "exact-s0" / "model" / "config.json").exists()
    row = next(line for line in (out / "report.md").read_text().splitlines() if line.startswith("| mc4 |"))
    assert row.rstrip("| ").endswith("0: 1")  # seed 0 diverged after logged step 1


def test_log_ratio_clamp_keeps_the_loss_finite(policy_dir, tmp_path):
    """Old and reference log-probs hundreds of nats away (an importance-weighted MC estimate)
    give a finite loss and gradient: the targets are bounded to ±LOG_RATIO_CLAMP."""
    rec = load_config(GRPORecipe, None, [], base=recipe_dict(policy_dir, tmp_path / "run", tmp_path / "cache", beta=0.1))
    tr = build_grpo_trainer(rec, [EvenIdReward(policy_dir)], [1.0])
    inputs = dict(tr.sample_batch(tr.rows_for(0), 0)["inputs"])
    inputs["old_per_token_logps"] = inputs["old_per_token_logps"] - 900.0
    inputs["eso_ref_logps"] = inputs["eso_ref_logps"] + 900.0
    tr.model.train()
    tr.current_gradient_accumulation_steps = 1
    loss = tr.compute_loss(tr.model, inputs)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in tr.model.parameters() if p.grad is not None)


def test_plots_are_readable(policy_dir, tmp_path, monkeypatch):
    """Every plot has labelled axes and a legend matching its series; the KL plot is on a
    log scale (the arms differ by orders of magnitude); the diagnostics bars never overlap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import esorl.compare.report as rep

    seen = {}
    real = rep.save_figure

    def spy(fig, path):
        seen[path.name] = [(ax.get_yscale(), [(round(p.get_x(), 6), round(p.get_width(), 6)) for p in ax.patches]) for ax in fig.axes]
        return real(fig, path)

    monkeypatch.setattr(rep, "save_figure", spy)
    run_compare(_cfg(policy_dir, tmp_path, **{"diagnostics": {"draws": 2, "fresh_batches": 1, "ref_n": 4, "when": ["initial"], "mc_n_scaling": [2]}}))
    assert seen["kl_vs_step.png"][0][0] == "symlog"
    for yscale, patches in seen["grad_variance_and_logprob_error.png"]:
        spans = sorted(patches)
        assert all(a[0] + a[1] <= b[0] + 1e-9 for a, b in zip(spans, spans[1:])), spans  # no overlapping bars
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1], label="a")
    ax.plot([0, 1], [1, 0], label="b")
    with pytest.raises(ValueError, match="no x-axis label"):
        rep.check_figure(fig)
    ax.set_xlabel("step"), ax.set_ylabel("reward")
    with pytest.raises(ValueError, match="without a legend"):
        rep.check_figure(fig)
    ax.legend()
    rep.check_figure(fig)


def test_paired_statistics_against_hand_computation():
    import math

    from esorl.compare.stats import MIN_SEEDS, holm, paired_difference, verdict

    ref = {0: 0.50, 1: 0.60, 2: 0.55, 3: 0.70, 4: 0.65}
    arm = {0: 0.40, 1: 0.52, 2: 0.50, 3: 0.58, 4: 0.60, 9: 1.0}  # seed 9 has no pair: ignored
    r = paired_difference(arm, ref)
    d = [arm[s] - ref[s] for s in range(5)]
    m = sum(d) / 5
    sd = math.sqrt(sum((x - m) ** 2 for x in d) / 4)
    t = m / (sd / math.sqrt(5))
    assert r["n"] == 5 and r["mean"] == pytest.approx(m)
    # t quantile 0.975 with 4 df = 2.776445; p from the t distribution with 4 df
    assert r["ci"][0] == pytest.approx(m - 2.776445 * sd / math.sqrt(5), rel=1e-5)
    assert r["ci"][1] == pytest.approx(m + 2.776445 * sd / math.sqrt(5), rel=1e-5)
    # two-sided p of Student's t with 4 degrees of freedom, in closed form (no scipy)
    a = abs(t) / math.sqrt(4 + t * t)
    cdf = 0.5 + 0.5 * a * (1 + 0.5 * (1 - a * a))  # F(t) for ν = 4: ½ + ½·a·(1 + (1 − a²)/2), a = t/√(ν + t²)
    assert t == pytest.approx(-5.8038, rel=1e-4) and r["p"] == pytest.approx(2 * (1 - cdf), rel=1e-6)
    assert holm([0.01, 0.04, float("nan"), 0.03]) == pytest.approx([0.03, 0.06, float("nan"), 0.06], nan_ok=True)
    assert verdict(r, 0.004).startswith("differs") and verdict(r, 0.2).startswith("no difference detected")
    assert verdict(paired_difference({0: 1.0, 1: 2.0}, {0: 1.0, 1: 1.5}), 0.0).startswith(f"not tested (2 paired seed(s); a difference is stated from {MIN_SEEDS}")
    # identical arms: no difference
    same = paired_difference(ref, dict(ref))
    assert same["mean"] == 0.0 and same["p"] != same["p"] and verdict(same, float("nan")).startswith("no difference detected")


def test_fresh_clone_chain_pretrain_then_learned_reward(tmp_path, monkeypatch):
    """Regression (a fresh clone of the main job failed): the comparison's first arm must
    pretrain its policy (which writes the synthetic corpus) before building a learned reward
    that trains on that corpus. The main job's chain at toy sizes, from an empty directory."""
    import yaml

    from esorl.config import load_config as lc

    monkeypatch.chdir(tmp_path)
    pre = yaml.safe_load((REPO / "recipes" / "pretrain" / "synthetic_cpu.yaml").read_text())
    pre["model"].update(hidden_size=32, n_layers=1, n_heads=2, cond_dim=16)
    pre["data"]["synthetic_size"] = 400
    pre["train"].update(max_steps=2, eval_every=2, eval_batches=1, save_every=2)
    pre["logging"] = {"wandb_mode": "disabled", "log_every": 1}
    (tmp_path / "pre.yaml").write_text(yaml.safe_dump(pre))
    main = yaml.safe_load((REPO / "recipes" / "compare" / "synthetic_cpu.yaml").read_text())
    main["policy"] = {"init_from": "runs/pre/model", "pretrain_recipe": "pre.yaml"}
    main["prompts"]["synthetic_size"] = 400
    main["rewards"][0]["kwargs"].update(train=".esorl_cache/synthetic-400-0/train.tsv", dev=".esorl_cache/synthetic-400-0/dev.tsv",
                                        epochs=1, max_steps=2, model_dir=".esorl_cache/rm")
    main["grpo"].update(max_steps=1, per_device_train_batch_size=8, save_steps=1)
    main.update(estimators=[{"name": "exact", "likelihood": "exact"}, {"name": "one_step", "likelihood": "one_step"}], seeds=[0],
                diagnostics={"enabled": False}, logging={"wandb_mode": "disabled"}, output_dir="runs/cmp")
    run_compare(lc(CompareConfig, None, [], base=main))
    assert (tmp_path / "runs" / "cmp" / "report.md").exists()
    assert (tmp_path / "runs" / "cmp" / "runs" / "one_step-s0" / "model" / "config.json").exists()
