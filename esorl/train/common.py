"""Pieces every training loop shares (:mod:`esorl.train.loop`, and GRPO's callbacks):
accelerator set-up, the non-finite guard, EMA, atomic checkpoints with exact resume,
metrics logging (JSONL + wandb)."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..distributed import all_reduce_sum, local_data, uses_deepspeed, zero_stage


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the run stopped and the last good checkpoint was kept."""


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, incomplete or corrupted."""


# ----------------------------------------------------------------------------- configs


@dataclass
class LoggingConfig:
    """Where metrics go besides the local ``metrics.jsonl`` (always written). How often and
    under which run name are the training section's ``logging_steps`` and ``run_name``.

    wandb_project: the wandb project. wandb_mode: ``offline`` (default: runs sync later with
    ``wandb sync``), ``online`` (needs ``WANDB_API_KEY``) or ``disabled``."""

    wandb_project: str = "esorl"
    wandb_mode: str = "offline"

    def validate(self):
        if self.wandb_mode not in ("offline", "online", "disabled"):
            raise ValueError(f"logging.wandb_mode must be offline, online or disabled, got {self.wandb_mode!r}")


# ----------------------------------------------------------------------------- updates

# consecutive updates skipped for a non-finite gradient before the run is declared diverged
MAX_CONSECUTIVE_SKIPPED = 5
# with fp16 loss scaling, overflows are how the scale is found (from 2^16 down): allow more
MAX_CONSECUTIVE_SKIPPED_FP16 = 40


class NonFiniteGuard:
    """Keeps non-finite gradients away from the weights and the optimizer state.

    :meth:`step` clips and applies an update only when the global gradient norm is finite,
    as AMP's ``GradScaler`` does: otherwise the gradients are dropped, the update is skipped
    and counted (``skipped_updates``, logged as ``train/skipped_updates``), and after
    :data:`MAX_CONSECUTIVE_SKIPPED` skips in a row the run stops (:class:`TrainingDiverged`).
    The norm is the all-reduced one (DDP) or DeepSpeed's partition-wide overflow check, so
    every rank takes the same decision. Under DeepSpeed the step is taken inside the
    engine; a non-finite gradient there stops the run *before* the engine's step (DeepSpeed
    has no bf16/fp32 skip). With fp16 mixed precision accelerate's ``GradScaler`` already
    skips and rescales; its decision is counted.
    """

    def __init__(self, accelerator, model, optimizer, checkpointer: "Checkpointer"):
        self.acc, self.model, self.opt, self.ckpt = accelerator, model, optimizer, checkpointer
        self.skipped_updates = 0
        self.consecutive = 0
        self.is_ds = uses_deepspeed(accelerator)

    def backward(self, loss: torch.Tensor, sync: bool, world: int) -> None:
        """Backward of one micro-batch whose loss is already normalised over the whole
        optimizer batch; ``sync``: the last micro-batch before the update. DeepSpeed must not
        rescale by 1/gas and only reduces at that boundary; DDP skips the all-reduce until then."""
        acc = self.acc
        if self.is_ds:
            engine = acc.deepspeed_engine_wrapped.engine
            engine.set_gradient_accumulation_boundary(is_boundary=sync)
            engine.backward(loss, scale_wrt_gas=False)  # the loss is already normalised over the optimizer batch
        elif not sync and world > 1:
            with acc.no_sync(self.model):
                acc.backward(loss)
        else:
            acc.backward(loss)

    def step(self, max_grad_norm: float, step: int) -> tuple[float, bool]:
        """Clip (``max_grad_norm`` > 0) and apply the accumulated gradients if they are finite.
        ``step``: the step number shown in the logs (for messages). Returns ``(grad_norm,
        applied)``; the gradients are cleared either way."""
        acc = self.acc
        limit = MAX_CONSECUTIVE_SKIPPED
        if self.is_ds:
            engine = acc.deepspeed_engine_wrapped.engine
            if engine.fp16_enabled():
                # fp16: DeepSpeed's dynamic loss scaler skips overflowing steps and lowers its
                # scale (routine at the start); count its decisions, as with GradScaler
                engine.step()
                applied, limit = bool(engine.was_step_applied()), MAX_CONSECUTIVE_SKIPPED_FP16
                gn = float("inf") if not applied else float(engine.get_global_grad_norm() or float("nan"))
            else:
                if _ds_overflow(engine):  # bf16/fp32: DeepSpeed has no skip of its own
                    engine.optimizer.zero_grad()
                    raise TrainingDiverged(self._message(f"a gradient is non-finite at step {step} (DeepSpeed: stopped before its update)"))
                engine.step()
                gn = engine.get_global_grad_norm()
                return (float(gn) if gn is not None else float("nan")), True
        else:
            # the total norm of the (DDP-reduced, unscaled) gradients: `inf` as the max norm measures without clipping
            gn = acc.clip_grad_norm_(self.model.parameters(), max_grad_norm if max_grad_norm > 0 else float("inf"))
            gn = float(gn) if gn is not None else float("nan")
            applied = math.isfinite(gn)
            if getattr(acc, "scaler", None) is not None:
                # fp16: GradScaler skips a non-finite step itself and lowers its scale; its step
                # must run either way (decided from the unscaled norm: a fused optimizer's skip is
                # not reported by accelerate)
                self.opt.step()
                limit = MAX_CONSECUTIVE_SKIPPED_FP16
            elif applied:
                self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        if applied:
            self.consecutive = 0
        else:
            self.skipped_updates += 1
            self.consecutive += 1
            acc.print(f"[esorl] step {step}: gradient norm {gn} is not finite; update skipped ({self.skipped_updates} skipped so far)")
            if self.consecutive >= limit:
                raise TrainingDiverged(self._message(f"the gradient was non-finite in {self.consecutive} consecutive updates up to step {step}"))
        return gn, applied

    def _message(self, what: str) -> str:
        return f"{what}: stopping. No update with a non-finite value was applied. {self.ckpt.describe_last_good()}"

    def state_dict(self) -> dict:
        return {"skipped_updates": self.skipped_updates}

    def load_state_dict(self, sd: dict) -> None:
        self.skipped_updates = int(sd.get("skipped_updates", 0))


def _ds_overflow(engine) -> bool:
    """Whether any (partitioned) gradient of a DeepSpeed engine is inf/NaN, agreed by all ranks."""
    opt = engine.optimizer
    if hasattr(opt, "has_overflow"):
        try:
            return bool(opt.has_overflow(partition_gradients=getattr(opt, "partition_gradients", True)))
        except TypeError:
            return bool(opt.has_overflow())
    bad = torch.zeros((), device=engine.device)
    # ZeRO-1 with bf16 (BF16_Optimizer) accumulates into fp32 flat buffers and clears p.grad
    flats = getattr(opt, "fp32_groups_gradients_flat", None)
    tensors = list(flats) if flats else [p.grad for p in engine.module.parameters() if p.grad is not None]
    for t in tensors:
        bad = torch.maximum(bad, (~torch.isfinite(t)).any().float())
    return bool(all_reduce_sum(bad).item() > 0)


def parameters_finite(model, optimizer=None) -> bool:
    """Whether every parameter (this rank's shard under ZeRO-3) and every floating tensor of
    the optimizer state is finite, agreed by all ranks (collective)."""
    bad = torch.zeros((), dtype=torch.float32)
    dev = None
    for p in model.parameters():
        t = local_data(p)
        dev = t.device
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad += 1
    if optimizer is not None:
        inner = getattr(optimizer, "optimizer", optimizer)
        for st in getattr(inner, "state", {}).values():
            for v in st.values() if isinstance(st, dict) else ():
                if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
                    bad += 1
    if dev is not None:
        bad = bad.to(dev)
    return bool(all_reduce_sum(bad).item() == 0)


# ----------------------------------------------------------------------------- accelerator


def make_accelerator(mixed_precision: str = "no"):
    """An ``Accelerator`` (``mixed_precision``: ``no`` | ``bf16`` | ``fp16``, as
    :meth:`esorl.train.arguments.TrainingArgs.mixed_precision` resolves it) that works on GPUs
    and on CPU ranks (gloo). Its gradient accumulation count stays 1: the loop accumulates
    micro-batches itself, with losses normalised over the whole optimizer batch."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs
    handlers, cpu = [], False
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # CPU ranks: gloo, and tell accelerate it is distributed on CPU (a launch config with
        # `use_cpu: true` does not set ACCELERATE_USE_CPU for the ranks it starts)
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
        cpu = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true"
    from accelerate.state import AcceleratorState

    # accelerate keeps one process-wide state and refuses a second Accelerator with another
    # precision; a process that builds several runs (a notebook, a sweep, a comparison with
    # diagnostics) may ask for another one: reset that state (the process group is kept)
    st = AcceleratorState._shared_state
    if st and st.get("_mixed_precision", mixed_precision) != mixed_precision:
        AcceleratorState._reset_state()
    acc = Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=1, kwargs_handlers=handlers, cpu=cpu)
    return acc


