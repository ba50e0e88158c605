"""Study 'theory': the paper's rank-expressiveness statements, checked in the float64 toy.

Runs `lora_limits.theory.statements` — Proposition 1, multi-fact edits and rank capacity,
Theorem 2 (sum / average of updates / average of factors), Arrow routing, the explicit
bridge — on one seeded toy, and writes to the workdir:
  results.json                      every statement: measured values, named checks, passed
  prop1_trained_vs_closed_form.png  GD-trained rank-one LoRA against the closed form
  accuracy_vs_rank.png              what a rank-r update can store (exact fits, argmax accuracy)
  two_hop_accuracy.png              two-hop accuracy by method, with the chance line
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any

import jax

from experiments import common as exp_common
from experiments import schema
from lora_limits import validate
from lora_limits.theory import kv_model as kv
from lora_limits.theory import statements as st

_READOUTS = ("lstsq", "train")
_SOURCES = ("trained", "closed_form")


@dataclasses.dataclass(frozen=True)
class Prop1Section:
  """The fact edited (entity, relation), to answer + 1; GD tolerances of Proposition 1."""

  entity: int
  relation: int
  cosine_min: float
  relative_error_max: float
  gd: kv.GDConfig

  def __post_init__(self):
    validate.integer("prop1.entity", self.entity, 0)
    validate.integer("prop1.relation", self.relation, 0)
    validate.number("prop1.cosine_min", self.cosine_min, 0, 1, low_open=True)
    validate.number("prop1.relative_error_max", self.relative_error_max, 0, low_open=True)


@dataclasses.dataclass(frozen=True)
class MultiFactSection:
  """m facts edited at once; ranks () means 1..m."""

  n_facts: int
  ranks: tuple[int, ...]
  fit_tolerance: float
  gd: kv.GDConfig

  def __post_init__(self):
    validate.integer("multi_fact.n_facts", self.n_facts, 1)
    for r in self.ranks:
      validate.integer("multi_fact.ranks", r, 1)
    validate.number("multi_fact.fit_tolerance", self.fit_tolerance, 0, low_open=True)


@dataclasses.dataclass(frozen=True)
class TwoHopSection:
  """m chains A→B→C; experts of rank `rank` (0: m), trained by GD or in closed form."""

  n_chains: int
  expert_source: str
  rank: int
  one_hop_min: float
  target_min: float
  bridge_min: float
  gd: kv.GDConfig

  def __post_init__(self):
    validate.integer("two_hop.n_chains", self.n_chains, 1)
    validate.integer("two_hop.rank", self.rank, 0)
    validate.choice("two_hop.expert_source", self.expert_source, _SOURCES)
    for name in ("one_hop_min", "target_min", "bridge_min"):
      validate.number(f"two_hop.{name}", getattr(self, name), 0, 1)


@dataclasses.dataclass(frozen=True)
class ArrowSection:
  top_k: tuple[int, ...]
  temperature: float

  def __post_init__(self):
    if not self.top_k:
      raise ValueError("arrow.top_k must list at least one k")
    for k in self.top_k:
      validate.integer("arrow.top_k", k, 1, 2)  # two experts
    validate.number("arrow.temperature", self.temperature, 0, low_open=True)


@dataclasses.dataclass(frozen=True)
class TheoryStudy:
  """chance_z: 'at chance' means accuracy ≤ 1/N + z·√(p(1−p)/m)."""

  study: str
  seed: int
  toy: kv.KVConfig
  readout: str
  readout_steps: int
  chance_z: float
  prop1: Prop1Section
  multi_fact: MultiFactSection
  two_hop: TwoHopSection
  arrow: ArrowSection

  def __post_init__(self):
    validate.integer("config.seed", self.seed, 0)
    validate.integer("config.readout_steps", self.readout_steps, 1)
    validate.choice("config.readout", self.readout, _READOUTS)
    validate.number("config.chance_z", self.chance_z, 0, low_open=True)
    if self.prop1.entity >= self.toy.n_entities or self.prop1.relation >= self.toy.n_relations:
      raise ValueError(f"prop1 fact ({self.prop1.entity}, {self.prop1.relation}) is outside the "
                       f"toy's {self.toy.n_entities} entities × {self.toy.n_relations} relations")


def run_statements(study: TheoryStudy) -> dict[str, Any]:
  """All statements on one toy (pure apart from compute): name → record."""
  key = jax.random.key(study.seed)
  toy = st.build_toy(jax.random.fold_in(key, 0), study.toy, readout=study.readout,
                     readout_steps=study.readout_steps)
  p1, mf, th = study.prop1, study.multi_fact, study.two_hop
  out: dict[str, Any] = {}
  out["proposition_1"] = st.proposition_1(
      toy, key=jax.random.fold_in(key, 1), entity=p1.entity, relation=p1.relation, gd=p1.gd,
      cosine_min=p1.cosine_min, relative_error_max=p1.relative_error_max)
  out["multi_fact"] = st.multi_fact(
      toy, key=jax.random.fold_in(key, 2), n_facts=mf.n_facts, ranks=list(mf.ranks) or None,
      gd=mf.gd, fit_tolerance=mf.fit_tolerance)
  task = st.make_two_hop(toy, key=jax.random.fold_in(key, 3), n_chains=th.n_chains,
                         expert_source=th.expert_source, rank=th.rank or None, gd=th.gd)
  out["theorem_2"] = st.theorem_2(toy, task, one_hop_min=th.one_hop_min,
                                  target_min=th.target_min, z=study.chance_z)
  for k in study.arrow.top_k:
    out[f"arrow_top{k}"] = st.arrow_in_toy(toy, task, top_k=k,
                                           temperature=study.arrow.temperature, z=study.chance_z)
  out["explicit_bridge"] = st.explicit_bridge(toy, task, min_accuracy=th.bridge_min,
                                              z=study.chance_z)
  return {"base_recall": toy.base_recall, "records": out}


# ----------------------------------------------------------------------------------------
# Plots (matplotlib Agg; only this shell module imports matplotlib).


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def plot_prop1(rec: st.Prop1Record, path: pathlib.Path) -> None:
  plt = _pyplot()
  fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(14, 4))
  cf, tr = rec.closed_form_rows.ravel(), rec.trained_rows.ravel()
  lim = float(max(abs(cf).max(), abs(tr).max())) * 1.1
  ax1.plot([-lim, lim], [-lim, lim], color="0.6", lw=1, label="y = x")
  ax1.scatter(cf, tr, s=6, alpha=0.6, label="ΔW entries, rows i_new and i_old")
  ax1.set(xlabel="closed form (i_new − i_old) hᵀ/‖h‖²", ylabel="rank-1 LoRA trained by GD",
          title=f"cos {rec.trained_cosine:.5f}, rel. err {rec.trained_relative_error:.2%}")
  ax1.legend(fontsize=8)
  ax2.plot(rec.trajectory_steps, rec.trajectory_relative_error, label="relative error")
  ax2.plot(rec.trajectory_steps, 1 - rec.trajectory_cosine, label="1 − cosine")
  ax2.axhline(rec.relative_error_max, color="k", ls=":", lw=1,
              label=f"tolerance {rec.relative_error_max:.0%}")
  ax2.set_yscale("log")
  ax2.set(xlabel="gradient-descent step", ylabel="distance to the closed form",
          title="GD from a small init (trained rank-1 LoRA)")
  ax2.legend(fontsize=8)
  ax3.loglog(rec.init_sweep_scales, rec.init_sweep_relative_error, "o-",
             label="small init N(0, s²)")
  ax3.axhline(rec.peft_init_relative_error, ls="--", color="C3",
              label=f"usual LoRA init (b = 0, a ~ U(±1/√F)): {rec.peft_init_relative_error:.2f}")
  ax3.axhline(rec.relative_error_max, color="k", ls=":", lw=1, label="tolerance")
  ax3.set(xlabel="init scale s", ylabel="relative error after GD",
          title="only a small init finds the minimum-norm edit")
  ax3.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_rank(rec: st.MultiFactRecord, path: pathlib.Path) -> None:
  plt = _pyplot()
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
  m = rec.n_facts
  r = rec.ranks
  ax1.plot(r, rec.accuracy_closed_form, "o-", label="argmax accuracy, best rank-r (closed form)")
  ax1.plot(r, rec.accuracy_trained, "s--", label="argmax accuracy, rank-r LoRA by GD")
  ax1.plot(r, [k / m for k in rec.exact_fits_closed_form], "^:",
           label="facts fitted exactly / m (closed form)")
  ax1.plot(r, [min(x / m, 1.0) for x in r], color="0.5", lw=1, label="bound r/m on exact fits")
  if rec.saturation_rank_closed_form is not None:
    ax1.axvline(rec.saturation_rank_closed_form, color="C0", ls=":", lw=1)
  ax1.set(xlabel="LoRA rank r", ylabel="fraction of the m edited facts", ylim=(-0.03, 1.03),
          title=f"m = {m} independent facts")
  ax1.legend(fontsize=7)
  ax2.plot(r, rec.eckart_young_residual, color="0.3", lw=2, label="Eckart–Young √(Σ_{i>r} σ_i²)")
  ax2.plot(r, rec.residual_closed_form, "o", ms=4, label="best rank-r edit")
  ax2.plot(r, rec.residual_trained, "s", ms=3, mfc="none", label="rank-r LoRA by GD")
  ax2.set(xlabel="LoRA rank r", ylabel="‖(W + ΔW) K − T_new‖_F", title="residual")
  ax2.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def two_hop_bars(records: dict[str, Any]) -> list[tuple[str, float, float | None]]:
  """(label, two-hop accuracy (answer C), fraction answering the bridge B or None) by method."""
  th: st.Theorem2Record = records["theorem_2"]
  acc, bridge = th.two_hop_accuracy, th.two_hop_answers_bridge
  named = [("base", "base"), ("expert 1 (A→B)", "expert_1"), ("expert 2 (B→C)", "expert_2"),
           ("sum", "sum"), ("mean of updates", "mean_updates"),
           ("mean of factors", "mean_factors")]
  bars = [(label, acc[k], bridge[k]) for label, k in named]
  for name, rec in records.items():
    if name.startswith("arrow_top"):
      bars.append((f"Arrow top-{rec.top_k}", rec.two_hop_accuracy, rec.two_hop_answers_bridge))
  bars += [("target adapter (A→C)", acc["target_adapter"], bridge["target_adapter"]),
           ("library + target", acc["library_plus_target"], bridge["library_plus_target"]),
           ("sum, bridge stated (CoT)", records["explicit_bridge"].chain_accuracy, None)]
  return bars


def plot_two_hop(records: dict[str, Any], path: pathlib.Path) -> None:
  plt = _pyplot()
  th: st.Theorem2Record = records["theorem_2"]
  bars = two_hop_bars(records)
  x = list(range(len(bars)))
  fig, ax = plt.subplots(figsize=(11, 4.5))
  ax.bar([i - 0.2 for i in x], [v for _, v, _ in bars], width=0.4, color="C2",
         label="answers C (composed, correct)")
  ax.bar([i + 0.2 for i in x], [b or 0.0 for _, _, b in bars], width=0.4, color="C7",
         label="answers B (the bridge)")
  for i, (_, v, _) in enumerate(bars):
    ax.text(i - 0.2, v + 0.01, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
  ax.axhline(th.chance, color="k", ls="--", lw=1, label=f"chance 1/N = {th.chance:.3f}")
  ax.axhline(th.chance_bound, color="k", ls=":", lw=1,
             label=f"chance bound ({th.n_chains} chains) = {th.chance_bound:.3f}")
  ax.set_xticks(x, [b for b, _, _ in bars], rotation=30, ha="right", fontsize=8)
  ax.set(ylabel="fraction of two-hop prompts", ylim=(0, 1.4),
         title=f"Two-hop prompt 'A REL1 REL2' in the toy: {th.n_chains} chains, "
               f"{th.n_entities} entities, {th.expert_source} experts")
  ax.legend(fontsize=8, loc="upper center", ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(config, workdir: pathlib.Path) -> None:
  study = schema.build(TheoryStudy, config, "config")
  workdir = pathlib.Path(workdir)
  start = time.time()
  with exp_common.stage("statements"):
    result = run_statements(study)
  records = result["records"]
  with exp_common.stage("plots"):
    plot_prop1(records["proposition_1"], workdir / "prop1_trained_vs_closed_form.png")
    plot_rank(records["multi_fact"], workdir / "accuracy_vs_rank.png")
    plot_two_hop(records, workdir / "two_hop_accuracy.png")
  statements = {name: rec.to_dict() for name, rec in records.items()}
  failed = {name: [c for c, ok in rec.checks.items() if not ok]
            for name, rec in records.items() if not rec.passed}
  out = {"config": schema.to_dict(study), "base_recall": result["base_recall"],
         "statements": statements, "all_passed": not failed, "failed_checks": failed,
         "two_hop_accuracy_by_method": {label: v for label, v, _ in two_hop_bars(records)},
         "seconds": round(time.time() - start, 2)}
  exp_common.write_json(workdir / "results.json", out)
  for name, rec in records.items():
    exp_common.log(f"{name}: {'PASS' if rec.passed else 'FAIL ' + ', '.join(failed[name])}")
  summary = {name: {"passed": rec.passed} for name, rec in records.items()}
  summary["two_hop_accuracy_by_method"] = out["two_hop_accuracy_by_method"]
  print(json.dumps(summary, indent=2))
