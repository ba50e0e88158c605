"""Study 'sweep': the recycling study repeated over the values of one config field.

`config.sweep.field` is a dotted path into the study config (`adapters.rank`,
`recycle.distractors`, `world.fact_exposure`, ...), `config.sweep.values` its values;
`config.base` is a whole 'recycling' config. Every value runs the whole recycling study into
`<workdir>/runs/<field>=<value>/`, sharing one cache, so values that leave the world and base
model unchanged (rank, library size) pretrain once per seed. Outputs: `sweep_results.jsonl`
(every record plus `sweep_field` and `sweep_value`), `sweep.md` and `sweep.png` (accuracy vs
value per method, 2-combination library, with intervals and chance).

Sharded (`experiments.run --num_shards`, or a SLURM array job), each job runs its share of
the (value, seed) units; the last to finish writes the outputs, or `python -m
experiments.studies.recycling.report W` merges them from `sweep.json` and the units.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from experiments import common, distributed, schema
from experiments.studies import recycling
from experiments.studies.recycling import report, units as units_lib

_SPLITS = ("test_two_hop_direct", "test_two_hop_cot", "test_hop1", "test_hop2")


@dataclasses.dataclass(frozen=True)
class SweepSection:
  field: str
  values: tuple[Any, ...]

  def __post_init__(self):
    if not self.values:
      raise ValueError("sweep.values must list at least one value")
    if len(set(map(repr, self.values))) != len(self.values):
      raise ValueError(f"sweep.values repeat: {self.values}")


@dataclasses.dataclass(frozen=True)
class SweepStudy:
  study: str
  sweep: SweepSection
  base: dict


def with_value(base: Mapping[str, Any], field: str, value: Any) -> dict[str, Any]:
  """A copy of the base config dict with `field` (dotted) set to `value`."""
  out = copy.deepcopy(dict(base))
  node = out
  *parents, leaf = field.split(".")
  for part in parents:
    if not isinstance(node.get(part), dict):
      raise schema.ConfigError(f"sweep.field={field!r}: {part!r} is not a section of the base "
                               "config")
    node = node[part]
  if leaf not in node and not (parents and parents[0] == "world"):
    raise schema.ConfigError(f"sweep.field={field!r}: {leaf!r} is not a field of the base config")
  node[leaf] = value
  return out


def parse(config: Any) -> tuple[SweepStudy, list[recycling.RecyclingStudy]]:
  cfg = schema.build(SweepStudy, config, "config")
  base = schema.convert(cfg.base, dict, "config.base")
  studies = []
  for value in cfg.sweep.values:
    d = with_value(base, cfg.sweep.field, value)
    studies.append(schema.build(recycling.RecyclingStudy, d,
                                f"config.base (with {cfg.sweep.field}={value!r})"))
  return cfg, studies


def units(studies: Sequence[recycling.RecyclingStudy]) -> list[tuple[int, int]]:
  """The sweep's independent units, (value index, seed), value by value."""
  return [(i, seed) for i, study in enumerate(studies) for seed in study.seeds]


def main(config, workdir: pathlib.Path) -> None:
  cfg, studies = parse(config)
  cache = str(workdir / "cache")
  runs = [f"{cfg.sweep.field}={value}" for value in cfg.sweep.values]
  common.write_json(workdir / "sweep.json", {"field": cfg.sweep.field, "runs": runs,
                                             "values": list(cfg.sweep.values)})
  mine = distributed.mine(units(studies))  # all of them unless sharded
  for i, (value, study) in enumerate(zip(cfg.sweep.values, studies)):
    if not study.cache_dir:
      study = dataclasses.replace(study, cache_dir=cache)
    run_dir = workdir / "runs" / runs[i]
    run_dir.mkdir(parents=True, exist_ok=True)
    with common.stage(f"sweep {cfg.sweep.field}={value}"):
      recycling.run(study, run_dir, seeds=[seed for j, seed in mine if j == i])
  # Once more now: another shard may have finished a value since this one passed it.
  if all([units_lib.assemble(workdir / "runs" / run, study.task, study.seeds) is not None
          for run, study in zip(runs, studies)]):  # else other shards run the rest
    merge(workdir)