def configure_deepspeed(accelerator, micro_batch_size: int, accumulation: int, max_grad_norm: float | None = None) -> None:
    """Fill the batch fields DeepSpeed needs before ``prepare`` (esorl feeds tensors, not a
    DataLoader, so accelerate cannot infer them), and the recipe's gradient clipping (the
    engine clips inside its step; one setting, the recipe's, wins over the launch config's)."""
    if not uses_deepspeed(accelerator):
        return
    cfg = accelerator.state.deepspeed_plugin.deepspeed_config
    cfg["train_micro_batch_size_per_gpu"] = micro_batch_size
    cfg["gradient_accumulation_steps"] = accumulation
    cfg["train_batch_size"] = micro_batch_size * accumulation * accelerator.num_processes
    if max_grad_norm is not None:
        cfg["gradient_clipping"] = float(max_grad_norm)


# ----------------------------------------------------------------------------- EMA


class EMA:
    """Exponential moving average of parameters, kept in float32 on the parameters' device.

    Under ZeRO-3 each rank averages its own parameter shard (``ds_tensor``); export gathers.
    """

    def __init__(self, params, decay: float):
        self.decay = decay
        self.params = [p for p in params if p.requires_grad]
        self.shadow = [self._data(p).detach().float().clone() for p in self.params]
        self.num_updates = 0

    _data = staticmethod(local_data)

    @torch.no_grad()
    def update(self):
        self.num_updates += 1
        d = self.decay
        # one multi-tensor kernel rather than two kernels per parameter
        torch._foreach_lerp_(self.shadow, [self._data(p).float() for p in self.params], 1 - d)

    def state_dict(self):
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": [s.cpu() for s in self.shadow]}

    def load_state_dict(self, sd):
        if len(sd["shadow"]) != len(self.shadow):
            raise CheckpointError(f"EMA state has {len(sd['shadow'])} tensors, the model {len(self.shadow)}")
        self.decay, self.num_updates = sd["decay"], sd["num_updates"]
        for s, v in zip(self.shadow, sd["shadow"]):
            s.copy_(v)

    @torch.no_grad()
    def swap(self):
        """Swap live and EMA weights in place (call twice to restore)."""
        for s, p in zip(self.shadow, self.params):
            data = self._data(p)
            tmp = data.float().clone()
            data.copy_(s.to(data.dtype))
            s.copy_(tmp)
        # ZeRO-3 keeps small ("persistent") parameters gathered between steps: re-gather them
        # from the swapped shards (collective; every rank swaps together)
        persistent = [p for p in self.params if hasattr(p, "ds_tensor") and p.data.numel() == getattr(p, "ds_numel", -1)]
        if persistent:
            from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

            for p in persistent:
                p.ds_status = ZeroParamStatus.NOT_AVAILABLE
            persistent[0].all_gather(param_list=persistent)


