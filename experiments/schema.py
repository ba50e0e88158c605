"""ConfigDict → typed, frozen dataclasses, validated at the edge before any compute.

`build(Cls, config, "config")` walks the dataclass fields: unknown keys, missing required
keys, wrong types, non-finite floats and the dataclass's own range checks (its
`__post_init__`) all become one `ConfigError` naming the field path, the value and what is
allowed. The library only ever sees the dataclasses.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
  """A config field has a bad key, type or value."""


def _as_mapping(value: Any) -> Mapping[str, Any] | None:
  if isinstance(value, Mapping):
    return value
  if hasattr(value, "to_dict") and hasattr(value, "keys"):  # ml_collections.ConfigDict
    return value.to_dict()
  return None


def build(cls: type[T], config: Any, path: str = "config") -> T:
  mapping = _as_mapping(config)
  if mapping is None:
    raise ConfigError(f"{path} must be a mapping of fields for {cls.__name__}, got {config!r}")
  hints = typing.get_type_hints(cls)
  fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
  unknown = sorted(set(mapping) - set(fields))
  if unknown:
    raise ConfigError(f"{path}: unknown key(s) {unknown}; allowed keys: {sorted(fields)}")
  missing = sorted(n for n, f in fields.items() if n not in mapping
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
  if missing:
    raise ConfigError(f"{path}: missing required key(s) {missing}")
  kwargs = {name: convert(value, hints[name], f"{path}.{name}") for name, value in mapping.items()}
  try:
    return cls(**kwargs)
  except ConfigError:
    raise
  except (ValueError, TypeError) as e:
    raise ConfigError(f"{path}: {e}") from e


def convert(value: Any, typ: Any, path: str) -> Any:
  """`value` checked against the annotation `typ` (no silent coercion beyond int → float)."""
  origin = typing.get_origin(typ)
  args = typing.get_args(typ)
  if typ is Any:
    return value
  if origin in (typing.Union, types.UnionType):
    if value is None and type(None) in args:
      return None
    errors = []
    for arg in args:
      if arg is type(None):
        continue
      try:
        return convert(value, arg, path)
      except ConfigError as e:
        errors.append(str(e))
    raise ConfigError(errors[0] if len(errors) == 1 else
                      f"{path}={value!r} matches none of {[_name(a) for a in args]}")
  if origin is typing.Literal:
    if value not in args:
      raise ConfigError(f"{path}={value!r} is not one of {list(args)}")
    return value
  if dataclasses.is_dataclass(typ):
    return build(typ, value, path)
  if origin is tuple:
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f"{path} must be a list/tuple, got {type(value).__name__} {value!r}")
    if len(args) == 2 and args[1] is Ellipsis:
      return tuple(convert(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
    if len(args) != len(value):
      raise ConfigError(f"{path} must have {len(args)} items, got {len(value)}")
    return tuple(convert(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(args, value)))
  if origin in (dict, Mapping) or typ is dict:
    m = _as_mapping(value)
    if m is None:
      raise ConfigError(f"{path} must be a mapping, got {value!r}")
    return dict(m)
  if typ is bool:
    if not isinstance(value, bool):
      raise ConfigError(f"{path} must be a bool, got {type(value).__name__} {value!r}")
    return value
  if typ is int:
    if isinstance(value, bool) or not isinstance(value, int):
      raise ConfigError(f"{path} must be an int, got {type(value).__name__} {value!r}")
    return value
  if typ is float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(f"{path} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
      # NaN slips through every `x < 0` range check and inf through every `x > 0` one.
      raise ConfigError(f"{path} must be a finite number, got {value!r}")
    return float(value)
  if typ is str:
    if not isinstance(value, str):
      raise ConfigError(f"{path} must be a string, got {type(value).__name__} {value!r}")
    return value
  return value


def _name(t: Any) -> str:
  return getattr(t, "__name__", str(t))


def to_dict(obj: Any) -> Any:
  """A dataclass tree as plain JSON-able dicts/lists."""
  if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
    return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
  if isinstance(obj, (list, tuple)):
    return [to_dict(x) for x in obj]
  if isinstance(obj, Mapping):
    return {str(k): to_dict(v) for k, v in obj.items()}
  return obj
