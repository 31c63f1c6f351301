"""Convert a released Eso-LM (B) Lightning checkpoint (docs/ESOLM.md §9) into an esorl model directory.

The released ``.ckpt`` files pickle the training config (OmegaConf) and the tokenizer object
next to the weights, so ``torch.load(weights_only=True)`` refuses them and
``weights_only=False`` would import (and run) whatever the file names. This module reads them
through ``torch.load(..., weights_only=False, pickle_module=<restricted>)`` (torch keeps its
own zip/legacy storage handling) whose unpickler, :class:`RestrictedUnpickler`, is an
**allowlist**: every global the pickle names (``GLOBAL``/``STACK_GLOBAL``/
``INST``/``OBJ``/``EXT*``) is looked up in :data:`ALLOWED_GLOBALS` and
:data:`CONFIG_STUB_GLOBALS`; nothing is ever imported, and anything else is refused.

* **allowed callables** (immutable wrappers that refuse pickle ``BUILD`` and check their
  arguments before calling the real function; a wrong argument is refused, naming the
  callable): the tensor rebuilders ``torch._utils._rebuild_tensor{,_v2,_v3}`` (a real
  storage, an int offset, int tuples for size/stride), ``_rebuild_parameter{,_with_state}``
  (a real tensor) and ``torch._tensor._rebuild_from_type_v2`` (one of those rebuilders and
  ``torch.Tensor``); backward hooks and Python-side tensor state from the file are dropped.
  The containers and scalars pickle protocol 2 rebuilds by calling their type:
  ``builtins.dict/list/tuple/set/frozenset/int/float/bool/str/bytes/bytearray``
  (and the immutable type ``complex`` itself: protocol 2 rebuilds it with ``NEWOBJ``),
  ``collections.OrderedDict``, ``collections.defaultdict`` (factory: one of those types),
  ``torch.Size``, ``torch.device`` – with plain-data arguments only (numbers, strings,
  bytes, tensors and lists/tuples/sets/dicts of them: never a stub or another callable),
  text codecs only, no ``bytes(n)`` allocation; ``_codecs.encode`` restricted to ``str``
  with a latin-1/utf-8/ascii codec (how protocol 2 stores ``bytes``);
  ``torch.serialization._get_layout`` restricted to layout names;
* **allowed values**: the ``torch`` dtypes / layouts / memory formats / qschemes, and inert
  markers for ``torch.Tensor`` and ``torch.UntypedStorage`` (storage types of a persistent
  id; torch's own loader turns the typed ``*Storage`` names into inert ``StorageType``
  objects before this unpickler is asked);
* **inert stubs** for the classes of the pickled config and tokenizer
  (:data:`CONFIG_STUB_GLOBALS`: OmegaConf containers/nodes/metadata, ``typing`` annotations,
  the GPT-2/BERT tokenizers and their ``tokenizers`` objects, the reference fixture's
  ``fake_omegaconf``/``fake_tokenizers`` stand-ins) and for any ``allow_stubs`` the caller
  adds: each becomes a fresh immutable class of its own that records the module and name;
  constructing it, ``__setstate__``, ``append``/``extend`` and ``__setitem__`` only *store*
  their arguments. Their code never runs and their modules are never imported;
* **refused**, everything else (:class:`UnsafeCheckpointError`, naming module and name,
  raised when the global is looked up, before anything is called): ``os.system``,
  ``builtins.eval``/``exec``/``getattr``/``__import__``, ``subprocess.Popen``,
  ``copyreg._reconstructor``, ``torch.load``, ``torch.storage._load_from_bytes`` (which would
  ``torch.load`` nested bytes with a full unpickler; ``torch.save`` never emits it), tensor
  subclasses, ... and every **dotted name** (``torch`` + ``serialization.os.system``), which
  pickle would resolve attribute by attribute through whatever the module imports.

Not defended: memory exhaustion (a file can always claim huge storages or long strings).

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
    "ALLOWED_GLOBALS",
    "CONFIG_STUB_GLOBALS",
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


# ----------------------------------------------------------------------------- refusals


def _refuse_global(module: str, name: str, why: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"the checkpoint's pickle references the global {module}.{name} (module {module!r}, name {name!r}), "
        f"{why}; refusing to load it (nothing from the file was run)"
    )


def _describe(x) -> str:
    """A short description of an unpickled object, for refusal messages."""
    if isinstance(x, type) and issubclass(x, StubObject):
        return f"the stubbed class {x._stub_module}.{x._stub_name}"
    if isinstance(x, StubObject):
        return f"an instance of the stubbed class {x._stub_module}.{x._stub_name}"
    if isinstance(x, (_Frozen, _Marker)):
        return f"the global {x.qualname}"
    return f"a {type(x).__module__}.{type(x).__qualname__}"


# ----------------------------------------------------------------------------- stubs


class _StubMeta(type):
    """Metaclass of the stub classes: the class itself is immutable (pickle ``BUILD`` on a
    global would otherwise set class attributes such as ``__setstate__`` or ``__iter__``)."""

    def __setattr__(cls, name, value):
        raise UnsafeCheckpointError(f"the checkpoint tries to set {name!r} on the stubbed class {cls._stub_module}.{cls._stub_name}")

    def __delattr__(cls, name):
        raise UnsafeCheckpointError(f"the checkpoint tries to delete {name!r} from the stubbed class {cls._stub_module}.{cls._stub_name}")


class _instance_only:  # noqa: N801 - used as a decorator
    """A method that exists on instances only: looked up on the class (pickle ``BUILD`` applied
    to the stubbed class itself) it refuses instead of being called with the state as ``self``."""

    def __init__(self, fn):
        self.fn = fn

    def __get__(self, obj, cls=None):
        if obj is None:

            def refuse(*args, **kwargs):
                raise UnsafeCheckpointError(f"the checkpoint tries to modify the stubbed class {cls._stub_module}.{cls._stub_name}")

            return refuse
        return self.fn.__get__(obj, cls)


class StubObject(metaclass=_StubMeta):
    """Base of the inert stand-ins for the allowlisted config/tokenizer classes.

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

    @_instance_only
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
    return _StubMeta(safe, (StubObject,), {"_stub_module": module, "_stub_name": name, "__module__": "esorl.convert.stubs"})


