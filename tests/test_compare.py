"""The study (issue 14): its runner end to end (sweep, paired evaluation seeds, diagnostics,
cost per arm in its own process, report), identical arms reported as no difference, the
exact-measured KL identical across arms, the statistics against scipy, the diagnostics
against hand computation, and identical rollouts across estimators."""

import json
import math
from pathlib import Path

import pytest
import torch

from esorl.compare.runner import CompareConfig, run_compare
from esorl.config import ConfigError, load_config
from esorl.rl.grpo import GRPORecipe, build_grpo_trainer
from esorl.train.common import read_metrics

from rl_fixtures import EvenIdReward, make_tiny_policy, recipe_dict

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    return make_tiny_policy(tmp_path_factory.mktemp("policy"))


def _cfg(policy_dir, tmp_path, **extra):
    """A study on the tiny policy: 2 arms × 1 seed × 3 steps, held-out reward every step."""
    base = recipe_dict(policy_dir, tmp_path / "unused", tmp_path / "cache", max_steps=3, num_iterations=2)
    g = base["grpo"]
    g.pop("output_dir")
    g.pop("save_strategy")
    g.update(eval_strategy="steps", eval_steps=1, eval_on_start=True, per_device_eval_batch_size=8, scale_rewards="none")
    prompts = dict(base["prompts"], eval_prompts=8)
    d = {"output_dir": str(tmp_path / "cmp"), "policy": base["policy"], "prompts": prompts, "grpo": g,
         "rewards": [{"name": "rl_fixtures:EvenIdReward", "kwargs": {"policy_dir": str(policy_dir)}}],
         "arms": [{"name": "exact", "grpo": {"likelihood": "exact"}}, {"name": "mc4", "grpo": {"likelihood": "mc_elbo", "mc_samples": 4}}],
         "seeds": [0], "diagnostics": {"true_grad_batches": 3, "arm_batches": 2, "ll_sequences": 8, "ll_orders": 2, "ll_elbo_n": 4, "ll_draws": 2},
         "cost": {"enabled": False}, "logging": {"wandb_mode": "disabled"}}
    d.update(extra)
    return load_config(CompareConfig, None, [], base=d)


def test_study_end_to_end(policy_dir, tmp_path):
    """Sweep on a tuning seed, each arm's selected setting on 2 evaluation seeds, diagnostics at
    every policy, cost per arm in its own process, and a report whose numbers are the runs'."""
    cfg = _cfg(policy_dir, tmp_path, seeds=[0, 1], sweep={"enabled": True, "grid": {"learning_rate": [1e-3, 3e-2]}, "seeds": [100]},
               cost={"enabled": True, "steps": 1})
    res = run_compare(cfg)
    out = tmp_path / "cmp"
    report = (out / "report.md").read_text()
    for p in ("heldout_vs_step.png", "heldout_vs_time.png", "reward_vs_exact_kl.png", "paired_differences.png", "estimator_quality.png"):
        assert (out / p).stat().st_size > 1000 and p in report
    # the sweep picks each arm's best mean held-out AUC, and phase 2 runs at it
    sweep = json.loads((out / "sweep" / "sweep.json").read_text())
    for name, t in sweep["arms"].items():
        best = max(t["scores"], key=lambda s: s["mean"])
        assert t["selected"] == best["setting"]
        for s in (0, 1):
            run_cfg = (out / "runs" / name / f"s{s}" / "config.yaml").read_text()
            assert f"learning_rate: {best['setting']['learning_rate']}" in run_cfg
    # the table's held-out numbers are the runs' last evaluations
    for name in ("exact", "mc4"):
        finals = []
        for s in (0, 1):
            recs = read_metrics(out / "runs" / name / f"s{s}" / "metrics.jsonl")
            ev = [r for r in recs if "eval_reward" in r]
            assert [r["step"] for r in ev] == [0, 1, 2, 3]
            finals.append(ev[-1]["eval_reward"])
            assert any("exact_kl" in r for r in recs)
        row = next(line for line in report.splitlines() if line.startswith(f"| {name} |") and "±" in line)
        m = sum(finals) / 2
        assert float(row.split("|")[3].split("±")[0]) == pytest.approx(m, abs=5e-4)
    # paired statistics of the primary metric match the per-seed values
    t = res["tests"]["heldout_final"]["mc4"]
    ex = {s: res["summaries"]["exact"][s]["heldout_final"] for s in (0, 1)}
    mc = {s: res["summaries"]["mc4"][s]["heldout_final"] for s in (0, 1)}
    assert t["diffs"] == pytest.approx([mc[0] - ex[0], mc[1] - ex[1]])
    assert "not testable" in t["verdict"] or "identical" in t["verdict"]  # 2 seeds never support a difference
    diag = json.loads((out / "diagnostics.json").read_text())
    assert set(diag["gradients"]) == {"initial", "exact_mid", "own_mid"} and "mc4" in diag["gradients"]["own_mid"]
    assert diag["likelihoods_initial"]["arms"]["exact"]["rmse_vs_exact"] == 0.0
    cost = json.loads((out / "cost.json").read_text())
    assert set(cost) == {"exact", "mc4"} and all(c["peak_memory_mb"] >= 0 and c["step_s"] > 0 for c in cost.values())
    assert cost["mc4"]["token_forwards_per_completion"] > cost["exact"]["token_forwards_per_completion"] > 0
    # a finished run is not run again
    f = out / "runs" / "exact" / "s0" / "metrics.jsonl"
    mtime = f.stat().st_mtime
    run_compare(_cfg(policy_dir, tmp_path, seeds=[0, 1], sweep={"enabled": True, "grid": {"learning_rate": [1e-3, 3e-2]}, "seeds": [100]},
                     diagnostics={"enabled": False}))
    assert f.stat().st_mtime == mtime


