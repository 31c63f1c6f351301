"""``esorl grpo``: a thin recipe layer over :class:`~esorl.rl.grpo_trainer.EsoGRPOTrainer`.

A recipe names the starting ``policy``, the ``prompts`` (a corpus, a local file, a hub
dataset or a verifiable task), the ``rewards`` and the ``grpo`` section, whose fields are
``trl.GRPOConfig``'s (TRL's names and meanings) plus the Eso-LM ones
(:class:`~esorl.rl.grpo_trainer.EsoGRPOConfig`). :func:`build_grpo_trainer` turns it into the
objects a Python user would build by hand (a ``datasets.Dataset`` with a ``prompt`` column,
reward callables, an ``EsoGRPOConfig``, the model and tokenizer) and :func:`run_grpo` trains,
owning the output directory (one run per directory, ``--resume``, ``--overwrite``, a
checkpoint on SIGINT/SIGTERM), then exports ``<output_dir>/model`` and plots
``reward_curve.png``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..config import load_config
from ..lora import LoraArgs
from ..train.common import LoggingConfig
from .common import PolicyArgs, PromptArgs, RewardSpec

# the recipe's defaults where they differ from TRL's (TRL's defaults suit multi-GPU LLM runs)
RECIPE_DEFAULTS = {"output_dir": "runs/grpo", "logging_steps": 1, "save_steps": 50, "save_total_limit": 2}


@dataclass
class GRPORecipe:
    """A GRPO recipe: ``policy``, ``prompts``, ``rewards`` (reward functions / models with
    weights), ``grpo`` (``trl.GRPOConfig`` fields plus the Eso-LM ones: ``esorl config grpo``
    lists them all), ``lora`` and ``logging`` (wandb mode and project). Where a recipe leaves a
    ``grpo`` field out, TRL's default holds, except: output_dir ``runs/grpo``, logging_steps 1,
    save_steps 50, save_total_limit 2, report_to ``wandb`` (offline unless
    ``logging.wandb_mode`` says otherwise; ``none`` when it is ``disabled``)."""

    policy: PolicyArgs = field(default_factory=PolicyArgs)
    prompts: PromptArgs = field(default_factory=PromptArgs)
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec()])
    grpo: dict = field(default_factory=dict, metadata={"config_class": "esorl.rl.grpo_trainer:EsoGRPOConfig"})
    lora: LoraArgs = field(default_factory=LoraArgs)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    # fields of earlier esorl versions: old → new (a recipe that uses one fails before any work)
    RENAMED = {"logging.log_every": "grpo.logging_steps", "logging.run_name": "grpo.run_name"}

    def validate(self):
        self.args()  # every TRL and Eso-LM check, before any work

    def args(self, **overrides):
        """The :class:`EsoGRPOConfig` of this recipe (``overrides`` win over the section)."""
        from .grpo_trainer import config_from_dict

        values = {**RECIPE_DEFAULTS, "report_to": "none" if self.logging.wandb_mode == "disabled" else "wandb", **self.grpo, **overrides}
        return config_from_dict(values)


def prompt_dataset(rows: list[dict]):
    """A ``datasets.Dataset`` of prompt rows (``prompt`` plus the columns the rewards read);
    the source-row bookkeeping stays out of it."""
    from datasets import Dataset

    from .common import SOURCE_ROW

    return Dataset.from_list([{k: v for k, v in r.items() if k != SOURCE_ROW} for r in rows])


def _wandb_env(logging: LoggingConfig, output_dir: str) -> None:
    # wandb is offline unless configured; an explicit WANDB_MODE in the environment wins
    os.environ.setdefault("WANDB_MODE", logging.wandb_mode)
    os.environ.setdefault("WANDB_PROJECT", logging.wandb_project)
    os.environ.setdefault("WANDB_DIR", str(output_dir))


def start_wandb(logging: LoggingConfig, args, resume: bool):
    """Open this run's wandb run before ``Trainer.train`` (main process), so that
    transformers' ``WandbCallback`` logs into it: with the recipe's mode (``offline`` by
    default; an explicit ``WANDB_MODE`` wins), the recipe's project, ``<output_dir>/wandb``,
    and on ``--resume`` the same wandb run (its id is kept in ``<output_dir>/.wandb_run_id``).
    Relying on the environment alone is not enough: wandb reads it once per process, and a
    chained pretraining may already have started wandb. Returns the run or ``None``."""
    if "wandb" not in (args.report_to or []) or not args.should_save:
        return None
    mode = "disabled" if logging.wandb_mode == "disabled" else (os.environ.get("WANDB_MODE") or logging.wandb_mode)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    id_file = out / ".wandb_run_id"
    import secrets

    import wandb

    run_id = id_file.read_text().strip() if resume and id_file.is_file() else secrets.token_hex(4)
    id_file.write_text(run_id)
    return wandb.init(project=logging.wandb_project, name=args.run_name or out.name, mode=mode, id=run_id, resume="allow", dir=str(out),
                      reinit="finish_previous")


def build_grpo_trainer(recipe: GRPORecipe, reward_funcs=None, reward_weights=None, callbacks=None, **arg_overrides):
    """The :class:`~esorl.rl.grpo_trainer.EsoGRPOTrainer` of a recipe.

    Checks, before the model, reward models or any step: the policy source, user reward code,
    every prompt's length against ``max_seq_len − max_completion_length`` (naming the source
    and row). ``reward_funcs``/``reward_weights`` replace the recipe's rewards (the comparison
    shares loaded reward models between arms). ``arg_overrides`` override ``grpo`` fields.
    """
    from ..configuration_esolm import EsoLMConfig
    from ..modeling_esolm import EsoLMModel
    from .common import build_rewards, check_prompt_lengths, ensure_policy, load_prompts, load_tokenizer_for, resolve_callable
    from .grpo_trainer import EsoGRPOTrainer

    args = recipe.args(**arg_overrides)
    if reward_funcs is None:  # user reward code is found (or not) before any expensive set-up
        for r in recipe.rewards:
            if ":" in r.name:
                resolve_callable(r.name)
    model_dir = ensure_policy(recipe.policy)
    tokenizer = load_tokenizer_for(recipe.policy, model_dir)
    p = recipe.prompts
    train_rows = load_prompts(p, p.split, p.max_prompts, args.seed)
    eval_rows = load_prompts(p, p.eval_split, p.eval_prompts, args.seed) if p.eval_prompts else []
    context = EsoLMConfig.from_pretrained(str(model_dir)).max_seq_len
    n = args.max_completion_length
    if n >= context:
        raise ValueError(f"grpo.max_completion_length={n} leaves no room for a prompt in the model context max_seq_len={context}")
    limit = f"the model context max_seq_len={context} minus grpo.max_completion_length={n}"
    for rows, split in ((train_rows, p.split), (eval_rows, p.eval_split)):
        check_prompt_lengths(rows, tokenizer, context - n, f"prompts {p.source!r} split {split!r}", limit)
    if reward_funcs is None:
        reward_funcs, reward_weights = build_rewards(recipe.rewards, p.cache_dir, p)
    if args.reward_weights is None:
        args.reward_weights = list(reward_weights) if reward_weights is not None else None
    if args.reward_weights is not None and len(args.reward_weights) != len(reward_funcs):
        raise ValueError(f"grpo.reward_weights has {len(args.reward_weights)} entries for {len(reward_funcs)} reward functions")
    if eval_rows and args.eval_strategy == "no" and not args.eval_steps:
        eval_rows = []  # held-out prompts only when an evaluation is scheduled
    peft_config = None
    if recipe.lora.enabled:
        from ..lora import lora_config

        lc = recipe.lora
        peft_config = lora_config(r=lc.r, lora_alpha=lc.lora_alpha, lora_dropout=lc.lora_dropout, target_modules=lc.target_modules or None)
    _wandb_env(recipe.logging, args.output_dir)
    model = EsoLMModel.from_pretrained(str(model_dir))
    return EsoGRPOTrainer(model=model, reward_funcs=list(reward_funcs), args=args, train_dataset=prompt_dataset(train_rows),
                          eval_dataset=prompt_dataset(eval_rows) if eval_rows else None, processing_class=tokenizer,
                          callbacks=callbacks, peft_config=peft_config)


def resume_checkpoint(output_dir: str | Path, resume):
    """``Trainer.train``'s ``resume_from_checkpoint`` for esorl's ``--resume`` values:
    ``False``/``None`` (start), ``"latest"``/``True``/``"auto"`` (the newest checkpoint; a run
    with none saved yet starts from step 0), or a checkpoint directory."""
    from transformers.trainer_utils import get_last_checkpoint

    if resume in (False, None, "", "false"):
        return None
    out = Path(output_dir)
    if resume in (True, "latest", "auto"):
        return get_last_checkpoint(str(out)) if out.is_dir() else None
    if not Path(resume).is_dir():
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint directory")
    return str(resume)


def run_grpo(recipe: GRPORecipe, resume=False, overwrite: bool = False, reward_funcs=None, reward_weights=None, **arg_overrides) -> dict:
    """Train a recipe in its output directory (claimed for this run: :mod:`esorl.train.run_dir`),
    export ``<output_dir>/model`` (LoRA adapters merged) and plot ``reward_curve.png``.
    SIGINT/SIGTERM save a checkpoint and raise :class:`~esorl.train.run_dir.RunInterrupted`."""
    from ..config import save_config
    from ..train.run_dir import RunInterrupted, claim, resume_command
    from ..train.callbacks import StopOnSignal

    args = recipe.args(**arg_overrides)
    out = Path(args.output_dir)
    if reward_funcs is None:  # cheap checks first: nothing is written for a policy or reward that cannot load
        from .common import check_policy_source, resolve_callable

        check_policy_source(recipe.policy)
        for r in recipe.rewards:
            if ":" in r.name:
                resolve_callable(r.name)
    existed = out.exists()
    from accelerate import PartialState

    # every rank takes part (the main one writes the lock, the others wait for it); the
    # process group is the one TrainingArguments set up when ``args`` was built
    lock = claim(out, resume, overwrite, PartialState(), "grpo.output_dir")
    started = False
    try:
        ckpt = resume_checkpoint(out, resume)
        if ckpt:
            from .grpo_trainer import EsoGRPOTrainer

            EsoGRPOTrainer.check_resume(ckpt, args)  # before any set-up work or write
        stop = StopOnSignal()
        trainer = build_grpo_trainer(recipe, reward_funcs, reward_weights, callbacks=[stop], **arg_overrides)
        if trainer.accelerator.is_main_process:
            save_config(recipe, out / "config.yaml")
        started = True
        run = start_wandb(recipe.logging, trainer.args, bool(ckpt))
        try:
            trainer.train(resume_from_checkpoint=ckpt)
        finally:
            if run is not None:
                run.finish()
        if stop.stopped:
            raise RunInterrupted(f"grpo stopped by {stop.stopped} at step {trainer.state.global_step} of {trainer.state.max_steps}; "
                                 f"checkpoint in {out}. Resume with: {resume_command()}")
        model_dir = export_policy(trainer, out / "model")
        if trainer.accelerator.is_main_process:
            from ..plots import plot_reward_curve

            plot_reward_curve(out / "metrics.jsonl", out / "reward_curve.png", f"GRPO [{args.likelihood}] {out.name}")
        trainer.accelerator.print(f"[esorl] GRPO finished: metrics, checkpoints and model in {out}")
        if stop.late:
            # the signal came after the last step (during the final evaluation or save): the run
            # is complete, but whoever sent it wants the process to stop (e.g. a study's loop)
            raise RunInterrupted(f"grpo received {stop.late} as it finished; the run is complete in {out}")
        return {"output_dir": str(out), "model_dir": str(model_dir), "trainer": trainer}
    except BaseException:
        if not started and not existed:  # a set-up error leaves no run directory behind
            import shutil

            lock.release()
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        lock.release()


def export_policy(trainer, out_dir: Path) -> Path:
    """Write the trained policy as a plain Eso-LM directory (safetensors + tokenizer),
    atomically; LoRA adapters are merged into the weights (:func:`esorl.train.loop.export_model`,
    the export of every esorl run)."""
    from ..train.loop import export_model

    export_model(trainer.accelerator, trainer.model_wrapped, trainer.processing_class, out_dir)
    return out_dir


def main(argv=None):
    from ..config import parse_recipe_args, recipe_argparser
    from ..train.run_dir import precheck

    a = parse_recipe_args(recipe_argparser("esorl grpo", "GRPO fine-tuning of an Eso-LM (exact or Monte Carlo likelihoods) on TRL's GRPOTrainer",
                                           "grpo.learning_rate=1e-5"), argv)
    recipe = load_config(GRPORecipe, a.config, a.overrides)
    precheck(recipe.args().output_dir, a.resume, a.overwrite, "grpo.output_dir")  # before any set-up work
    run_grpo(recipe, a.resume, a.overwrite)


__all__ = ["GRPORecipe", "LoraArgs", "build_grpo_trainer", "run_grpo", "export_policy", "resume_checkpoint", "prompt_dataset"]
