"""Gates, retention, classes and the pre-registered claim rules on hand-built records."""

import pytest

from experiments import verdicts as v

SEEDS = (0, 1, 2)


def rec(tier, library, method, split, acc, *, seed=0, fmt=None, n=48, chance=1 / 16,
        majority=1 / 16, task="two_hop"):
  fmt = fmt or ("cot" if split.endswith("_cot") else "direct")
  return {"task": task, "tier": tier, "library": library, "method": method,
          "answer_format": fmt, "split": split, "seed": seed, "accuracy": acc, "n": n,
          "chance": chance, "majority": majority}


def world_records(*, base_cot=0.95, union_cot=0.9, lib_cot=0.05, lib_hop=0.95,
                  plus_cot=0.05, expert=0.97, leak=0.0, gain_r=0.0, noise=0.0):
  """Records of a three-seed two-hop run; every knob sets one part of the picture."""
  out = []
  for s in SEEDS:
    e = noise * (s - 1)
    out += [rec("filler", "none", "base", "test_hop1", 0.99, seed=s),
            rec("filler", "none", "base", "test_hop2", 0.98, seed=s),
            rec("filler", "none", "base", "test_two_hop_cot", base_cot, seed=s),
            rec("F", "none", "base", "test_hop1", leak, seed=s),
            rec("F", "single", "hop1", "test_hop1", expert, seed=s),
            rec("F", "single", "hop2", "test_hop2", expert, seed=s),
            rec("F", "single", "hop2", "test_two_hop_bridge", 0.95, seed=s),
            rec("F", "single", "union", "test_two_hop_cot", union_cot + e, seed=s),
            rec("F", "single", "union", "test_two_hop_direct", 0.06, seed=s)]
    for tier in ("F", "H", "R"):
      boost = gain_r if tier == "R" else 0.0
      out += [rec(tier, "none", "base", "test_two_hop_cot", 0.0, seed=s),
              rec(tier, "none", "base", "test_two_hop_direct", 0.06, seed=s)]
      for m in v.PRIMARY_METHODS:
        out += [rec(tier, "two", m, "test_hop1", lib_hop, seed=s),
                rec(tier, "two", m, "test_hop2", lib_hop, seed=s),
                rec(tier, "two", m, "test_two_hop_cot", lib_cot + boost + e, seed=s),
                rec(tier, "two", m, "test_two_hop_direct", 0.06, seed=s),
                rec(tier, "two_plus_target", m, "test_two_hop_cot", plus_cot, seed=s),
                rec(tier, "two_plus_target", m, "test_two_hop_direct", 0.06, seed=s)]
    # Experts on H and R, so retention is defined there too.
    for tier in ("H", "R"):
      out += [rec(tier, "single", "hop1", "test_hop1", expert, seed=s),
              rec(tier, "single", "hop2", "test_hop2", expert, seed=s)]
  out = v.with_retention(out, k=2)
  for s in SEEDS:
    out += v.compute_gates(out, v.GateThresholds(), task="two_hop", seed=s, k=2)
  return out


def by_claim(verdicts, claim, method="uniform_factors"):
  return [x.verdict for x in verdicts if x.claim.startswith(claim) and x.evidence.startswith(method)]


def test_gates_pass_and_fail_by_their_thresholds():
  good = world_records()
  gates = v.gates_by_seed(good, "two_hop")
  assert sorted(gates) == list(SEEDS)
  names = {g["split"] for g in gates[0]}
  assert names == {"gate_base_extraction", "gate_base_cot", "gate_base_leak", "gate_expert_hop1",
                   "gate_expert_hop2", "gate_bridge_stated", "gate_union_cot"}
  assert all(g["passed"] for g in gates[0])
  union = next(g for g in gates[0] if g["split"] == "gate_union_cot")
  assert union["threshold"] == 0.6 and union["goal"] == 0.8 and union["method"] == "union"
  assert not v.failed_gates(good, "two_hop")
  bad = world_records(base_cot=0.5, leak=0.3)
  failed = v.failed_gates(bad, "two_hop")
  assert "base_cot (seed 0)" in failed and "base_leak (seed 2)" in failed
  extraction = next(g for g in v.gates_by_seed(good, "two_hop")[0]
                    if g["split"] == "gate_base_extraction")
  assert extraction["accuracy"] == pytest.approx(0.985)  # pooled over both hops
  assert extraction["n"] == 96


def test_the_all_adapter_stands_in_when_union_fails():
  records = world_records(union_cot=0.2)
  records = [r for r in records if not r["split"].startswith("gate_")]
  for s in SEEDS:
    records.append(rec("F", "single", "all", "test_two_hop_cot", 0.85, seed=s))
  gate = v.compute_gates(records, v.GateThresholds(), task="two_hop", seed=0, k=2)
  union = next(g for g in gate if g["split"] == "gate_union_cot")
  assert union["method"] == "all" and union["passed"]


def test_retention_is_recycled_over_expert_accuracy():
  records = world_records(lib_hop=0.485, expert=0.97)
  r = next(x for x in records if x["library"] == "two" and x["tier"] == "F")
  assert r["retention"] == pytest.approx(0.5)
  assert all("retention" not in x for x in records if x["library"] in ("none", "single"))