def test_identical_arms_report_no_difference(policy_dir, tmp_path):
    """Two arms with the same settings (seeded, deterministic) give identical runs, and the
    report says "no difference" for every metric."""
    cfg = _cfg(policy_dir, tmp_path, seeds=[0, 1], arms=[{"name": "exact", "grpo": {"likelihood": "exact"}},
                                                        {"name": "exact_again", "grpo": {"likelihood": "exact"}}],
               diagnostics={"enabled": False})
    cfg.grpo["max_steps"] = 2
    res = run_compare(cfg)
    for m, tests in res["tests"].items():
        v = tests["exact_again"]["verdict"]
        if m == "heldout_at_budget":  # wall-clock differs between identical runs: timing noise, never a stated difference here
            assert v.startswith(("no difference", "not testable")), v
        else:
            assert v.startswith("no difference: identical"), (m, v)
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "**exact_again** vs exact: no difference" in report


def test_exact_kl_is_the_same_measurement_for_every_arm(policy_dir, tmp_path):
    """exact_kl depends on the policies, not on the arm's estimator: two trainers (exact and
    mc_elbo) whose models moved identically report the same value on the same rollout, equal to
    the hand computation mean(exact log π − exact log π_ref) over tokens."""
    vals, trainers = [], []
    for est in ("exact", "mc_elbo"):
        rec = load_config(GRPORecipe, None, [], base=recipe_dict(policy_dir, tmp_path / est, tmp_path / "cache", likelihood=est, log_exact_kl=True))
        tr = build_grpo_trainer(rec, [EvenIdReward(policy_dir)], [1.0])
        with torch.no_grad():  # the same "update" to both policies
            g = torch.Generator().manual_seed(0)
            for p in tr.model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        ro = tr.sample_batch(tr.rows_for(0), 0)["rollout"]
        tr._metrics["train"].clear()
        tr._log_exact_kl(ro)
        vals.append(tr._metrics["train"]["exact_kl"][-1])
        trainers.append((tr, ro))
    assert vals[0] == pytest.approx(vals[1], abs=1e-6)
    tr, ro = trainers[0]
    with torch.no_grad():
        cur = tr.policy.log_probs(ro, "exact")[0]
        ref = tr.policy.__class__(tr._kl_ref_model, tr.processing_class, tr.args.sampling(), tr.accelerator).log_probs(ro, "exact")[0]
    assert vals[0] == pytest.approx((cur - ref).mean().item(), abs=1e-5)
    assert abs(vals[0]) > 1e-4  # the policies did move apart


