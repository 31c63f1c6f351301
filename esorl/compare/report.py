"""The comparison report: PNG plots and ``report.md`` built from the runs' ``metrics.jsonl``
and ``diagnostics.json`` (every number in the report comes from those files)."""

from __future__ import annotations

import math
import statistics as st
from pathlib import Path

from ..plots import check_figure, plot_reward_curve, save_figure  # noqa: F401  (re-exported: the report's figures go through them)
from ..train.common import read_metrics
from .stats import holm, paired_difference, verdict


def _final(recs, key="reward", last=5):
    v = [r[key] for r in recs if key in r][-last:]
    return sum(v) / len(v) if v else float("nan")


def _time_to(recs, thr):
    t = 0.0
    for r in recs:
        t += r.get("step_time", 0.0)
        if r.get("reward", -math.inf) >= thr:
            return t
    return None


def load_runs(cfg, out: Path) -> dict:
    """``{arm: {seed: [record per training step]}}`` from each run's ``metrics.jsonl`` (the
    training-step records: TRL also logs eval and end-of-training summaries there)."""
    runs = {}
    for e in cfg.estimators:
        runs[e.name] = {s: [r for r in read_metrics(out / "runs" / f"{e.name}-s{s}" / "metrics.jsonl") if "loss" in r and "reward" in r]
                        for s in cfg.seeds}
    return runs


def _band(ax, runs_for_est, xkey, ykey, label):
    import numpy as np

    seqs = [r for r in runs_for_est.values() if r]
    if not seqs:
        return
    n = min(len(r) for r in seqs)
    Y = np.array([[x[ykey] for x in r[:n]] for r in seqs])
    if xkey == "step":
        X = np.array([x["step"] for x in seqs[0][:n]])
    else:
        X = np.mean([np.cumsum([x.get("step_time", 0.0) for x in r[:n]]) for r in seqs], axis=0)
    m = Y.mean(0)
    s = Y.std(0, ddof=1) if len(seqs) > 1 else np.zeros_like(m)  # sample std over seeds
    ax.plot(X, m, label=label)
    lo = m - s
    if (Y >= 0).all():  # a non-negative quantity (reward, KL): the band does not cross below 0
        lo = np.maximum(lo, 0.0)
    ax.fill_between(X, lo, m + s, alpha=0.2)


def run_recipe_args(cfg):
    """The resolved GRPO settings of the comparison's first arm (shared by every arm)."""
    from .runner import run_recipe

    return run_recipe(cfg, cfg.estimators[0], cfg.seeds[0]).args()


