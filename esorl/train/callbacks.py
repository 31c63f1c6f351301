"""``transformers`` callbacks that give a ``Trainer``-based run (GRPO, the reward-model
trainer) esorl's guarantees.

- :class:`MetricsJSONL`: every log record also goes to ``<output_dir>/metrics.jsonl`` (one JSON
  object per line, ``step`` first); a resumed run drops the records after its checkpoint, so
  the file is one history.
- :class:`NonFiniteGradients`: a non-finite gradient never reaches the weights, the optimizer
  state or a checkpoint. The update is skipped and counted (``train/skipped_updates``), and
  ``MAX_CONSECUTIVE_SKIPPED`` skips in a row stop the run with
  :class:`~esorl.train.common.TrainingDiverged`. ``Trainer`` itself steps on ``inf``/``nan``
  gradients (only fp16's ``GradScaler`` skips them).
- :class:`StopOnSignal`: SIGINT/SIGTERM end the run at the next optimizer step with a
  checkpoint (a second signal aborts at once).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from transformers import TrainerCallback

from ..io import atomic_write
from .common import MAX_CONSECUTIVE_SKIPPED, TrainingDiverged, _ds_overflow
from .run_dir import GracefulStop


class MetricsJSONL(TrainerCallback):
    """Append ``{"step": global_step, **logs}`` to ``<output_dir>/metrics.jsonl`` (main process)."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / "metrics.jsonl"

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.path.exists():
            # a resumed run redoes the steps after its checkpoint: their old records go
            keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= state.global_step]
            atomic_write(self.path, "".join(ln + "\n" for ln in keep))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rec = {"step": state.global_step, **{k: _plain(v) for k, v in logs.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")


def _plain(v):
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no inf/nan
    return v


class NonFiniteGradients(TrainerCallback):
    """Skip (and count) an optimizer update whose gradient norm is not finite; stop the run
    after :data:`~esorl.train.common.MAX_CONSECUTIVE_SKIPPED` in a row.

    ``trainer`` must record the norm it computed before the step (``_last_grad_norm``: override
    ``Trainer._get_grad_norm`` as :class:`RecordsGradNorm` does). The skip clears every gradient, so the
    optimizer's step is a no-op for every parameter (AdamW leaves parameters without a
    gradient and their moments untouched). With DeepSpeed the engine steps inside
    ``backward``; there the check runs just before the engine's step (DeepSpeed has no
    bf16/fp32 skip of its own) and stops the run. With fp16 the ``GradScaler`` skips and
    rescales itself; its skips are only counted.
    """

    def __init__(self, trainer):
        self.trainer = trainer
        self.skipped_updates = 0
        self.consecutive = 0

    def on_train_begin(self, args, state, control, **kwargs):
        w = getattr(self.trainer.accelerator, "deepspeed_engine_wrapped", None)
        if w is not None and not getattr(w, "_esorl_guarded", False):
            engine = w.engine

            def backward(loss, sync_gradients=True, **kw):
                engine.set_gradient_accumulation_boundary(is_boundary=sync_gradients)
                engine.backward(loss, **kw)
                if sync_gradients:
                    if not engine.fp16_enabled() and _ds_overflow(engine):
                        engine.optimizer.zero_grad()
                        raise TrainingDiverged(f"a gradient is non-finite at step {state.global_step + 1} (DeepSpeed: stopped before its update); "
                                               "no update with a non-finite value was applied")
                    engine.step()

            w.backward = backward
            w._esorl_guarded = True

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if args.fp16 or getattr(self.trainer.accelerator, "deepspeed_engine_wrapped", None) is not None:
            return
        gn = getattr(self.trainer, "_last_grad_norm", None)
        if gn is None or math.isfinite(float(gn)):
            self.consecutive = 0
            return
        for p in self.trainer.model.parameters():
            p.grad = None
        self.skipped_updates += 1
        self.consecutive += 1
        self.trainer.accelerator.print(f"[esorl] step {state.global_step + 1}: gradient norm {gn} is not finite; update skipped "
                                       f"({self.skipped_updates} skipped so far)")
        if self.consecutive >= MAX_CONSECUTIVE_SKIPPED:
            raise TrainingDiverged(f"the gradient was non-finite in {self.consecutive} consecutive updates up to step {state.global_step + 1}: "
                                   "stopping. No update with a non-finite value was applied.")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs:
            logs["train/skipped_updates"] = self.skipped_updates


class RecordsGradNorm:
    """A ``transformers.Trainer`` mixin that keeps the gradient norm of the coming update in
    ``_last_grad_norm`` for :class:`NonFiniteGradients` (``Trainer`` computes the norm before
    the ``on_pre_optimizer_step`` event but does not pass it)."""

    _last_grad_norm = None

    def _get_grad_norm(self, model, grad_norm=None):
        self._last_grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        return self._last_grad_norm


class StopOnSignal(TrainerCallback):
    """End training at the next optimizer step after SIGINT/SIGTERM, saving a checkpoint;
    ``stopped`` then names the signal (the caller raises
    :class:`~esorl.train.run_dir.RunInterrupted`)."""

    def __init__(self):
        self.stop = GracefulStop()
        self.stopped = ""
        self.late = ""  # a signal that came after the last step's check (evaluation, the final save)

    def on_train_begin(self, args, state, control, **kwargs):
        self.stop.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step < state.max_steps and self.stop.requested(args.device):
            control.should_save = True
            control.should_training_stop = True
            self.stopped = self.stop.signame or "a signal on another rank"

    def on_train_end(self, args, state, control, **kwargs):
        if not self.stopped and self.stop.flag:
            self.late = self.stop.signame
        self.stop.__exit__(None, None, None)