def test_statistics_against_scipy():
    from scipy import stats
    from statsmodels.stats.multitest import multipletests

    from esorl.compare.stats import auc, compare_arms, holm, min_wilcoxon_p, paired_difference, value_at, verdict

    ref = {s: 0.5 + 0.01 * s for s in range(10)}
    arm = {s: ref[s] + [0.03, 0.05, 0.02, 0.04, 0.06, 0.01, 0.05, 0.03, 0.02, 0.04][s] for s in range(10)}
    arm[99] = 1.0  # no pair: ignored
    r = paired_difference(arm, ref)
    d = [arm[s] - ref[s] for s in range(10)]
    assert r["n"] == 10 and r["mean"] == pytest.approx(sum(d) / 10)
    lo, hi = stats.t.interval(0.95, 9, loc=sum(d) / 10, scale=stats.sem(d))
    assert r["ci"] == pytest.approx((lo, hi))
    assert r["p_wilcoxon"] == pytest.approx(stats.wilcoxon(d, method=stats.PermutationMethod()).pvalue)
    assert r["p_wilcoxon"] == pytest.approx(stats.wilcoxon(d, method="exact").pvalue)  # no ties: the classic exact test
    # tied differences (rewards move in steps of 1/200): still the exact permutation p-value
    tied = {s: 0.5 + [0.005, 0.005, 0.01, -0.005, 0.01, 0.005][s] for s in range(6)}
    base = {s: 0.5 for s in range(6)}
    dt = [tied[s] - 0.5 for s in range(6)]
    import itertools as it

    def stat(x):  # Wilcoxon's T+ with mid-ranks, by hand
        ranks = stats.rankdata([abs(v) for v in x])
        return sum(r for r, v in zip(ranks, x) if v > 0)

    t_obs = stat(dt)
    null = [stat([s * abs(v) for s, v in zip(signs, dt)]) for signs in it.product([1, -1], repeat=6)]
    mu = sum(null) / len(null)
    p_hand = sum(abs(t - mu) >= abs(t_obs - mu) - 1e-12 for t in null) / len(null)
    assert paired_difference(tied, base)["p_wilcoxon"] == pytest.approx(p_hand)
    assert r["p_t"] == pytest.approx(stats.ttest_rel([arm[s] for s in range(10)], [ref[s] for s in range(10)]).pvalue)
    assert r["p_wilcoxon"] == pytest.approx(2 / 2**10)  # every difference positive
    # Holm against statsmodels and by hand; NaN does not count
    ps = [0.01, 0.04, float("nan"), 0.03]
    assert holm(ps) == pytest.approx([0.03, 0.06, float("nan"), 0.06], nan_ok=True)
    assert [x for x in holm(ps) if x == x] == pytest.approx(list(multipletests([0.01, 0.04, 0.03], method="holm")[1]))
    # what the design can test: 8 arms need 9 seeds
    assert min_wilcoxon_p(5) == 0.0625 and min_wilcoxon_p(8, 8) == pytest.approx(0.0625) and min_wilcoxon_p(9, 8) < 0.05
    # verdicts follow the numbers
    assert verdict(r, 0.004, 1).startswith("higher than exact")
    neg = paired_difference(ref, arm)
    assert verdict(neg, 0.004, 1).startswith("lower than exact")
    assert verdict(r, 0.2, 1).startswith("no difference detected")
    assert verdict(paired_difference({0: 1.0, 1: 2.0}, {0: 1.0, 1: 1.5}), 0.0, 1).startswith("not testable with 2 paired seed(s)")
    assert verdict(r, 0.001, 40).startswith("not testable")  # 10 seeds, 40 arms: Holm's first step is ≥ 40·2/2¹⁰ = 0.078
    zeros = paired_difference({s: ref[s] + (0.01 if s < 2 else 0.0) for s in range(10)}, ref)
    assert zeros["n_nonzero"] == 2 and verdict(zeros, 0.5, 1).startswith("not testable")  # 10 seeds, only 2 non-zero differences
    same = paired_difference(ref, dict(ref))
    assert same["p_wilcoxon"] == 1.0 and verdict(same, 1.0, 1).startswith("no difference: identical")
    # three arms against exact: Holm across them
    res = compare_arms({"exact": ref, "a": arm, "b": {s: ref[s] for s in range(10)}, "c": {s: ref[s] - 0.001 * (s % 3) for s in range(10)}})
    assert res["a"]["verdict"].startswith("higher") and res["b"]["verdict"].startswith("no difference: identical")
    assert res["a"]["p_holm"] == pytest.approx(multipletests([res[k]["p_wilcoxon"] for k in "abc"], method="holm")[1][0])
    assert auc([0, 1, 3], [0.0, 1.0, 1.0]) == pytest.approx((0.5 + 2.0) / 3)
    assert value_at([0, 2, 4], [0.0, 1.0, 0.0], 3) == pytest.approx(0.5) and value_at([1, 2], [0, 1], 0.5) != value_at([1, 2], [0, 1], 0.5)