# The classes (and the one rebuild function) of the pickled training config and tokenizer in
# ``hyper_parameters``: stubbed, never imported. OmegaConf 2.x, transformers 4.x/5.x GPT-2
# and BERT tokenizers with their ``tokenizers`` objects, ``typing`` annotations OmegaConf
# stores as metadata, and the stand-in modules the shared reference fixture was written with
# (``fake_omegaconf`` / ``fake_tokenizers``, which no longer exist).
CONFIG_STUB_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    [("omegaconf.dictconfig", "DictConfig"), ("omegaconf.listconfig", "ListConfig")]
    + [("omegaconf.base", n) for n in ("ContainerMetadata", "Metadata", "UnionNode")]
    + [("omegaconf.nodes", n) for n in (
        "AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode", "BytesNode", "PathNode", "EnumNode",
        "InterpolationResultNode",
    )]  # fmt: skip
    + [("typing", n) for n in ("Any", "Dict", "List", "Optional", "Union", "Tuple")]
    + [
        ("transformers.models.gpt2.tokenization_gpt2_fast", "GPT2TokenizerFast"),
        ("transformers.models.gpt2.tokenization_gpt2", "GPT2Tokenizer"),
        ("transformers.models.bert.tokenization_bert_fast", "BertTokenizerFast"),
        ("transformers.models.bert.tokenization_bert", "BertTokenizer"),
        ("transformers.tokenization_utils_fast", "PreTrainedTokenizerFast"),
        ("transformers.tokenization_utils_base", "AddedToken"),
        ("tokenizers", "Tokenizer"),
        ("tokenizers", "AddedToken"),
        ("tokenizers.models", "Model"),
        ("tokenizers.models", "BPE"),
        ("tokenizers.models", "WordPiece"),
    ]
    + [("fake_omegaconf", n) for n in ("DictConfig", "ListConfig", "ContainerMetadata", "Metadata", "AnyNode")]
    + [("fake_tokenizers", n) for n in ("GPT2TokenizerFast", "_rebuild_tokenizer")]
)

