"""Gates, retention, model classes and the paper's claims with pre-registered decision rules.

Everything here is a pure function of result records (the dicts of `results.jsonl`), so the
run computes the gates and retention, and `experiments.studies.recycling.report` draws the same verdicts from
the file alone.

*Gates* (per seed, thresholds from the config) say whether the setting can tell anything:
the base model extracts facts it saw only as statements and runs the chain-of-thought
procedure on entities it never saw composed; it knows nothing about tier F before any
adapter; each one-hop expert answers held-out forms of its facts; the last-hop expert reads
its fact off a stated bridge; the union adapter composes with chain of thought (the positive
control). A claim whose evidence rests on a failed gate is *inconclusive*.

*Retention* of a recycled model on a tier is its accuracy on the held-out one-hop tests
relative to the experts' (mean over hops of recycled / expert). A recycled model then
*composes* (CoT interval above the majority baseline), *keeps the facts but does not
compose* (retention >= 0.8), or *loses the facts* (retention < 0.8) — a different failure
from the paper's.

*Claims* are stated with their rule before any number is read; the verdict is one of
supported / contradicted / inconclusive, with the intervals that decided it. Intervals: the
wider of Student t over seeds and Wilson over the pooled examples (`interval`).
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

SUPPORTED, CONTRADICTED, INCONCLUSIVE = "supported", "contradicted", "inconclusive"
RETENTION_KEEPS = 0.8
PRIMARY_METHODS = ("uniform_factors", "arrow")
COT, COT_LENIENT = "cot", "cot_lenient"
BRIDGE_SPLIT = "test_two_hop_bridge"
FILLER = "filler"
# Who composes what in each task's unfamiliar group (the two-hop world's tier F; the math
# world's one group).
UNFAMILIAR = {"two_hop": "F", "math": "math"}

_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}


def t_quantile(dof: int) -> float:
  for k in sorted(_T975):
    if dof <= k:
      return _T975[k]
  return 1.96


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
  if n <= 0:
    return (float("nan"), float("nan"))
  denom = 1 + z * z / n
  centre = (p + z * z / (2 * n)) / denom
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
  return (max(0.0, centre - half), min(1.0, centre + half))


def interval(accuracies: Sequence[float], ns: Sequence[int]) -> tuple[float, float, float]:
  """(mean, lo, hi): the wider of the t interval over seeds and the pooled Wilson interval."""
  acc = np.asarray(accuracies, float)
  mean = float(acc.mean())
  n_total = int(sum(ns))
  pooled = float(np.dot(acc, ns)) / max(n_total, 1)
  lo, hi = wilson(pooled, n_total)
  if len(acc) >= 2:
    half = t_quantile(len(acc) - 1) * float(acc.std(ddof=1)) / math.sqrt(len(acc))
    lo, hi = min(lo, max(0.0, mean - half)), max(hi, min(1.0, mean + half))
  return mean, lo, hi


def contrast_interval(terms: Sequence[tuple[float, Sequence[float], Sequence[int]]]
                      ) -> tuple[float, float, float]:
  """(mean, lo, hi) of Σ sign·accuracy over terms (sign, per-seed accuracies, per-seed n),
  paired by seed: the wider of the t interval over the per-seed contrasts and the normal
  interval from the pooled proportions' binomial variances."""
  per_seed = sum(sign * np.asarray(acc, float) for sign, acc, _ in terms)
  mean = float(np.mean(per_seed))
  var = 0.0
  for _, acc, ns in terms:
    n = max(int(sum(ns)), 1)
    p = float(np.dot(acc, ns)) / n
    var += p * (1 - p) / n
  half = 1.96 * math.sqrt(var)
  if len(per_seed) >= 2:
    half = max(half, t_quantile(len(per_seed) - 1) * float(np.std(per_seed, ddof=1))
               / math.sqrt(len(per_seed)))
  return mean, mean - half, mean + half


# ------------------------------------------------------------------------------- gates


@dataclasses.dataclass(frozen=True)
class GateThresholds:
  """The gates' thresholds (config values, printed in the report)."""

  base_extraction: float = 0.95
  base_cot: float = 0.9
  base_leak: float = 0.1
  expert: float = 0.9
  bridge_stated: float = 0.9
  union_cot: float = 0.6
  union_cot_goal: float = 0.8

  def __post_init__(self):
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
        raise ValueError(f"gates.{f.name} must be a number in [0, 1], got {v!r}")


