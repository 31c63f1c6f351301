"""Configs: every field of every recipe config is documented; bad input fails naming it."""

import dataclasses
import inspect
import typing

import pytest

from esorl.cli import CONFIG_CLASSES, _load
from esorl.config import ConfigError, load_config


def _sections(cls, seen=None):
    seen = seen if seen is not None else set()
    if cls in seen:
        return
    seen.add(cls)
    yield cls
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        inner = typing.get_args(tp)[0] if typing.get_origin(tp) is list and typing.get_args(tp) else tp
        if isinstance(inner, type) and dataclasses.is_dataclass(inner):
            yield from _sections(inner, seen)


@pytest.mark.parametrize("kind", sorted(CONFIG_CLASSES))
def test_every_field_is_documented(kind):
    missing = []
    for cls in _sections(_load(CONFIG_CLASSES[kind])):
        doc = " ".join(inspect.getdoc(c) or "" for c in cls.__mro__ if dataclasses.is_dataclass(c))
        for f in dataclasses.fields(cls):
            is_section = dataclasses.is_dataclass(typing.get_type_hints(cls)[f.name])
            if not is_section and f.name not in doc and not f.metadata.get("help"):
                missing.append(f"{cls.__name__}.{f.name}")
    assert not missing, missing


def test_unknown_and_ill_typed_fields_are_named():
    cls = _load(CONFIG_CLASSES["grpo"])
    with pytest.raises(ConfigError, match="grpo.learning_rat"):
        load_config(cls, None, ["grpo.learning_rat=1e-3"])
    with pytest.raises(ConfigError, match="grpo.max_steps"):
        load_config(cls, None, ["grpo.max_steps=many"])
    with pytest.raises(ConfigError, match="loss_type"):
        load_config(cls, None, ["grpo.loss_type=nope"])
