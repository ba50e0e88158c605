"""Evaluation: every model on every test split of every group, greedy exact match, chance and
the majority baseline; chain-of-thought splits give a strict record (`cot`: the bridge and
the final answer right) and a lenient one (`cot_lenient`: the final answer)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from experiments.studies.recycling import models as models_lib
from experiments.studies.recycling import stages
from lora_limits import exact_match
from lora_limits.tasks import common as task_common

BRIDGE_SPLIT = "test_two_hop_bridge"


def bridge_stated(examples: Sequence[task_common.Example]) -> tuple[task_common.Example, ...]:
  """Chain-of-thought test questions with the whole chain but the final answer given.

  "where does the spouse of A live ? explain" + "A 's spouse is B . B lives in" → "C": the
  bridge B is stated, so answering needs only the last hop, keyed on B in context. The
  positive control for composition (Theorem 2's explicit-bridge case, in the full model).
  """
  out = []
  for e in examples:
    final = e.meta["final"]
    given = e.answer[:len(e.answer) - len(final)].strip()
    meta = dict(e.meta, split=BRIDGE_SPLIT, format="direct")
    for key in ("bridges", "bridge_steps", "bridge_at", "bridge"):
      meta.pop(key, None)
    out.append(task_common.Example(f"{e.prompt} {given}", final, meta))
  return tuple(out)


def test_sets(world: task_common.World) -> dict[str, dict[str, tuple[task_common.Example, ...]]]:
  """{split: {group: examples}}: the world's test splits plus the bridge-stated control."""
  out = {split: {g: tuple(world.splits[g][split]) for g in world.groups}
         for split in task_common.test_splits(world.k)}
  out[BRIDGE_SPLIT] = {g: bridge_stated(world.splits[g]["test_two_hop_cot"])
                       for g in world.groups}
  return out


def evaluate_model(model: models_lib.Model, base: stages.Base, world: task_common.World,
                   task: str, seed: int, batch_size: int) -> list[dict[str, Any]]:
  """Records for every tier × test split (tiers decoded together, split apart afterwards)."""
  records = []
  recycled = model.recycled
  for split, by_group in test_sets(world).items():
    examples = [e for g in world.groups for e in by_group[g]]
    texts = exact_match.generate(recycled.params, base.cfg, base.tokenizer, examples,
                                 lora=recycled.lora_for(examples), batch_size=batch_size)
    start = 0
    for group in world.groups:
      group_ex = by_group[group]
      answers = split if split != BRIDGE_SPLIT else "test_two_hop_cot"
      chance = world.chance[group][answers]
      res = exact_match.score_split(split, texts[start:start + len(group_ex)], group_ex,
                                    chance=chance)
      start += len(group_ex)
      rec = {"task": task, "tier": group, "library": model.library, "method": model.method,
             "answer_format": "direct", "split": split, "seed": seed,
             "accuracy": res.accuracy, "n": res.n, "chance": res.chance,
             "majority": world.majority.get(group, {}).get(answers),
             "data_free": model.data_free}
      if recycled.extra:
        rec["extra"] = dict(recycled.extra)
      if split.endswith("_cot"):
        # Strict (the bridge and the answer right) as `cot`; the final answer alone beside it.
        strict = dict(rec, answer_format="cot", accuracy=(
            res.strict_accuracy if res.strict_accuracy is not None else res.accuracy))
        if res.bridge_accuracy is not None:
          strict["bridge_accuracy"] = res.bridge_accuracy
        records += [strict, dict(rec, answer_format="cot_lenient")]
      else:
        records.append(rec)
  return records