# Modules whose names a caller may not add to the stub allowlist (``allow_stubs``): a file
# that needs them is hostile, and the README promises to refuse such files.
_NEVER_STUB_MODULES = {
    "builtins", "__builtin__", "os", "posix", "nt", "subprocess", "sys", "shutil", "importlib", "runpy", "socket",
    "pty", "code", "codeop", "ctypes", "pickle", "_pickle", "marshal", "webbrowser", "multiprocessing", "signal",
    "pdb", "bdb", "timeit", "asyncio", "_thread", "threading", "urllib", "http", "ftplib", "smtplib", "telnetlib",
    "commands", "popen2", "_posixsubprocess", "pip", "setuptools", "distutils", "imp", "zipimport", "cProfile",
    "profile", "trace", "_io", "io", "tempfile", "pathlib", "glob", "copyreg", "copy_reg", "operator", "functools",
    "types", "inspect", "gc", "codecs", "_codecs", "torch", "collections", "numpy",
}  # fmt: skip


def _parse_allow_stubs(allow_stubs) -> frozenset[tuple[str, str]]:
    """``["module.Class", ...]`` → ``{(module, Class)}``; refuses dotted/empty names and the
    modules in ``_NEVER_STUB_MODULES``."""
    if isinstance(allow_stubs, str):
        allow_stubs = [allow_stubs]
    out = set()
    for spec in allow_stubs or ():
        if not isinstance(spec, str) or "." not in spec:
            raise ValueError(f"allow_stubs entries are 'module.Name' strings, got {spec!r}")
        module, name = spec.rsplit(".", 1)
        if not module or not name.isidentifier() or not all(p.isidentifier() for p in module.split(".")):
            raise ValueError(f"allow_stubs entry {spec!r} is not 'module.Name'")
        if module.split(".")[0] in _NEVER_STUB_MODULES:
            raise ValueError(f"allow_stubs entry {spec!r}: globals of {module.split('.')[0]!r} are never stubbed")
        out.add((module, name))
    return frozenset(out)


# ----------------------------------------------------------------------------- safe callables


class _Frozen:
    """An allowed callable as the unpickler hands it out: callable, but immutable.

    Pickle ``BUILD`` on a global sets attributes on it (``__setstate__``, or ``setattr`` for
    slot state); on a module-level function that would be process-wide state the file could
    change (``__defaults__``, ...). ``_Frozen`` has no ``__dict__`` and refuses ``BUILD``.
    ``fn`` is one of the checking wrappers below, never the raw torch/builtin callable.
    """

    __slots__ = ("fn", "qualname")

    def __init__(self, fn, qualname: str):
        object.__setattr__(self, "fn", fn)
        object.__setattr__(self, "qualname", qualname)

    def __call__(self, *args, **kwargs):
        if kwargs:
            raise UnsafeCheckpointError(f"{self.qualname} called with keyword arguments {sorted(kwargs)}")
        return self.fn(*args)

    def __setattr__(self, name, value):
        raise UnsafeCheckpointError(f"the checkpoint tries to set {name!r} on {self.qualname}")

    def __setstate__(self, state):
        raise UnsafeCheckpointError(f"the checkpoint tries to modify {self.qualname}")

    def __repr__(self) -> str:
        return f"<restricted {self.qualname}>"


