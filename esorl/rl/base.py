"""What GRPO and PPO share: set-up from a recipe, prompts per step, the estimator's noise
seeds, LR schedule, held-out evaluation, completion logs and checkpoints."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import save_config
from ..modeling_esolm import EsoLMModel
from ..policy import EsoPolicy, EstimatorConfig
from ..sampling import SamplingConfig
from ..schedule import ScheduleConfig, Stream, make_generator
from ..train.run_dir import GracefulStop, RunInterrupted, claim, resume_command
from ..train.common import Checkpointer, NonFiniteGuard, RunLogger, all_reduce_sum, check_resume, flat_config, lr_factor, make_accelerator, set_learning_rate
from ..configuration_esolm import EsoLMConfig
from .common import (all_gather_cat, build_rewards, check_prompt_lengths, ensure_policy, resolve_callable, load_prompts, load_tokenizer_for, prepare_reference,
                     score_rewards)



@dataclass
class EsoRLArgs:
    """Fields GRPO and PPO share, with TRL's names: optimizer (``learning_rate``,
    ``adam_beta1``, ``adam_beta2``, ``adam_epsilon``, ``weight_decay``, ``max_grad_norm``, ``warmup_steps``,
    ``lr_scheduler_type`` constant | cosine; as in TRL, ``warmup_steps`` and the schedule
    count *optimizer updates*: GRPO makes ``num_iterations`` per step, PPO
    ``num_ppo_epochs × num_mini_batches``), loop (``max_steps``, ``per_device_train_batch_size``,
    ``gradient_accumulation_steps``), sampling (``temperature``, ``top_p``, ``top_k``; RL default
    ``top_p = 1``, docs/ESOLM.md §7), rewards (``reward_weights``), bookkeeping (``seed``,
    ``logging_steps``, ``save_steps``, ``save_total_limit``, ``eval_steps``, ``output_dir``,
    ``log_completions``, ``num_completions_to_print``), and the Eso-LM fields: the estimator
    (``likelihood``, ``mc_samples``, ``p_mask``, docs/ESOLM.md §6), the sampling schedule
    (``sampling_alpha0``, ``diffusion_steps``, ``schedule_kind``), ``attention_backend``,
    ``mixed_precision`` and ``gradient_checkpointing`` (recompute the blocks in the backward:
    same gradients, less memory; TRL's name)."""

    output_dir: str = "runs/rl"
    learning_rate: float = 1e-5
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    lr_scheduler_type: str = "constant"
    max_steps: int = 100
    per_device_train_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    reward_weights: list[float] = field(default_factory=list)
    seed: int = 0
    logging_steps: int = 1
    save_steps: int = 50
    save_total_limit: int = 2
    eval_steps: int = 0
    log_completions: bool = True
    num_completions_to_print: int = 2
    # --- Eso-LM extensions ---
    likelihood: str = "exact"
    mc_samples: int = 4
    p_mask: float = 0.15
    sampling_alpha0: float = 1.0
    diffusion_steps: int = 8
    schedule_kind: str = "unified"
    attention_backend: str = "auto"
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False

    completion_length_field = "max_completion_length"

    def estimator(self) -> EstimatorConfig:
        return EstimatorConfig(self.likelihood, self.mc_samples, self.p_mask)

    def sampling(self) -> SamplingConfig:
        n = getattr(self, self.completion_length_field)
        return SamplingConfig(n, ScheduleConfig(kind=self.schedule_kind, alpha0=self.sampling_alpha0, num_steps=self.diffusion_steps),
                              self.temperature, self.top_k, self.top_p)


class RLTrainerBase:
    """Base of :class:`~esorl.rl.grpo.EsoGRPOTrainer` and :class:`~esorl.rl.ppo.EsoPPOTrainer`.

    Subclasses set ``kind`` and call :meth:`setup` first, then build their model/optimizer.
    ``self.cfg`` is the algorithm section of the recipe (``grpo`` / ``ppo``)."""

    kind = "rl"

    def setup(self, recipe, c, reward_funcs=None, reward_weights=None) -> None:
        self.recipe, self.cfg = recipe, c
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        if reward_funcs is None:  # user reward code is found (or not) before any expensive set-up
            for r in recipe.rewards:
                if ":" in r.name:
                    resolve_callable(r.name)
        # a chained pretraining (policy.pretrain_recipe) runs first, on every rank, with its own
        # accelerator: this run's accelerator is made after it, so neither changes the other
        self.model_dir = ensure_policy(recipe.policy)
        self.accelerator = acc = make_accelerator(c.mixed_precision, 1)
        torch.manual_seed(c.seed)
        self.tokenizer = load_tokenizer_for(recipe.policy, self.model_dir)
        # data-dependent limits are checked before anything expensive (reward models) is
        # built and before the first step: a prompt too long for the context names its row
        p = recipe.prompts
        self.train_prompts = load_prompts(p, p.split, p.max_prompts, c.seed)
        self.eval_prompts = load_prompts(p, p.eval_split, p.eval_prompts, c.seed) if p.eval_prompts else []
        context = EsoLMConfig.from_pretrained(str(self.model_dir)).max_seq_len
        n = c.sampling().max_new_tokens
        if n >= context:
            raise ValueError(f"{self.kind}.{c.completion_length_field}={n} leaves no room for a prompt in the model context max_seq_len={context}")
        limit = f"the model context max_seq_len={context} minus {self.kind}.{c.completion_length_field}={n}"
        for rows, split in ((self.train_prompts, p.split), (self.eval_prompts, p.eval_split)):
            check_prompt_lengths(rows, self.tokenizer, context - n, f"prompts {p.source!r} split {split!r}", limit)
        if reward_funcs is None:
            reward_funcs, reward_weights = build_rewards(recipe.rewards, recipe.prompts.cache_dir, recipe.prompts)
        self.reward_funcs = reward_funcs
        self.reward_weights = list(c.reward_weights) if c.reward_weights else list(reward_weights)
        if len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(f"{self.kind}.reward_weights has {len(self.reward_weights)} entries for {len(self.reward_funcs)} reward functions")
        self.out = Path(c.output_dir)
        self.ckpt = Checkpointer(self.out, c.save_total_limit)
        self.logger = None  # opened by run(), once the output directory is claimed (nothing is written before)
        self._resumed_from = None  # the checkpoint resume() loaded, if any
        self.step = 0
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

    # optimizer updates per RL step (GRPO: num_iterations; PPO: epochs × mini-batches)
    updates_per_step = 1

    def learning_rate(self, update: int) -> float:
        """The learning rate of optimizer update ``update`` (0-based, counted over the whole
        run: ``step × updates_per_step + k``), from the current config: linear warm-up over
        ``warmup_steps`` updates, then constant or cosine to 0 at the last update."""
        c = self.cfg
        return c.learning_rate * lr_factor(update, c.warmup_steps, c.lr_scheduler_type, c.max_steps * self.updates_per_step)

    def make_guard(self) -> None:
        self.guard = NonFiniteGuard(self.accelerator, self.model, self.opt, self.ckpt)

    def update(self, k: int) -> tuple[float, bool]:
        """Apply the accumulated gradients as update ``k`` of the current step: the learning
        rate and AdamW settings of the current config, then clip and step unless a gradient is
        non-finite (:class:`~esorl.train.common.NonFiniteGuard`). Returns ``(grad_norm, applied)``."""
        c = self.cfg
        set_learning_rate(self.opt, self.learning_rate(self.step * self.updates_per_step + k),
                          betas=(c.adam_beta1, c.adam_beta2), eps=c.adam_epsilon, weight_decay=c.weight_decay)
        return self.guard.step(c.max_grad_norm, self.step + 1)

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

    def plot(self) -> None:
        """``<output_dir>/reward_curve.png`` from the run's metrics (main process)."""
        if self.accelerator.is_main_process:
            from ..plots import plot_reward_curve

            plot_reward_curve(self.out / "metrics.jsonl", self.out / "reward_curve.png", f"{self.kind.upper()} [{self.cfg.likelihood}] {self.out.name}")

    def resume_fixed(self) -> dict[str, str]:
        """Settings (dotted names; a trailing ``.`` = a whole section) a resumed run cannot
        change, with the reason; every other change is honoured from the new config."""
        return {f"{self.kind}.seed": "rollouts, prompt order and estimator noise are keyed by it",
                "lora.": "the checkpoint holds the parameters this LoRA setting trains"}

    def save(self) -> None:
        self.ckpt.save(self.accelerator, self.step, {"kind": self.kind, "config": flat_config(self.recipe), **self.guard.state_dict()},
                       verify=(self.model, self.opt))

    def resume(self, resume) -> None:
        path = self.ckpt.resolve(resume)
        if path is None:
            return
        state = Checkpointer.read_state(path)
        if state.get("kind", self.kind) != self.kind:
            raise ValueError(f"checkpoint {path} is a {state.get('kind')!r} checkpoint, not a {self.kind} one")
        changed = check_resume(state, path, self.accelerator, flat_config(self.recipe), self.resume_fixed())
        state, _ = Checkpointer.load(self.accelerator, path)
        self.step = state["step"]
        self.guard.load_state_dict(state)
        self._resumed_from = path
        self.accelerator.print(f"[esorl] resumed {self.kind.upper()} from {path} at step {self.step}"
                               + (f" with changed settings: {'; '.join(changed)}" if changed else ""))

    # ------------------------------------------------------------------ the loop
    def step_once(self, t0: float) -> tuple[dict, dict]:
        """One RL step (rollout, scoring, update); advances ``self.step``; returns the batch
        and its metrics."""
        raise NotImplementedError

    def progress_desc(self) -> str:
        return f"{self.kind}[{self.cfg.likelihood}]"

    def postfix(self, m: dict) -> dict:
        return {"reward": f"{m['reward']:.3f}"}

    def export_all(self) -> dict:
        """Write the trained artefacts; returns their paths."""
        raise NotImplementedError

    def open_run(self, resume, overwrite: bool = False):
        """Claim the output directory (one owner, one history: :mod:`esorl.train.run_dir`),
        refuse a resume that cannot be honoured, and only then open the logs and write
        ``config.yaml``. Returns the directory's lock."""
        lock = claim(self.out, resume, overwrite, self.accelerator, f"{self.kind}.output_dir")
        try:
            path = self.ckpt.resolve(resume)
            if path is not None:
                state = Checkpointer.read_state(path)
                if state.get("kind", self.kind) != self.kind:
                    raise ValueError(f"checkpoint {path} is a {state.get('kind')!r} checkpoint, not a {self.kind} one")
                check_resume(state, path, self.accelerator, flat_config(self.recipe), self.resume_fixed())
        except BaseException:
            lock.release()
            raise
        resuming = resume not in (False, None, "", "false")
        self.logger = RunLogger(self.out, self.recipe.logging, asdict(self.recipe), enabled=self.accelerator.is_main_process, resume=resuming)
        if self.accelerator.is_main_process:
            save_config(self.recipe, self.out / "config.yaml")
        return lock

    def run(self, resume=False, overwrite: bool = False) -> dict:
        """Train to ``max_steps`` (resuming if asked), with periodic eval, logs, completions
        and checkpoints; export, plot ``reward_curve.png``. ``resume``: as
        :func:`esorl.train.pretrain.run_pretrain`; ``overwrite``: delete a run already in
        ``output_dir`` first. SIGINT/SIGTERM save a checkpoint at the next step boundary and
        raise :class:`~esorl.train.run_dir.RunInterrupted`."""
        if resume in (False, None, "", "false") and self._resumed_from is not None:
            resume = str(self._resumed_from)  # resume() was called by hand: continue that checkpoint
        lock = self.open_run(resume, overwrite)
        try:
            return self._run(resume)
        finally:
            lock.release()

    def _run(self, resume) -> dict:
        c = self.cfg
        if self._resumed_from is None or str(self._resumed_from) != str(resume):
            self.resume(resume)
        if resume not in (False, None, "", "false"):
            self.logger.truncate_after(self.step if self.step else -1)  # records after the checkpoint are redone
        bar = tqdm(total=c.max_steps, initial=self.step, desc=self.progress_desc(), disable=not self.accelerator.is_main_process, dynamic_ncols=True)
        if self.step == 0 and c.eval_steps:
            self.logger.log(self.evaluate(), 0)
        with GracefulStop() as stop:
            while self.step < c.max_steps:
                batch, m = self.step_once(time.time())
                last = self.step == c.max_steps
                if c.eval_steps and (self.step % c.eval_steps == 0 or last):
                    m.update(self.evaluate())
                if self.step % c.logging_steps == 0 or last:
                    self.logger.log(m, self.step)
                    self.log_completions(batch)
                bar.update(1)
                bar.set_postfix(**self.postfix(m))
                if self.accelerator.is_main_process and c.num_completions_to_print and self.step % max(c.logging_steps, 10) == 0:
                    for p, t in list(zip(batch["prompts"], batch["texts"]))[: c.num_completions_to_print]:
                        tqdm.write(f"  [{self.step}] {p!r} -> {t!r}")
                saved = (c.save_steps and self.step % c.save_steps == 0) or last
                if saved:
                    self.save()
                if not last and stop.requested(self.accelerator.device):
                    if not saved:
                        self.save()
                    bar.close()
                    self.logger.finish()
                    raise RunInterrupted(f"{self.kind} stopped by {stop.signame or 'a signal on another rank'} at step {self.step} of "
                                         f"{c.max_steps}; checkpoint {self.ckpt.latest()}. Resume with: {resume_command()}")
        bar.close()
        res = self.export_all()
        self.plot()
        self.logger.finish()
        self.accelerator.print(f"[esorl] {self.kind.upper()} finished: metrics, checkpoints and model in {self.out}")
        return {"output_dir": str(self.out), **res}
