"""`python -m experiments.studies.recycling.report W`: report.md and figures from W/results.jsonl alone.

When the study ran in shards (`experiments.run --num_shards`), results.jsonl is first
assembled from the shards' per-seed units in W/units/ if it is missing or older than one;
for a sweep workdir (W/sweep.json), each value's results, then sweep_results.jsonl and
sweep.md.

Aggregates the tidy records over seeds (mean and a 95% interval: the wider of Student t over
seeds and Wilson over the pooled examples), draws
figure (a) library-level vs expert-level accuracy on tier H by method and figure (b)
accuracy by familiarity tier for each recycling method, with chance lines and intervals,
and writes a "what this shows" paragraph computed from the numbers.
"""

from __future__ import annotations

import collections
import pathlib
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from experiments import common
from experiments import verdicts

TIER_MECHANISM = {"two_hop": (
    "The tiers share one pretraining corpus and differ only in what it holds about their "
    "entities. **F**: nothing — their names appear only in fact-free copy texts (\"echo X . "
    "X\"), so each is a trained token with no fact. **H**: the same, plus unrelated "
    "background sentences (\"X likes tea .\"): the entity is familiar, its facts are not. "
    "**R**: the background and both hop facts, in statement and question forms, "
    "`fact_exposure` times each (the dose `configs/sweep_exposure.py` sweeps): the facts are "
    "known before any adapter. No tier ever sees a composed question about its own "
    "entities. So accuracy can differ between tiers only through what the corpus says "
    "about the entities. The `filler` columns are the probes of what pretraining taught: "
    "questions about facts seen only as statements (extraction) and chain-of-thought on "
    "fillers never shown a composed question (the procedure, not recall).")}
KEY = ("task", "tier", "library", "method", "answer_format", "split")
TIER_ORDER = ("F", "H", "R", "filler", "math", "all")
CONTROL_ORDER = ("base", "hop1", "hop2", "target", "union", "all")
LIBRARY_LABEL = {"two": "2-combination", "two_plus_target": "2-combination + target",
                 "single": "single adapter", "none": "no adapter"}
REQUIRED = ("task", "tier", "library", "method", "answer_format", "split", "seed", "accuracy",
            "n", "chance")


def aggregate(records: Iterable[Mapping[str, Any]]) -> dict[tuple, dict[str, Any]]:
  """{KEY tuple: {mean, lo, hi, seeds, n, chance, bridge}} over seeds."""
  groups: dict[tuple, list[Mapping[str, Any]]] = collections.defaultdict(list)
  for r in records:
    groups[tuple(r[k] for k in KEY)].append(r)
  out = {}
  for key, rs in groups.items():
    # Seeds vary world, init and data order: the t-interval over seeds carries that variance;
    # the pooled Wilson interval keeps it honest when the seeds happen to agree.
    mean, lo, hi = verdicts.interval([r["accuracy"] for r in rs], [r["n"] for r in rs])
    chance = [r["chance"] for r in rs if r.get("chance") is not None]
    majority = [r["majority"] for r in rs if r.get("majority") is not None]
    bridge = [r["bridge_accuracy"] for r in rs if r.get("bridge_accuracy") is not None]
    out[key] = {"mean": mean, "lo": lo, "hi": hi, "seeds": len(rs),
                "n": int(sum(r["n"] for r in rs)),
                "chance": float(np.mean(chance)) if chance else None,
                "majority": float(np.mean(majority)) if majority else None,
                "bridge": float(np.mean(bridge)) if bridge else None,
                "data_free": all(r.get("data_free", True) for r in rs)}
  return out


def _fmt(cell: Mapping[str, Any] | None) -> str:
  if cell is None:
    return "–"
  return f"{cell['mean']:.2f} [{cell['lo']:.2f}, {cell['hi']:.2f}]"


def _tiers(agg: Mapping[tuple, Any], task: str) -> list[str]:
  tiers = {k[1] for k in agg if k[0] == task and k[1] != "all"}
  return sorted(tiers, key=lambda t: TIER_ORDER.index(t) if t in TIER_ORDER else 99)


def _methods(agg: Mapping[tuple, Any], task: str, library: str) -> list[str]:
  seen = []
  for k in agg:
    if k[0] == task and k[2] == library and k[3] not in seen:
      seen.append(k[3])
  return seen


def _test_splits(agg, task) -> list[str]:
  splits = sorted({k[5] for k in agg if k[0] == task and k[5].startswith("test_")})
  hops = [s for s in splits if s.startswith("test_hop")]
  return hops + [s for s in splits if s not in hops]