class _Marker:
    """An inert, immutable stand-in for a class the file names but must never call:
    ``torch.UntypedStorage`` (torch's loader only reads ``.dtype`` from the storage type of a
    persistent id) and ``torch.Tensor`` (only the ``new_type`` argument of
    ``_rebuild_from_type_v2``, which ignores it)."""

    __slots__ = ("qualname", "dtype")

    def __init__(self, qualname: str, dtype=None):
        object.__setattr__(self, "qualname", qualname)
        object.__setattr__(self, "dtype", dtype)

    def __call__(self, *args, **kwargs):
        raise UnsafeCheckpointError(f"the checkpoint calls {self.qualname}, which is only allowed as a type marker")

    def __setattr__(self, name, value):
        raise UnsafeCheckpointError(f"the checkpoint tries to set {name!r} on {self.qualname}")

    def __setstate__(self, state):
        raise UnsafeCheckpointError(f"the checkpoint tries to modify {self.qualname}")

    def __repr__(self) -> str:
        return f"<marker {self.qualname}>"


_TENSOR_MARKER = _Marker("torch.Tensor")

_PLAIN_LEAVES = (type(None), bool, int, float, complex, str, bytes, bytearray, torch.dtype, torch.device, torch.layout, torch.memory_format, torch.Tensor, torch.nn.Parameter)
_PLAIN_SEQUENCES = (tuple, list, set, frozenset, torch.Size)
_PLAIN_MAPPINGS = (dict, collections.OrderedDict, collections.defaultdict)


def _check_plain(value, where: str) -> None:
    """Refuse anything but plain data (numbers, strings, bytes, tensors, dtypes/devices and
    lists/tuples/sets/dicts of them; exact types, no subclasses) as arguments of ``where``.
    Iterative, cycle-safe; iterating these exact built-in types runs no code from the file."""
    stack, seen = [value], set()
    while stack:
        x = stack.pop()
        t = type(x)
        if t in _PLAIN_LEAVES:
            continue
        if id(x) in seen:
            continue
        if t in _PLAIN_SEQUENCES:
            seen.add(id(x))
            stack.extend(x)
        elif t in _PLAIN_MAPPINGS:
            seen.add(id(x))
            stack.extend(x.keys())
            stack.extend(x.values())
        else:
            raise UnsafeCheckpointError(
                f"{where} got {_describe(x)} as an argument; only plain data (numbers, strings, bytes, tensors, "
                "lists/tuples/sets/dicts of them) may be passed to it"
            )


def _check_int_tuple(x, what: str, where: str) -> None:
    if type(x) not in (tuple, torch.Size) or not all(type(v) is int for v in x):
        raise UnsafeCheckpointError(f"{where} got {_describe(x)} as {what}; expected a tuple of ints")


def _check_storage(storage, where: str = "tensor rebuild") -> None:
    if type(storage) not in (torch.storage.TypedStorage, torch.storage.UntypedStorage):
        raise UnsafeCheckpointError(f"{where} got {_describe(storage)} instead of a storage")


def _check_tensor(t, where: str = "parameter rebuild") -> None:
    if type(t) not in (torch.Tensor, torch.nn.Parameter):
        raise UnsafeCheckpointError(f"{where} got {_describe(t)} instead of a tensor")


def _check_geometry(storage, storage_offset, size, stride, where: str) -> None:
    _check_storage(storage, where)
    if type(storage_offset) is not int:
        raise UnsafeCheckpointError(f"{where} got {_describe(storage_offset)} as the storage offset")
    _check_int_tuple(size, "the size", where)
    _check_int_tuple(stride, "the stride", where)


def _tensor_metadata(metadata):
    if type(metadata) is dict and all(type(k) is str and type(v) is bool for k, v in metadata.items()):
        return metadata
    return None