def test_run_summary_counts_every_step_with_several_iterations(tmp_path):
    """With μ = 2 only every other step logs a reward; the training time and the held-out
    curve's times still count every step (a reviewer found the curve times stuck at the
    generation steps' total)."""
    from esorl.compare.report import run_summary

    recs = [{"step": 0, "eval_reward": 0.5}]
    for k in range(1, 5):
        r = {"step": k, "loss": 0.0, "step_time": 1.0 + k}
        if k % 2:
            r.update(reward=0.1 * k, exact_kl=0.01 * k, **{"time/rollout": 0.5})
        recs.append(r)
        if k % 2 == 0:
            recs.append({"step": k, "eval_reward": 0.5 + 0.1 * k})
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    s = run_summary(tmp_path)
    assert s["train_time_s"] == pytest.approx(2 + 3 + 4 + 5)
    assert s["curve_steps"] == [0, 2, 4] and s["curve_times"] == pytest.approx([0.0, 5.0, 14.0])
    assert s["step_s"] == pytest.approx(14.0 / 4) and s["heldout_final"] == pytest.approx(0.9)
    assert s["exact_kl_final"] == pytest.approx((0.01 + 0.03) / 2) and s["train_reward_final"] == pytest.approx((0.1 + 0.3) / 2)


def test_gradient_quality_by_hand():
    """Cosine, relative squared error and norm ratio to the leave-one-out true gradient, and
    the SNR of the arm's gradients, on hand-made vectors."""
    from esorl.compare.diagnostics import gradient_quality

    g = torch.Generator().manual_seed(0)
    E = [torch.tensor([1.0, 0.0]).double() + 0.5 * torch.randn(2, generator=g, dtype=torch.float64) for _ in range(6)]
    A = [2 * E[0], 2 * E[1]]  # an arm twice exact's scale on batches 0 and 1
    q = gradient_quality(A, E, [0, 1])
    tot = torch.stack(E).sum(0)
    cos, rel, ratio = [], [], []
    for a, i in zip(A, [0, 1]):
        t = (tot - E[i]) / 5
        cos.append(float(a @ t / (a.norm() * t.norm())))
        rel.append(float((a - t).pow(2).sum() / t.pow(2).sum()))
        ratio.append(float(a.norm() / t.norm()))
    assert q["cos_to_true"] == pytest.approx(sum(cos) / 2) and q["rel_sq_error"] == pytest.approx(sum(rel) / 2)
    assert q["norm_ratio"] == pytest.approx(sum(ratio) / 2)
    m = (A[0] + A[1]) / 2
    var = ((A[0] - m).pow(2).sum() + (A[1] - m).pow(2).sum()).item() / 1
    assert q["snr"] == pytest.approx((m.pow(2).sum().item() - var / 2) / var)
    rest = torch.stack(E[2:]).mean(0)  # exact's mean over the batches the arm was not measured on
    assert q["cos_mean_to_true"] == pytest.approx(float(m @ rest / (m.norm() * rest.norm())))
    # the SNR estimate is unbiased-ish: for pure noise around a known mean it is near the truth
    g2 = torch.Generator().manual_seed(1)
    mu_, sd = torch.tensor([1.0, 0.0, 0.0, 0.0]).double(), 2.0
    many = [mu_ + sd * torch.randn(4, generator=g2, dtype=torch.float64) for _ in range(400)]
    q2 = gradient_quality(many, many + many, list(range(400)))
    assert q2["snr"] == pytest.approx(1.0 / (4 * sd**2), abs=0.02)
    # exact compared with itself leave-one-out: its cosine is below 1 (one batch is one noisy sample)
    qe = gradient_quality(E[:3], E, [0, 1, 2])
    assert qe["cos_to_true"] < 0.999


