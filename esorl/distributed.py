"""What esorl needs to know about the distributed set-up, in one place: the DeepSpeed ZeRO
stage an ``Accelerator`` runs, a parameter's local data under ZeRO-3 partitioning, and the
two collectives the loops use (``torch.distributed`` directly: accelerate's ``reduce`` is a
no-op for some CPU launch modes). Every function is the identity / ``None`` on one process
without DeepSpeed."""

from __future__ import annotations

import torch


def zero_stage(accelerator) -> int | None:
    """The DeepSpeed ZeRO stage ``accelerator`` runs (0–3), or ``None`` without DeepSpeed
    (also for ``accelerator=None``)."""
    ds = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None) if accelerator is not None else None
    return None if ds is None else int(ds.zero_stage)


def uses_deepspeed(accelerator) -> bool:
    """Whether ``accelerator`` runs DeepSpeed (any ZeRO stage)."""
    return zero_stage(accelerator) is not None


def is_partitioned(model: torch.nn.Module) -> bool:
    """Whether ``model``'s parameters are ZeRO-3 partitioned (each rank holds a shard)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def local_data(p: torch.nn.Parameter) -> torch.Tensor:
    """This rank's data of parameter ``p``: its ZeRO-3 shard (``ds_tensor``) or the full tensor."""
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a copy); identity without a process group."""
    import torch.distributed as dist

    t = t.clone()
    if _world() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor's rank copies along dim 0 (same shape on every rank; identity on
    one process)."""
    import torch.distributed as dist

    if _world() == 1:
        return t
    out = [torch.empty_like(t) for _ in range(_world())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out)