def _safe_rebuild_tensor(storage, storage_offset, size, stride):
    _check_geometry(storage, storage_offset, size, stride, "torch._utils._rebuild_tensor")
    return torch._utils._rebuild_tensor(storage, storage_offset, size, stride)


def _safe_rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    # Backward hooks are not meant to be serialized (torch keeps the argument for BC only);
    # any the file carries are dropped.
    _check_geometry(storage, storage_offset, size, stride, "torch._utils._rebuild_tensor_v2")
    return torch._utils._rebuild_tensor_v2(
        storage, storage_offset, size, stride, requires_grad is True, collections.OrderedDict(), _tensor_metadata(metadata)
    )


def _safe_rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    _check_geometry(storage, storage_offset, size, stride, "torch._utils._rebuild_tensor_v3")
    if type(dtype) is not torch.dtype:
        raise UnsafeCheckpointError(f"torch._utils._rebuild_tensor_v3 got {_describe(dtype)} as the dtype")
    return torch._utils._rebuild_tensor_v3(
        storage, storage_offset, size, stride, requires_grad is True, collections.OrderedDict(), dtype, _tensor_metadata(metadata)
    )


def _safe_rebuild_parameter(data, requires_grad, backward_hooks):
    _check_tensor(data, "torch._utils._rebuild_parameter")
    return torch._utils._rebuild_parameter(data, requires_grad is True, collections.OrderedDict())


def _safe_rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    # The Python-side state (attributes set on the Parameter) is dropped.
    _check_tensor(data, "torch._utils._rebuild_parameter_with_state")
    return torch._utils._rebuild_parameter(data, requires_grad is True, collections.OrderedDict())


_SAFE_REBUILDERS = (_safe_rebuild_tensor, _safe_rebuild_tensor_v2, _safe_rebuild_tensor_v3, _safe_rebuild_parameter, _safe_rebuild_parameter_with_state)


def _safe_rebuild_from_type_v2(func, new_type, args, state):
    # A tensor with Python attributes: rebuild the plain tensor only (the state from the file
    # is never applied). Tensor subclasses are refused (their class is not on the allowlist).
    where = "torch._tensor._rebuild_from_type_v2"
    if not isinstance(func, _Frozen) or func.fn not in _SAFE_REBUILDERS:
        raise UnsafeCheckpointError(f"{where} got {_describe(func)} as its rebuild function; expected a tensor rebuilder")
    if new_type is not _TENSOR_MARKER:
        raise UnsafeCheckpointError(f"{where} got {_describe(new_type)} as the tensor type; only torch.Tensor is allowed")
    if type(args) is not tuple:
        raise UnsafeCheckpointError(f"{where} got {_describe(args)} as the rebuild arguments")
    return func(*args)


_SAFE_ENCODINGS = {"latin1", "latin-1", "latin_1", "iso-8859-1", "iso8859-1", "l1", "utf-8", "utf8", "utf_8", "ascii"}
_SAFE_ERRORS = {"strict", "surrogatepass", "replace", "ignore"}


def _check_codec(where: str, encoding, errors="strict") -> None:
    # A codec name is looked up (and its module imported) by name: plain text codecs only.
    if type(encoding) is not str or encoding.lower() not in _SAFE_ENCODINGS:
        raise UnsafeCheckpointError(f"{where} with encoding {encoding!r} is refused")
    if errors not in _SAFE_ERRORS:
        raise UnsafeCheckpointError(f"{where} with errors={errors!r} is refused")


def _safe_codecs_encode(obj, encoding="utf-8", errors="strict"):
    """``_codecs.encode`` as pickle protocol 2 uses it for ``bytes``: str → bytes, plain codecs only."""
    if type(obj) is not str:
        raise UnsafeCheckpointError(f"_codecs.encode with encoding {encoding!r} on {_describe(obj)} is refused")
    _check_codec("_codecs.encode", encoding, errors)
    return obj.encode(encoding, errors)


