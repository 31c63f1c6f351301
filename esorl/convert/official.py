"""Convert a released Eso-LM (B) Lightning checkpoint (spec §9) into an esorl model directory.

The released ``.ckpt`` files pickle the training config (OmegaConf) and the tokenizer object
next to the weights, so ``torch.load(weights_only=True)`` refuses them and
``weights_only=False`` would import (and run) whatever the file names. This module reads them
through ``torch.load(..., weights_only=False, pickle_module=<restricted>)`` (torch keeps its
own zip/legacy storage handling) whose unpickler is :class:`RestrictedUnpickler`:

* **real objects**: the immutable C types ``dict``, ``list``, ``tuple``, ``set``,
  ``frozenset``, ``int``, ``float``, ``complex``, ``bool``, ``str``, ``bytes``, ``bytearray``,
  ``slice``, ``range``, ``collections.OrderedDict``, ``torch.Size``, ``torch.device`` and the
  ``torch`` dtypes / layouts / memory formats / qschemes;
* **wrapped functions** (immutable wrappers that refuse pickle ``BUILD``): the tensor
  rebuilders ``torch._utils._rebuild_tensor{,_v2,_v3}``, ``_rebuild_parameter{,_with_state}``
  and ``torch._tensor._rebuild_from_type_v2`` (arguments must be real storages/tensors;
  backward hooks, tensor subclasses and Python-side tensor state from the file are dropped),
  ``torch.serialization._get_layout``, and ``_codecs.encode`` restricted to ``str`` with a
  latin-1/utf-8/ascii codec (how pickle protocol 2 stores ``bytes``). Storage types are
  turned into inert ``StorageType`` objects by torch's own loader (``torch.UntypedStorage``
  by an inert marker here);
* **refused** (:class:`UnsafeCheckpointError`, naming the global, raised when the global is
  looked up, before anything is called) by default: globals that only a malicious file
  references – anything from ``os``/``posix``/``nt``/``subprocess``/``sys``/``shutil``/
  ``importlib``/``runpy``/``socket``/``ctypes``/``pickle``/``marshal``/... and the builtins
  ``eval``/``exec``/``compile``/``open``/``getattr``/``setattr``/``__import__``/....
  With ``on_dangerous="stub"`` they are stubbed like everything else instead;
* **stubbed**: every other global (``fake_omegaconf.DictConfig``, ``typing.Any``,
  ``copyreg._reconstructor``, a tensor subclass, ...) becomes a fresh class of its own that
  records the module and name; constructing it, ``__setstate__``, ``append``/``extend`` and
  ``__setitem__`` only *store* their arguments. The named module is never imported, so no
  code from it or from the file runs.

Not defended: memory exhaustion (a file can always claim huge storages or ``bytes(10**12)``).

Cost: one ``torch.load`` of the file (memory-mapped for zip checkpoints, so e.g. optimizer
states are not read into memory) plus one model construction.
"""

from __future__ import annotations

import _compat_pickle
import argparse
import collections
import json
import os
import pickle
import re
import shutil
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch

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
    "main",
]

BUFFER_NAMES = ("rotary_emb.inv_freq",)
_GPT2_VOCAB = 50258
_GPT2_MASK = 50257
_GPT2_EOS = 50256


class CheckpointError(ValueError):
    """A checkpoint file is missing pieces, malformed, or inconsistent."""


class UnsafeCheckpointError(CheckpointError, pickle.UnpicklingError):
    """The checkpoint's pickle references a global that can execute code (refused)."""


# ----------------------------------------------------------------------------- stubs


class StubObject:
    """Base of the inert stand-ins for globals a checkpoint references.

    Each stubbed global gets its own subclass with ``_stub_module`` / ``_stub_name``. Calling
    the class (pickle ``REDUCE``/``NEWOBJ``/``INST``), ``__setstate__`` (``BUILD``),
    ``append``/``extend`` (``APPENDS``) and ``__setitem__`` (``SETITEMS``) only record their
    arguments. No other behaviour exists, so nothing from the file can run.
    """

    _stub_module = "?"
    _stub_name = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        object.__setattr__(obj, "_stub_args", args)
        object.__setattr__(obj, "_stub_kwargs", kwargs)
        object.__setattr__(obj, "_stub_state", None)
        object.__setattr__(obj, "_stub_items", [])
        object.__setattr__(obj, "_stub_list", [])
        return obj

    def __init__(self, *args, **kwargs):  # noqa: D401 - arguments were recorded by __new__
        pass

    def __setstate__(self, state):
        object.__setattr__(self, "_stub_state", state)

    def __setitem__(self, key, value):
        self._stub_items.append((key, value))

    def append(self, value):
        self._stub_list.append(value)

    def extend(self, values):
        self._stub_list.extend(list(values) if isinstance(values, (list, tuple)) else [values])

    def __repr__(self) -> str:
        return f"<stub {self._stub_module}.{self._stub_name}>"


