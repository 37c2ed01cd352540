"""Typed dataclasses from YAML mappings and dotted command-line overrides, checked key by key: an unknown key or a
value of the wrong type is a `ConfigError` naming the key and where it came from (the file, or the command line).
The stage configs themselves are in `distributed_pt.config`."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key and where it came from."""


def build(cls: type, raw: Any, prefix: str, source: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            raise ConfigError(f"{source}: unknown key '{prefix}{key}' (valid keys here: {', '.join(sorted(names))})")
    kwargs = {}
    for key, value in raw.items():
        kwargs[key] = _coerce(hints[key], value, f"{prefix}{key}", source)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp`; convert lists to tuples, ints to floats, dicts to dataclasses."""
    if dataclasses.is_dataclass(tp):
        return build(tp, {} if value is None else value, key + ".", source)  # an empty section keeps defaults
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, key, source)
            except ConfigError:
                pass
        raise ConfigError(f"{source}: '{key}' expects {_name(tp)}, got {value!r}")
    if origin is Literal:
        # YAML reads true/false as bools; accept them for literals spelled "true"/"false".
        if isinstance(value, bool) and str(value).lower() in args:
            return str(value).lower()
        if value not in args:
            raise ConfigError(f"{source}: '{key}' must be one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{source}: '{key}' expects a list, got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"{source}: '{key}' expects a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, f"{key}[{i}]", source) for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' expects a mapping, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-4" as a string
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ConfigError(f"{source}: '{key}' expects {tp.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _accepts_dict(tp: Any) -> bool:
    return typing.get_origin(tp) is dict or any(typing.get_origin(a) is dict for a in typing.get_args(tp))


def apply_override(cfg: Any, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"command line: override '{item}' must look like key.sub=value")
    dotted, text = item.split("=", 1)
    value = yaml.safe_load(text) if text else ""
    parts = dotted.split(".")
    obj: Any = cfg
    for i, part in enumerate(parts[:-1]):
        if isinstance(obj, dict):
            obj = obj.setdefault(part, {})
            continue
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
            raise ConfigError(f"command line: unknown key '{'.'.join(parts[: i + 1])}' in override '{item}'")
        child = getattr(obj, part)
        if child is None and _accepts_dict(typing.get_type_hints(type(obj))[part]):
            child = {}  # an optional dict section such as model.init_config
            setattr(obj, part, child)
        if not (isinstance(child, dict) or dataclasses.is_dataclass(child)):
            raise ConfigError(f"command line: '{'.'.join(parts[: i + 1])}' has no sub-keys (override '{item}')")
        obj = child
    last = parts[-1]
    if isinstance(obj, dict):
        obj[last] = value
        return
    fields = {f.name: f for f in dataclasses.fields(obj)}
    if last not in fields:
        raise ConfigError(f"command line: unknown key '{dotted}' (valid keys here: {', '.join(sorted(fields))})")
    hint = typing.get_type_hints(type(obj))[last]
    setattr(obj, last, _coerce(hint, value, dotted, "command line"))