# ----------------------------------------------------------------------------- checkpoints


class Checkpointer:
    """Checkpoints under ``<output_dir>/checkpoints/step-XXXXXXX``, written atomically.

    Every rank writes into ``step-X.tmp`` (accelerate ``save_state``: model, optimizer,
    scheduler, RNG states; plus ``trainer_state.json`` and extras); the main process then
    renames it to ``step-X`` and rewrites ``latest``. A crash mid-save leaves only a ``.tmp``
    directory, never a half-written ``step-X``.
    """

    def __init__(self, output_dir: str | Path, keep_last: int = 2):
        self.root = Path(output_dir) / "checkpoints"
        self.keep_last = keep_last

    def save(self, accelerator, step: int, state: dict, extras: dict[str, object] | None = None, verify: tuple = ()) -> Path:
        """Write checkpoint ``step-{step}``. ``verify``: ``(model, optimizer)`` whose values
        must all be finite (checked on every rank first): a checkpoint is only ever written,
        and only ever called good, when it is."""
        final = self.root / f"step-{step:07d}"
        if verify and not parameters_finite(*verify):
            raise TrainingDiverged(
                f"step {step}: the weights or the optimizer state hold a non-finite value, so no checkpoint was written. "
                + self.describe_last_good())
        tmp = self.root / f"step-{step:07d}.tmp"
        if accelerator.is_main_process:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True, exist_ok=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        if extras:
            for name, obj in extras.items():
                torch.save(obj, tmp / f"{name}.rank{accelerator.process_index}.pt")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / "trainer_state.json").write_text(json.dumps({**state, "step": step, **distributed_layout(accelerator),
                                                               "verified_finite": bool(verify)}, indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _atomic_write(self.root / "latest", final.name)
            self._prune()
        accelerator.wait_for_everyone()
        return final

    def _prune(self):
        done = sorted(p for p in self.root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
        for p in done[: -self.keep_last] if self.keep_last > 0 else []:
            shutil.rmtree(p, ignore_errors=True)

    def describe_last_good(self) -> str:
        """A sentence naming the newest checkpoint known to be finite (written with its weights
        and optimizer state checked), for divergence messages."""
        done = sorted(p for p in self.root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")) if self.root.is_dir() else []
        for p in reversed(done):
            try:
                ok = json.loads((p / "trainer_state.json").read_text()).get("verified_finite")
            except (OSError, json.JSONDecodeError):
                continue
            if ok:
                return f"The last good checkpoint is {p}; resume from it with a lower learning rate."
        if done:
            return (f"The last checkpoint is {done[-1]} (written by an earlier esorl, not checked for non-finite values); "
                    "resume from it with a lower learning rate.")
        return "No checkpoint was written yet; start again with a lower learning rate."

    def latest(self) -> Path | None:
        f = self.root / "latest"
        if not f.exists():
            return None
        p = self.root / f.read_text().strip()
        return p if p.exists() else None

    def resolve(self, resume: str | bool) -> Path | None:
        if resume in (False, None, "", "false"):
            return None
        if resume in (True, "true", "latest", "auto"):
            p = self.latest()
            if p is None and resume != "auto":
                # nothing saved yet (e.g. interrupted while a chained pretraining ran, before
                # this run's first checkpoint): there is nothing to lose, so start from step 0
                print(f"[esorl] --resume: no checkpoint under {self.root} yet; starting from step 0")
            return p
        p = Path(resume)
        if not p.is_dir():
            raise CheckpointError(f"--resume: checkpoint directory {p} does not exist")
        return p

    @staticmethod
    def read_state(path: Path) -> dict:
        """The checkpoint's ``trainer_state.json`` (cheap: read before any model is loaded)."""
        sf = Path(path) / "trainer_state.json"
        if not sf.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: trainer_state.json is missing")
        try:
            return json.loads(sf.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"checkpoint {path}: trainer_state.json is corrupted ({e})") from None

    @staticmethod
    def load(accelerator, path: Path, extras: list[str] = ()) -> tuple[dict, dict]:
        state = Checkpointer.read_state(path)
        # checkpoints of earlier versions hold custom objects no longer registered (the LR
        # scheduler: the learning rate is now computed from the config); accelerate refuses a
        # count mismatch, so stand-ins absorb them for the load
        n_saved = len(list(Path(path).glob("custom_checkpoint_*.pkl")))
        stand_ins = [_Ignored() for _ in range(max(0, n_saved - len(getattr(accelerator, "_custom_objects", []))))]
        for s in stand_ins:
            accelerator.register_for_checkpointing(s)
        try:
            accelerator.load_state(str(path))
        except Exception as e:  # noqa: BLE001 - re-raised with the path named
            raise CheckpointError(f"checkpoint {path} could not be loaded ({type(e).__name__}: {e})") from e
        finally:
            for s in stand_ins:
                accelerator._custom_objects.remove(s)
        out = {}
        for name in extras:
            f = path / f"{name}.rank{accelerator.process_index}.pt"
            if not f.is_file() and not uses_deepspeed(accelerator) and (path / f"{name}.rank0.pt").is_file():
                f = path / f"{name}.rank0.pt"  # replicated state (DDP): a run resumed on more ranks reads rank 0's copy
            if not f.is_file():
                raise CheckpointError(f"checkpoint {path} has no {f.name}")
            try:
                out[name] = torch.load(f, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001
                raise CheckpointError(f"checkpoint file {f} is corrupted ({type(e).__name__}: {e})") from e
        return state, out


def flat_config(cfg) -> dict:
    """A (nested) dataclass as ``{"section.field": value}`` (JSON-able values)."""
    from dataclasses import asdict, is_dataclass

    out: dict = {}

    def walk(d, prefix):
        for k, v in d.items():
            if isinstance(v, dict) and v and all(isinstance(x, str) for x in v) and not k.endswith("kwargs"):
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = json.loads(json.dumps(v, default=str))

    walk(asdict(cfg) if is_dataclass(cfg) else dict(cfg), "")
    return out


def distributed_layout(accelerator) -> dict:
    """What a checkpoint's *format* depends on: the number of ranks and the DeepSpeed ZeRO
    stage (``None`` without DeepSpeed)."""
    return {"world_size": accelerator.num_processes, "zero_stage": zero_stage(accelerator)}


def check_resume(state: dict, path: Path, accelerator, current: dict, fixed: dict[str, str]) -> list[str]:
    """Compare a checkpoint's saved settings with the current run's before any work.

    ``current``: :func:`flat_config` of the current config. ``fixed``: settings (or dotted
    prefixes ending in ``.``) that cannot change within one run, each with the reason.
    Raises :class:`CheckpointError` naming every such setting that changed, and a change of
    DeepSpeed ZeRO stage or (under DeepSpeed) of the number of ranks, whose partitioned
    checkpoints cannot be re-split. Returns ``"name: old → new"`` for the changes that are
    honoured (learning rate, schedule length, logging, ...), for the resume message.
    Checkpoints written before settings were recorded are accepted as they are."""
    problems = []
    layout = distributed_layout(accelerator)
    saved_stage = state.get("zero_stage", "unknown")
    if saved_stage != "unknown" and saved_stage != layout["zero_stage"]:
        problems.append(f"DeepSpeed ZeRO stage {saved_stage} → {layout['zero_stage']} (the optimizer state is saved in the first one's format)")
    if layout["zero_stage"] is not None and state.get("world_size", layout["world_size"]) != layout["world_size"]:
        problems.append(f"number of ranks {state['world_size']} → {layout['world_size']} (DeepSpeed checkpoints are partitioned per rank)")
    saved = state.get("config")
    changed = []
    if isinstance(saved, dict):
        for k in sorted(set(saved) | set(current)):
            if k in saved and k in current and saved[k] != current[k]:
                reason = next((r for f, r in fixed.items() if k == f or (f.endswith(".") and k.startswith(f))), None)
                if reason is not None:
                    problems.append(f"{k} {saved[k]!r} → {current[k]!r} ({reason})")
                else:
                    changed.append(f"{k}: {saved[k]!r} → {current[k]!r}")
    if problems:
        raise CheckpointError(
            f"cannot resume from {path}: " + "; ".join(problems)
            + ". Resume with the original settings, or start a new run in another output_dir.")
    return changed


class _Ignored:
    """A stand-in for a custom object an older checkpoint saved (its state is dropped)."""

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def _atomic_write(path: Path, text: str) -> None:
    from ..io import atomic_write

    atomic_write(path, text)


def check_finite(value: float, step: int, checkpointer: Checkpointer, what: str = "loss") -> None:
    """Stop the run (:class:`TrainingDiverged`) if ``value`` is NaN/inf. ``step``: the step
    as the logs show it (1-based: the step that produced ``value``)."""
    if not math.isfinite(value):
        raise TrainingDiverged(f"{what} is {value} at step {step}: stopping. No update with a non-finite value was applied. "
                               + checkpointer.describe_last_good())


# ----------------------------------------------------------------------------- logging


class RunLogger:
    """Writes ``metrics.jsonl`` (always) and wandb (offline unless configured), main process only.

    A resumed run (``resume=True``) continues the *same* wandb run (its id is kept in
    ``<output_dir>/.wandb_run_id``), and :meth:`truncate_after` makes it skip the steps the
    interrupted run had already sent, so that a synced history has each step once."""

    def __init__(self, output_dir: str | Path, cfg: LoggingConfig, config_dict: dict, enabled: bool = True, resume: bool = False, run_name: str = ""):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.wandb = None
        self.wandb_after = -1  # wandb already holds steps <= this (resumed run)
        if not enabled:
            return
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        # an explicit "disabled" in the config wins; otherwise WANDB_MODE (if set) overrides
        mode = "disabled" if cfg.wandb_mode == "disabled" else (os.environ.get("WANDB_MODE") or cfg.wandb_mode)
        if mode != "disabled":
            id_file = Path(output_dir) / ".wandb_run_id"
            try:
                import wandb

                run_id = id_file.read_text().strip() if resume and id_file.is_file() else None
                if run_id is None:
                    import secrets

                    run_id = secrets.token_hex(4)  # wandb run ids: short, lower-case, unique per run directory
                    _atomic_write(id_file, run_id)
                else:
                    self.wandb_after = max((r.get("step", 0) for r in read_metrics(self.path)), default=-1)
                self.wandb = wandb.init(
                    project=cfg.wandb_project, name=run_name or Path(output_dir).name, mode=mode, id=run_id, resume="allow",
                    dir=str(output_dir), config=config_dict, reinit="finish_previous",
                )
            except Exception as e:  # noqa: BLE001 - logging must never kill a run
                print(f"[esorl] wandb disabled ({type(e).__name__}: {e}); metrics still go to {self.path}")
                self.wandb = None

    def log(self, metrics: dict, step: int) -> None:
        if not self.enabled:
            return
        rec = {"step": step, "time": time.time(), **{k: _plain(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.wandb is not None and step > self.wandb_after:
            self.wandb.log({k: v for k, v in rec.items() if isinstance(v, (int, float))}, step=step)

    def truncate_after(self, step: int) -> None:
        """On resume, drop records of steps after the checkpoint (they will be redone)."""
        if not self.enabled or not self.path.exists():
            return
        keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
        _atomic_write(self.path, "".join(k + "\n" for k in keep))

    def finish(self):
        if self.wandb is not None:
            self.wandb.finish()


def _plain(v):
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    return v


def read_metrics(path: str | Path) -> list[dict]:
    p = Path(path)
    return [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()] if p.exists() else []
