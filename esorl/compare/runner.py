"""``esorl compare``: the exact-vs-Monte-Carlo study (docs/ESOLM.md §10).

The same GRPO recipe once per **arm** (an estimator with its objective and its own tuned
settings) and **seed**, with identical initial weights, prompts, rollout noise and held-out
evaluation noise per seed, so that arms can be compared seed by seed (paired). Two phases:

1. **sweep** (``sweep.enabled``): every arm over ``sweep.grid`` (e.g. learning rate × β) on the
   tuning seeds ``sweep.seeds``; per arm the setting with the best mean ``sweep.select_by``
   (held-out reward) wins. Tuning seeds are disjoint from the evaluation seeds, and every arm
   gets the same grid and the same selection rule.
2. **evaluation**: every arm at its selected setting (or, without a sweep, at the settings
   its ``grpo`` section fixes, e.g. from a committed sweep) on the evaluation ``seeds``.

Then the estimator diagnostics (:mod:`esorl.compare.diagnostics`: gradients against the true
policy gradient, the likelihood-gap decomposition), the per-arm cost, each arm in its own
process (:mod:`esorl.compare.cost`), and the report (:mod:`esorl.compare.report`).

Layout of ``output_dir``::

    config.yaml                          the study's resolved configuration
    sweep/<arm>/<setting>/s<seed>/       phase-1 runs; sweep/selected.yaml, sweep/sweep.json
    runs/<arm>/s<seed>/                  phase-2 runs (metrics.jsonl, model/, mid-run checkpoint)
    diagnostics.json, cost.json          estimator diagnostics, per-arm cost
    report.md, *.png                     the report

A finished run (``model/`` exists, or ``DIVERGED``) is never run again, so an interrupted
study continues where it stopped.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from ..config import load_config, save_config
from ..rl.common import PolicyArgs, PromptArgs, RewardSpec, check_policy_source
from ..rl.grpo import GRPORecipe, run_grpo
from ..train.common import LoggingConfig, TrainingDiverged
from ..train.run_dir import claim

_GRPO = "esorl.rl.grpo_trainer:EsoGRPOConfig"


@dataclass
class ArmSpec:
    """One arm of the study.

    name: its display name (unique; also its directory).
    grpo: the :class:`~esorl.rl.grpo_trainer.EsoGRPOConfig` fields this arm sets over the
        study's shared ``grpo`` section: the estimator (``likelihood`` and its parameters), the
        objective (``objective``, ``importance_sampling_level``, ``loss_type``) and, without a
        sweep, its tuned ``learning_rate`` / ``beta``.
    sweep_grid: grid entries of this arm that replace or extend ``sweep.grid`` (e.g. ``beta:
        [0.0, 0.04]`` for an arm whose paper uses a KL; an objective without a KL keeps β = 0).
    """

    name: str = "exact"
    grpo: dict = field(default_factory=dict, metadata={"config_class": _GRPO})
    sweep_grid: dict = field(default_factory=dict)


@dataclass
class SweepArgs:
    """Phase 1: the same tuning for every arm.

    enabled: run the sweep (otherwise each arm runs at the settings its ``grpo`` fixes).
    grid: ``{grpo field: [values]}``; every combination is tried for every arm (over the
        arm's own ``grpo``).
    seeds: tuning seeds; must be disjoint from the evaluation ``seeds``.
    select_by: ``heldout_auc`` (time-average of the held-out reward curve) or
        ``heldout_final`` (the last held-out evaluation); mean over the tuning seeds, ties to
        the first setting in grid order.
    """

    enabled: bool = False
    grid: dict = field(default_factory=lambda: {"learning_rate": [3.0e-4, 1.0e-3, 3.0e-3]})
    seeds: list[int] = field(default_factory=lambda: [1000, 1001])
    select_by: str = "heldout_auc"

    def validate(self):
        if self.select_by not in ("heldout_auc", "heldout_final"):
            raise ValueError(f"compare.sweep.select_by must be heldout_auc or heldout_final, got {self.select_by!r}")
        for k, v in self.grid.items():
            if not isinstance(v, list) or not v:
                raise ValueError(f"compare.sweep.grid.{k}: expected a non-empty list of values, got {v!r}")
        if self.enabled and not self.seeds:
            raise ValueError("compare.sweep.seeds: at least one tuning seed")


@dataclass
class DiagnosticsArgs:
    """Estimator diagnostics (:mod:`esorl.compare.diagnostics`).

    enabled: run them. policies: where to measure: ``initial`` (the starting weights),
        ``exact_mid`` (the reference arm's run at half its steps, first evaluation seed) and
        ``own_mid`` (each arm's own run at half its steps).
    true_grad_batches: fresh generation batches whose mean exact gradient is the true policy
        gradient (leave-one-out against each batch).
    arm_batches: of those, how many each arm's gradient is measured on.
    ll_sequences: completions for the likelihood-gap decomposition; ll_orders: fresh
        trajectories per completion for the T-step ELBO; ll_elbo_n: draws of the continuous
        ELBO reference; ll_draws: draws of each estimator per completion.
    """

    enabled: bool = True
    policies: list[str] = field(default_factory=lambda: ["initial", "exact_mid", "own_mid"])
    true_grad_batches: int = 64
    arm_batches: int = 16
    ll_sequences: int = 256
    ll_orders: int = 16
    ll_elbo_n: int = 64
    ll_draws: int = 4

    def validate(self):
        bad = set(self.policies) - {"initial", "exact_mid", "own_mid"}
        if bad:
            raise ValueError(f"compare.diagnostics.policies: unknown {sorted(bad)}; choose from initial, exact_mid, own_mid")
        if self.enabled and not 2 <= self.arm_batches <= self.true_grad_batches:
            raise ValueError(f"compare.diagnostics: need 2 <= arm_batches <= true_grad_batches, got {self.arm_batches}, {self.true_grad_batches}")


@dataclass
class CostArgs:
    """Per-arm cost, each arm in its own process (:mod:`esorl.compare.cost`): enabled, and
    ``steps`` timed GRPO steps after one warm-up step."""

    enabled: bool = True
    steps: int = 5

    def validate(self):
        if self.steps < 1:
            raise ValueError("compare.cost.steps must be >= 1")


@dataclass
class CompareConfig:
    """A study: the RL recipe (``policy``, ``prompts``, ``rewards``, ``grpo``: the shared
    :class:`~esorl.rl.grpo_trainer.EsoGRPOConfig` fields, TRL's names), the ``arms`` and
    ``reference_arm`` (the exact arm every other is paired with), ``sweep`` (phase 1),
    evaluation ``seeds`` (phase 2), ``diagnostics``, ``cost``, ``notes`` (the set-up's caveats,
    copied into the report), ``output_dir`` and ``logging``.

    The held-out reward is GRPO's ``eval_reward`` on ``prompts.eval_prompts`` held-out prompts:
    ``grpo.eval_strategy`` must be ``steps`` with ``eval_on_start``. Every run logs
    ``exact_kl`` (``log_exact_kl`` is forced on), the KL every arm is compared on.
    """

    output_dir: str = "runs/compare"
    policy: PolicyArgs = field(default_factory=PolicyArgs)
    prompts: PromptArgs = field(default_factory=PromptArgs)
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec()])
    grpo: dict = field(default_factory=dict, metadata={"config_class": _GRPO})
    arms: list[ArmSpec] = field(default_factory=lambda: [ArmSpec("exact", {"likelihood": "exact"}), ArmSpec("mc_elbo", {"likelihood": "mc_elbo"}),
                                                         ArmSpec("one_step", {"likelihood": "one_step"})])
    reference_arm: str = "exact"
    sweep: SweepArgs = field(default_factory=SweepArgs)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4, 5, 6, 7])
    diagnostics: DiagnosticsArgs = field(default_factory=DiagnosticsArgs)
    cost: CostArgs = field(default_factory=CostArgs)
    notes: str = ""
    logging: LoggingConfig = field(default_factory=lambda: LoggingConfig(wandb_mode="offline"))

    # fields of earlier versions (the study's redesign, the one vocabulary): refused with what replaced them
    RENAMED = {"estimators": "arms (each arm is {name: ..., grpo: {likelihood: ..., <its parameters>}})",
               "reward_threshold": "removed: the report compares held-out reward at equal wall-clock instead",
               "logging.log_every": "grpo.logging_steps", "logging.run_name": "grpo.run_name"}

    def validate(self):
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"compare.arms: names must be unique, got {names}")
        if self.reference_arm not in names:
            raise ValueError(f"compare.reference_arm {self.reference_arm!r} is not an arm ({', '.join(names)})")
        if not self.seeds:
            raise ValueError("compare.seeds: at least one evaluation seed")
        if self.sweep.enabled and set(self.sweep.seeds) & set(self.seeds):
            raise ValueError(f"compare.sweep.seeds {sorted(set(self.sweep.seeds) & set(self.seeds))} are also evaluation seeds: tuning and evaluation seeds must be disjoint")
        ref = run_recipe(self, self.arm(self.reference_arm), self.seeds[0])
        if ref.grpo.get("likelihood", "exact") not in ("exact", "replay"):
            raise ValueError(f"compare.reference_arm {self.reference_arm!r} must use likelihood exact (or replay)")
        for a in self.arms:
            for k, v in a.sweep_grid.items():
                if not isinstance(v, list) or not v:
                    raise ValueError(f"compare.arms[{a.name}].sweep_grid.{k}: expected a non-empty list of values, got {v!r}")
            for point in self.grid_points(a) or [{}]:
                args = run_recipe(self, a, self.seeds[0], point).args()  # every arm's settings, before any run
                if args.eval_strategy != "steps" or not args.eval_on_start or not self.prompts.eval_prompts:
                    raise ValueError(f"compare: the held-out reward needs grpo.eval_strategy: steps, grpo.eval_on_start: true and prompts.eval_prompts > 0 "
                                     f"(arm {a.name}: {args.eval_strategy}, {args.eval_on_start}, {self.prompts.eval_prompts})")

    def arm(self, name: str) -> ArmSpec:
        return next(a for a in self.arms if a.name == name)

    def grid_points(self, arm: ArmSpec) -> list[dict]:
        """Every combination of the sweep grid for ``arm`` (the shared grid with the arm's own
        entries over it; ``[]`` without a sweep)."""
        if not self.sweep.enabled:
            return []
        grid = {**self.sweep.grid, **arm.sweep_grid}
        keys = list(grid)
        return [dict(zip(keys, vals)) for vals in itertools.product(*(grid[k] for k in keys))]


def setting_tag(point: dict) -> str:
    """A grid point as a directory name, e.g. ``learning_rate=0.001,beta=0.0``."""
    return ",".join(f"{k}={v}" for k, v in point.items()) or "default"


def run_dir(cfg: CompareConfig, arm: str, seed: int, point: dict | None = None) -> Path:
    """Where one run lives: ``runs/<arm>/s<seed>`` (evaluation) or
    ``sweep/<arm>/<setting>/s<seed>`` (a sweep point)."""
    out = Path(cfg.output_dir)
    if point is None:
        return out / "runs" / arm / f"s{seed}"
    return out / "sweep" / arm / setting_tag(point) / f"s{seed}"


def run_recipe(cfg: CompareConfig, arm: ArmSpec, seed: int, point: dict | None = None, selected: dict | None = None) -> GRPORecipe:
    """The GRPO recipe of one run: the shared ``grpo`` section, then the arm's own settings,
    then the sweep point (phase 1) or the arm's selected setting (phase 2), then the seed and
    directory. The first evaluation seed's runs keep a model-only checkpoint at half their
    steps (the diagnostics' mid-run policies)."""
    g = {**cfg.grpo, **arm.grpo, **(point or {}), **(selected or {})}
    g.update(seed=seed, output_dir=str(run_dir(cfg, arm.name, seed, point)), log_exact_kl=True)
    if point is None and seed == cfg.seeds[0]:
        mid = max(1, int(g.get("max_steps", 2)) // 2)
        g.update(save_strategy="steps", save_steps=mid, save_only_model=True, save_total_limit=None)
    else:
        g.update(save_strategy="no")
    prompts = cfg.prompts
    if point is not None:  # a sweep run validates on the next block of held-out prompts
        prompts = dataclasses.replace(prompts, eval_offset=prompts.eval_offset + prompts.eval_prompts)
    return GRPORecipe(policy=cfg.policy, prompts=prompts, rewards=cfg.rewards, grpo=g, logging=copy.deepcopy(cfg.logging))


def run_compare(cfg: CompareConfig) -> dict:
    """Both phases, the diagnostics, the cost and the report. Returns ``{"report", ...}``."""
    check_policy_source(cfg.policy)  # before anything is written
    out = Path(cfg.output_dir)
    # a study always continues its own directory (finished runs are skipped), but never
    # shares it with a concurrent study
    lock = claim(out, "auto", False, None, "output_dir")
    try:
        return _run_compare(cfg, out)
    finally:
        lock.release()


class _Runner:
    """Runs GRPO recipes in this process, sharing the reward functions the first run built
    (a learned reward trains once; every arm is scored by the same functions)."""

    def __init__(self):
        self.rewards = None

    def __call__(self, rec: GRPORecipe) -> None:
        d = Path(rec.grpo["output_dir"])
        if (d / "model" / "config.json").exists() or (d / "DIVERGED").exists():
            return  # finished (or diverged): never run again
        try:
            res = run_grpo(rec, resume="auto", reward_funcs=self.rewards[0] if self.rewards else None,
                           reward_weights=self.rewards[1] if self.rewards else None)
            if self.rewards is None:
                tr = res["trainer"]
                self.rewards = (list(tr.reward_funcs), tr.reward_weights.tolist())
            del res
        except TrainingDiverged as e:
            # a diverged run is a result of the study, not a crash of it
            (d / "DIVERGED").write_text(str(e) + "\n")
            tqdm.write(f"[esorl] {d} diverged: {e}")


def _run_compare(cfg: CompareConfig, out: Path) -> dict:
    from .report import run_summary, write_report

    save_config(cfg, out / "config.yaml")
    runner = _Runner()
    selected = {a.name: {} for a in cfg.arms}
    if cfg.sweep.enabled:
        jobs = [(a, p, s) for s in cfg.sweep.seeds for a in cfg.arms for p in cfg.grid_points(a)]
        for a, p, s in tqdm(jobs, desc="phase 1: sweep", dynamic_ncols=True):
            runner(run_recipe(cfg, a, s, p))
        table = {}
        for a in cfg.arms:
            points, scores = cfg.grid_points(a), []
            for p in points:
                sums = [run_summary(run_dir(cfg, a.name, s, p)) for s in cfg.sweep.seeds]
                vals = [x[cfg.sweep.select_by] for x in sums]
                diverged = any(x["diverged"] for x in sums)
                scores.append({"setting": p, "per_seed": vals, "mean": sum(vals) / len(vals), "diverged": diverged})
            ok = lambda i: not scores[i]["diverged"] and scores[i]["mean"] == scores[i]["mean"]  # noqa: E731
            best = max(range(len(points)), key=lambda i: (ok(i), scores[i]["mean"] if ok(i) else 0.0, -i))
            selected[a.name] = points[best]
            table[a.name] = {"scores": scores, "selected": points[best]}
        (out / "sweep").mkdir(parents=True, exist_ok=True)
        (out / "sweep" / "sweep.json").write_text(json.dumps({"select_by": cfg.sweep.select_by, "seeds": cfg.sweep.seeds, "arms": table}, indent=1))
        import yaml

        (out / "sweep" / "selected.yaml").write_text(yaml.safe_dump({a: p for a, p in selected.items()}, sort_keys=False))
    jobs = [(a, s) for s in cfg.seeds for a in cfg.arms]
    for a, s in tqdm(jobs, desc="phase 2: evaluation seeds", dynamic_ncols=True):
        runner(run_recipe(cfg, a, s, None, selected[a.name]))
    diag = {}
    if cfg.diagnostics.enabled:
        from .diagnostics import run_diagnostics

        diag = run_diagnostics(cfg, selected, runner.rewards)
        (out / "diagnostics.json").write_text(json.dumps(diag, indent=1))
    cost = {}
    if cfg.cost.enabled:
        from .cost import measure_all

        cost = measure_all(cfg, selected)
        (out / "cost.json").write_text(json.dumps(cost, indent=1))
    return write_report(cfg, out, selected, diag, cost)


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(prog="esorl compare", description="exact vs Monte Carlo likelihoods in RL fine-tuning of an Eso-LM: the paired study")
    p.add_argument("--config", required=True, help="recipes/compare/<name>.yaml")
    p.add_argument("--report-only", action="store_true", help="rebuild report.md and the plots from finished runs")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    cfg = load_config(CompareConfig, a.config, a.overrides)
    if a.report_only:
        from .report import write_report

        out = Path(cfg.output_dir)
        rd = lambda f: json.loads((out / f).read_text()) if (out / f).exists() else {}  # noqa: E731
        import yaml

        sel_f = out / "sweep" / "selected.yaml"
        selected = yaml.safe_load(sel_f.read_text()) if sel_f.exists() else {a.name: {} for a in cfg.arms}
        res = write_report(cfg, out, selected, rd("diagnostics.json"), rd("cost.json"))
    else:
        res = run_compare(cfg)
    print(f"[esorl] report: {res['report']}")
