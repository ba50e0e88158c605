"""Per-seed unit files: a finished seed's records, trusted only with their count and hash."""

from __future__ import annotations

import hashlib
import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from experiments import common


def _unit_meta(unit: pathlib.Path) -> pathlib.Path:
  return unit.with_name(unit.name + ".meta.json")


def unit_path(workdir: pathlib.Path, task: str, seed: int) -> pathlib.Path:
  return workdir / "units" / f"{task}-seed{seed}.jsonl"


def config_key(config: Mapping[str, Any]) -> str:
  """A digest of everything a seed's records depend on in the study config (not the list of
  seeds, not where the cache lives)."""
  kept = {k: v for k, v in config.items() if k not in ("seeds", "cache_dir")}
  return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_unit(unit: pathlib.Path, records: Sequence[Mapping[str, Any]],
               key: str | None = None) -> None:
  """One seed's records, then (only once they are on disk) their count, SHA-256 and the
  config key they were computed with (on the writing process only)."""
  if not common.is_writer():
    return
  common.write_jsonl(unit, records)
  digest = hashlib.sha256(unit.read_bytes()).hexdigest()
  meta = {"records": len(records), "sha256": digest}
  if key is not None:
    meta["config_key"] = key
  common.write_json(_unit_meta(unit), meta)


def read_unit(unit: pathlib.Path, key: str | None = None) -> list[dict[str, Any]] | None:
  """A finished seed's records; None if the seed never finished (no unit, or no meta yet:
  the run died between the two writes) or, given `key`, was computed with another config
  (its records would be stale; the caller recomputes it). A unit that disagrees with its
  meta is refused."""
  meta_path = _unit_meta(unit)
  if not unit.exists() or not meta_path.exists():
    return None
  if key is not None:
    try:
      stored = json.loads(meta_path.read_text()).get("config_key")
    except ValueError:
      stored = None  # damaged meta: refused below
    if stored is not None and stored != key:
      common.log(f"{unit} was computed with another config (key {stored}, now {key}); "
                 "recomputing that seed")
      return None
  try:
    meta = json.loads(meta_path.read_text())
    expected, count = meta["sha256"], meta["records"]
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{meta_path} is damaged ({e}); delete it and {unit.name} to rerun "
                     "that seed") from e
  if hashlib.sha256(unit.read_bytes()).hexdigest() != expected:
    raise ValueError(f"{unit} does not match its SHA-256 in {meta_path.name} (truncated or "
                     "edited); delete both to rerun that seed")
  records = common.read_jsonl(unit)
  if len(records) != count:
    raise ValueError(f"{unit} holds {len(records)} records, {meta_path.name} says {count}")
  return records


def assemble(workdir: pathlib.Path, task: str, seeds: Sequence[int]) -> pathlib.Path | None:
  """`results.jsonl` from the units of every seed, in `seeds` order; None (nothing written)
  while a seed has no finished unit (another shard's), and on processes that do not write."""
  if not common.is_writer():
    return None
  records, missing = [], []
  for seed in seeds:
    done = read_unit(unit_path(workdir, task, seed))
    if done is None:
      missing.append(seed)
    else:
      records += done
  if missing:
    common.log(f"seeds {missing} have no finished unit in {workdir / 'units'} yet (other "
               "shards run them); results.jsonl is assembled when the last shard finishes, "
               f"or by `python -m experiments.studies.recycling.report {workdir}`")
    return None
  results = workdir / "results.jsonl"
  common.write_jsonl(results, records)
  common.log(f"{len(records)} records in {results}")
  return results
