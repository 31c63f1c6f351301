"""``esorl compare``: the same RL recipe once per likelihood estimator and seed, with
identical prompts, rollout seeds and initial weights, then diagnostics and a report.

Layout of the output directory::

    <output_dir>/runs/<estimator>-s<seed>/   metrics.jsonl, checkpoints/, model/ (one RL run)
    <output_dir>/diagnostics.json             estimator diagnostics on shared trajectories
    <output_dir>/report.md, *.png             the report

A run whose ``model/`` exists is finished and is not run again; an unfinished one resumes
from its last checkpoint.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from ..config import load_config, save_config
from ..policy import EstimatorConfig
from ..rl.common import PolicyArgs, PromptArgs, RewardSpec, check_policy_source
from ..rl.grpo import GRPORecipe, build_grpo_trainer, run_grpo
from ..train.common import LoggingConfig, TrainingDiverged
from ..train.run_dir import claim


@dataclass
class EstimatorSpec:
    """One arm of the comparison: a display ``name`` and the estimator's settings
    (``likelihood``, ``mc_samples`` for mc_elbo, ``p_mask`` for one_step; see
    :class:`esorl.policy.EstimatorConfig`)."""

    name: str = "exact"
    likelihood: str = "exact"
    mc_samples: int = 4
    p_mask: float = 0.15

    def config(self) -> EstimatorConfig:
        return EstimatorConfig(self.likelihood, self.mc_samples, self.p_mask)


@dataclass
class DiagnosticsArgs:
    """Estimator diagnostics (on trajectories shared by all estimators).

    enabled: run them. draws: noise draws per estimator on the fixed batch.
    fresh_batches: fresh rollout batches for the total gradient variance.
    ref_n: size of each MC estimator's own large-``n`` reference.
    when: ``initial`` (the starting policy) and/or ``final`` (the exact run's final policy).
    mc_n_scaling: ``n`` values for the 1/n check of mc_elbo's fixed-batch gradient variance.
    """

    enabled: bool = True
    draws: int = 6
    fresh_batches: int = 3
    ref_n: int = 64
    when: list[str] = field(default_factory=lambda: ["initial", "final"])
    mc_n_scaling: list[int] = field(default_factory=lambda: [4, 16])


@dataclass
class CompareConfig:
    """A comparison: the RL recipe (``policy``, ``prompts``, ``rewards``, ``grpo``: the
    fields of :class:`~esorl.rl.grpo_trainer.EsoGRPOConfig`, TRL's names), the
    ``estimators`` and ``seeds``, ``diagnostics``, ``reward_threshold`` (for the report's
    time-to-threshold column), ``notes`` (caveats of the set-up, copied into the report's
    summary), ``output_dir`` (runs, diagnostics, report) and ``logging``."""

    output_dir: str = "runs/compare"
    policy: PolicyArgs = field(default_factory=PolicyArgs)
    prompts: PromptArgs = field(default_factory=PromptArgs)
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec()])
    grpo: dict = field(default_factory=dict, metadata={"config_class": "esorl.rl.grpo_trainer:EsoGRPOConfig"})
    estimators: list[EstimatorSpec] = field(default_factory=lambda: [EstimatorSpec("exact", "exact"), EstimatorSpec("mc_elbo_n4", "mc_elbo", 4), EstimatorSpec("one_step", "one_step")])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    diagnostics: DiagnosticsArgs = field(default_factory=DiagnosticsArgs)
    reward_threshold: float = 0.0
    notes: str = ""
    logging: LoggingConfig = field(default_factory=lambda: LoggingConfig(wandb_mode="offline"))

    def validate(self):
        names = [e.name for e in self.estimators]
        if len(set(names)) != len(names):
            raise ValueError(f"compare.estimators: names must be unique, got {names}")
        if not self.seeds:
            raise ValueError("compare.seeds: at least one seed")
        for e in self.estimators:
            e.config().validate()
        run_recipe(self, self.estimators[0], self.seeds[0]).validate()  # the grpo section, before any run


def run_recipe(cfg: CompareConfig, est: EstimatorSpec, seed: int) -> GRPORecipe:
    """The GRPO recipe of one arm and seed: the shared ``grpo`` section with the arm's
    estimator, the seed and the arm's own output directory."""
    g = {**cfg.grpo, "likelihood": est.likelihood, "mc_samples": est.mc_samples, "p_mask": est.p_mask, "seed": seed,
         "output_dir": str(Path(cfg.output_dir) / "runs" / f"{est.name}-s{seed}")}
    return GRPORecipe(policy=cfg.policy, prompts=cfg.prompts, rewards=cfg.rewards, grpo=g, logging=copy.deepcopy(cfg.logging))


def run_compare(cfg: CompareConfig) -> dict:
    check_policy_source(cfg.policy)  # before anything is written
    out = Path(cfg.output_dir)
    # a comparison always continues its own directory (finished arms are skipped), but never
    # shares it with a concurrent comparison
    lock = claim(out, "auto", False, None, "output_dir")
    try:
        return _run_compare(cfg, out)
    finally:
        lock.release()


def _run_compare(cfg: CompareConfig, out: Path) -> dict:
    save_config(cfg, out / "config.yaml")
    jobs = [(e, s) for s in cfg.seeds for e in cfg.estimators]
    shared_rewards = None
    bar = tqdm(jobs, desc="compare runs", dynamic_ncols=True)
    for est, seed in bar:
        rec = run_recipe(cfg, est, seed)
        run_dir = Path(rec.grpo["output_dir"])
        bar.set_postfix(run=run_dir.name)
        if (run_dir / "model" / "config.json").exists() or (run_dir / "DIVERGED").exists():
            continue  # finished (or diverged): never run again
        try:
            # the first arm builds the reward functions (after its policy and prompts exist: a
            # chained pretraining writes the corpus a learned reward trains on); the others reuse them
            res = run_grpo(rec, resume="auto", reward_funcs=shared_rewards[0] if shared_rewards else None,
                           reward_weights=shared_rewards[1] if shared_rewards else None)
            if shared_rewards is None:
                tr = res["trainer"]
                shared_rewards = (list(tr.reward_funcs), tr.reward_weights.tolist())
            del res
        except TrainingDiverged as e:
            # a diverged arm is a result of the comparison, not a crash of it
            (run_dir / "DIVERGED").write_text(str(e) + "\n")
            tqdm.write(f"[esorl] {run_dir.name} diverged: {e}")
    bar.close()
    diag = {}
    if cfg.diagnostics.enabled:
        diag = run_diagnostics(cfg, shared_rewards)
        (out / "diagnostics.json").write_text(json.dumps(diag, indent=1))
    from .report import write_report

    return write_report(cfg, out, diag)


def run_diagnostics(cfg: CompareConfig, rewards=None) -> dict:
    """Diagnostics at the initial policy and/or the exact run's final policy."""
    from .diagnostics import estimator_diagnostics, mc_elbo_fixed_batch_variance

    res: dict = {}
    exact_spec = next((e for e in cfg.estimators if e.likelihood == "exact"), EstimatorSpec("exact", "exact"))
    for when in cfg.diagnostics.when:
        rec = run_recipe(cfg, exact_spec, cfg.seeds[0])
        rec.grpo["output_dir"] = str(Path(cfg.output_dir) / "diagnostics_scratch")
        rec.logging.wandb_mode = "disabled"
        if when == "final":
            final = Path(cfg.output_dir) / "runs" / f"{exact_spec.name}-s{cfg.seeds[0]}" / "model"
            if not (final / "config.json").exists():
                continue
            rec.policy = PolicyArgs(init_from=str(final), tokenizer=rec.policy.tokenizer or str(final))
        tr = build_grpo_trainer(rec, *(rewards or (None, None)), report_to="none")
        batches = [tr.sample_batch(tr.rows_for(10_000 + i), 10_000 + i) for i in range(max(1, cfg.diagnostics.fresh_batches))]
        tr.model.eval()
        for b in batches:
            b["rollout"] = b["rollout"].to(tr.accelerator.device)
        ests = {e.name: e.config() for e in cfg.estimators}
        t0 = time.time()
        d = estimator_diagnostics(tr.policy, batches, ests, tr.args.sampling_alpha0, cfg.diagnostics.draws, cfg.diagnostics.ref_n)
        scaling = {str(n): mc_elbo_fixed_batch_variance(tr.policy, batches[0]["rollout"], batches[0]["advantages"], n, tr.args.sampling_alpha0, cfg.diagnostics.draws)
                   for n in cfg.diagnostics.mc_n_scaling}
        res[when] = {"estimators": d, "mc_elbo_grad_var_by_n": scaling, "time_s": time.time() - t0, "batch_size": batches[0]["rollout"].batch_size}
    return res


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(prog="esorl compare", description="exact vs Monte Carlo likelihoods in RL fine-tuning of an Eso-LM")
    p.add_argument("--config", required=True, help="recipes/compare/<name>.yaml")
    p.add_argument("--report-only", action="store_true", help="rebuild report.md and the plots from finished runs")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    cfg = load_config(CompareConfig, a.config, a.overrides)
    if a.report_only:
        from .report import write_report

        diag_f = Path(cfg.output_dir) / "diagnostics.json"
        res = write_report(cfg, Path(cfg.output_dir), json.loads(diag_f.read_text()) if diag_f.exists() else {})
    else:
        res = run_compare(cfg)
    print(f"[esorl] report: {res['report']}")
