"""Path utilities for plain nested-dict parameter trees ('/'-joined string paths)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{'a': {'b': x}} -> {'a/b': x}. Only Mappings are descended into."""
  out: dict[str, Any] = {}
  for key, value in tree.items():
    path = f"{prefix}/{key}" if prefix else str(key)
    if isinstance(value, Mapping):
      out.update(flatten(value, path))
    else:
      out[path] = value
  return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """{'a/b': x} -> {'a': {'b': x}}."""
  out: dict[str, Any] = {}
  for path, value in flat.items():
    node = out
    *parents, leaf = path.split("/")
    for part in parents:
      node = node.setdefault(part, {})
      if not isinstance(node, dict):
        raise ValueError(f"path {path!r} conflicts with a leaf at {part!r}")
    node[leaf] = value
  return out


def get(tree: Mapping[str, Any], path: str) -> Any:
  node: Any = tree
  for part in path.split("/"):
    if not isinstance(node, Mapping) or part not in node:
      raise KeyError(f"no parameter at path {path!r}")
    node = node[part]
  return node


def replace(tree: Mapping[str, Any], updates: Mapping[str, Any]) -> dict[str, Any]:
  """A copy of `tree` with the leaves at the given paths replaced (paths must exist)."""
  flat = flatten(tree)
  for path in updates:
    if path not in flat:
      raise KeyError(f"no parameter at path {path!r}")
  flat.update(updates)
  return unflatten(flat)