def test_floor_where_the_control_also_fails_is_inconclusive():
  verdicts = v.claim_verdicts(world_records(union_cot=0.05), "two_hop")
  assert by_claim(verdicts, "The 2-combination library fails") == [v.INCONCLUSIVE] * 2
  assert by_claim(verdicts, "Adding the target-task adapter") == [v.INCONCLUSIVE] * 2


def test_working_control_library_at_chance_facts_kept_is_supported():
  verdicts = v.claim_verdicts(world_records(), "two_hop")
  cot = [x for x in verdicts if x.claim.endswith("(cot)") and x.claim.startswith("The 2")]
  assert [x.verdict for x in cot] == [v.SUPPORTED, v.SUPPORTED]
  # Direct answers: the union control is at chance there, so no verdict can be drawn.
  direct = [x for x in verdicts if x.claim.endswith("(direct)") and x.claim.startswith("The 2")]
  assert [x.verdict for x in direct] == [v.INCONCLUSIVE, v.INCONCLUSIVE]


def test_library_that_lost_the_facts_is_not_evidence_of_failing_to_compose():
  verdicts = v.claim_verdicts(world_records(lib_hop=0.3), "two_hop")
  cot = [x for x in verdicts if x.claim.endswith("(cot)") and x.claim.startswith("The 2")]
  assert [x.verdict for x in cot] == [v.INCONCLUSIVE, v.INCONCLUSIVE]
  assert "lost the one-hop facts" in cot[0].evidence


def test_library_that_composes_contradicts():
  verdicts = v.claim_verdicts(world_records(lib_cot=0.8), "two_hop")
  cot = [x.verdict for x in verdicts if x.claim.endswith("(cot)") and x.claim.startswith("The 2")]
  assert cot == [v.CONTRADICTED, v.CONTRADICTED]
  target = [x.verdict for x in verdicts
            if x.claim.startswith("Adding") and x.claim.endswith("(cot)")]
  assert target == [v.CONTRADICTED, v.CONTRADICTED]


def test_target_claim_needs_the_plus_target_library_to_compose():
  assert {x.verdict for x in v.claim_verdicts(world_records(plus_cot=0.7), "two_hop")
          if x.claim.startswith("Adding") and x.claim.endswith("(cot)")} == {v.SUPPORTED}
  assert {x.verdict for x in v.claim_verdicts(world_records(plus_cot=0.05), "two_hop")
          if x.claim.startswith("Adding") and x.claim.endswith("(cot)")} == {v.INCONCLUSIVE}


def test_a_failed_gate_makes_every_verdict_inconclusive():
  verdicts = v.claim_verdicts(world_records(base_cot=0.3, plus_cot=0.7, gain_r=0.6), "two_hop")
  assert {x.verdict for x in verdicts} == {v.INCONCLUSIVE}


def test_familiarity_uses_base_subtracted_gains_with_intervals():
  up = v.claim_verdicts(world_records(gain_r=0.6), "two_hop")
  assert by_claim(up, "Recycling fails worst") == [v.SUPPORTED]
  flat = v.claim_verdicts(world_records(gain_r=0.0, noise=0.05), "two_hop")
  assert by_claim(flat, "Recycling fails worst") == [v.INCONCLUSIVE]
  down = v.claim_verdicts(world_records(lib_cot=0.7, gain_r=-0.6), "two_hop")
  assert by_claim(down, "Recycling fails worst") == [v.CONTRADICTED]


def test_classes():
  composed = v.Cell(0.7, 0.6, 0.8, SEEDS, (0.7,) * 3, (48,) * 3, 1 / 16, 1 / 16)
  floor = v.Cell(0.06, 0.02, 0.12, SEEDS, (0.06,) * 3, (48,) * 3, 1 / 16, 1 / 16)
  assert v.classify(composed, 0.2) == "composes"
  assert v.classify(floor, 0.9) == "keeps the facts but does not compose"
  assert v.classify(floor, 0.5) == "loses the facts"
  assert v.classify(floor, None) == "unknown"


def test_identical_methods_are_found_once():
  records = []
  for m, acc in (("sum", 0.3), ("cat", 0.3), ("ties", 0.4)):
    records += [rec("F", "two", m, "test_hop1", acc, seed=s) for s in SEEDS]
  assert v.duplicate_methods(records, "two_hop") == {"sum": ["cat"]}


def test_side_effects_list_identical_methods_once():
  records = [rec("filler", "none", "base", "test_hop1", 0.99, seed=s) for s in SEEDS]
  for m, acc in (("sum", 0.3), ("cat", 0.3), ("ties", 0.4)):
    records += [rec(t, "two", m, "test_hop1", acc, seed=s) for s in SEEDS for t in ("F", "filler")]
  rows = [line.split(" | ")[1] for line in v.side_effects_markdown(records, "two_hop", k=1)[2:]]
  assert rows == ["base", "sum (= cat)", "ties"]


def test_intervals_widen_with_seed_spread():
  mean, lo, hi = v.interval([0.5, 0.5, 0.5], [48, 48, 48])
  assert lo < 0.5 < hi  # Wilson keeps identical seeds honest
  _, lo2, hi2 = v.interval([0.2, 0.5, 0.8], [48, 48, 48])
  assert lo2 < lo and hi2 > hi
  d = v.contrast_interval([(1.0, [0.9, 0.8, 0.85], [48] * 3), (-1.0, [0.1, 0.2, 0.15], [48] * 3)])
  assert d[0] == pytest.approx(0.7) and d[1] > 0