def _make_stub(module: str, name: str) -> type:
    safe = re.sub(r"\W", "_", name) or "stub"
    return type(safe, (StubObject,), {"_stub_module": module, "_stub_name": name, "__module__": "esorl.convert.stubs"})


# ----------------------------------------------------------------------------- safe callables


class _Frozen:
    """An allowed callable as the unpickler hands it out: callable, but immutable.

    Pickle ``BUILD`` on a global sets attributes on it (``__setstate__``, or ``setattr`` for
    slot state); on a module-level function that would be process-wide state the file could
    change (``__defaults__``, ...). ``_Frozen`` has no ``__dict__`` and refuses ``BUILD``.
    """

    __slots__ = ("fn", "qualname")

    def __init__(self, fn, qualname: str):
        object.__setattr__(self, "fn", fn)
        object.__setattr__(self, "qualname", qualname)

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __setattr__(self, name, value):
        raise UnsafeCheckpointError(f"the checkpoint tries to set {name!r} on {self.qualname}")

    def __setstate__(self, state):
        raise UnsafeCheckpointError(f"the checkpoint tries to modify {self.qualname}")

    def __repr__(self) -> str:
        return f"<restricted {self.qualname}>"


class _UntypedStorageType:
    """Stands for ``torch.UntypedStorage`` in a storage persistent id: torch's loader only reads
    ``.dtype`` (uint8) from it; a fresh inert object per reference, not the real class."""

    __slots__ = ()
    dtype = torch.uint8

    def __setstate__(self, state):
        raise UnsafeCheckpointError("the checkpoint tries to modify a storage type")


def _check_storage(storage) -> None:
    if not isinstance(storage, (torch.storage.TypedStorage, torch.storage.UntypedStorage)):
        raise UnsafeCheckpointError(f"tensor rebuild got a {type(storage).__name__} instead of a storage")


def _check_tensor(t) -> None:
    if not isinstance(t, torch.Tensor):
        raise UnsafeCheckpointError(f"parameter rebuild got a {type(t).__name__} instead of a tensor")


def _safe_rebuild_tensor(storage, storage_offset, size, stride):
    _check_storage(storage)
    return torch._utils._rebuild_tensor(storage, storage_offset, size, stride)


def _safe_rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    # Backward hooks are not meant to be serialized (torch keeps the argument for BC only);
    # any the file carries are dropped.
    _check_storage(storage)
    if not isinstance(metadata, dict) or not all(isinstance(v, bool) for v in metadata.values()):
        metadata = None
    return torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, bool(requires_grad), collections.OrderedDict(), metadata)


def _safe_rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    _check_storage(storage)
    if not isinstance(dtype, torch.dtype):
        raise UnsafeCheckpointError(f"tensor rebuild got dtype {dtype!r}")
    if not isinstance(metadata, dict) or not all(isinstance(v, bool) for v in metadata.values()):
        metadata = None
    return torch._utils._rebuild_tensor_v3(storage, storage_offset, size, stride, bool(requires_grad), collections.OrderedDict(), dtype, metadata)


def _safe_rebuild_parameter(data, requires_grad, backward_hooks):
    _check_tensor(data)
    return torch._utils._rebuild_parameter(data, bool(requires_grad), collections.OrderedDict())


def _safe_rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    # The Python-side state (attributes set on the Parameter) is dropped.
    return _safe_rebuild_parameter(data, requires_grad, backward_hooks)


_SAFE_REBUILDERS = (_safe_rebuild_tensor, _safe_rebuild_tensor_v2, _safe_rebuild_tensor_v3, _safe_rebuild_parameter, _safe_rebuild_parameter_with_state)


def _safe_rebuild_from_type_v2(func, new_type, args, state):
    # A tensor subclass or a tensor with Python attributes: rebuild the plain tensor only
    # (the subclass and state from the file are never applied).
    if not isinstance(func, _Frozen) or func.fn not in _SAFE_REBUILDERS or not isinstance(args, tuple):
        raise UnsafeCheckpointError(f"_rebuild_from_type_v2 with a non-tensor rebuild function {func!r}")
    return func(*args)


_SAFE_ENCODINGS = {"latin1", "latin-1", "latin_1", "iso-8859-1", "iso8859-1", "l1", "utf-8", "utf8", "utf_8", "ascii"}


