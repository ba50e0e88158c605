"""Synthetic worlds: k-hop facts with familiarity tiers, and skill-split word problems.

`build(settings)` returns a `World` (corpus, splits per group, recall probes, leak rules)
for `TwoHopConfig` or `MathConfig`; both worlds share split names (see `common`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lora_limits.tasks import common, corpus, math_word, two_hop
from lora_limits.tasks.common import Example, LeakRules, World, content_hash, manifest
from lora_limits.tasks.corpus import LeakError, check_no_leak, exposure_report
from lora_limits.tasks.math_word import MathConfig
from lora_limits.tasks.two_hop import Relation, TwoHopConfig

KINDS = ("two_hop", "math")


def build(settings: TwoHopConfig | MathConfig) -> World:
  """The world described by `settings` (deterministic in its seed)."""
  if isinstance(settings, TwoHopConfig):
    return two_hop.build(settings)
  if isinstance(settings, MathConfig):
    return math_word.build(settings)
  raise ValueError(f"build needs TwoHopConfig or MathConfig, got {type(settings).__name__}")


def settings_from_dict(kind: str, d: Mapping[str, Any]) -> TwoHopConfig | MathConfig:
  """Typed settings of world `kind` from a plain mapping (unknown keys are an error)."""
  if kind == "two_hop":
    return TwoHopConfig.from_dict(d)
  if kind == "math":
    return MathConfig.from_dict(d)
  raise ValueError(f"world kind {kind!r} is not one of {list(KINDS)}")


__all__ = ["KINDS", "Example", "LeakError", "LeakRules", "MathConfig", "Relation",
           "TwoHopConfig", "World", "build", "check_no_leak", "common", "content_hash",
           "corpus", "exposure_report", "manifest", "math_word", "settings_from_dict",
           "two_hop"]
