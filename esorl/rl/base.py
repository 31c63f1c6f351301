"""The RL side of :class:`~esorl.train.loop.TrainLoop` (PPO's base): set-up from a recipe,
prompts per step, rollouts and their rewards, the estimator's noise seeds, held-out reward,
completion logs and the reward curve. The loop itself (optimizer, schedule, guarded updates,
checkpoints, resume, logging, signals) is the one pretraining and SFT run on."""

from __future__ import annotations

import json
import time

import torch
from tqdm.auto import tqdm

from ..configuration_esolm import EsoLMConfig
from ..modeling_esolm import EsoLMModel
from ..policy import EsoPolicy
from ..schedule import Stream, make_generator
from ..distributed import all_gather_cat, all_reduce_sum
from ..train.loop import TrainLoop
from .common import (build_rewards, check_prompt_lengths, ensure_policy, resolve_callable, load_prompts, load_tokenizer_for, prepare_reference,
                     score_rewards)


class RLTrainerBase(TrainLoop):
    """Base of :class:`~esorl.rl.ppo.EsoPPOTrainer` (GRPO runs on TRL's ``GRPOTrainer``).

    Subclasses set ``kind`` and call :meth:`setup` first, then build their model and call
    :meth:`~esorl.train.loop.TrainLoop.prepare_model`. ``self.cfg`` (= ``self.args``) is the
    algorithm section of the recipe."""

    kind = "rl"
    evaluate_first = True  # the held-out reward of the starting policy, at step 0

    def setup(self, recipe, c, reward_funcs=None, reward_weights=None) -> None:
        TrainLoop.__init__(self, recipe, c)
        self.cfg = c
        if reward_funcs is None:  # user reward code is found (or not) before any expensive set-up
            for r in recipe.rewards:
                if ":" in r.name:
                    resolve_callable(r.name)
        # a chained pretraining (policy.pretrain_recipe) runs first, on every rank, with its own
        # accelerator: this run's accelerator is made after it, so neither changes the other
        self.model_dir = ensure_policy(recipe.policy)
        self.start_accelerator()
        self.tokenizer = load_tokenizer_for(recipe.policy, self.model_dir)
        # data-dependent limits are checked before anything expensive (reward models) is
        # built and before the first step: a prompt too long for the context names its row
        p = recipe.prompts
        self.train_prompts = load_prompts(p, p.split, p.max_prompts, c.seed)
        self.eval_prompts = load_prompts(p, p.eval_split, p.eval_prompts, c.seed) if p.eval_prompts else []
        context = EsoLMConfig.from_pretrained(str(self.model_dir)).max_seq_len
        n = c.max_completion_length
        if n >= context:
            raise ValueError(f"{self.kind}.max_completion_length={n} leaves no room for a prompt in the model context max_seq_len={context}")
        limit = f"the model context max_seq_len={context} minus {self.kind}.max_completion_length={n}"
        for rows, split in ((self.train_prompts, p.split), (self.eval_prompts, p.eval_split)):
            check_prompt_lengths(rows, self.tokenizer, context - n, f"prompts {p.source!r} split {split!r}", limit)
        if reward_funcs is None:
            reward_funcs, reward_weights = build_rewards(recipe.rewards, recipe.prompts.cache_dir, recipe.prompts)
        self.reward_funcs = reward_funcs
        self.reward_weights = list(c.reward_weights) if c.reward_weights else list(reward_weights)
        if len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(f"{self.kind}.reward_weights has {len(self.reward_weights)} entries for {len(self.reward_funcs)} reward functions")
        self._perms: dict[int, torch.Tensor] = {}

    def make_reference(self, needed: bool):
        """The frozen reference policy, reloaded from the policy's saved directory (as TRL does
        from ``_name_or_path``), or ``None``."""
        if not needed:
            return None
        ref = EsoLMModel.from_pretrained(str(self.model_dir)).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        self.ref = prepare_reference(ref, self.accelerator)
        return EsoPolicy(self.ref, self.tokenizer, self.cfg.sampling(), self.accelerator, self.cfg.attention_backend)

    # ------------------------------------------------------------------ batches
    def prompt_rows(self, step: int, n_prompts: int, repeat: int = 1) -> list[dict]:
        """The step's prompts, each repeated ``repeat`` times, identical on every rank and for
        every estimator: a seeded permutation of the prompts per epoch."""
        P = len(self.train_prompts)
        rows = []
        for f in range(step * n_prompts, (step + 1) * n_prompts):
            e, i = divmod(f, P)
            if e not in self._perms:
                self._perms[e] = torch.randperm(P, generator=make_generator(self.cfg.seed, Stream.PROMPTS, e))
            rows.append(self.train_prompts[int(self._perms[e][i])])
        return [r for r in rows for _ in range(repeat)]

    def sample_and_score(self, step: int, n_prompts: int, repeat: int, n_local: int, reward_adjust=None) -> dict:
        """Generate this rank's share of the step's batch (``n_local`` completions of the
        global ``prompt_rows(step, n_prompts, repeat)``) and score it with the reward
        functions. ``reward_adjust(rollout, total) -> total`` may modify the rewards before
        they are gathered. Returns the rollout, texts, local and gathered rewards, timings."""
        rows = self.prompt_rows(step, n_prompts, repeat)
        sl = self.local_slice(n_local)
        local = rows[sl]
        n_global = n_prompts * repeat
        sample_ids = torch.arange(step * n_global, (step + 1) * n_global)[sl]
        prompts = [x["prompt"] for x in local]
        t0 = time.time()
        ro = self.policy.generate(prompts, self.cfg.seed, step, sample_ids)
        t_sample = time.time() - t0
        texts = self.policy.texts(ro)
        cols = {k: [x[k] for x in local] for k in self.recipe.prompts.reward_columns()}
        cols.update(self.reward_contract(ro))
        total, per = score_rewards(self.reward_funcs, self.reward_weights, prompts, texts, cols)
        if reward_adjust is not None:
            total = reward_adjust(ro, total)
        dev = self.accelerator.device
        return {"rollout": ro, "prompts": prompts, "texts": texts, "rewards": total, "slice": sl,
                "all_rewards": all_gather_cat(total.to(dev)).cpu(),
                "per_reward": {k: all_gather_cat(v.to(dev)).cpu() for k, v in per.items()},
                "t_sample": t_sample, "t_reward": time.time() - t0 - t_sample, "t_generate": time.time() - t0}

    def reward_contract(self, ro) -> dict:
        """TRL's reward keywords besides the dataset columns, with the semantics of
        :mod:`esorl.rl.grpo_trainer`: ``completion_ids`` up to and including the first EOS (what
        the text shows), ``trainer_state`` (``global_step`` = steps done, ``max_steps``),
        ``log_metric(name, value)`` (averaged into the step's metrics) and
        ``log_extra(column, values)`` (added to ``completions.jsonl``)."""
        from transformers import TrainerState

        ids = [row[m].tolist() for row, m in zip(ro.completion_ids, ro.text_mask)]
        self._reward_metrics, self._reward_extra = {}, {}
        return {"completion_ids": ids, "trainer_state": TrainerState(global_step=self.step, max_steps=self.cfg.max_steps),
                "log_metric": lambda name, value: self._reward_metrics.setdefault(name, []).append(float(value)),
                "log_extra": lambda column, values: self._reward_extra.__setitem__(column, list(values))}

    def local_slice(self, n_local: int) -> slice:
        i = self.accelerator.process_index
        return slice(i * n_local, (i + 1) * n_local)

    def estimator_seed(self, step: int, k: int) -> int:
        """One noise seed per inner iteration / epoch, shared by the current, old and
        reference passes (docs/ESOLM.md §6)."""
        return int(torch.randint(0, 2**31 - 1, (1,), generator=make_generator(self.cfg.seed, Stream.EST, step, k)))

    # ------------------------------------------------------------------ eval, logging
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean reward on held-out prompts (one completion each, fixed seed)."""
        if not self.eval_prompts:
            return {}
        rows = self.eval_prompts[self.accelerator.process_index :: self.world]
        prompts = [r["prompt"] for r in rows]
        ro = self.policy.generate(prompts, self.cfg.seed + 99991, 0, torch.arange(len(prompts)))
        texts = self.policy.texts(ro)
        cols = {k: [r[k] for r in rows] for k in self.recipe.prompts.reward_columns()}
        total, _ = score_rewards(self.reward_funcs, self.reward_weights, prompts, texts, cols)
        s = all_reduce_sum(torch.tensor([total.sum().item(), len(total)], device=self.accelerator.device, dtype=torch.float64))
        return {"eval/reward": (s[0] / s[1]).item()}

    def log_completions(self, batch) -> None:
        if not (self.cfg.log_completions and self.accelerator.is_main_process):
            return
        with (self.out / "completions.jsonl").open("a") as f:
            extra = getattr(self, "_reward_extra", {})
            for i, (p, t, r) in enumerate(list(zip(batch["prompts"], batch["texts"], batch["rewards"].tolist()))[: max(self.cfg.num_completions_to_print, 8)]):
                rec = {"step": self.step, "prompt": p, "completion": t, "reward": r, **{k: v[i] for k, v in extra.items() if i < len(v)}}
                f.write(json.dumps(rec, default=str) + "\n")

    def truncate_logs(self, step: int) -> None:
        super().truncate_logs(step)
        f = self.out / "completions.jsonl"
        if self.accelerator.is_main_process and f.exists():
            from ..io import atomic_write

            keep = [ln for ln in f.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
            atomic_write(f, "".join(ln + "\n" for ln in keep))

    def on_log(self, metrics: dict) -> None:
        self.log_completions(self._batch)

    def on_step_end(self, metrics: dict) -> None:
        batch, c = self._batch, self.cfg
        if self.accelerator.is_main_process and c.num_completions_to_print and self.step % max(c.logging_steps, 10) == 0:
            for p, t in list(zip(batch["prompts"], batch["texts"]))[: c.num_completions_to_print]:
                tqdm.write(f"  [{self.step}] {p!r} -> {t!r}")

    def on_finish(self) -> None:
        """``<output_dir>/reward_curve.png`` from the run's metrics (main process)."""
        if self.accelerator.is_main_process:
            from ..plots import plot_reward_curve

            plot_reward_curve(self.out / "metrics.jsonl", self.out / "reward_curve.png", f"{self.kind.upper()} [{self.cfg.likelihood}] {self.out.name}")

    def resume_fixed(self) -> dict[str, str]:
        return {f"{self.kind}.seed": "rollouts, prompt order and estimator noise are keyed by it",
                "lora.": "the checkpoint holds the parameters this LoRA setting trains"}

    def progress_desc(self) -> str:
        return f"{self.kind}[{self.cfg.likelihood}]"

    def postfix(self, m: dict) -> dict:
        return {"reward": f"{m['reward']:.3f}"}