def test_identical_rollouts_across_estimators(policy_dir, tmp_path):
    ros = []
    for est, extra in (("exact", {}), ("mc_elbo", {}), ("one_step", {}), ("coupled", {}), ("elbo_lowvar", {}), ("espo_elbo", {"objective": "espo"}),
                       ("step_merge", {}), ("one_step", {"objective": "wd1"})):
        rec = load_config(GRPORecipe, None, [], base=recipe_dict(policy_dir, tmp_path / f"{est}{len(ros)}", tmp_path / "cache", likelihood=est, seed=3, **extra))
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
        if self.args.likelihood == "mc_elbo" and self.state.global_step == 1 and self.model.training:
            raise TrainingDiverged("loss is inf at step 1: stopping (test)")
        return real(self, model, inputs)

    monkeypatch.setattr(gt.EsoGRPOTrainer, "_compute_loss", boom)
    run_compare(_cfg(policy_dir, tmp_path, diagnostics={"enabled": False}))
    out = tmp_path / "cmp"
    assert (out / "runs" / "mc4" / "s0" / "DIVERGED").exists()
    assert (out / "runs" / "exact" / "s0" / "model" / "config.json").exists()
    row = next(line for line in (out / "report.md").read_text().splitlines() if line.startswith("| mc4 |") and "±" in line)
    assert row.rstrip("| ").endswith("| 0")  # seed 0 diverged


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
    """Every plot has labelled axes and a legend matching its series; the estimator-quality
    bars never overlap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import esorl.compare.report as rep
    from esorl.plots import check_figure

    seen = {}
    real = rep.save_figure

    def spy(fig, path):
        seen[path.name] = [[(round(p.get_x(), 6), round(p.get_width(), 6)) for p in ax.patches] for ax in fig.axes]
        return real(fig, path)

    monkeypatch.setattr(rep, "save_figure", spy)
    run_compare(_cfg(policy_dir, tmp_path, diagnostics={"true_grad_batches": 2, "arm_batches": 2, "ll_sequences": 8, "ll_orders": 1, "ll_elbo_n": 2,
                                                         "ll_draws": 1, "policies": ["initial"]}))
    assert {"heldout_vs_step.png", "estimator_quality.png", "paired_differences.png"} <= set(seen)
    for patches in seen["estimator_quality.png"]:
        spans = sorted(p for p in patches if p[1] > 0)
        assert all(a[0] + a[1] <= b[0] + 1e-9 for a, b in zip(spans, spans[1:])), spans
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1], label="a")
    ax.plot([0, 1], [1, 0], label="b")
    with pytest.raises(ValueError, match="no x-axis label"):
        check_figure(fig)
    ax.set_xlabel("step"), ax.set_ylabel("reward")
    with pytest.raises(ValueError, match="without a legend"):
        check_figure(fig)
    ax.legend()
    check_figure(fig)


def test_config_errors_name_the_field(policy_dir, tmp_path):
    with pytest.raises(ConfigError, match="estimators was renamed to arms"):
        _cfg(policy_dir, tmp_path, estimators=[{"name": "exact", "likelihood": "exact"}])
    with pytest.raises(ConfigError, match="tuning and evaluation seeds must be disjoint"):
        _cfg(policy_dir, tmp_path, seeds=[0, 1], sweep={"enabled": True, "seeds": [1]})
    with pytest.raises(ConfigError, match="reference_arm 'nope'"):
        _cfg(policy_dir, tmp_path, reference_arm="nope")
    with pytest.raises(ConfigError, match="held-out reward needs"):
        _cfg(policy_dir, tmp_path, prompts={"source": "synthetic", "eval_prompts": 0})
    with pytest.raises(ConfigError, match="grpo.objective spg reads its bounds"):
        _cfg(policy_dir, tmp_path, arms=[{"name": "exact", "grpo": {}}, {"name": "spg", "grpo": {"objective": "spg", "likelihood": "mc_elbo"}}])


def test_every_study_recipe_validates():
    for f in sorted((REPO / "recipes" / "compare").glob("*.yaml")):
        load_config(CompareConfig, f)


def test_fresh_clone_chain_pretrain_then_learned_reward(tmp_path, monkeypatch):
    """Regression (a fresh clone of the main job failed): the study's first run must pretrain
    its policy (which writes the synthetic corpus) before building a learned reward that trains
    on that corpus. The learned-reward study's chain at toy sizes, from an empty directory."""
    import yaml

    monkeypatch.chdir(tmp_path)
    pre = yaml.safe_load((REPO / "recipes" / "pretrain" / "synthetic_cpu.yaml").read_text())
    pre["model"].update(hidden_size=32, n_layers=1, n_heads=2, cond_dim=16)
    pre["data"]["synthetic_size"] = 400
    pre["training"].update(max_steps=2, eval_steps=2, eval_batches=1, save_steps=2)
    pre["logging"] = {"wandb_mode": "disabled"}
    (tmp_path / "pre.yaml").write_text(yaml.safe_dump(pre))
    main = yaml.safe_load((REPO / "recipes" / "compare" / "synthetic_cpu.yaml").read_text())
    main["policy"] = {"init_from": "runs/pre/model", "pretrain_recipe": "pre.yaml"}
    main["prompts"].update(synthetic_size=400, eval_prompts=8)
    main["rewards"][0]["kwargs"].update(train=".esorl_cache/synthetic-400-0/train.tsv", dev=".esorl_cache/synthetic-400-0/dev.tsv",
                                        epochs=1, max_steps=2, model_dir=".esorl_cache/rm")
    main["grpo"].update(max_steps=1, per_device_train_batch_size=8, eval_steps=1, per_device_eval_batch_size=8)
    main.update(arms=[{"name": "exact", "grpo": {"likelihood": "exact"}}, {"name": "one_step", "grpo": {"likelihood": "one_step"}}], seeds=[0],
                diagnostics={"enabled": False}, cost={"enabled": False}, logging={"wandb_mode": "disabled"}, output_dir="runs/cmp")
    run_compare(load_config(CompareConfig, None, [], base=main))
    assert (tmp_path / "runs" / "cmp" / "report.md").exists()
    assert (tmp_path / "runs" / "cmp" / "runs" / "one_step" / "s0" / "model" / "config.json").exists()