def _safe_codecs_encode(obj, encoding="utf-8", errors="strict"):
    """``_codecs.encode`` as pickle protocol 2 uses it for ``bytes``: str → bytes, plain codecs only."""
    if not isinstance(obj, str) or not isinstance(encoding, str) or encoding.lower() not in _SAFE_ENCODINGS:
        raise UnsafeCheckpointError(f"_codecs.encode with encoding {encoding!r} on a {type(obj).__name__} is refused")
    if errors not in ("strict", "surrogatepass", "replace", "ignore"):
        raise UnsafeCheckpointError(f"_codecs.encode with errors={errors!r} is refused")
    return obj.encode(encoding, errors)


_SAFE_BUILTINS = {
    "dict": dict, "list": list, "tuple": tuple, "set": set, "frozenset": frozenset, "int": int,
    "float": float, "complex": complex, "bool": bool, "str": str, "bytes": bytes,
    "bytearray": bytearray, "slice": slice, "range": range,
}  # fmt: skip

_SAFE_FUNCTIONS = {
    ("_codecs", "encode"): _safe_codecs_encode,
    ("torch._utils", "_rebuild_tensor"): _safe_rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _safe_rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _safe_rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _safe_rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _safe_rebuild_parameter_with_state,
    ("torch._tensor", "_rebuild_from_type_v2"): _safe_rebuild_from_type_v2,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
}
# Immutable C types only (BUILD cannot set attributes on them).
_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
}
_SAFE_GLOBALS.update({("builtins", k): v for k, v in _SAFE_BUILTINS.items()})
_UNTYPED_STORAGE = {("torch", "UntypedStorage"), ("torch.storage", "UntypedStorage")}

# Globals only a malicious file references: refused by default (stubbed with on_dangerous="stub").
_DANGEROUS_MODULES = {
    "os", "posix", "nt", "subprocess", "sys", "shutil", "importlib", "runpy", "socket", "pty",
    "code", "codeop", "ctypes", "pickle", "_pickle", "marshal", "webbrowser", "multiprocessing",
    "signal", "pdb", "bdb", "timeit", "asyncio", "_thread", "threading", "urllib", "http",
    "ftplib", "smtplib", "telnetlib", "commands", "popen2", "_posixsubprocess", "pip",
    "setuptools", "distutils", "imp", "zipimport", "cProfile", "profile", "trace", "_io", "io",
    "tempfile", "pathlib", "glob",
}  # fmt: skip
_DANGEROUS_BUILTINS = {
    "eval", "exec", "execfile", "compile", "open", "file", "getattr", "setattr", "delattr",
    "__import__", "globals", "locals", "vars", "input", "raw_input", "breakpoint", "exit",
    "quit", "help", "apply", "reload", "memoryview", "__loader__", "__spec__", "__build_class__",
}  # fmt: skip


def _is_dangerous(module: str, name: str) -> bool:
    root = module.split(".")[0]
    if root in _DANGEROUS_MODULES:
        return True
    if module == "builtins" and name in _DANGEROUS_BUILTINS:
        return True
    return False


def _torch_attribute(name: str):
    """dtypes, layouts, memory formats and qschemes of the ``torch`` module (immutable C objects).

    Typed storage names (``torch.FloatStorage``) never get here under ``torch.load``: its own
    unpickler wrapper maps every ``*Storage`` name to an inert ``StorageType`` first.
    """
    if "." in name or name.startswith("_"):
        return None
    obj = getattr(torch, name, None)
    if isinstance(obj, (torch.dtype, torch.layout, torch.memory_format, torch.qscheme)):
        return obj
    return None

# ----------------------------------------------------------------------------- unpickler