def _index(records: Iterable[Mapping[str, Any]]) -> dict[tuple, Mapping[str, Any]]:
  return {(r["tier"], r["library"], r["method"], r["answer_format"], r["split"]): r
          for r in records}


def _pooled(cells: Sequence[Mapping[str, Any] | None]) -> tuple[float, int] | None:
  cells = [c for c in cells if c is not None]
  if not cells:
    return None
  n = sum(c["n"] for c in cells)
  return sum(c["accuracy"] * c["n"] for c in cells) / max(n, 1), n


def compute_gates(records: Sequence[Mapping[str, Any]], thresholds: GateThresholds, *,
                  task: str, seed: int, k: int) -> list[dict[str, Any]]:
  """Gate records of one seed from its evaluation records (gates whose evidence the task does
  not have, e.g. filler probes in the math world, are left out)."""
  idx = _index(r for r in records if r["seed"] == seed and r["task"] == task)
  tier = UNFAMILIAR[task]
  hop_splits = [f"test_hop{i}" for i in range(1, k + 1)]
  specs = [
      ("base_extraction", "min", thresholds.base_extraction, ("none", "base"),
       [(FILLER, "direct", s) for s in hop_splits]),
      ("base_cot", "min", thresholds.base_cot, ("none", "base"),
       [(FILLER, COT, "test_two_hop_cot")]),
      ("base_leak", "max", thresholds.base_leak, ("none", "base"),
       [(tier, "direct", "test_hop1"), (tier, COT, "test_two_hop_cot")]),
  ]
  specs += [(f"expert_hop{i}", "min", thresholds.expert, ("single", f"hop{i}"),
             [(tier, "direct", f"test_hop{i}")]) for i in range(1, k + 1)]
  specs += [("bridge_stated", "min", thresholds.bridge_stated, ("single", f"hop{k}"),
             [(tier, "direct", BRIDGE_SPLIT)])]
  out = []
  for name, direction, threshold, (library, method), cells in specs:
    got = _pooled([idx.get((t, library, method, fmt, s)) for t, fmt, s in cells])
    if got is None:
      continue
    out.append(_gate_record(task, seed, name, direction, threshold, library, method,
                            cells, idx, got))
  # The positive control: union (or, failing that, the data-pooling `all`) on CoT, strict.
  union = None
  for method in ("union", "all"):
    got = _pooled([idx.get((tier, "single", method, COT, "test_two_hop_cot"))])
    if got is None:
      continue
    rec = _gate_record(task, seed, "union_cot", "min", thresholds.union_cot, "single", method,
                       [(tier, COT, "test_two_hop_cot")], idx, got)
    rec["goal"] = thresholds.union_cot_goal
    if union is None or (not union["passed"] and rec["passed"]):
      union = rec
  if union is not None:
    out.append(union)
  return out


def _gate_record(task, seed, name, direction, threshold, library, method, cells, idx, got):
  acc, n = got
  first = idx.get((cells[0][0], library, method, cells[0][1], cells[0][2]))
  passed = acc >= threshold if direction == "min" else acc <= threshold
  return {"task": task, "tier": cells[0][0], "library": "gate", "method": method,
          "answer_format": cells[0][1], "split": f"gate_{name}", "seed": seed,
          "accuracy": float(acc), "n": int(n), "threshold": float(threshold),
          "direction": direction, "passed": bool(passed),
          "evidence": [f"{library}/{method} {t} {s} ({fmt})" for t, fmt, s in cells],
          "chance": first.get("chance") if first else None,
          "majority": first.get("majority") if first else None, "data_free": True}


def gates_by_seed(records: Iterable[Mapping[str, Any]], task: str) -> dict[int, list[dict]]:
  out: dict[int, list[dict]] = collections.defaultdict(list)
  for r in records:
    if r["task"] == task and r["split"].startswith("gate_"):
      out[r["seed"]].append(r)
  return dict(sorted(out.items()))


def failed_gates(records: Iterable[Mapping[str, Any]], task: str) -> list[str]:
  """'name (seed s)' for every failed gate; an empty list when every seed passed all."""
  return [f"{r['split'].removeprefix('gate_')} (seed {r['seed']})"
          for gates in gates_by_seed(records, task).values() for r in gates if not r["passed"]]


# --------------------------------------------------------------------------- retention


