"""Strict conversion of plain data (YAML, JSON, CLI) into frozen dataclasses.

Unknown keys and wrong types raise ``ConfigError`` naming the dotted path and the valid
choices. Supported annotations: bool, int, float, str, Any, Literal, Optional/union with
None, list[X], tuple[X, ...], tuple[X, Y], dict[str, X] and nested dataclasses.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from typing import Any, Literal, Union

from mmpretrain.registry import RegistryError

_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


class ConfigError(ValueError):
    """A config value or key is invalid; the message names the dotted path."""


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{path or cls.__name__}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), list(fields), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown key {_join(path, key)!r}.{hint} Valid keys: {', '.join(fields)}")
    kwargs = {name: convert(hints[name], value, _join(path, name)) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{path or cls.__name__}: {exc}") from None
    except ConfigError as exc:  # raised by the dataclass's own __post_init__ checks
        raise ConfigError(f"{path}.{exc}" if path else str(exc)) from None


def convert(tp: Any, value: Any, path: str) -> Any:
    """Check/convert ``value`` against annotation ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin in (Union, types.UnionType):
        return _convert_union(args, value, path)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        return [convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        return _convert_tuple(args, value, path)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        return {str(k): convert(args[1], v, f"{path}.{k}") for k, v in value.items()}
    return _convert_scalar(tp, value, path)


def _convert_union(args: tuple, value: Any, path: str) -> Any:
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{path}: may not be null")
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return convert(arg, value, path)
        except ConfigError as exc:
            errors.append(str(exc))
    raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} matches none of: " + "; ".join(errors))


def _convert_tuple(args: tuple, value: Any, path: str) -> tuple:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
    if len(value) != len(args):
        raise ConfigError(f"{path}: expected {len(args)} items, got {len(value)}")
    return tuple(convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))


def _convert_scalar(tp: Any, value: Any, path: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_RE.match(value):  # YAML 1.1 reads "1e-3" as a string
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise ConfigError(f"{path}: unsupported annotation {tp!r}")
    raise ConfigError(f"{path}: expected {tp.__name__}, got {type(value).__name__} {value!r}")


def to_dict(obj: Any) -> Any:
    """Dataclass tree -> plain YAML-safe data (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def check_params(registry: Any, name: str, params: dict, where: str) -> None:
    """``name`` is registered in ``registry`` and ``params`` fit its config dataclass (or are empty)."""

    try:
        entry = registry.get(name)
    except RegistryError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    typed_params(entry, params, where)


def typed_params(entry: Any, params: Any, where: str) -> Any:
    """A registry entry's ``params`` (a mapping, or already its config dataclass) as its config dataclass
    (``from_dict``: unknown keys and wrong types refused, naming ``where.params``); None for an entry
    without a config class, which refuses any params. The one conversion builders and checks share."""
    if entry.config_cls is not None:
        return from_dict(entry.config_cls, params, f"{where}.params")
    if params:
        raise ConfigError(f"{where}.params: {entry.name!r} takes no parameters")
    return None
