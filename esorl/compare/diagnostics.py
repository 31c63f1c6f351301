"""Estimator diagnostics of the study (docs/ESOLM.md §10): what each arm's update *is*,
measured against the true policy gradient, and where the likelihood gap comes from.

**Gradients.** At a policy θ, the true policy gradient is the expectation over rollouts of
the exact arm's first-iteration loss gradient; it is estimated by the mean of that gradient
over ``K`` fresh generation batches. Each arm's gradient (its own estimator and objective, the
gradient of the loss its trainer would step on, ratio 1) is measured on ``M ≤ K`` of the
same batches and compared with the true gradient *leaving that batch out* (so that exact is
not compared with itself): cosine, relative squared error ``‖g − ḡ‖² / ‖ḡ‖²``, the norm ratio
``‖g‖ / ‖ḡ‖``, and the signal-to-noise ratio of the arm's per-batch gradients
``‖mean g‖² / tr Cov g``. A per-arm learning-rate sweep absorbs a constant scale, so the
cosine is the scale-free comparison; the squared error and norm ratio include the scale.

**Likelihoods.** On the same completions: ``exact`` (the trajectory's log-likelihood
log p(y, τ)); the T-step ELBO (log p(y, τ') averaged over fresh trajectories τ' drawn from the
sampler's own schedule: a lower bound on log p(y) by Jensen); the continuous-time ELBO
(``mc_elbo`` with many draws); and every arm's estimate. The gap exact − T-step ELBO is
"the sampler's own trajectory versus a random one", the gap T-step − continuous ELBO is the
discretisation, and an estimator's distance to its own expectation is its Monte Carlo error.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from ..rl.common import PolicyArgs


def _flat_grad(model) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().double() for p in model.parameters() if p.requires_grad])


def _trainer(cfg, arm, selected: dict, policy_dir: str, rewards):
    """The arm's trainer (its estimator, objective and settings) on the weights in
    ``policy_dir``, writing nothing but a scratch directory."""
    from ..rl.grpo import build_grpo_trainer
    from .runner import run_recipe

    rec = run_recipe(cfg, arm, cfg.seeds[0], None, selected.get(arm.name, {}))
    rec.grpo.update(output_dir=str(Path(cfg.output_dir) / "diagnostics_scratch"), save_strategy="no", eval_strategy="no", eval_on_start=False)
    rec.logging.wandb_mode = "disabled"
    rec.policy = PolicyArgs(init_from=str(policy_dir), tokenizer=rec.policy.tokenizer or str(policy_dir))
    tr = build_grpo_trainer(rec, *(rewards or (None, None)), report_to="none")
    tr.args.log_exact_kl = False  # its metric is not wanted here
    return tr


def batch_gradient(tr, inputs: dict, key: int) -> torch.Tensor:
    """The gradient (flat, float64) of ``tr``'s first-iteration loss on one generation batch
    (TRL's ``inputs`` from ``tr``'s own :meth:`~esorl.rl.grpo_trainer.EsoGRPOTrainer.sample_batch`
    at ``global_step = key``: its advantages, reference log-probs and objective weights) at
    ratio 1 (the old log-probs are dropped, so they are the current ones detached)."""
    model = tr.model
    inputs = {k: v for k, v in inputs.items() if k not in ("old_per_token_logps", "eso_old_logps")}
    saved_step, saved = tr.state.global_step, {k: list(v) for k, v in tr._metrics["train"].items()}
    tr.state.global_step = key  # the estimator's noise seed of this batch, as in training
    if not hasattr(tr, "current_gradient_accumulation_steps"):  # set by Trainer's loop, which does not run here
        tr.current_gradient_accumulation_steps = tr.args.gradient_accumulation_steps
    model.train()
    model.zero_grad(set_to_none=True)
    try:
        with torch.enable_grad():
            tr._compute_loss(model, inputs).backward()
        g = _flat_grad(model)
    finally:
        model.zero_grad(set_to_none=True)
        tr.state.global_step = saved_step
        tr._metrics["train"].clear()
        tr._metrics["train"].update(saved)
    return g


def _key(tr, base: int, i: int) -> int:
    """The generation step batch ``i`` is sampled at: a multiple of the trainer's updates per
    generation, so its estimator seed is the one training would use."""
    return (base + i) * tr._updates_per_generation()


def _gradients(tr, idx: list[int], base: int) -> list[torch.Tensor]:
    """``tr``'s gradient on each batch of ``idx`` (rows and rollouts keyed by ``base + i``: the
    same rollouts for every arm with the same updates per generation)."""
    out = []
    for i in idx:
        k = _key(tr, base, i)
        out.append(batch_gradient(tr, tr.sample_batch(tr.rows_for(base + i), k)["inputs"], k))
    return out


def gradient_quality(g_arm: list[torch.Tensor], g_exact: list[torch.Tensor], idx: list[int]) -> dict:
    """``g_arm[j]``: the arm's gradient on batch ``idx[j]``; ``g_exact``: exact's gradient on
    every batch. Each ``g_arm[j]`` is compared with the mean of ``g_exact`` without batch
    ``idx[j]``. Returns means (and standard errors) over the arm's batches of the cosine,
    relative squared error and norm ratio; the SNR ``(‖mean g‖² − tr Cov/M) / tr Cov`` of the
    arm's ``M`` gradients (the ``tr Cov/M`` term removes the bias of ``‖mean g‖²``); and the
    cosine of their mean to exact's mean over the batches not in ``idx`` (the direction's
    bias, with no shared batch)."""
    E = torch.stack(g_exact)
    total, K = E.sum(0), E.shape[0]
    cos, rel, ratio = [], [], []
    for g, i in zip(g_arm, idx):
        true = (total - E[i]) / (K - 1)
        cos.append(torch.nn.functional.cosine_similarity(g, true, dim=0).item())
        rel.append(((g - true).pow(2).sum() / true.pow(2).sum().clamp(min=1e-300)).item())
        ratio.append((g.norm() / true.norm().clamp(min=1e-300)).item())
    G = torch.stack(g_arm)
    M = len(g_arm)
    mean = G.mean(0)
    var = ((G - mean) ** 2).sum(1).sum().item() / max(M - 1, 1)  # tr Cov of one batch's gradient
    # ‖mean‖² overestimates ‖E g‖² by tr Cov / M: remove it (the SNR of RL gradients is small)
    signal = mean.pow(2).sum().item() - (var / M if M > 1 else 0.0)
    rest = [i for i in range(K) if i not in set(idx)]
    true_rest = E[rest].mean(0) if rest else E.mean(0)  # exact's mean over batches the arm was not measured on

    def ms(v):
        n = len(v)
        m = sum(v) / n
        se = math.sqrt(sum((x - m) ** 2 for x in v) / (n - 1) / n) if n > 1 else float("nan")
        return m, se

    out = {}
    for name, v in (("cos_to_true", cos), ("rel_sq_error", rel), ("norm_ratio", ratio)):
        out[name], out[name + "_se"] = ms(v)
    out["snr"] = signal / var if var > 0 else float("inf")
    out["cos_mean_to_true"] = torch.nn.functional.cosine_similarity(mean, true_rest, dim=0).item()
    out["batches"] = len(g_arm)
    return out


def gradients_at(cfg, selected: dict, policy_dir: str, arms: list, rewards, base: int) -> dict:
    """The gradient diagnostics of ``arms`` at the weights in ``policy_dir`` (see the module
    docstring); ``base`` keys the fresh batches."""
    d = cfg.diagnostics
    ref_arm = cfg.arm(cfg.reference_arm)
    tr = _trainer(cfg, ref_arm, selected, policy_dir, rewards)
    t0 = time.time()
    g_exact = _gradients(tr, list(range(d.true_grad_batches)), base)
    idx = list(range(d.arm_batches))
    res = {"true_grad_norm": torch.stack(g_exact).mean(0).norm().item(), "batches": d.true_grad_batches, "completions_per_batch": tr.args.generation_batch_size}
    arms_out = {}
    for a in arms:
        if a.name == cfg.reference_arm:
            g = [g_exact[i] for i in idx]
        else:
            ta = _trainer(cfg, a, selected, policy_dir, rewards)
            g = _gradients(ta, idx, base)
            del ta
        arms_out[a.name] = gradient_quality(g, g_exact, idx)
    res["arms"] = arms_out
    res["time_s"] = time.time() - t0
    return res


@torch.no_grad()
def likelihood_decomposition(cfg, selected: dict, policy_dir: str, rewards, base: int = 50_000) -> dict:
    """Per-sequence log-likelihoods of ``ll_sequences`` completions of the policy in
    ``policy_dir`` under exact, the T-step ELBO, the continuous ELBO and every arm's estimator
    (see the module docstring). Values are nats per sequence."""
    from ..schedule import Stream, make_generator

    d = cfg.diagnostics
    # every arm's estimator settings first: building a TrainingArguments resets accelerate's
    # state, which the trainer below needs while it scores
    ests = {a.name: _arm_estimator(cfg, a, selected) for a in cfg.arms}
    tr = _trainer(cfg, cfg.arm(cfg.reference_arm), selected, policy_dir, rewards)
    tr.model.eval()
    per_batch = tr.args.generation_batch_size
    ros = [tr.sample_batch(tr.rows_for(base + i), base + i)["rollout"] for i in range(max(1, -(-d.ll_sequences // per_batch)))]
    policy, a0 = tr.policy, tr.args.sampling_alpha0
    sched = tr.args.sampling().schedule

    def seq(ro, name, **kw):
        lp, valid = policy.log_probs(ro, name, **kw)
        return (lp * valid).sum(1).double()

    exact, tstep, cont = [], [], []
    arm_vals = {a.name: [] for a in cfg.arms}
    for bi, ro in enumerate(ros):
        exact.append(seq(ro, "exact"))
        vals = []
        for j in range(d.ll_orders):
            g = make_generator(cfg.seeds[0], Stream.DIAG_TRAJ, bi, j)
            traj = sched.sample(ro.batch_size, ro.num_new, g)
            vals.append(seq(ro.with_trajectory(traj.order, traj.step_sizes), "exact"))
        tstep.append(torch.stack(vals).mean(0))
        cont.append(seq(ro, "mc_elbo", n=d.ll_elbo_n, alpha0=a0, seed=777))
        for a in cfg.arms:
            ecfg = ests[a.name]
            draws = 1 if ecfg.info().deterministic else d.ll_draws
            arm_vals[a.name].append(torch.stack([seq(ro, ecfg.likelihood, **ecfg.params(a0, 900 + k)) for k in range(draws)]))  # (draws, B)
    exact, tstep, cont = torch.cat(exact), torch.cat(tstep), torch.cat(cont)
    out = {"sequences": int(exact.numel()), "mean_exact": exact.mean().item(), "mean_tstep_elbo": tstep.mean().item(), "mean_continuous_elbo": cont.mean().item(),
           "gap_trajectory_vs_random_order": (exact - tstep).mean().item(), "gap_discretisation": (tstep - cont).mean().item(), "arms": {}}
    for name, chunks in arm_vals.items():
        V = torch.cat(chunks, 1)  # (draws, S)
        out["arms"][name] = {"mean": V.mean().item(), "rmse_vs_exact": (V - exact).pow(2).mean().sqrt().item(),
                             "rmse_vs_continuous_elbo": (V - cont).pow(2).mean().sqrt().item(),
                             "std_over_draws": V.std(0).mean().item() if V.shape[0] > 1 else 0.0,
                             "spearman_vs_exact": _spearman(V[0], exact), "draws": int(V.shape[0])}
    return out


def _arm_estimator(cfg, arm, selected):
    from .runner import run_recipe

    return run_recipe(cfg, arm, cfg.seeds[0], None, selected.get(arm.name, {})).args().estimator()


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy import stats

    return float(stats.spearmanr(a.cpu().numpy(), b.cpu().numpy()).statistic)


def run_diagnostics(cfg, selected: dict, rewards=None) -> dict:
    """Every diagnostic the study's ``diagnostics`` section asks for (see the module docstring).
    The mid-run policies are the first evaluation seed's checkpoints at half the steps."""
    from .runner import run_dir, run_recipe

    d = cfg.diagnostics
    init = run_recipe(cfg, cfg.arm(cfg.reference_arm), cfg.seeds[0]).policy
    from ..rl.common import ensure_policy

    init_dir = str(ensure_policy(init))

    def mid(arm_name):
        a = cfg.arm(arm_name)
        steps = int(run_recipe(cfg, a, cfg.seeds[0], None, selected.get(a.name, {})).args().max_steps)
        p = run_dir(cfg, arm_name, cfg.seeds[0]) / f"checkpoint-{max(1, steps // 2)}"
        return str(p) if (p / "config.json").exists() else None

    res: dict = {"gradients": {}}
    t0 = time.time()
    res["likelihoods_initial"] = likelihood_decomposition(cfg, selected, init_dir, rewards)
    if "initial" in d.policies:
        res["gradients"]["initial"] = gradients_at(cfg, selected, init_dir, cfg.arms, rewards, 20_000)
    if "exact_mid" in d.policies and mid(cfg.reference_arm):
        res["gradients"]["exact_mid"] = gradients_at(cfg, selected, mid(cfg.reference_arm), cfg.arms, rewards, 30_000)
    if "own_mid" in d.policies:
        own = {}
        for a in cfg.arms:
            if a.name != cfg.reference_arm and mid(a.name):
                own[a.name] = gradients_at(cfg, selected, mid(a.name), [cfg.arm(cfg.reference_arm), a], rewards, 40_000)
        res["gradients"]["own_mid"] = own
    res["time_s"] = time.time() - t0
    return res