def test_exact_kl_reuses_the_exact_reference_scoring(policy_dir, tmp_path):
    """With an exact loss and β > 0 the reference has just been scored exactly: exact_kl reuses
    those log-probs (no second reference forward), and they equal a fresh reference forward."""
    rec = load_config(GRPORecipe, None, [], base=recipe_dict(policy_dir, tmp_path / "run", tmp_path / "cache", likelihood="exact", beta=0.1,
                                                              log_exact_kl=True))
    tr = build_grpo_trainer(rec, [EvenIdReward(policy_dir)], [1.0])
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in tr.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    seen = {}
    real_log, real_from = tr._log_exact_kl, tr._exact_kl_from
    tr._log_exact_kl = lambda ro, ref=None: (seen.setdefault("reused", ref is not None), real_log(ro, ref))[1]
    tr._exact_kl_from = lambda ro, ref: (seen.setdefault("ref", ref), real_from(ro, ref))[1]
    out = tr.sample_batch(tr.rows_for(0), 0)
    assert seen["reused"]
    with torch.no_grad(), tr._reference() as ref_policy:
        fresh = ref_policy.log_probs(out["rollout"], "exact")[0]
    assert torch.allclose(seen["ref"].float(), fresh.float(), atol=1e-5)
    assert ((out["rollout"].logp_model - fresh) * out["rollout"].completion_mask).abs().sum() > 1e-3  # the policies differ