def merge(workdir: pathlib.Path) -> pathlib.Path:
  """`sweep_results.jsonl`, `sweep.md` and `sweep.png` from every value's `results.jsonl`."""
  spec = json.loads((workdir / "sweep.json").read_text())
  field, values = spec["field"], spec["values"]
  records = []
  for run, value in zip(spec["runs"], values):
    for r in common.read_jsonl(workdir / "runs" / run / "results.jsonl"):
      records.append(dict(r, sweep_field=field, sweep_value=value))
  out = workdir / "sweep_results.jsonl"
  common.write_jsonl(out, records)
  write_sweep_report(workdir, records, field, values)
  return out


def _curves(records, library: str, split: str, values):
  """{method: (mean [V], lo [V], hi [V])} and the chance level for one library and split."""
  by_value = {v: [r for r in records if r["sweep_value"] == v] for v in values}
  methods = sorted({r["method"] for r in records if r["library"] == library and r["split"] == split})
  curves = {}
  for m in methods:
    cells = []
    for v in values:
      agg = report.aggregate([r for r in by_value[v] if r["library"] == library
                              and r["method"] == m and r["split"] == split])
      # Pool the tiers: one cell per (value, method) — mean of the per-tier means.
      cells.append((np.mean([c["mean"] for c in agg.values()]) if agg else np.nan,
                    np.mean([c["lo"] for c in agg.values()]) if agg else np.nan,
                    np.mean([c["hi"] for c in agg.values()]) if agg else np.nan))
    curves[m] = tuple(np.array(x) for x in zip(*cells))
  chance = [r["chance"] for r in records if r["split"] == split and r.get("chance") is not None]
  return curves, (float(np.mean(chance)) if chance else None)


def write_sweep_report(workdir: pathlib.Path, records, field: str, values) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  splits = [s for s in _SPLITS if any(r["split"] == s for r in records)]
  fig, axes = plt.subplots(1, len(splits), figsize=(5.5 * len(splits), 4.2), squeeze=False)
  numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
  xs = np.array(values, float) if numeric else np.arange(len(values))
  lines = [f"# Sweep over `{field}`", "",
           f"Values {values}; accuracy is the mean over tiers of the per-tier mean over seeds "
           "(intervals: the same average of the per-tier 95% bounds). Full records: "
           "`sweep_results.jsonl`; each value's own report: `runs/<field>=<value>/report.md`.", ""]
  for ax, split in zip(axes[0], splits):
    curves, chance = _curves(records, "two", split, values)
    for ctrl in ("target", "union"):
      c, _ = _curves(records, "single", split, values)
      if ctrl in c:
        ax.plot(xs, c[ctrl][0], ":", color="gray", label=f"{ctrl} adapter")
    for m, (mean, lo, hi) in curves.items():
      ax.errorbar(xs, mean, yerr=[mean - lo, hi - mean], marker="o", ms=3, capsize=2, label=m)
    if chance is not None:
      ax.axhline(chance, color="black", ls="--", lw=1, label="chance")
    if numeric and min(xs) > 0 and max(xs) / min(xs) >= 8:
      ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(v) for v in values])
    ax.set_ylim(0, 1.05)
    ax.set_xlabel(field)
    ax.set_ylabel("exact match (mean over tiers)")
    ax.set_title(f"2-combination: {split.removeprefix('test_')}")
    ax.legend(fontsize=6)
    lines += [f"## {split.removeprefix('test_')} (2-combination library)", "",
              "| method | " + " | ".join(str(v) for v in values) + " |",
              "|---|" + "---|" * len(values)]
    for m, (mean, _, _) in curves.items():
      lines.append(f"| {m} | " + " | ".join(f"{x:.2f}" for x in mean) + " |")
    lines.append("")
  fig.tight_layout()
  fig.savefig(workdir / "sweep.png", dpi=110)
  plt.close(fig)
  lines += ["![sweep](sweep.png)", ""]
  common.atomic_write_text(workdir / "sweep.md", "\n".join(lines) + "\n")