def write_report(cfg, out: Path, diag: dict) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = load_runs(cfg, out)
    names = [e.name for e in cfg.estimators]
    plots = []
    g = run_recipe_args(cfg)

    for xkey, fname, xl in (("step", "reward_vs_step.png", "step"), ("time", "reward_vs_time.png", "wall-clock (s)")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for n in names:
            _band(ax, runs[n], xkey, "reward", n)
        if cfg.reward_threshold:
            ax.axhline(cfg.reward_threshold, ls="--", c="gray", lw=0.8)
        ax.set_xlabel(xl), ax.set_ylabel("reward per completion (mean over seeds; band ±1 std)"), ax.legend(), ax.grid(alpha=0.3)
        save_figure(fig, out / fname)
        plots.append(fname)
    fig, ax = plt.subplots(figsize=(6, 4))
    for n in names:
        _band(ax, runs[n], "step", "kl", n)
    # KL spans orders of magnitude across estimators (mc_elbo's importance weights): a
    # symmetric log axis shows every series (and zeros) instead of flattening all but one
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_xlabel("step"), ax.set_ylabel("KL to reference, k3 (nats per token, symlog)"), ax.legend(), ax.grid(alpha=0.3)
    save_figure(fig, out / "kl_vs_step.png")
    plots.append("kl_vs_step.png")

    # cost per step, by phase
    cost = {}
    for n in names:
        recs = [r for rs in runs[n].values() for r in rs]
        def mean(k):
            v = [r[k] for r in recs if k in r]
            return sum(v) / len(v) if v else float("nan")
        cost[n] = {"step": mean("step_time"), "rollout": mean("time/rollout"), "score": mean("time/score"),
                   "update": mean("step_time") - mean("time/rollout") - mean("time/score"),
                   "memory_mb": max([r.get("memory/peak_mb", 0) for r in recs] or [float("nan")]),
                   "tokens_per_s": g.generation_batch_size * g.max_completion_length / mean("step_time")}
    fig, ax = plt.subplots(figsize=(6, 4))
    bottom = [0.0] * len(names)
    for ph in ("rollout", "score", "update"):
        vals = [cost[n][ph] for n in names]
        ax.bar(names, vals, bottom=bottom, label=ph)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xlabel("estimator"), ax.set_ylabel("wall-clock per RL step (s)"), ax.legend(), ax.set_title("cost per RL step by phase")
    save_figure(fig, out / "cost_per_step.png")
    plots.append("cost_per_step.png")

    if diag:
        import numpy as np

        whens = [w for w in ("initial", "final") if w in diag] or list(diag)
        fig, axes = plt.subplots(len(whens), 2, figsize=(11, 4 * len(whens)), squeeze=False)
        x = np.arange(len(names))
        for row, when in zip(axes, whens):
            d = diag[when]["estimators"]
            # side by side (never overlapping), each series in its own legend entry
            row[0].bar(x - 0.2, [d[n]["grad_var_fixed_batch"] for n in names], 0.4, label="fixed batch (estimator noise only)")
            row[0].bar(x + 0.2, [d[n]["grad_var_fresh_rollouts"] for n in names], 0.4, label="fresh rollouts (estimator + sampling)")
            row[0].set_yscale("symlog", linthresh=1e-8)
            row[0].set_ylabel("variance of the policy gradient\n(Σ over parameters, symlog)")
            row[0].set_title(f"policy-gradient variance ({when} policy)"), row[0].legend(fontsize=7)
            row[1].bar(x, [d[n]["abs_error_vs_own_reference"] for n in names], 0.6, label="|estimate − own large-n reference|")
            row[1].set_ylabel("log-likelihood error (nats per sequence)")
            row[1].set_title(f"estimate error vs its own large-n value ({when} policy)"), row[1].legend(fontsize=7)
            for a in row:
                a.set_xticks(x, names, rotation=20), a.set_xlabel("estimator")
        save_figure(fig, out / "grad_variance_and_logprob_error.png")
        plots.append("grad_variance_and_logprob_error.png")

    # table
    exact_name = next((e.name for e in cfg.estimators if e.likelihood == "exact"), names[0])
    finals = {n: [_final(runs[n][s]) for s in cfg.seeds if runs[n][s]] for n in names}
    initial = {n: [r[0]["reward"] for r in runs[n].values() if r] for n in names}
    lines = [
        "# exact vs Monte Carlo likelihoods in GRPO",
        "",
        f"Recipe: `{cfg.output_dir}` · estimators {', '.join(names)} · seeds {list(cfg.seeds)} · {g.max_steps} steps · "
        f"{g.generation_batch_size} completions/step ({g.num_generations} per prompt) · "
        f"N = {g.max_completion_length} · sampling α0 = {g.sampling_alpha0}, T = {g.diffusion_steps} · β = {g.beta} · μ = {g.num_iterations} · loss {g.loss_type}.",
        "Every run starts from the same weights and sees the same prompts and the same rollout noise (keyed by seed, step, sample); only the estimator differs. All numbers below are read from the runs' `metrics.jsonl` and `diagnostics.json`.",
        "",
        "| estimator | initial reward | final reward (mean ± std over seeds, last 5 steps) | time to reward ≥ %.3g (s, per seed) | s / step | score s / step | peak memory (MB) | diverged (seed: step) |" % cfg.reward_threshold,
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in names:
        f = finals[n]
        fm = st.mean(f) if f else float("nan")
        fs = st.stdev(f) if len(f) > 1 else 0.0
        ttr = [_time_to(runs[n][s], cfg.reward_threshold) for s in cfg.seeds if runs[n][s]]
        ttr_s = ", ".join("—" if t is None else f"{t:.0f}" for t in ttr)
        im = st.mean(initial[n]) if initial[n] else float("nan")
        div = [f"{s}: {runs[n][s][-1]['step'] if runs[n][s] else 0}" for s in cfg.seeds if (out / "runs" / f"{n}-s{s}" / "DIVERGED").exists()]
        lines.append(f"| {n} | {im:.3f} | {fm:.3f} ± {fs:.3f} | {ttr_s} | {cost[n]['step']:.2f} | {cost[n]['score']:.2f} | {cost[n]['memory_mb']:.0f} | {', '.join(div) or '—'} |")
    if any((out / "runs").glob("*/DIVERGED")):
        lines += ["", "A diverged run stopped on a non-finite loss (its `DIVERGED` file holds the message); its final reward is the mean of its last 5 logged steps."]
    lines += ["", "## Estimator diagnostics", ""]
    if diag:
        for when, dd in diag.items():
            d = dd["estimators"]
            lines += [f"On {dd['batch_size']} completions of the **{when}** policy (per-sequence log-likelihood sums):", "",
                      "| estimator | mean estimate | exact (same seqs) | bias vs own large-n ref | mean abs error vs own ref | Spearman vs exact | grad var (fixed batch) | grad var (fresh rollouts) | cos(∇, ∇exact) 1 draw | cos, mean of draws |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
            for n in names:
                x = d[n]
                lines.append(f"| {n} | {x['mean_seq_logp']:.2f} | {x['mean_seq_logp_exact']:.2f} | {x['bias_vs_own_reference']:.3f} | {x['abs_error_vs_own_reference']:.3f} | "
                             f"{x['spearman_vs_exact']:.3f} | {x['grad_var_fixed_batch']:.3g} | {x['grad_var_fresh_rollouts']:.3g} | {x['cos_to_exact_grad_single_draw']:.3f} | {x['cos_to_exact_grad_mean_of_draws']:.3f} |")
            sc = dd.get("mc_elbo_grad_var_by_n", {})
            if sc:
                lines += ["", "mc_elbo fixed-batch gradient variance by n: " + ", ".join(f"n = {k}: {v:.3g}" for k, v in sc.items()), ""]
        lines += ["The fixed-batch gradient variance of `exact` (and `replay`) is zero by construction — they have no noise; this is stated, not found.",
                  "MC estimators estimate a bound on log p(y | prompt) averaged over orders, `exact` is log p(y | σ, k) of the trajectory that produced y: their means differ by design, so only rank correlation and gradient direction are compared with `exact`.", ""]
    # summary
    lines += ["## Summary", ""]
    by_seed = {n: {s: _final(runs[n][s]) for s in cfg.seeds if runs[n][s]} for n in names}
    others = [n for n in names if n != exact_name]
    tests = [paired_difference(by_seed[n], by_seed[exact_name]) for n in others]
    adjusted = holm([t["p"] for t in tests])
    for n, t, p_adj in zip(others, tests, adjusted):
        lo, hi = t["ci"]
        lines.append(f"- Final reward, {n} − {exact_name} (paired by seed, n = {t['n']}): {t['mean']:+.3f}, 95 % CI [{lo:+.3f}, {hi:+.3f}], "
                     f"p = {t['p']:.3g}: {verdict(t, p_adj)}.")
        if cost[exact_name]["score"] == cost[exact_name]["score"] and cost[n]["score"] == cost[n]["score"]:
            lines.append(f"- Measured cost (one run per arm, no test), {n} / {exact_name}: {cost[n]['score'] / max(cost[exact_name]['score'], 1e-9):.2f}× "
                         f"per step in the score phase; whole step {cost[n]['step'] / max(cost[exact_name]['step'], 1e-9):.2f}×.")
    if cfg.notes:
        lines.append(f"- Set-up: {cfg.notes.strip()}")
    lines += ["", "Plots: " + ", ".join(f"`{p}`" for p in plots), ""]
    (out / "report.md").write_text("\n".join(lines))
    return {"report": str(out / "report.md"), "plots": [str(out / p) for p in plots], "finals": finals, "cost": cost}