def retention(records: Sequence[Mapping[str, Any]], *, k: int) -> dict[tuple, float | None]:
  """{(task, seed, tier, library, method): recycled / expert held-out one-hop accuracy, mean
  over hops} for every recycled model (library other than 'none' and 'single')."""
  idx = {(r["task"], r["seed"], r["tier"], r["library"], r["method"], r["split"]): r["accuracy"]
         for r in records if r["answer_format"] == "direct"}
  out: dict[tuple, float | None] = {}
  for (task, seed, tier, library, method, split) in idx:
    if library in ("none", "single", "gate") or split != "test_hop1" or tier == FILLER:
      continue
    ratios = []
    for i in range(1, k + 1):
      expert = idx.get((task, seed, tier, "single", f"hop{i}", f"test_hop{i}"))
      got = idx.get((task, seed, tier, library, method, f"test_hop{i}"))
      if expert is None or got is None or expert <= 0:
        ratios = None
        break
      ratios.append(got / expert)
    out[(task, seed, tier, library, method)] = None if ratios is None else float(np.mean(ratios))
  return out


def with_retention(records: Sequence[Mapping[str, Any]], *, k: int) -> list[dict[str, Any]]:
  """The records with `retention` set on every recycled model's record (None elsewhere)."""
  ret = retention(records, k=k)
  out = []
  for r in records:
    r = dict(r)
    if r["library"] not in ("none", "single", "gate"):
      r["retention"] = ret.get((r["task"], r["seed"], r["tier"], r["library"], r["method"]))
    out.append(r)
  return out


# --------------------------------------------------------------------------- aggregation


@dataclasses.dataclass(frozen=True)
class Cell:
  """One (library, method, tier, format, split) over seeds."""

  mean: float
  lo: float
  hi: float
  seeds: tuple[int, ...]
  by_seed: tuple[float, ...]
  ns: tuple[int, ...]
  chance: float | None
  majority: float | None
  retention: float | None = None

  @property
  def baseline(self) -> float:
    """The larger of chance and the majority-answer baseline."""
    return max(x for x in (self.chance, self.majority, 0.0) if x is not None)

  def fmt(self) -> str:
    return f"{self.mean:.2f} [{self.lo:.2f}, {self.hi:.2f}]"


def cells(records: Iterable[Mapping[str, Any]], task: str) -> dict[tuple, Cell]:
  """{(tier, library, method, answer_format, split): Cell} for one task."""
  groups: dict[tuple, list[Mapping[str, Any]]] = collections.defaultdict(list)
  for r in records:
    if r["task"] == task:
      groups[(r["tier"], r["library"], r["method"], r["answer_format"], r["split"])].append(r)
  out = {}
  for key, rs in groups.items():
    rs = sorted(rs, key=lambda r: r["seed"])
    mean, lo, hi = interval([r["accuracy"] for r in rs], [r["n"] for r in rs])
    ch = [r["chance"] for r in rs if r.get("chance") is not None]
    mj = [r["majority"] for r in rs if r.get("majority") is not None]
    rt = [r["retention"] for r in rs if r.get("retention") is not None]
    out[key] = Cell(mean, lo, hi, tuple(r["seed"] for r in rs),
                    tuple(float(r["accuracy"]) for r in rs), tuple(int(r["n"]) for r in rs),
                    float(np.mean(ch)) if ch else None, float(np.mean(mj)) if mj else None,
                    float(np.mean(rt)) if len(rt) == len(rs) and rt else None)
  return out


def duplicate_methods(records: Iterable[Mapping[str, Any]], task: str) -> dict[str, list[str]]:
  """{kept method: [methods with identical accuracy in every record]} per library-free
  identity: methods whose every (tier, library, format, split, seed) accuracy is equal."""
  table: dict[str, dict[tuple, float]] = collections.defaultdict(dict)
  for r in records:
    if r["task"] == task and r["library"] not in ("none", "single", "gate"):
      table[r["method"]][(r["tier"], r["library"], r["answer_format"], r["split"],
                          r["seed"])] = r["accuracy"]
  out: dict[str, list[str]] = {}
  taken: set[str] = set()
  for m in table:
    if m in taken:
      continue
    same = [o for o in table if o != m and o not in taken and table[o] == table[m]]
    if same:
      out[m] = same
      taken.update(same)
    taken.add(m)
  return out


