"""The house vocabulary for refusing bad input, used by library and experiments code alike.

Each check returns nothing and raises a `ValueError` in one form, `<field>=<value> must be
<what is allowed>` (`"KVConfig.d_ff=0 must be an int >= 1"`), so every message names the
field, the value it got and what it accepts. `field` is the name the caller knows the value
by: `Record.field` in a config record's `__post_init__`, `section.field` in an experiments
section, the argument's own name in a function.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def _bounds(low, high, low_open: bool = False, high_open: bool = False) -> str:
  if low is not None and high is not None:
    return f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
  if low is not None:
    return f" {'>' if low_open else '>='} {low}"
  if high is not None:
    return f" {'<' if high_open else '<='} {high}"
  return ""


def integer(field: str, value: Any, low: int | None = None, high: int | None = None) -> None:
  """An int (a NumPy integer too, never a bool) in [low, high] (None: unbounded)."""
  ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
  if not ok or (low is not None and value < low) or (high is not None and value > high):
    raise ValueError(f"{field}={value!r} must be an int{_bounds(low, high)}")


def number(field: str, value: Any, low: float | None = None, high: float | None = None, *,
           low_open: bool = False, high_open: bool = False) -> None:
  """A finite int or float (never a bool) between low and high; an open end excludes it."""
  ok = (isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
        and math.isfinite(value))
  ok = ok and (low is None or (value > low if low_open else value >= low))
  ok = ok and (high is None or (value < high if high_open else value <= high))
  if not ok:
    raise ValueError(f"{field}={value!r} must be a finite number"
                     f"{_bounds(low, high, low_open, high_open)}")


def choice(field: str, value: Any, allowed: Sequence[str]) -> None:
  """One of the strings in `allowed`."""
  if not isinstance(value, str) or value not in allowed:
    raise ValueError(f"{field}={value!r} is not one of {list(allowed)}")


def boolean(field: str, value: Any) -> None:
  """True or False (not 0/1)."""
  if not isinstance(value, bool):
    raise ValueError(f"{field}={value!r} must be a bool")
