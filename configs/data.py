"""Synthetic worlds: two-hop facts in familiarity tiers F/H/R, and skill-split word problems.

Run:
  python -m experiments.run --config=configs/data.py --workdir=runs/data
Variants: `--config.seeds='(0,)'`, `--config.two_hop.fact_exposure=4`,
`--config.two_hop.hybrid=one_hop`, `--config.math.domain_pretraining=False`.

Expected (2-core CPU, ~8 s, 2026-11-29): for each of seeds 0, 1, 2 a two-hop world (4,192
pretraining texts; per tier hop1/hop2 96, target 48, each test split 24; exposure F 0/0, H
entities 4 mentions and 0 facts, R facts 8 texts each, composed facts 0 everywhere) and a math
world (1,107 texts; hop1 72, hop2 460, target 192, composed tests 32); one tokenizer of 219
tokens covering both kinds and any seed; rows of at most 31 (two-hop) / 33 (math) tokens with
BOS and EOS; `manifest.json` in the workdir and on stdout.
"""

import dataclasses

import ml_collections

from lora_limits import tasks


def _defaults(cls) -> dict:
  """A settings class's defaults, less its seed (set by `seeds`)."""
  return {f.name: getattr(cls(), f.name) for f in dataclasses.fields(cls) if f.name != "seed"}


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.study = "data"
  config.seeds = (0, 1, 2)
  config.worlds = tasks.KINDS
  config.two_hop = ml_collections.ConfigDict(_defaults(tasks.TwoHopConfig))
  config.math = ml_collections.ConfigDict(_defaults(tasks.MathConfig))
  return config