# ------------------------------------------------------------------------- classes


def classify(composed: Cell | None, ret: float | None) -> str:
  """'composes' (CoT interval above the majority baseline), 'keeps the facts but does not
  compose' (retention >= 0.8) or 'loses the facts' (retention < 0.8); 'unknown' without
  evidence."""
  if composed is not None and composed.lo > composed.baseline:
    return "composes"
  if ret is None:
    return "unknown"
  return ("keeps the facts but does not compose" if ret >= RETENTION_KEEPS
          else "loses the facts")


# ---------------------------------------------------------------------------- claims


@dataclasses.dataclass(frozen=True)
class Verdict:
  claim: str
  rule: str
  verdict: str
  evidence: str


CLAIM_RULES = {
    "fails": (
        "The 2-combination library fails on two-hop questions about unfamiliar entities",
        "For each primary method and answer format (tier F, 2-combination library): "
        "inconclusive if a gate failed on any seed or the format's positive control (the union "
        "adapter) does not clear the majority baseline (interval lower bound); supported if "
        "the method's interval upper bound lies below the control's lower bound, its lower "
        "bound does not clear the majority baseline, and its retention is >= 0.8; "
        "contradicted if its lower bound clears the majority baseline; otherwise inconclusive "
        "(a method that lost the one-hop facts does not test composition)."),
    "target": (
        "Adding the target-task adapter is necessary",
        "For each primary method on CoT and direct questions, tier F: inconclusive unless "
        "every gate passed; supported if the 2-combination library's verdict above is "
        "'supported' and the library + target's lower bound clears the majority baseline; "
        "contradicted if the 2-combination library itself clears the majority baseline; "
        "otherwise inconclusive."),
    "familiarity": (
        "Recycling fails worst for unfamiliar entities",
        "For each primary method (2-combination library, CoT, strict), the gain over the base "
        "model per tier, gain(t) = acc(method, t) − acc(base, t), paired by seed; inconclusive "
        "unless every gate passed; supported if the interval of gain(R) − gain(F) lies above "
        "0, contradicted if it lies below 0, otherwise inconclusive; every tier's gain is "
        "printed with its interval."),
}


def _verdict_fails(c: Mapping[tuple, Cell], tier: str, method: str, fmt: str, split: str,
                   gates_ok: bool) -> tuple[str, str]:
  lib = c.get((tier, "two", method, fmt, split))
  control = c.get((tier, "single", "union", fmt, split))
  if lib is None:
    return INCONCLUSIVE, f"{method}: no records"
  ev = (f"{method} {lib.fmt()} (retention {_r(lib.retention)}), union control "
        f"{control.fmt() if control else '–'}, majority {lib.baseline:.2f}")
  if not gates_ok:
    return INCONCLUSIVE, ev + "; a gate failed"
  if control is None or control.lo <= control.baseline:
    return INCONCLUSIVE, ev + "; the positive control does not clear the majority baseline"
  if lib.lo > lib.baseline:
    return CONTRADICTED, ev
  if lib.hi < control.lo and lib.retention is not None and lib.retention >= RETENTION_KEEPS:
    return SUPPORTED, ev
  if lib.retention is not None and lib.retention < RETENTION_KEEPS:
    return INCONCLUSIVE, ev + "; it lost the one-hop facts (a different failure)"
  return INCONCLUSIVE, ev


def _r(x: float | None) -> str:
  return "–" if x is None else f"{x:.2f}"


