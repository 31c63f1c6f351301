"""Dataclass configs filled from YAML and ``key=value`` overrides, validated before any work.

A config is a (nested) dataclass whose fields carry their documentation in
``field(metadata={"help": ...})`` or in the class docstring. ``load_config`` reads a YAML
file, applies dotted overrides (``training.learning_rate=3e-4``), rejects unknown keys and ill-typed
values naming the field, then calls the config's ``validate()`` if it has one.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config field is unknown, missing or ill-typed; the message names it."""


def _is_dc(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp, name: str):
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, name)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"config field '{name}': {value!r} matches none of {tp}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config field '{name}' expects a list, got {value!r}")
        (a,) = typing.get_args(tp)[:1] or (Any,)
        return [_coerce(v, a, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config field '{name}' expects a mapping, got {value!r}")
        return dict(value)
    if typing.get_origin(tp) is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"config field '{name}' must be one of {typing.get_args(tp)}, got {value!r}")
        return value
    if _is_dc(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config section '{name}' expects a mapping, got {value!r}")
        return from_dict(tp, value, prefix=name + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"config field '{name}' expects a bool, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"config field '{name}' expects an int, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"config field '{name}' expects an int, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"config field '{name}' expects a float, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config field '{name}' expects a float, got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"config field '{name}' expects a string, got {value!r}")
        return str(value)
    return value


def renamed_fields(cls, data: dict) -> list[str]:
    """``"old was renamed to new"`` for every field of ``data`` (a recipe mapping) that ``cls.RENAMED``
    (``{old dotted name or section: what replaced it}``) lists: a recipe written for an
    earlier esorl names each such field, all at once, before any work."""
    table = getattr(cls, "RENAMED", {})
    if not table or not isinstance(data, dict):
        return []
    flat: list[str] = []

    def walk(d, pre):
        for k, v in d.items():
            flat.append(pre + str(k))
            if isinstance(v, dict):
                walk(v, f"{pre}{k}.")

    walk(data, "")
    return [f"{path} was {table[path]}" if table[path].startswith("removed") else f"{path} was renamed to {table[path]}" for path in flat if path in table]


def from_dict(cls, data: dict, prefix: str = ""):
    """Build ``cls`` from a mapping; unknown keys and bad types raise :class:`ConfigError`,
    and a field an earlier esorl called otherwise (``cls.RENAMED``) says what it is called now."""
    if not isinstance(data, dict):
        raise ConfigError(f"config {prefix or cls.__name__} expects a mapping, got {type(data).__name__}")
    old = renamed_fields(cls, data)
    if old:
        raise ConfigError(f"{cls.__name__}: field(s) of an earlier esorl (which now uses the Hugging Face TrainingArguments / TRL names): "
                          + "; ".join(f"{prefix}{o}" for o in old) + ". Rename them in the recipe or override (esorl config lists every field).")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config field(s) {', '.join(prefix + u for u in unknown)} in {cls.__name__}; known: {', '.join(sorted(fields))}")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{cls.__name__}: {e}") from None


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _parse_scalar(text: str):
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML scalars/lists)."""
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} is not of the form key=value")
        key, val = ov.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {ov!r}: '{p}' is not a section")
        node[parts[-1]] = _parse_scalar(val)
    return data


def load_config(cls, path: str | Path | None = None, overrides: list[str] | None = None, base: dict | None = None):
    """YAML file (optional) + overrides → validated ``cls`` instance."""
    data: dict = dict(base or {})
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at top level")
        data = _deep_merge(data, loaded)
    data = apply_overrides(data, list(overrides or []))
    cfg = from_dict(cls, data)
    try:
        validate(cfg)
    except ConfigError:
        raise
    except ValueError as e:  # a section's validate(): report it as a config error
        raise ConfigError(str(e)) from None
    return cfg


def validate(cfg) -> None:
    """Call ``validate()`` on the config and every nested section that defines it."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            validate(v)
        elif isinstance(v, list):  # e.g. the list of reward specs
            for x in v:
                if dataclasses.is_dataclass(x):
                    validate(x)
    if hasattr(cfg, "validate"):
        cfg.validate()


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def save_config(cfg, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def describe(cls, prefix: str = "") -> list[str]:
    """One line per field (name, type, default, help) – the documentation ``esorl config``
    prints for a config class."""
    import inspect

    lines = []
    doc = inspect.getdoc(cls) or ""
    if prefix and doc:
        # the section's documentation lives in its docstring (one place, next to the fields)
        lines += [f"# [{prefix.rstrip('.')}] " + ln if i == 0 else "#   " + ln for i, ln in enumerate(doc.splitlines())]
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_dc(tp):
            lines += describe(tp, prefix + f.name + ".")
            continue
        if "config_class" in f.metadata:  # a section kept as a mapping and built later (e.g. TRL's GRPOConfig)
            import importlib

            mod, _, name = f.metadata["config_class"].partition(":")
            lines += describe_fields(getattr(importlib.import_module(mod), name), prefix + f.name + ".")
            continue
        if typing.get_origin(tp) is list and typing.get_args(tp) and _is_dc(typing.get_args(tp)[0]):
            lines += describe(typing.get_args(tp)[0], prefix + f.name + "[].")
            continue
        default = f.default if f.default is not dataclasses.MISSING else (f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")
        h = f.metadata.get("help") or _inherited_help(cls, f.name)
        lines.append(f"{prefix}{f.name}: {getattr(tp, '__name__', str(tp))} = {default!r}" + (f"  # {h}" if h else ""))
    return lines


def _inherited_help(cls, name: str) -> str | None:
    """The help of a field a subclass redeclares only to change its default."""
    for klass in cls.__mro__[1:]:
        f = getattr(klass, "__dataclass_fields__", {}).get(name)
        if f is not None and f.metadata.get("help"):
            return f.metadata["help"]
    return None


def describe_fields(cls, prefix: str) -> list[str]:
    """One line per field of a (``transformers``-style) dataclass whose help is in
    ``metadata["help"]``: name, default, the help's first sentence."""
    lines = [f"# [{prefix.rstrip('.')}] {cls.__module__}.{cls.__name__}"]
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_"):
            continue
        default = f.default if f.default is not dataclasses.MISSING else (f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")
        h = " ".join(str(f.metadata.get("help", "")).split())
        h = h.split(". ")[0][:160]
        lines.append(f"{prefix}{f.name} = {default!r}" + (f"  # {h}" if h else ""))
    return lines


class _RenamedFlag:
    """argparse action of a flag an earlier esorl had: using it is a usage error naming the new flag."""

    def __new__(cls, *args, **kwargs):
        import argparse

        class Renamed(argparse.Action):
            def __init__(self, option_strings, dest, new="", **kw):
                kw.pop("nargs", None)
                super().__init__(option_strings, dest, nargs="?", help=argparse.SUPPRESS, **kw)
                self.new = new

            def __call__(self, parser, namespace, values, option_string=None):
                parser.error(f"{option_string} was renamed to {self.new} (one name per setting: the recipes' field names)")

        return Renamed(*args, **kwargs)


def add_renamed_flags(parser, renamed: dict[str, str]) -> None:
    """Refuse each old flag of ``renamed`` (``{"--steps": "--diffusion-steps"}``) with a usage
    error naming its new name (exit 2, before any work)."""
    for old, new in renamed.items():
        parser.add_argument(old, action=_RenamedFlag, new=new, dest=f"_renamed{old.replace('-', '_')}")


#: the sampling flags of ``esorl sample`` / ``score`` / ``eval`` before they took the recipes' names
RENAMED_SAMPLING_FLAGS = {"--alpha0": "--sampling-alpha0", "--steps": "--diffusion-steps", "--max-new-tokens": "--max-completion-length",
                          "--num-samples": "--num-generations", "--samples": "--num-generations"}


def recipe_argparser(prog: str, description: str, example: str = ""):
    """The CLI shape every recipe command shares: ``--config``, ``--resume [DIR]``, overrides.
    ``example``: an override shown in the help (one that exists in this command's config)."""
    import argparse

    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", help="recipe YAML (see recipes/); required unless --defaults")
    p.add_argument("--defaults", action="store_true", help="run on the built-in defaults of every field (no recipe file)")
    p.add_argument("--resume", nargs="?", const="latest", default=False,
                   help="resume from the latest checkpoint of the output directory, or from the given checkpoint directory")
    p.add_argument("--overwrite", action="store_true", help="delete the run already in the output directory and start over")
    p.add_argument("overrides", nargs="*", help=f"key=value overrides{', e.g. ' + example if example else ''} (esorl config <command> lists them)")
    return p


def parse_recipe_args(parser, argv):
    """Parse; without ``--config`` (and without ``--defaults``) print the usage and exit 2
    rather than silently starting a run on defaults."""
    a = parser.parse_args(argv)
    if isinstance(a.resume, str) and "=" in a.resume:  # `--resume key=value ...`: an override, not a directory
        a.overrides.insert(0, a.resume)
        a.resume = "latest"
    if a.config is None and not a.defaults:
        parser.print_usage()
        parser.exit(2, f"{parser.prog}: error: --config FILE.yaml is required (or --defaults to run on the built-in defaults)\n")
    if a.config is not None and not Path(a.config).is_file():
        parser.exit(2, f"{parser.prog}: error: --config {a.config}: no such file\n")
    return a
