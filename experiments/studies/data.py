"""Study 'data': write the synthetic worlds, one shared tokenizer and an audited manifest.

For every seed and world kind: the pretraining corpus, every split of every group (tier),
the recall probes, each as JSON lines; then one word-level tokenizer covering all of them
(checked to round-trip every string) and `manifest.json` with counts per split and tier,
exposure counts measured in the corpus, generator settings and content hashes. The
manifest is also printed. Layout under the workdir:
  tokenizer/                          save_pretrained output (load with tokenizer.load)
  <kind>/seed<S>/corpus.jsonl         {"text": ...} per pretraining text
  <kind>/seed<S>/<group>/<split>.jsonl   Example.to_dict() per line
  <kind>/seed<S>/recall.jsonl
  manifest.json
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

from experiments import common as exp_common
from experiments import schema
from lora_limits import tasks
from lora_limits import tokenizer as tokenizer_lib
from lora_limits import validate


@dataclasses.dataclass(frozen=True)
class DataStudy:
  """seeds: one world per seed and kind; worlds: which kinds to write."""

  study: str = "data"
  seeds: tuple[int, ...] = (0, 1, 2)
  worlds: tuple[str, ...] = tasks.KINDS
  two_hop: tasks.TwoHopConfig = tasks.TwoHopConfig()
  math: tasks.MathConfig = tasks.MathConfig()

  def __post_init__(self):
    if not self.seeds or len(set(self.seeds)) != len(self.seeds):
      raise ValueError(f"DataStudy.seeds must be distinct and non-empty, got {self.seeds!r}")
    for s in self.seeds:
      validate.integer("DataStudy.seeds", s, 0, 2**32 - 1)
    if not self.worlds or len(set(self.worlds)) != len(self.worlds):
      raise ValueError(f"DataStudy.worlds must be distinct and non-empty, got {self.worlds!r}")
    for w in self.worlds:
      validate.choice("DataStudy.worlds", w, tasks.KINDS)
    for kind in ("two_hop", "math"):
      if getattr(self, kind).seed != 0:
        raise ValueError(f"DataStudy.{kind}.seed is set by DataStudy.seeds; leave it out")

  def settings(self, kind: str, seed: int):
    return dataclasses.replace(getattr(self, kind), seed=seed)


def world_records(world: tasks.World) -> dict[str, list[dict[str, Any]]]:
  """Relative path → JSON-lines records of one world (pure; the caller writes them)."""
  out = {"corpus.jsonl": [{"text": t} for t in world.corpus],
         "recall.jsonl": [e.to_dict() for e in world.recall]}
  for group, splits in world.splits.items():
    for split, examples in splits.items():
      out[f"{group}/{split}.jsonl"] = [e.to_dict() for e in examples]
  return out


def load_split(path: str | pathlib.Path) -> list[tasks.Example]:
  """Examples of a split file written by this study."""
  return [tasks.Example.from_dict(r) for r in exp_common.read_jsonl(path)]


def main(config, workdir: pathlib.Path) -> None:
  study = schema.build(DataStudy, config, "config")
  workdir = pathlib.Path(workdir)
  worlds: dict[tuple[str, int], tasks.World] = {}
  with exp_common.stage("build worlds"):
    for kind in study.worlds:
      for seed in study.seeds:
        world = tasks.build(study.settings(kind, seed))
        tasks.check_no_leak(world)
        worlds[(kind, seed)] = world
  with exp_common.stage("tokenizer"):
    texts = [t for w in worlds.values() for t in w.texts()]
    # The declared vocabularies do not depend on the seed: the tokenizer serves any seed.
    tok = tokenizer_lib.build(texts + [v for w in worlds.values() for v in w.vocabulary])
    n_checked = tokenizer_lib.check_round_trip(tok, dict.fromkeys(texts))
    tok.save_pretrained(str(workdir / "tokenizer"))
  manifest: dict[str, Any] = {
      "tokenizer": {"vocab_size": len(tok), "pad_id": tok.pad_token_id,
                    "eos_id": tok.eos_token_id, "bos_id": tok.bos_token_id,
                    "unk_id": tok.unk_token_id, "round_trip_checked": n_checked,
                    "dir": "tokenizer"},
      "worlds": {}}
  with exp_common.stage("write"):
    for (kind, seed), world in worlds.items():
      base = workdir / kind / f"seed{seed}"
      for rel, records in world_records(world).items():
        exp_common.write_jsonl(base / rel, records)
      entry = tasks.manifest(world, tasks.exposure_report(world) if kind == "two_hop" else None)
      # +2: BOS before the prompt, EOS after the answer.
      entry["max_row_tokens"] = 2 + tokenizer_lib.max_tokens(
          tok, [e.text for e in world.examples()] + list(world.corpus))
      entry["dir"] = f"{kind}/seed{seed}"
      manifest["worlds"].setdefault(kind, {})[f"seed{seed}"] = entry
    exp_common.write_json(workdir / "manifest.json", manifest)
  print(json.dumps(manifest, indent=2, sort_keys=True))
