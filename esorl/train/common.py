"""Pieces every training loop shares: accelerator set-up, EMA, LR schedule, atomic
checkpoints with exact resume, metrics logging (JSONL + wandb), NaN guard."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the run stopped and the last good checkpoint was kept."""


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, incomplete or corrupted."""


# ----------------------------------------------------------------------------- configs


@dataclass
class OptimConfig:
    """AdamW and its schedule.

    lr: peak learning rate. weight_decay: AdamW decay. beta1/beta2/eps: AdamW.
    warmup_steps: linear warm-up steps. lr_schedule: ``cosine`` (to ``min_lr_ratio·lr`` at
    ``max_steps``) or ``constant`` (after warm-up). grad_clip: max global grad norm (0 = off).
    """

    lr: float = 3e-4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    warmup_steps: int = 0
    lr_schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0

    def validate(self):
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"optim.lr_schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}")
        if self.warmup_steps < 0:
            raise ValueError("optim.warmup_steps must be >= 0")


@dataclass
class LoggingConfig:
    """wandb_project / run_name (default: the output directory's name).
    wandb_mode: ``offline`` (default: runs sync later with ``wandb sync``), ``online``
    (needs ``WANDB_API_KEY``) or ``disabled``. The local ``metrics.jsonl`` is always written.
    log_every: steps between metric records."""

    wandb_project: str = "esorl"
    wandb_mode: str = "offline"
    run_name: str = ""
    log_every: int = 10

    def validate(self):
        if self.wandb_mode not in ("offline", "online", "disabled"):
            raise ValueError(f"logging.wandb_mode must be offline, online or disabled, got {self.wandb_mode!r}")
        if self.log_every < 1:
            raise ValueError("logging.log_every must be >= 1")


def lr_factor(step: int, cfg: OptimConfig, max_steps: int) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(params, cfg: OptimConfig, max_steps: int, device=None):
    """AdamW (the fused CUDA kernel when training on a GPU) and its LR schedule."""
    fused = True if device is not None and torch.device(device).type == "cuda" else None
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay, fused=fused)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg, max_steps))
    return opt, sched


# ----------------------------------------------------------------------------- accelerator


def make_accelerator(mixed_precision: str = "auto", gradient_accumulation_steps: int = 1):
    """An ``Accelerator`` that works on GPUs and on CPU ranks (gloo: ENVIRONMENT.md)."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    if mixed_precision == "auto":
        mixed_precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    handlers, cpu = [], False
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # CPU ranks: gloo, and tell accelerate it is distributed on CPU (a launch config with
        # `use_cpu: true` does not set ACCELERATE_USE_CPU for the ranks it starts)
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
        cpu = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true"
    acc = Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=gradient_accumulation_steps, kwargs_handlers=handlers, cpu=cpu)
    return acc


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a copy); identity without a process group. (accelerate's ``reduce``
    is a no-op for some CPU launch modes, so the toolkit calls torch.distributed itself.)"""
    import torch.distributed as dist

    t = t.clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def configure_deepspeed(accelerator, micro_batch_size: int, accumulation: int) -> None:
    """Fill the batch fields DeepSpeed needs before ``prepare`` (esorl feeds tensors, not a
    DataLoader, so accelerate cannot infer them)."""
    ds = getattr(accelerator.state, "deepspeed_plugin", None)
    if ds is None:
        return
    cfg = ds.deepspeed_config
    cfg["train_micro_batch_size_per_gpu"] = micro_batch_size
    cfg["gradient_accumulation_steps"] = accumulation
    cfg["train_batch_size"] = micro_batch_size * accumulation * accelerator.num_processes


def is_zero3(accelerator) -> bool:
    ds = getattr(accelerator.state, "deepspeed_plugin", None)
    return ds is not None and ds.zero_stage == 3


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

    @staticmethod
    def _data(p):
        return p.ds_tensor if hasattr(p, "ds_tensor") else p.data

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

    def save(self, accelerator, step: int, state: dict, extras: dict[str, object] | None = None) -> Path:
        final = self.root / f"step-{step:07d}"
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
            (tmp / "trainer_state.json").write_text(json.dumps({**state, "step": step, "world_size": accelerator.num_processes}, indent=1))
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
            if p is None and resume in (True, "true", "latest"):
                raise CheckpointError(f"--resume: no checkpoint under {self.root}")
            return p
        p = Path(resume)
        if not p.is_dir():
            raise CheckpointError(f"--resume: checkpoint directory {p} does not exist")
        return p

    @staticmethod
    def load(accelerator, path: Path, extras: list[str] = ()) -> tuple[dict, dict]:
        sf = path / "trainer_state.json"
        if not sf.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: trainer_state.json is missing")
        try:
            state = json.loads(sf.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"checkpoint {path}: trainer_state.json is corrupted ({e})") from None
        try:
            accelerator.load_state(str(path))
        except Exception as e:  # noqa: BLE001 - re-raised with the path named
            raise CheckpointError(f"checkpoint {path} could not be loaded ({type(e).__name__}: {e})") from e
        out = {}
        for name in extras:
            f = path / f"{name}.rank{accelerator.process_index}.pt"
            if not f.is_file():
                raise CheckpointError(f"checkpoint {path} has no {f.name}")
            try:
                out[name] = torch.load(f, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001
                raise CheckpointError(f"checkpoint file {f} is corrupted ({type(e).__name__}: {e})") from e
        return state, out


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def check_finite(value: float, step: int, checkpointer: Checkpointer, what: str = "loss") -> None:
    if not math.isfinite(value):
        last = checkpointer.latest()
        raise TrainingDiverged(
            f"{what} is {value} at step {step}: stopping. The last good checkpoint is "
            f"{last if last else '(none written yet)'}; resume from it with a lower learning rate."
        )


# ----------------------------------------------------------------------------- logging


class RunLogger:
    """Writes ``metrics.jsonl`` (always) and wandb (offline unless configured), main process only."""

    def __init__(self, output_dir: str | Path, cfg: LoggingConfig, config_dict: dict, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.wandb = None
        if not enabled:
            return
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        # an explicit "disabled" in the config wins; otherwise WANDB_MODE (if set) overrides
        mode = "disabled" if cfg.wandb_mode == "disabled" else (os.environ.get("WANDB_MODE") or cfg.wandb_mode)
        if mode != "disabled":
            try:
                import wandb

                self.wandb = wandb.init(
                    project=cfg.wandb_project, name=cfg.run_name or Path(output_dir).name, mode=mode,
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
        if self.wandb is not None:
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
