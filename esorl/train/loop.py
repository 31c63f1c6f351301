"""The one training loop of pretraining, SFT and PPO, on ``accelerate``.

:class:`TrainLoop` owns everything a run does besides computing its loss: the output
directory (one owner, one history: :mod:`esorl.train.run_dir`), the refusal of a resume it
cannot honour (before any work), AdamW and transformers' learning-rate schedule
(:mod:`esorl.train.arguments`), DeepSpeed's batch fields, micro-batch backward and the
clipped, guarded update (:class:`~esorl.train.common.NonFiniteGuard`: a non-finite gradient
never reaches the weights), the optional EMA of the weights, periodic evaluation, logging
(``metrics.jsonl`` and wandb), atomic checkpoints with exact resume, a checkpoint on
SIGINT/SIGTERM, and the export of ``<output_dir>/model`` (:func:`export_model`).

A subclass supplies only its batches and loss: :meth:`TrainLoop.build` (data, model; then
:meth:`TrainLoop.prepare_model`), :meth:`TrainLoop.train_step` (its micro-batches through
:meth:`TrainLoop.backward`, each update through :meth:`TrainLoop.update`; returns the step's
metrics), and optionally :meth:`TrainLoop.evaluate`, :meth:`TrainLoop.export`,
:meth:`TrainLoop.checkpoint_state` / :meth:`TrainLoop.load_checkpoint_state` and
:meth:`TrainLoop.resume_fixed`. GRPO runs on TRL's ``GRPOTrainer`` instead, and exports with
the same :func:`export_model`.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import save_config
from ..distributed import uses_deepspeed, zero_stage
from .arguments import TrainingArgs, make_optimizer, set_learning_rate
from .common import EMA, Checkpointer, NonFiniteGuard, RunLogger, check_resume, configure_deepspeed, flat_config, make_accelerator, read_metrics
from .run_dir import GracefulStop, RunInterrupted, claim, resume_command


def _resuming(resume) -> bool:
    return resume not in (False, None, "", "false")


class TrainLoop:
    """One training run of ``recipe`` with the loop settings ``args`` (a
    :class:`~esorl.train.arguments.TrainingArgs`). See the module docstring for what a
    subclass supplies. ``run()`` trains to ``args.max_steps`` and returns ``{"output_dir",
    "model_dir", "metrics", ...}``."""

    kind = "train"  # checkpoint kind (a resume refuses another kind's checkpoint) and progress label
    updates_per_step = 1  # optimizer updates per step (PPO: num_iterations × num_mini_batches)
    evaluate_first = False  # evaluate before the first step (when eval_steps > 0)
    fixed_on_resume: dict[str, str] = {}  # settings a resume cannot change: dotted name (or prefix ending in ".") → why
    optimize_frozen = False  # offer AdamW the frozen parameters too (it skips them: they get no gradient)
    renamed: dict[str, str] = {}  # old flat config names of earlier checkpoints → current ones (their settings still compare)

    def __init__(self, recipe, args: TrainingArgs):
        self.recipe, self.args = recipe, args
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.out = Path(args.output_dir)
        self.ckpt = Checkpointer(self.out, args.save_total_limit)
        self.step = 0
        self.ema: EMA | None = None
        self.logger: RunLogger | None = None  # opened by run(), once the output directory is claimed
        self._resumed_from = None

    # ------------------------------------------------------------------ set-up
    def start_accelerator(self) -> None:
        """The run's ``Accelerator`` (its precision from ``args``) and the global seed (dropout).
        Called by the subclass once anything that runs with its own accelerator (a chained
        pretraining) is done."""
        self.accelerator = make_accelerator(self.args.mixed_precision())
        torch.manual_seed(self.args.seed)

    def prepare_model(self, model: torch.nn.Module) -> None:
        """AdamW over the trainable parameters, DeepSpeed's batch fields, ``accelerate.prepare``,
        the non-finite guard and (``args.ema_decay > 0``) the EMA. Sets ``self.model`` (wrapped)
        and ``self.opt``."""
        a, acc = self.args, self.accelerator
        params = list(model.parameters()) if self.optimize_frozen else [p for p in model.parameters() if p.requires_grad]
        opt = make_optimizer(params, a, device=None if uses_deepspeed(acc) else acc.device)
        configure_deepspeed(acc, a.per_device_train_batch_size, a.gradient_accumulation_steps, a.max_grad_norm)
        self.model, self.opt = acc.prepare(model, opt)
        self.guard = NonFiniteGuard(acc, self.model, self.opt, self.ckpt)
        decay = getattr(a, "ema_decay", 0.0)
        self.ema = EMA(self.model.parameters(), decay) if decay > 0 else None

    def build(self) -> None:
        """Data and model (then :meth:`prepare_model`), after the output directory is claimed
        and the resume checked; a subclass that builds in ``__init__`` leaves it empty. Called
        once (:meth:`_build_once`)."""

    def _build_once(self) -> None:
        if not getattr(self, "_built", False):
            self.build()
            self._built = True

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict:
        """Step ``self.step`` (0-based): batches, :meth:`backward`, :meth:`update`; returns its
        metrics. The loop advances ``self.step`` afterwards."""
        raise NotImplementedError

    def backward(self, loss: torch.Tensor, sync: bool) -> None:
        """Backward of one micro-batch whose loss is normalised over the whole optimizer batch
        and multiplied by the number of ranks (DDP/ZeRO average over ranks); ``sync``: the last
        micro-batch before :meth:`update`."""
        self.guard.backward(loss, sync, self.world)

    def update(self, k: int = 0) -> tuple[float, bool]:
        """Apply the accumulated gradients as update ``k`` of the current step: the learning
        rate of the schedule at the number of updates applied so far (``step ×
        updates_per_step + k`` minus the skipped ones) and the AdamW settings of the current
        config, then clip and step unless a gradient is non-finite; the EMA follows an
        applied update. Returns ``(grad_norm, applied)``."""
        a = self.args
        # the applied updates so far: a skipped (non-finite) update does not advance the
        # schedule, as transformers' Trainer does not step its scheduler then
        u = self.step * self.updates_per_step + k - self.guard.skipped_updates
        set_learning_rate(self.opt, a.learning_rate * a.lr_factor(u, a.max_steps * self.updates_per_step),
                          betas=(a.adam_beta1, a.adam_beta2), eps=a.adam_epsilon, weight_decay=a.weight_decay)
        gn, applied = self.guard.step(a.max_grad_norm, self.step + 1)
        if applied and self.ema is not None:
            self.ema.update()
        return gn, applied

    # ------------------------------------------------------------------ hooks
    def evaluate(self) -> dict:
        """Held-out metrics of the current weights (the EMA's when on); ``{}`` = none."""
        return {}

    def export(self) -> dict:
        """Write ``<output_dir>/model`` (the EMA weights when on); returns the paths written."""
        export_model(self.accelerator, self.model, self.tokenizer, self.out / "model", ema=self.ema)
        return {"model_dir": str(self.out / "model")}

    def checkpoint_state(self) -> dict:
        """JSON-able state saved in ``trainer_state.json`` besides the step."""
        return {}

    def load_checkpoint_state(self, state: dict) -> None:
        """Restore :meth:`checkpoint_state` (``self.step`` is already the checkpoint's)."""

    def on_log(self, metrics: dict) -> None:
        """Called after a metrics record is written (e.g. completion logs)."""

    def truncate_logs(self, step: int) -> None:
        """On resume, drop the records of steps after ``step`` (they will be redone)."""
        self.logger.truncate_after(step)

    def on_step_end(self, metrics: dict) -> None:
        """Called after every step (e.g. printing sample completions)."""

    def on_finish(self) -> None:
        """Called after the export (e.g. plots)."""

    def progress_desc(self) -> str:
        return self.kind

    def postfix(self, m: dict) -> dict:
        return {}

    def resume_fixed(self) -> dict[str, str]:
        """Settings (dotted names; a trailing ``.`` = a whole section) a resumed run cannot
        change, with the reason; every other change is honoured from the new config."""
        return dict(self.fixed_on_resume)

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        st = {"kind": self.kind, "config": flat_config(self.recipe), **self.guard.state_dict(), **self.checkpoint_state()}
        return self.ckpt.save(self.accelerator, self.step, st, {"ema": self.ema.state_dict()} if self.ema else None, verify=(self.model, self.opt))

    def _check(self, path: Path) -> list[str]:
        state = Checkpointer.read_state(path)
        if state.get("kind", self.kind) != self.kind:
            raise ValueError(f"checkpoint {path} is a {state.get('kind')!r} checkpoint, not a {self.kind} one")
        if isinstance(state.get("config"), dict) and self.renamed:
            state["config"] = {self.renamed.get(k, k): v for k, v in state["config"].items()}
        return check_resume(state, path, self.accelerator, flat_config(self.recipe), self.resume_fixed())

    def resume(self, resume) -> None:
        """Load a checkpoint (``"latest"``, ``True``, ``"auto"`` or a directory) into the built
        run: weights, optimizer, RNG states, EMA, step and the subclass's state."""
        path = self.ckpt.resolve(resume)
        if path is None:
            return
        changed = self._check(path)
        self._build_once()
        state, extras = Checkpointer.load(self.accelerator, path, ["ema"] if self.ema else [])
        self.step = state["step"]
        self.guard.load_state_dict(state)
        if self.ema is not None:
            self.ema.load_state_dict(extras["ema"])
            self.ema.decay = self.args.ema_decay  # the current setting, not the saved one
        self.load_checkpoint_state(state)
        self._resumed_from = path
        self.accelerator.print(f"[esorl] resumed {self.kind} from {path} at step {self.step}"
                               + (f" with changed settings: {'; '.join(changed)}" if changed else ""))

    # ------------------------------------------------------------------ the loop
    def run(self, resume=False, overwrite: bool = False) -> dict:
        """Train to ``max_steps``. ``resume``: ``False`` (a new run: an ``output_dir`` that
        holds a run is refused unless ``overwrite``), ``"latest"``/``True``, ``"auto"`` (resume
        if possible) or a checkpoint directory. SIGINT/SIGTERM save a checkpoint at the next
        step boundary and raise :class:`~esorl.train.run_dir.RunInterrupted`."""
        if not _resuming(resume) and self._resumed_from is not None:
            resume = str(self._resumed_from)  # resume() was called by hand: continue that checkpoint
        lock = claim(self.out, resume, overwrite, self.accelerator, f"{self.args.section}.output_dir")
        try:
            path = self.ckpt.resolve(resume)
            if path is not None:
                self._check(path)  # a resume that cannot be honoured is refused before any work
            self._build_once()
            self.logger = RunLogger(self.out, self.recipe.logging, asdict(self.recipe), enabled=self.accelerator.is_main_process,
                                    resume=_resuming(resume), run_name=self.args.run_name)
            if self.accelerator.is_main_process:
                save_config(self.recipe, self.out / "config.yaml")
            if path is not None and (self._resumed_from is None or Path(self._resumed_from) != path):
                self.resume(path)
            if _resuming(resume):
                self.truncate_logs(self.step if self.step else -1)  # records after the checkpoint are redone
            return self._loop()
        finally:
            lock.release()

    def _evaluate(self) -> dict:
        if self.ema is not None:
            self.ema.swap()
        try:
            return self.evaluate()
        finally:
            if self.ema is not None:
                self.ema.swap()

    def _loop(self) -> dict:
        a, acc = self.args, self.accelerator
        bar = tqdm(total=a.max_steps, initial=self.step, desc=self.progress_desc(), disable=not acc.is_main_process, dynamic_ncols=True)
        if self.step == 0 and a.eval_steps and self.evaluate_first:
            self.logger.log(self._evaluate(), 0)
        with GracefulStop() as stop:
            while self.step < a.max_steps:
                m = self.train_step()
                self.step += 1
                last = self.step == a.max_steps
                evaluated = (a.eval_steps and self.step % a.eval_steps == 0) or last
                if evaluated:
                    m.update(self._evaluate())
                if self.step % a.logging_steps == 0 or evaluated:
                    self.logger.log(m, self.step)
                    self.on_log(m)
                self.on_step_end(m)
                bar.update(1)
                bar.set_postfix(**self.postfix(m))
                saved = (a.save_steps and self.step % a.save_steps == 0) or last
                if saved:
                    self.save()
                if not last and stop.requested(acc.device):
                    path = self.ckpt.latest() if saved else self.save()
                    bar.close()
                    self.logger.finish()
                    raise RunInterrupted(f"{self.kind} stopped by {stop.signame or 'a signal on another rank'} at step {self.step} of "
                                         f"{a.max_steps}; checkpoint {path}. Resume with: {resume_command()}")
        bar.close()
        res = self.export()
        self.on_finish()
        metrics = read_metrics(self.out / "metrics.jsonl") if acc.is_main_process else []
        self.logger.finish()
        acc.print(f"[esorl] {self.kind} finished: metrics, checkpoints and model in {self.out}")
        return {"output_dir": str(self.out), **res, "metrics": metrics}


def export_model(accelerator, model, tokenizer, out_dir: str | Path, ema: EMA | None = None, submodule: str = "") -> dict | None:
    """Write the trained Eso-LM as a plain ``save_pretrained`` directory (safetensors) with its
    tokenizer, atomically (readers see the old or the new directory). The one export of
    pretraining, SFT, PPO and GRPO.

    ``model``: the prepared (wrapped) model; ``submodule``: the attribute of the unwrapped
    model that is the Eso-LM (PPO's container: ``"module"``); ``ema``: export its weights
    (swapped in and back). LoRA adapters are merged into a plain Eso-LM. Under ZeRO-3 the
    weights are gathered (collective: call on every rank). Returns the full state dict on the
    main process when one was gathered (PPO saves its value head from it), else ``None``."""
    import contextlib

    from ..io import replace_dir

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if ema is not None:
        ema.swap()
    try:
        unwrapped = accelerator.unwrap_model(model)
        lm = getattr(unwrapped, submodule) if submodule else unwrapped
        peft = hasattr(lm, "peft_config")
        sd = None if peft and not submodule else accelerator.get_state_dict(model)
        if peft:  # LoRA: the adapters merged into a plain Eso-LM (under ZeRO-3 from whole weights: every rank gathers)
            from ..lora import merge_and_export

            gather = contextlib.nullcontext()
            if zero_stage(accelerator) == 3:
                import deepspeed

                gather = deepspeed.zero.GatheredParameters(list(lm.parameters()))
            with gather:
                if accelerator.is_main_process:
                    merge_and_export(lm, tmp)
        elif accelerator.is_main_process:
            pre = f"{submodule}." if submodule else ""
            lm.save_pretrained(str(tmp), state_dict={k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)}, safe_serialization=True)
        if accelerator.is_main_process:
            tokenizer.save_pretrained(str(tmp))
            replace_dir(tmp, out_dir)
    finally:
        if ema is not None:
            ema.swap()
    accelerator.wait_for_everyone()
    return sd if accelerator.is_main_process else None