def _plain_constructor(cls, qualname: str, max_args: int):
    """``cls(*args)`` for a built-in container/scalar type, with plain-data arguments only."""

    def construct(*args):
        if len(args) > max_args:
            raise UnsafeCheckpointError(f"{qualname} called with {len(args)} arguments")
        _check_plain(args, qualname)
        if cls in (str, bytes, bytearray) and len(args) > 1:
            _check_codec(qualname, *args[1:])
        if cls in (bytes, bytearray) and args and type(args[0]) is int:
            raise UnsafeCheckpointError(f"{qualname}({args[0]}) (a zero-filled allocation) is refused")
        return cls(*args)

    construct.__qualname__ = construct.__name__ = f"safe_{cls.__name__}"
    construct.plain_type = cls
    return construct


def _safe_defaultdict(*args):
    """``collections.defaultdict(factory[, mapping])`` (OmegaConf's ``resolver_cache``): the
    factory must be one of the allowed container types; mapping plain data."""
    if not args or len(args) > 2:
        raise UnsafeCheckpointError(f"collections.defaultdict called with {len(args)} arguments")
    factory, rest = args[0], args[1:]
    if factory is not None:
        if not isinstance(factory, _Frozen) or not hasattr(factory.fn, "plain_type"):
            raise UnsafeCheckpointError(f"collections.defaultdict got {_describe(factory)} as its factory; only a built-in container type is allowed")
        factory = factory.fn.plain_type
    _check_plain(rest, "collections.defaultdict")
    return collections.defaultdict(factory, *rest)


_LAYOUTS = {str(v): v for v in vars(torch).values() if isinstance(v, torch.layout)}


def _safe_get_layout(name):
    """``torch.serialization._get_layout`` (how ``torch.layout`` pickles): a layout by its name."""
    if type(name) is not str or name not in _LAYOUTS:
        raise UnsafeCheckpointError(f"torch.serialization._get_layout got {name!r}; expected a layout name such as 'torch.strided'")
    return _LAYOUTS[name]


_CALLABLES = {
    ("_codecs", "encode"): _safe_codecs_encode,
    ("collections", "OrderedDict"): _plain_constructor(collections.OrderedDict, "collections.OrderedDict", 1),
    ("collections", "defaultdict"): _safe_defaultdict,
    ("torch", "Size"): _plain_constructor(torch.Size, "torch.Size", 1),
    ("torch", "device"): _plain_constructor(torch.device, "torch.device", 2),
    ("torch._utils", "_rebuild_tensor"): _safe_rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _safe_rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _safe_rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _safe_rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _safe_rebuild_parameter_with_state,
    ("torch._tensor", "_rebuild_from_type_v2"): _safe_rebuild_from_type_v2,
    ("torch.serialization", "_get_layout"): _safe_get_layout,
}
for _cls, _n in ((dict, 1), (list, 1), (tuple, 1), (set, 1), (frozenset, 1), (int, 2), (float, 1), (bool, 1), (str, 3), (bytes, 3), (bytearray, 3)):
    _CALLABLES[("builtins", _cls.__name__)] = _plain_constructor(_cls, f"builtins.{_cls.__name__}", _n)

# Every global the unpickler resolves, except the stubs: (module, name) → the object handed out.
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {key: _Frozen(fn, f"{key[0]}.{key[1]}") for key, fn in _CALLABLES.items()}
# Pickle protocol 2 rebuilds a complex number with NEWOBJ, which needs the real type: the
# immutable C type itself (``BUILD`` cannot set attributes on it; its constructor only
# accepts numbers and strings, and runs no code of the file's).
ALLOWED_GLOBALS[("builtins", "complex")] = complex
ALLOWED_GLOBALS[("torch", "Tensor")] = _TENSOR_MARKER
for _key in (("torch", "UntypedStorage"), ("torch.storage", "UntypedStorage")):
    ALLOWED_GLOBALS[_key] = _Marker(f"{_key[0]}.{_key[1]}", torch.uint8)