def claim_verdicts(records: Sequence[Mapping[str, Any]], task: str,
                   primary: Sequence[str] = PRIMARY_METHODS) -> list[Verdict]:
  """The paper's claims, each with its rule and one verdict per primary method and format."""
  c = cells(records, task)
  tier = UNFAMILIAR[task]
  gates_ok = not failed_gates(records, task) and bool(gates_by_seed(records, task))
  methods = [m for m in primary if any(k[1] == "two" and k[2] == m for k in c)]
  out = []
  formats = ((COT, "test_two_hop_cot"), ("direct", "test_two_hop_direct"))
  fails: dict[tuple[str, str], str] = {}
  for m in methods:
    for fmt, split in formats:
      v, ev = _verdict_fails(c, tier, m, fmt, split, gates_ok)
      fails[(m, fmt)] = v
      out.append(Verdict(CLAIM_RULES["fails"][0] + f" ({fmt})", CLAIM_RULES["fails"][1], v, ev))
  for m in methods:
    for fmt, split in formats:
      two = c.get((tier, "two", m, fmt, split))
      plus = c.get((tier, "two_plus_target", m, fmt, split))
      if two is None or plus is None:
        continue
      ev = f"{m}: 2-combination {two.fmt()}, + target {plus.fmt()}, majority {two.baseline:.2f}"
      if not gates_ok:
        v = INCONCLUSIVE
        ev += "; a gate failed"
      elif two.lo > two.baseline:
        v = CONTRADICTED
      elif fails[(m, fmt)] == SUPPORTED and plus.lo > plus.baseline:
        v = SUPPORTED
      else:
        v = INCONCLUSIVE
      out.append(Verdict(CLAIM_RULES["target"][0] + f" ({fmt})", CLAIM_RULES["target"][1], v,
                         ev))
  tiers = [t for t in ("F", "H", "R") if any(k[0] == t for k in c)]
  if task == "two_hop" and "F" in tiers and "R" in tiers:
    by_seed = _by_seed(records, task)
    for m in methods:
      gains, parts = {}, []
      for t in tiers:
        g = _paired(by_seed, [(1.0, (t, "two", m, COT, "test_two_hop_cot")),
                              (-1.0, (t, "none", "base", COT, "test_two_hop_cot"))])
        if g is None:
          break
        gains[t] = g
        parts.append(f"{t} {g[0]:+.2f} [{g[1]:+.2f}, {g[2]:+.2f}]")
      if set(gains) != set(tiers):
        continue
      d = _paired(by_seed, [(1.0, ("R", "two", m, COT, "test_two_hop_cot")),
                            (-1.0, ("R", "none", "base", COT, "test_two_hop_cot")),
                            (-1.0, ("F", "two", m, COT, "test_two_hop_cot")),
                            (1.0, ("F", "none", "base", COT, "test_two_hop_cot"))])
      ev = f"{m}: gain over base " + ", ".join(parts)
      if d is None:
        continue
      ev += f"; gain(R) − gain(F) {d[0]:+.2f} [{d[1]:+.2f}, {d[2]:+.2f}]"
      if not gates_ok:
        v = INCONCLUSIVE
        ev += "; a gate failed"
      else:
        v = SUPPORTED if d[1] > 0 else CONTRADICTED if d[2] < 0 else INCONCLUSIVE
      out.append(Verdict(CLAIM_RULES["familiarity"][0], CLAIM_RULES["familiarity"][1], v, ev))
  return out


def _by_seed(records, task) -> dict[tuple, dict[int, tuple[float, int]]]:
  out: dict[tuple, dict[int, tuple[float, int]]] = collections.defaultdict(dict)
  for r in records:
    if r["task"] == task:
      out[(r["tier"], r["library"], r["method"], r["answer_format"], r["split"])][r["seed"]] = (
          float(r["accuracy"]), int(r["n"]))
  return out


def _paired(by_seed, terms: Sequence[tuple[float, tuple]]) -> tuple[float, float, float] | None:
  """Interval of Σ sign·accuracy(key) paired over the seeds every key has."""
  values = [by_seed.get(key) for _, key in terms]
  if any(not v for v in values):
    return None
  seeds = sorted(set.intersection(*(set(v) for v in values)))
  if not seeds:
    return None
  return contrast_interval([(sign, [v[s][0] for s in seeds], [v[s][1] for s in seeds])
                            for (sign, _), v in zip(terms, values)])


# --------------------------------------------------------------------------- markdown


def gates_markdown(records: Sequence[Mapping[str, Any]], task: str) -> list[str]:
  """The gate table (one row per gate, one column per seed) and what failing one means."""
  by_seed = gates_by_seed(records, task)
  if not by_seed:
    return []
  seeds = list(by_seed)
  names = list(dict.fromkeys(g["split"] for gs in by_seed.values() for g in gs))
  lines = ["| gate | evidence | threshold | " + " | ".join(f"seed {s}" for s in seeds) + " |",
           "|---|---|---|" + "---|" * len(seeds)]
  for name in names:
    row = {s: next((g for g in by_seed[s] if g["split"] == name), None) for s in seeds}
    first = next(g for g in row.values() if g is not None)
    op = ">=" if first["direction"] == "min" else "<="
    goal = f" (goal {first['goal']:.2f})" if first.get("goal") is not None else ""
    cells = []
    for s in seeds:
      g = row[s]
      cells.append("–" if g is None else
                   f"{g['accuracy']:.2f} {'pass' if g['passed'] else '**FAIL**'}"
                   + (f" ({g['method']})" if name == "gate_union_cot" else ""))
    lines.append(f"| {name.removeprefix('gate_')} | {'; '.join(first['evidence'])} | "
                 f"{op} {first['threshold']:.2f}{goal} | " + " | ".join(cells) + " |")
  failed = failed_gates(records, task)
  lines += ["", "Every gate passed on every seed: the verdicts below rest on working controls."
            if not failed else
            f"**Failed gates: {', '.join(failed)}.** Every verdict resting on them is "
            "inconclusive."]
  return lines


