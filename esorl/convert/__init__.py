"""Converters for released checkpoints (spec §9)."""

from .official import (
    CheckpointError,
    RestrictedUnpickler,
    StubObject,
    UnsafeCheckpointError,
    convert_official,
    ema_state_dict,
    infer_config,
    load_official_checkpoint,
    parameter_order,
    restricted_pickle_module,
)

__all__ = [
    "CheckpointError",
    "UnsafeCheckpointError",
    "StubObject",
    "RestrictedUnpickler",
    "restricted_pickle_module",
    "load_official_checkpoint",
    "parameter_order",
    "ema_state_dict",
    "infer_config",
    "convert_official",
]