# dtypes, layouts, memory formats and qschemes (immutable C objects; torch pickles dtypes by
# name). Read from the module dict: no lazy torch submodule is imported by a lookup.
for _name, _obj in list(vars(torch).items()):
    if not _name.startswith("_") and isinstance(_obj, (torch.dtype, torch.layout, torch.memory_format, torch.qscheme)):
        ALLOWED_GLOBALS[("torch", _name)] = _obj
del _cls, _n, _key, _name, _obj

# ----------------------------------------------------------------------------- unpickler


class RestrictedUnpickler(pickle.Unpickler):
    """A ``pickle.Unpickler`` whose globals come from an allowlist (the policy is in the module
    docstring): tensors, storages and plain containers, plus inert stubs for the pickled
    config/tokenizer classes. Any other global raises :class:`UnsafeCheckpointError` naming
    its module and name when it is looked up, before anything is called.

    Args:
        file: a binary file object.
        allow_stubs: extra ``"module.Name"`` globals to stub (inert, never imported), e.g. the
            config class of a checkpoint from another training code base. Dotted names and
            ``builtins``/``os``/``subprocess``/``torch``/... modules are not accepted.
        stubbed: a list that receives ``"module.name"`` of every stubbed global (first use).

    ``stubbed_globals`` (sorted, unique) lists what was stubbed. Use it directly
    (``RestrictedUnpickler(f).load()``, tensors then need a ``persistent_load``) or through
    ``torch.load(..., weights_only=False, pickle_module=restricted_pickle_module())``.
    """

    _allow_stubs: frozenset = frozenset()
    _shared_record: list | None = None

    def __init__(self, file, *args, allow_stubs=None, stubbed: list | None = None, **kwargs):
        super().__init__(file, *args, **kwargs)
        if allow_stubs is not None:
            self._allow_stubs = _parse_allow_stubs(allow_stubs)
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
        if type(module) is not str or type(name) is not str:
            raise UnsafeCheckpointError(f"the checkpoint's pickle references a global with a non-string name {module!r}.{name!r}")
        if "." in name:
            # pickle resolves a dotted name attribute by attribute (torch → serialization → os
            # → system): it reaches whatever the module imports.
            raise _refuse_global(module, name, "a dotted name that walks through the module's attributes")
        # Protocol 0-2 pickles written by Python 2 name `__builtin__`, `copy_reg`, ...
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        if module == "torch.tensor":  # torch's own load_module_mapping (old pickles)
            module = "torch._tensor"

        key = (module, name)
        obj = ALLOWED_GLOBALS.get(key)
        if obj is not None:
            return obj
        if key in CONFIG_STUB_GLOBALS or key in self._allow_stubs:
            if key not in self._stubs:
                self._stubs[key] = _make_stub(module, name)
                self._record.append(f"{module}.{name}")
            return self._stubs[key]
        raise _refuse_global(
            module, name,
            "which is not on the converter's allowlist (tensor/storage rebuilders, plain containers, torch dtypes "
            "and the pickled config/tokenizer classes)",
        )  # fmt: skip


class _RestrictedPickleModule:
    """A module-like object for ``torch.load(pickle_module=...)``; records stubbed globals."""

    __name__ = "esorl_restricted_pickle"
    UnpicklingError = pickle.UnpicklingError

    def __init__(self, allow_stubs=()):
        self.stubbed: list[str] = []
        self.Unpickler = type(
            "RestrictedUnpickler",
            (RestrictedUnpickler,),
            {"_allow_stubs": _parse_allow_stubs(allow_stubs), "_shared_record": self.stubbed, "__module__": __name__},
        )

    def load(self, file, **kwargs):
        return self.Unpickler(file, **kwargs).load()

    def loads(self, data: bytes, **kwargs):
        import io

        return self.load(io.BytesIO(data), **kwargs)