def table(agg, task: str, rows: Sequence[tuple[str, str]], tiers: Sequence[str],
          splits: Sequence[str]) -> str:
  """Markdown: one row per (library, method), one column per (tier, split)."""
  head = ["library", "method"] + [f"{t}: {s.removeprefix('test_')}" for t in tiers for s in splits]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for library, method in rows:
    cells = []
    for t in tiers:
      for s in splits:
        fmt = "cot" if s.endswith("_cot") else "direct"
        cells.append(_fmt(agg.get((task, t, library, method, fmt, s))))
    label = method + ("" if agg_data_free(agg, task, library, method) else " *")
    lines.append(f"| {LIBRARY_LABEL.get(library, library)} | {label} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def agg_data_free(agg, task, library, method) -> bool:
  cells = [v for k, v in agg.items() if k[0] == task and k[2] == library and k[3] == method]
  return all(c["data_free"] for c in cells)


def chance_row(agg, task, tiers, splits, what: str = "chance") -> str:
  """The chance level (or, what='majority', the majority-answer baseline) per column."""
  cells = []
  for t in tiers:
    for s in splits:
      vals = [v[what] for k, v in agg.items() if k[0] == task and k[1] == t and k[5] == s
              and v.get(what) is not None]
      cells.append(f"{np.mean(vals):.3f}" if vals else "–")
  return f"| {what} | | " + " | ".join(cells) + " |"


# ------------------------------------------------------------------------------ figures


def _plot_setup():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def figure_a(agg, task: str, tier: str, path: pathlib.Path) -> bool:
  """Library-level vs expert-level accuracy on one tier, two-hop direct and CoT panels."""
  splits = [s for s in _test_splits(agg, task) if not s.startswith("test_hop")]
  if not splits or tier not in _tiers(agg, task):
    return False
  plt = _plot_setup()
  fig, axes = plt.subplots(1, len(splits), figsize=(7 * len(splits), 4.8), squeeze=False)
  for ax, split in zip(axes[0], splits):
    fmt = "cot" if split.endswith("_cot") else "direct"
    bars = [("experts", lib, m) for lib in ("none", "single") for m in CONTROL_ORDER
            if (task, tier, lib, m, fmt, split) in agg]
    for lib in ("two", "two_plus_target"):
      bars += [(LIBRARY_LABEL[lib], lib, m) for m in _methods(agg, task, lib)]
    colors = {"experts": "#777777", LIBRARY_LABEL["two"]: "#d62728",
              LIBRARY_LABEL["two_plus_target"]: "#1f77b4"}
    xs = np.arange(len(bars))
    for x, (group, lib, m) in zip(xs, bars):
      c = agg[(task, tier, lib, m, fmt, split)]
      ax.bar(x, c["mean"], color=colors[group], alpha=0.85)
      ax.errorbar(x, c["mean"], yerr=[[c["mean"] - c["lo"]], [c["hi"] - c["mean"]]],
                  color="black", capsize=2, lw=1)
    chance = [v["chance"] for k, v in agg.items() if k[0] == task and k[1] == tier
              and k[5] == split and v["chance"] is not None]
    if chance:
      ax.axhline(np.mean(chance), color="black", ls="--", lw=1, label="chance")
    ax.set_xticks(xs, [m for _, _, m in bars], rotation=70, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("exact match")
    ax.set_title(f"{task}, tier {tier}: {split.removeprefix('test_')}")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    ax.legend(handles + ax.get_legend_handles_labels()[0],
              list(colors) + ax.get_legend_handles_labels()[1], fontsize=7, loc="upper left")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def figure_b(agg, task: str, path: pathlib.Path) -> bool:
  """Accuracy by familiarity tier (x) for each recycling method, per library and format."""
  tiers = _tiers(agg, task)
  splits = [s for s in _test_splits(agg, task) if not s.startswith("test_hop")]
  libs = [lib for lib in ("two", "two_plus_target") if _methods(agg, task, lib)]
  if len(tiers) < 2 or not splits or not libs:
    return False
  plt = _plot_setup()
  fig, axes = plt.subplots(len(splits), len(libs), figsize=(6.5 * len(libs), 4.2 * len(splits)),
                           squeeze=False)
  x = np.arange(len(tiers))
  for i, split in enumerate(splits):
    fmt = "cot" if split.endswith("_cot") else "direct"
    for j, lib in enumerate(libs):
      ax = axes[i][j]
      methods = _methods(agg, task, lib)
      cmap = plt.get_cmap("tab20")
      for n, m in enumerate(methods):
        cells = [agg.get((task, t, lib, m, fmt, split)) for t in tiers]
        mean = [c["mean"] if c else np.nan for c in cells]
        err = [[c["mean"] - c["lo"] if c else 0 for c in cells],
               [c["hi"] - c["mean"] if c else 0 for c in cells]]
        ax.errorbar(x + (n - len(methods) / 2) * 0.02, mean, yerr=err, marker="o", ms=3,
                    capsize=2, lw=1, color=cmap(n % 20), label=m)
      for ctrl, style in (("target", ":"), ("union", "-.")):
        cells = [agg.get((task, t, "single", ctrl, fmt, split)) for t in tiers]
        if all(cells):
          ax.plot(x, [c["mean"] for c in cells], style, color="gray", label=f"{ctrl} adapter")
      chance = [np.mean([v["chance"] for k, v in agg.items() if k[0] == task and k[1] == t
                         and k[5] == split and v["chance"] is not None] or [np.nan])
                for t in tiers]
      ax.plot(x, chance, "k--", lw=1, label="chance")
      ax.set_xticks(x, tiers)
      ax.set_ylim(0, 1.05)
      ax.set_xlabel("familiarity tier (F fictional → R real)")
      ax.set_ylabel("exact match")
      ax.set_title(f"{LIBRARY_LABEL[lib]}: {split.removeprefix('test_')}")
      ax.legend(fontsize=6, ncol=2, loc="upper left")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


# --------------------------------------------------------------------------- narrative


# ------------------------------------------------------------------------------ report


def validate(records: Sequence[Mapping[str, Any]], path: pathlib.Path) -> None:
  if not records:
    raise ValueError(f"{path} holds no records")
  for i, r in enumerate(records, start=1):
    missing = [k for k in REQUIRED if k not in r]
    if missing:
      raise ValueError(f"{path}: record {i} lacks {missing}")


def write_report(workdir: pathlib.Path, results: pathlib.Path | None = None) -> pathlib.Path:
  workdir = pathlib.Path(workdir)
  results = results or workdir / "results.jsonl"
  records = common.read_jsonl(results)
  validate(records, results)
  agg = aggregate(records)
  figures = workdir / "figures"
  figures.mkdir(parents=True, exist_ok=True)
  seeds = sorted({r["seed"] for r in records})
  lines = [f"# lora-limits report", "",
           f"From `{results.name}` ({len(records)} records, seeds {seeds}). Cells: mean exact "
           "match [95% interval] — the wider of the Student t interval over seeds and the "
           "Wilson interval over the pooled examples (Wilson alone for one seed). "
           "`*` marks methods that are not data-free (they use data beyond the adapters: "
           "LoraHub few-shot examples, similarity centroids, or the oracle's gold labels). "
           "Regenerate with `python -m experiments.studies.recycling.report <workdir>`.", ""]
  for task in sorted({r["task"] for r in records}):
    tiers = _tiers(agg, task)
    splits = _test_splits(agg, task)
    lines += [f"## Task: {task}", ""]
    recall = sorted({r.get("base_recall") for r in records if r["task"] == task
                     and r.get("base_recall") is not None})
    if recall:
      lines += [f"Base model recall of the facts its pretraining corpus states (teacher-forced "
                f"exact match, per seed): {', '.join(f'{x:.3f}' for x in recall)}.", ""]
    k = max((int(sp.removeprefix("test_hop")) for sp in splits if sp.startswith("test_hop")),
            default=2)
    if task in TIER_MECHANISM:
      lines += ["### The tiers and what the corpus holds about them", "", TIER_MECHANISM[task],
                ""]
    gates = verdicts.gates_markdown(records, task)
    lines += ["### Gates, per seed", ""] + (gates or ["No gate records (an older run)."]) + [""]
    lines += ["### The paper's claims", ""] + verdicts.claims_markdown(records, task) + [""]
    classes = verdicts.classes_markdown(records, task)
    if classes:
      lines += [f"### Recycled models on tier {verdicts.UNFAMILIAR[task]}: retention and class",
                "", "Retention: held-out one-hop accuracy relative to the experts' (mean over "
                "hops and seeds). Classes: *composes* (CoT interval above the majority "
                "baseline), *keeps the facts but does not compose* (retention >= 0.8), *loses "
                "the facts* (retention < 0.8) — a different failure from the paper's. Methods "
                "whose every record is identical are listed once.", ""] + classes + [""]
    effects = verdicts.side_effects_markdown(records, task, k=k)
    if effects:
      lines += ["### Side effects on what the base model knew (the filler probes)", ""] + \
          effects + [""]
    if figure_a(agg, task, "H" if "H" in tiers else tiers[0], figures / f"{task}_a_tier.png"):
      lines += [f"![figure a](figures/{task}_a_tier.png)", "",
                f"Figure (a): library-level vs expert-level accuracy on tier "
                f"{'H' if 'H' in tiers else tiers[0]}, by method (dashed: chance).", ""]
    if figure_b(agg, task, figures / f"{task}_b_familiarity.png"):
      lines += [f"![figure b](figures/{task}_b_familiarity.png)", "",
                "Figure (b): accuracy by familiarity tier for each recycling method "
                "(dashed: chance; gray: target / union adapters).", ""]
    controls = [(lib, m) for lib in ("none", "single") for m in CONTROL_ORDER
                if any(k[0] == task and k[2] == lib and k[3] == m for k in agg)]
    lines += ["### Controls: base model and single adapters", "",
              table(agg, task, controls, tiers, splits), chance_row(agg, task, tiers, splits),
              chance_row(agg, task, tiers, splits, "majority"), ""]
    for lib in ("two", "two_plus_target"):
      methods = _methods(agg, task, lib)
      if methods:
        lines += [f"### Library: {LIBRARY_LABEL[lib]}", "",
                  table(agg, task, [(lib, m) for m in methods], tiers, splits),
                  chance_row(agg, task, tiers, splits),
                  chance_row(agg, task, tiers, splits, "majority"), ""]
    cot = [k for k, v in agg.items() if k[0] == task and v["bridge"] is not None]
    if cot:
      lines += ["### Chain-of-thought: the bridge, strict and lenient scores", "",
                "Strict (the tables above): the bridge entity and the final answer right; "
                "lenient: the final answer alone.", "",
                "| tier | library | method | bridge | strict | lenient |",
                "|---|---|---|---|---|---|"]
      for k in sorted(cot, key=lambda k: (TIER_ORDER.index(k[1]) if k[1] in TIER_ORDER else 9,
                                           k[2], k[3])):
        v = agg[k]
        lenient = agg.get(k[:4] + ("cot_lenient",) + k[5:])
        lines.append(f"| {k[1]} | {LIBRARY_LABEL.get(k[2], k[2])} | {k[3]} | {v['bridge']:.2f} | "
                     f"{v['mean']:.2f} | {lenient['mean']:.2f} |" if lenient else
                     f"| {k[1]} | {LIBRARY_LABEL.get(k[2], k[2])} | {k[3]} | {v['bridge']:.2f} | "
                     f"{v['mean']:.2f} | – |")
      lines.append("")
    train_rows = sorted(k for k in agg if k[0] == task and k[5].startswith("train_"))
    if train_rows:
      lines += ["### Adapters on their own training data", "", "| adapter | exact match |",
                "|---|---|"]
      lines += [f"| {k[3]} | {_fmt(agg[k])} |" for k in train_rows] + [""]
  out = workdir / "report.md"
  common.atomic_write_text(out, "\n".join(lines) + "\n")
  return out


def assemble_units(workdir: pathlib.Path) -> None:
  """`results.jsonl` from the per-seed units when it is missing or older than a unit (the
  shards of a study each write their units; see `experiments/distributed.py`). A workdir
  without the config.json that lists its seeds, or with results.jsonl but no units, is left
  as it is; a seed without a finished unit is a ValueError that names it."""
  import json

  from experiments.studies.recycling import units as units_lib
  config, results = workdir / "config.json", workdir / "results.jsonl"
  units = sorted((workdir / "units").glob("*.jsonl*"))
  if not config.exists():
    return
  if results.exists() and (not units or results.stat().st_mtime
                           >= max(u.stat().st_mtime for u in units)):
    return
  cfg = json.loads(config.read_text())
  task, seeds = cfg["task"], cfg["seeds"]
  missing = [s for s in seeds
             if units_lib.read_unit(units_lib.unit_path(workdir, task, s)) is None]
  if missing:
    raise ValueError(f"{workdir}: seeds {missing} of {seeds} have no finished unit in "
                     f"{workdir / 'units'}; run the shards that own them (or the study "
                     "without --num_shards), then this report again")
  units_lib.assemble(workdir, task, seeds)


def main(argv: Sequence[str]) -> int:
  if len(argv) != 2:
    print("usage: python -m experiments.studies.recycling.report <workdir>", file=sys.stderr)
    return 2
  workdir = pathlib.Path(argv[1])
  try:
    if (workdir / "sweep.json").exists():  # a sweep: every value's study, then the merge
      import json

      from experiments.studies import sweep
      for run in json.loads((workdir / "sweep.json").read_text())["runs"]:
        assemble_units(workdir / "runs" / run)
      path = sweep.merge(workdir)
      print(f"wrote {path} and {workdir / 'sweep.md'}")
      return 0
    assemble_units(workdir)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  path = write_report(workdir)
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