class RestrictedUnpickler(pickle.Unpickler):
    """A ``pickle.Unpickler`` that rebuilds tensors and plain data and stubs everything else
    (the policy is in the module docstring).

    Args:
        file: a binary file object.
        on_dangerous: ``"raise"`` (default): a global that can execute code (``os.system``,
            ``builtins.eval``, ``subprocess.Popen``, ...) raises :class:`UnsafeCheckpointError`
            naming it, before anything is called; ``"stub"``: it is stubbed like any other.
        stubbed: a list that receives ``"module.name"`` of every stubbed global (first use).

    ``stubbed_globals`` (sorted, unique) lists what was stubbed. Use it directly
    (``RestrictedUnpickler(f).load()``, tensors then need a ``persistent_load``) or through
    ``torch.load(..., weights_only=False, pickle_module=restricted_pickle_module())``.
    """

    on_dangerous = "raise"
    _shared_record: list | None = None

    def __init__(self, file, *args, on_dangerous: str | None = None, stubbed: list | None = None, **kwargs):
        super().__init__(file, *args, **kwargs)
        if on_dangerous is not None:
            self.on_dangerous = on_dangerous
        if self.on_dangerous not in ("raise", "stub"):
            raise ValueError(f"on_dangerous must be 'raise' or 'stub', got {self.on_dangerous!r}")
        if stubbed is not None:
            self._record = stubbed
        elif self._shared_record is not None:
            self._record = self._shared_record
        else:
            self._record = []
        self._stubs: dict[tuple[str, str], type] = {}

    @property
    def stubbed_globals(self) -> list[str]:
        return sorted(set(self._record))

    def find_class(self, module: str, name: str):
        if not isinstance(module, str) or not isinstance(name, str):
            raise UnsafeCheckpointError(f"global with non-string name {module!r}.{name!r}")
        # Protocol 0-2 pickles written by Python 2 name `__builtin__`, `copy_reg`, ...
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        if module == "torch.tensor":  # torch's own load_module_mapping (old pickles)
            module = "torch._tensor"

        key = (module, name)
        if key in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[key]
        if key in _SAFE_FUNCTIONS:
            return _Frozen(_SAFE_FUNCTIONS[key], f"{module}.{name}")
        if key in _UNTYPED_STORAGE:
            return _UntypedStorageType()
        if key == ("torch", "Tensor"):
            # Only ever the `new_type` argument of _rebuild_from_type_v2, which ignores it: an
            # inert marker (not a constructor), not reported as a stubbed foreign class.
            if key not in self._stubs:
                self._stubs[key] = _make_stub(module, name)
            return self._stubs[key]
        if module == "torch":
            obj = _torch_attribute(name)
            if obj is not None:
                return obj
        qual = f"{module}.{name}"
        if _is_dangerous(module, name) and self.on_dangerous == "raise":
            raise UnsafeCheckpointError(
                f"the checkpoint's pickle references {qual}, which can execute code; refusing to load it "
                "(nothing from the file was run)"
            )
        if key not in self._stubs:
            self._stubs[key] = _make_stub(module, name)
            self._record.append(qual)
        return self._stubs[key]


class _RestrictedPickleModule:
    """A module-like object for ``torch.load(pickle_module=...)``; records stubbed globals."""

    __name__ = "esorl_restricted_pickle"
    UnpicklingError = pickle.UnpicklingError

    def __init__(self, on_dangerous: str = "raise"):
        self.stubbed: list[str] = []
        self.Unpickler = type(
            "RestrictedUnpickler",
            (RestrictedUnpickler,),
            {"on_dangerous": on_dangerous, "_shared_record": self.stubbed, "__module__": __name__},
        )

    def load(self, file, **kwargs):
        return self.Unpickler(file, **kwargs).load()

    def loads(self, data: bytes, **kwargs):
        import io

        return self.load(io.BytesIO(data), **kwargs)


def restricted_pickle_module(on_dangerous: str = "raise") -> _RestrictedPickleModule:
    """A fresh ``pickle_module`` for ``torch.load``; ``.stubbed`` lists the stubbed globals."""
    return _RestrictedPickleModule(on_dangerous)


# ----------------------------------------------------------------------------- loading


def _strip_prefix(state_dict: dict) -> tuple[dict, list[str]]:
    """Backbone entries without ``backbone.`` (and a ``torch.compile`` ``_orig_mod.``)."""
    names = [k for k in state_dict if isinstance(k, str)]
    if any(k.startswith("backbone.") for k in names):
        keep = {k[len("backbone.") :]: v for k, v in state_dict.items() if isinstance(k, str) and k.startswith("backbone.")}
        ignored = [k for k in names if not k.startswith("backbone.")]
    else:
        keep, ignored = dict(state_dict), []
    if keep and all(k.startswith("_orig_mod.") for k in keep):
        keep = {k[len("_orig_mod.") :]: v for k, v in keep.items()}
    return keep, ignored