def restricted_pickle_module(allow_stubs=()) -> _RestrictedPickleModule:
    """A fresh ``pickle_module`` for ``torch.load``; ``.stubbed`` lists the stubbed globals."""
    return _RestrictedPickleModule(allow_stubs)


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


def load_official_checkpoint(path: str | os.PathLike, allow_stubs=()) -> dict:
    """Read a reference (Lightning) checkpoint without running anything from it.

    Returns ``{"state_dict", "ema", "global_step", "stubbed_globals", "epoch", "ignored_keys",
    "path"}``: ``state_dict`` maps reference names (no ``backbone.`` prefix, buffer
    ``rotary_emb.inv_freq`` included) to tensors; ``ema`` is ``{"decay", "num_updates",
    "shadow_params"}`` (the list in backbone-parameter order) or ``None``.

    Raises ``FileNotFoundError`` / :class:`CheckpointError` (not a checkpoint, no
    ``state_dict``, EMA length mismatch, ...) / :class:`UnsafeCheckpointError` (a global off
    the allowlist, naming its module and name, or an allowed callable given hostile
    arguments), always naming the file. ``allow_stubs``: extra ``"module.Name"`` classes to
    stub (see :class:`RestrictedUnpickler`).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    if p.is_dir():
        raise CheckpointError(f"{p} is a directory; expected a Lightning .ckpt file")
    pm = restricted_pickle_module(allow_stubs)
    is_zip = zipfile.is_zipfile(p)
    try:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=False, pickle_module=pm, mmap=is_zip)
        except (RuntimeError, OSError) as e:
            if not is_zip or isinstance(e, UnsafeCheckpointError):
                raise
            obj = torch.load(p, map_location="cpu", weights_only=False, pickle_module=restricted_pickle_module(allow_stubs))
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
    allow_stubs=(),
) -> Path:
    """Convert a reference ``.ckpt`` into an esorl model directory (safetensors + config.json).

    Loads with :func:`load_official_checkpoint`, picks the EMA weights (default; evaluation
    and sampling in the reference use them) or the raw ones, builds ``EsoLMModel``,
    ``load_state_dict(strict=True)``, ``save_pretrained``, and adds the tokenizer (or
    ``tokenizer_settings.json`` when it cannot be loaded) and ``conversion.json``
    (provenance). Weights are stored in float32 (the model's dtype; a bf16 checkpoint is
    upcast losslessly). Written atomically: built in ``<out_dir>.tmp-<pid>`` and renamed. An
    existing non-empty ``out_dir`` is an error unless ``overwrite``. ``allow_stubs``: extra
    ``"module.Name"`` classes the pickle may reference, stubbed (see :class:`RestrictedUnpickler`).
    """
    from ..modeling_esolm import EsoLMModel

    def log(msg: str) -> None:
        print(msg, file=sys.stderr)

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True / --overwrite)")

    ck = load_official_checkpoint(ckpt_path, allow_stubs=allow_stubs)
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
    [--tokenizer NAME|PATH|none] [--mask-token-id ID] [--overwrite] [--allow-stub MODULE.NAME ...]``.

    Returns 0 on success, 1 when the file is refused (a global off the allowlist) or cannot be
    converted; the reason goes to stderr."""
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
    ap.add_argument(
        "--allow-stub", action="append", default=[], metavar="MODULE.NAME",
        help="also accept this pickled class (e.g. another code base's config class) as an inert stub; repeatable",
    )  # fmt: skip
    a = ap.parse_args(argv)
    tok = None if str(a.tokenizer).lower() == "none" else a.tokenizer
    try:
        out = convert_official(
            a.ckpt, a.out_dir, use_ema=not a.no_ema, n_heads=a.n_heads, max_seq_len=a.max_seq_len,
            tokenizer=tok, mask_token_id=a.mask_token_id, overwrite=a.overwrite,
            allow_stubs=a.allow_stub,
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