def claims_markdown(records: Sequence[Mapping[str, Any]], task: str) -> list[str]:
  """Each claim's rule (fixed before any number), then its verdicts with the intervals."""
  verdicts = claim_verdicts(records, task)
  lines = ["Decision rules, fixed before the numbers (primary methods: "
           f"{', '.join(PRIMARY_METHODS)}; the rest of the zoo is secondary):", ""]
  for title, rule in CLAIM_RULES.values():
    lines.append(f"- **{title}.** {rule}")
  lines += ["", "| claim | verdict | evidence (mean [95% interval]) |", "|---|---|---|"]
  for vd in verdicts:
    lines.append(f"| {vd.claim} | **{vd.verdict}** | {vd.evidence} |")
  if not verdicts:
    lines.append("| – | – | no primary method was run |")
  return lines


def classes_markdown(records: Sequence[Mapping[str, Any]], task: str) -> list[str]:
  """Each recycled model on the unfamiliar tier: retention, CoT (strict), its class."""
  c = cells(records, task)
  tier = UNFAMILIAR[task]
  dup = duplicate_methods(records, task)
  hidden = {m for same in dup.values() for m in same}
  rows = sorted({(k[1], k[2]) for k in c if k[0] == tier and k[1] not in
                 ("none", "single", "gate") and k[2] not in hidden})
  if not rows:
    return []
  lines = ["| library | method | retention | CoT strict | direct | class |",
           "|---|---|---|---|---|---|"]
  for lib, m in rows:
    cot = c.get((tier, lib, m, COT, "test_two_hop_cot"))
    direct = c.get((tier, lib, m, "direct", "test_two_hop_direct"))
    hop = c.get((tier, lib, m, "direct", "test_hop1"))
    ret = hop.retention if hop is not None else None
    label = m + (f" (= {', '.join(dup[m])})" if m in dup else "")
    lines.append(f"| {lib} | {label} | {_r(ret)} | {cot.fmt() if cot else '–'} | "
                 f"{direct.fmt() if direct else '–'} | {classify(cot, ret)} |")
  return lines


def side_effects_markdown(records: Sequence[Mapping[str, Any]], task: str, *,
                          k: int) -> list[str]:
  """What every adapter and recycled model does to what the base already knew: the filler
  probes (extraction; CoT on never-composed fillers), next to the base model."""
  c = cells(records, task)
  dup = duplicate_methods(records, task)  # identical everywhere: listed once, as above
  hidden = {m for same in dup.values() for m in same}
  models = sorted({(key[1], key[2]) for key in c if key[0] == FILLER and key[1] != "gate"
                   and (key[1] in ("none", "single") or key[2] not in hidden)},
                  key=lambda lm: (("none", "single", "two", "two_plus_target").index(lm[0])
                                  if lm[0] in ("none", "single", "two", "two_plus_target")
                                  else 9, lm[1]))
  if not models:
    return []
  lines = ["| library | method | filler one-hop (extraction) | filler CoT strict |",
           "|---|---|---|---|"]
  for lib, m in models:
    hops = [c.get((FILLER, lib, m, "direct", f"test_hop{i}")) for i in range(1, k + 1)]
    hop = (float(np.mean([h.mean for h in hops])) if all(hops) else None)
    cot = c.get((FILLER, lib, m, COT, "test_two_hop_cot"))
    label = m + (f" (= {', '.join(dup[m])})" if m in dup and lib not in ("none", "single")
                 else "")
    lines.append(f"| {lib} | {label} | {_r(hop)} | {cot.fmt() if cot else '–'} |")
  return lines