def load_official_checkpoint(path: str | os.PathLike, on_dangerous: str = "raise") -> dict:
    """Read a reference (Lightning) checkpoint without running anything from it.

    Returns ``{"state_dict", "ema", "global_step", "stubbed_globals", "epoch", "ignored_keys",
    "path"}``: ``state_dict`` maps reference names (no ``backbone.`` prefix, buffer
    ``rotary_emb.inv_freq`` included) to tensors; ``ema`` is ``{"decay", "num_updates",
    "shadow_params"}`` (the list in backbone-parameter order) or ``None``.

    Raises ``FileNotFoundError`` / :class:`CheckpointError` (not a checkpoint, no
    ``state_dict``, EMA length mismatch, ...) / :class:`UnsafeCheckpointError`, always naming
    the file.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    if p.is_dir():
        raise CheckpointError(f"{p} is a directory; expected a Lightning .ckpt file")
    pm = restricted_pickle_module(on_dangerous)
    is_zip = zipfile.is_zipfile(p)
    try:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=False, pickle_module=pm, mmap=is_zip)
        except (RuntimeError, OSError) as e:
            if not is_zip or isinstance(e, UnsafeCheckpointError):
                raise
            obj = torch.load(p, map_location="cpu", weights_only=False, pickle_module=restricted_pickle_module(on_dangerous))
    except UnsafeCheckpointError as e:
        raise UnsafeCheckpointError(f"{p}: {e}") from None
    except Exception as e:  # noqa: BLE001 - every failure becomes one clear message
        raise CheckpointError(f"{p} is not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None

    if not isinstance(obj, dict):
        raise CheckpointError(f"{p}: the checkpoint holds a {type(obj).__name__}, expected a dict (a Lightning checkpoint)")
    if "state_dict" not in obj or not isinstance(obj["state_dict"], dict):
        keys = sorted(str(k) for k in obj)[:20]
        raise CheckpointError(f"{p} has no 'state_dict' entry (top-level keys: {keys})")
    state_dict, ignored = _strip_prefix(obj["state_dict"])
    if not state_dict:
        raise CheckpointError(f"{p}: 'state_dict' holds no backbone weights (keys: {ignored[:10]})")
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{p}: state_dict entries that are not tensors: {bad[:10]} (e.g. {state_dict[bad[0]]!r})")
    n_params = sum(1 for k in state_dict if k not in BUFFER_NAMES)

    ema = obj.get("ema")
    if ema is not None:
        if not isinstance(ema, dict) or "shadow_params" not in ema:
            raise CheckpointError(f"{p}: 'ema' is not an EMA state ({{decay, num_updates, shadow_params}}): {type(ema).__name__}")
        shadow = list(ema["shadow_params"])
        if not all(isinstance(t, torch.Tensor) for t in shadow):
            raise CheckpointError(f"{p}: ema.shadow_params holds non-tensors")
        if len(shadow) != n_params:
            raise CheckpointError(
                f"{p}: ema.shadow_params has {len(shadow)} tensors but the backbone has {n_params} parameters "
                "(the EMA list must follow the backbone's parameters; buffers excluded)"
            )
        ema = {"decay": ema.get("decay"), "num_updates": ema.get("num_updates"), "shadow_params": shadow}

    step = obj.get("global_step")
    return {
        "state_dict": state_dict,
        "ema": ema,
        "global_step": step if isinstance(step, int) else None,
        "epoch": obj.get("epoch") if isinstance(obj.get("epoch"), int) else None,
        "stubbed_globals": sorted(set(pm.stubbed)),
        "ignored_keys": ignored,
        "path": str(p),
    }


# ----------------------------------------------------------------------------- config and EMA


def _shape(sd: dict, name: str) -> tuple[int, ...]:
    if name not in sd:
        raise CheckpointError(f"state dict lacks {name!r}: not an Eso-LM (B) backbone")
    return tuple(sd[name].shape)


def infer_config(state_dict: dict, mask_token_id: int | None = None, max_seq_len: int = 1024, n_heads: int | None = None, **overrides):
    """An :class:`esorl.EsoLMConfig` from a reference state dict's shapes.

    hidden, vocab (``vocab_embed.embedding``), layers (``blocks.{i}``), cond_dim and the
    sinusoid size (``sigma_map.mlp.0``), MLP ratio (``blocks.0.mlp.0``). Heads do not show in
    any weight shape; the rotary buffer ``rotary_emb.inv_freq`` (``head_dim / 2`` entries)
    gives them when present (an explicit ``n_heads`` must agree with it), else ``n_heads``
    defaults to ``hidden_size // 64``. The rotary base is read back from ``inv_freq`` too.
    ``mask_token_id`` defaults to ``vocab_size - 1``. For the GPT-2 vocabulary (50258, MASK
    50257) pad/eos/bos are set to 50256 (``<|endoftext|>``): the training tokenizer's ``[PAD]``
    shares the MASK id and must never be fed as padding.
    """
    from ..configuration_esolm import EsoLMConfig

    vocab, hidden = _shape(state_dict, "vocab_embed.embedding")
    cond_dim, freq = _shape(state_dict, "sigma_map.mlp.0.weight")
    layers = sorted({int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))})
    if not layers or layers != list(range(len(layers))):
        raise CheckpointError(f"state dict blocks are not numbered 0..n-1: {layers[:20]}")
    mlp_hidden = _shape(state_dict, "blocks.0.mlp.0.weight")[0]
    if mlp_hidden % hidden:
        raise CheckpointError(f"MLP width {mlp_hidden} is not a multiple of hidden {hidden}")
    for name, want in (
        ("blocks.0.adaLN_modulation.weight", (6 * hidden, cond_dim)),
        ("output_layer.adaLN_modulation.weight", (2 * hidden, cond_dim)),
        ("output_layer.linear.weight", (vocab, hidden)),
        ("blocks.0.attn_qkv.weight", (3 * hidden, hidden)),
    ):
        if _shape(state_dict, name) != want:
            raise CheckpointError(f"{name} has shape {_shape(state_dict, name)}, expected {want}")

    rotary_base = 10000.0
    inv = state_dict.get("rotary_emb.inv_freq")
    if inv is not None:
        head_dim = 2 * inv.numel()
        if head_dim == 0 or hidden % head_dim:
            raise CheckpointError(f"rotary_emb.inv_freq has {inv.numel()} entries: head_dim {head_dim} does not divide hidden {hidden}")
        inferred = hidden // head_dim
        if n_heads is not None and n_heads != inferred:
            raise CheckpointError(
                f"n_heads={n_heads} contradicts the checkpoint: rotary_emb.inv_freq has {inv.numel()} entries, "
                f"so head_dim={head_dim} and n_heads={inferred}"
            )
        n_heads = inferred
        if inv.numel() >= 2 and float(inv[1]) > 0:
            base = float(inv[1].double()) ** (-head_dim / 2.0)
            rotary_base = 10000.0 if abs(base / 10000.0 - 1) < 1e-3 else round(base, 3)
    elif n_heads is None:
        n_heads = max(1, hidden // 64)

    mask_id = vocab - 1 if mask_token_id is None else int(mask_token_id)
    specials = {}
    if vocab == _GPT2_VOCAB and mask_id == _GPT2_MASK:
        specials = dict(pad_token_id=_GPT2_EOS, eos_token_id=_GPT2_EOS, bos_token_id=_GPT2_EOS)
    kwargs = dict(
        vocab_size=vocab,
        mask_token_id=mask_id,
        hidden_size=hidden,
        n_layers=len(layers),
        n_heads=n_heads,
        cond_dim=cond_dim,
        mlp_ratio=mlp_hidden // hidden,
        max_seq_len=max_seq_len,
        rotary_base=rotary_base,
        frequency_embedding_size=freq,
        **specials,
    )
    kwargs.update(overrides)
    try:
        cfg = EsoLMConfig(**kwargs)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if cfg.pad_token_id is not None and cfg.pad_token_id == cfg.mask_token_id:
        raise CheckpointError(f"pad_token_id == mask_token_id == {cfg.mask_token_id}: never pad with MASK")
    return cfg


def parameter_order(state_dict: dict) -> list[str]:
    """Names of the backbone's parameters in ``EsoLMModel(config).named_parameters()`` order
    (= the reference ``backbone.parameters()`` order the EMA list follows; buffers excluded).
    Built on the meta device: no memory, no init."""
    from ..modeling_esolm import EsoLMModel

    cfg = infer_config(state_dict, max_seq_len=1)
    with torch.device("meta"):
        model = EsoLMModel(cfg)
    order = [n for n, _ in model.named_parameters()]
    have = {k for k in state_dict if k not in BUFFER_NAMES}
    if set(order) != have:
        raise CheckpointError(
            f"state dict parameters do not match the Eso-LM backbone: missing {sorted(set(order) - have)[:10]}, "
            f"unexpected {sorted(have - set(order))[:10]}"
        )
    return order


def ema_state_dict(state_dict: dict, shadow_params: list) -> dict:
    """Map the EMA ``shadow_params`` list onto parameter names; buffers copied from ``state_dict``.

    The list follows the backbone's parameter order (:func:`parameter_order`). Every tensor's
    shape is checked against the raw weight of the same name.
    """
    order = parameter_order(state_dict)
    if len(shadow_params) != len(order):
        raise CheckpointError(f"EMA has {len(shadow_params)} tensors but the backbone has {len(order)} parameters")
    out = {}
    for i, (name, t) in enumerate(zip(order, shadow_params)):
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"EMA entry {i} ({name}) is a {type(t).__name__}, not a tensor")
        if tuple(t.shape) != tuple(state_dict[name].shape):
            raise CheckpointError(
                f"EMA entry {i} has shape {tuple(t.shape)} but parameter {name} has shape {tuple(state_dict[name].shape)}: "
                "the EMA list does not follow the backbone's parameter order"
            )
        out[name] = t
    for name in BUFFER_NAMES:
        if name in state_dict:
            out[name] = state_dict[name]
    return out


# ----------------------------------------------------------------------------- conversion


def _tokenizer_settings(name: str, cfg) -> dict:
    """What a user needs to rebuild the tokenizer when it could not be saved (e.g. offline)."""
    if cfg.vocab_size == _GPT2_VOCAB and cfg.mask_token_id == _GPT2_MASK:
        pad = _GPT2_EOS if cfg.pad_token_id in (None, _GPT2_MASK) else cfg.pad_token_id
    else:
        pad = cfg.pad_token_id
    return {"name": name, "mask_token_id": cfg.mask_token_id, "pad_token_id": pad, "note": f"never pad with {cfg.mask_token_id} (= MASK)"}


def _save_tokenizer(tokenizer: str, cfg, tmp: Path, log) -> str:
    """Save the tokenizer (or, if it cannot be loaded, e.g. offline, its settings) into ``tmp``."""
    try:
        from ..data.tokenizer import load_tokenizer

        tok = load_tokenizer(tokenizer)
        pad = getattr(tok, "pad_token_id", None)
        if pad is None or pad == cfg.mask_token_id:
            eos = getattr(tok, "eos_token_id", None)
            if eos is None or eos == cfg.mask_token_id:
                raise CheckpointError(f"tokenizer {tokenizer!r} has no pad/eos id distinct from MASK {cfg.mask_token_id}")
            tok.pad_token = tok.eos_token
            pad = eos
        tok_mask = getattr(tok, "mask_token_id", None)
        if tok_mask is not None and tok_mask != cfg.mask_token_id:
            log(f"warning: tokenizer mask id {tok_mask} differs from the model's MASK id {cfg.mask_token_id}")
        if len(tok) > cfg.vocab_size:
            log(f"warning: tokenizer has {len(tok)} ids but the model only {cfg.vocab_size}")
        cfg.pad_token_id = pad
        if getattr(tok, "eos_token_id", None) is not None:
            cfg.eos_token_id = tok.eos_token_id
        tok.save_pretrained(tmp)
        return f"tokenizer {tokenizer!r} saved (pad id {pad})"
    except Exception as e:  # noqa: BLE001 - offline / module missing: fall back to settings
        settings = _tokenizer_settings(str(tokenizer), cfg)
        log(f"warning: could not load tokenizer {tokenizer!r} ({type(e).__name__}: {e}); writing tokenizer_settings.json instead")
        (tmp / "tokenizer_settings.json").write_text(json.dumps(settings, indent=1) + "\n")
        if cfg.pad_token_id is None and settings["pad_token_id"] is not None:
            cfg.pad_token_id = settings["pad_token_id"]
        return f"tokenizer settings written ({settings['name']}: MASK {settings['mask_token_id']}, pad {settings['pad_token_id']})"


def _plain(x):
    """A JSON-able scalar from an EMA field (a number, a 0-d tensor, or anything else as text)."""
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        return x.item()
    return x if isinstance(x, (int, float, type(None))) else str(x)


def convert_official(
    ckpt_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    use_ema: bool = True,
    n_heads: int | None = None,
    max_seq_len: int = 1024,
    tokenizer: str | os.PathLike | None = "gpt2",
    mask_token_id: int | None = None,
    overwrite: bool = False,
    on_dangerous: str = "raise",
) -> Path:
    """Convert a reference ``.ckpt`` into an esorl model directory (safetensors + config.json).

    Loads with :func:`load_official_checkpoint`, picks the EMA weights (default; evaluation
    and sampling in the reference use them) or the raw ones, builds ``EsoLMModel``,
    ``load_state_dict(strict=True)``, ``save_pretrained``, and adds the tokenizer (or
    ``tokenizer_settings.json`` when it cannot be loaded) and ``conversion.json``
    (provenance). Weights are stored in float32 (the model's dtype; a bf16 checkpoint is
    upcast losslessly). Written atomically: built in ``<out_dir>.tmp-<pid>`` and renamed. An
    existing non-empty ``out_dir`` is an error unless ``overwrite``.
    """
    from ..modeling_esolm import EsoLMModel

    def log(msg: str) -> None:
        print(msg, file=sys.stderr)

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True / --overwrite)")

    ck = load_official_checkpoint(ckpt_path, on_dangerous=on_dangerous)
    raw = ck["state_dict"]
    cfg = infer_config(raw, mask_token_id=mask_token_id, max_seq_len=max_seq_len, n_heads=n_heads)
    if use_ema:
        if ck["ema"] is None:
            raise CheckpointError(f"{ckpt_path} has no 'ema' entry; convert the raw weights with use_ema=False (--no-ema)")
        weights = ema_state_dict(raw, ck["ema"]["shadow_params"])
    else:
        weights = raw

    tmp = Path(f"{out}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        tok_msg = _save_tokenizer(str(tokenizer), cfg, tmp, log) if tokenizer is not None else "no tokenizer"
        if cfg.pad_token_id is not None and cfg.pad_token_id == cfg.mask_token_id:
            raise CheckpointError(f"pad_token_id == mask_token_id == {cfg.mask_token_id}: never pad with MASK")
        model = EsoLMModel(cfg)
        try:
            model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in weights.items()}, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{ckpt_path}: weights do not fit the inferred architecture ({cfg.n_layers} blocks, hidden {cfg.hidden_size}): {e}") from None
        model.eval()
        model.save_pretrained(tmp)
        n_params = sum(p.numel() for p in model.parameters())
        info = {
            "source": str(Path(ckpt_path).resolve()),
            "global_step": ck["global_step"],
            "weights": "ema" if use_ema else "raw",
            "ema_decay": _plain(ck["ema"]["decay"]) if use_ema else None,
            "ema_num_updates": _plain(ck["ema"]["num_updates"]) if use_ema else None,
            "stubbed_globals": ck["stubbed_globals"],
            "ignored_state_dict_keys": ck["ignored_keys"],
            "num_parameters": n_params,
            "tokenizer": tok_msg,
        }
        (tmp / "conversion.json").write_text(json.dumps(info, indent=1) + "\n")
        old = None
        if out.exists():
            old = Path(f"{out}.old-{os.getpid()}")
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            if old is not None:
                os.replace(old, out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """``esorl convert-official <file.ckpt> <out_dir> [--no-ema] [--n-heads N] [--max-seq-len L]
    [--tokenizer NAME|PATH|none] [--mask-token-id ID] [--overwrite] [--stub-dangerous]``."""
    ap = argparse.ArgumentParser(
        prog="esorl convert-official",
        description="Convert a released Eso-LM Lightning .ckpt into an esorl model directory (no code from the file runs).",
    )
    ap.add_argument("ckpt", help="the reference .ckpt file")
    ap.add_argument("out_dir", help="output directory (config.json + model.safetensors)")
    ap.add_argument("--no-ema", action="store_true", help="convert the raw weights instead of the EMA weights")
    ap.add_argument("--n-heads", type=int, default=None, help="attention heads (default: from rotary_emb.inv_freq, else hidden/64)")
    ap.add_argument("--max-seq-len", type=int, default=1024, help="the model's context in positions (default 1024)")
    ap.add_argument("--tokenizer", default="gpt2", help="tokenizer name or path to save alongside, or 'none' (default gpt2)")
    ap.add_argument("--mask-token-id", type=int, default=None, help="MASK id (default vocab_size - 1)")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty out_dir")
    ap.add_argument("--stub-dangerous", action="store_true", help="stub code-executing globals instead of refusing the file")
    a = ap.parse_args(argv)
    tok = None if str(a.tokenizer).lower() == "none" else a.tokenizer
    try:
        out = convert_official(
            a.ckpt, a.out_dir, use_ema=not a.no_ema, n_heads=a.n_heads, max_seq_len=a.max_seq_len,
            tokenizer=tok, mask_token_id=a.mask_token_id, overwrite=a.overwrite,
            on_dangerous="stub" if a.stub_dangerous else "raise",
        )  # fmt: skip
    except (CheckpointError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    info = json.loads((out / "conversion.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    print(f"read {a.ckpt}: global_step {info['global_step']}")
    if info["stubbed_globals"]:
        print("stubbed (never imported or run): " + ", ".join(info["stubbed_globals"]))
    w = info["weights"]
    if w == "ema":
        w = f"EMA (decay {info['ema_decay']}, {info['ema_num_updates']} updates)"
    else:
        w = "RAW (no EMA)"
    print(
        f"wrote {out}: {w} weights, {info['num_parameters']:,} parameters, {cfg['n_layers']} blocks, hidden {cfg['hidden_size']}, "
        f"{cfg['n_heads']} heads, vocab {cfg['vocab_size']} (MASK {cfg['mask_token_id']}, pad {cfg.get('pad_token_id')}), "
        f"max_seq_len {cfg['max_seq_len']}; {info['tokenizer']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
