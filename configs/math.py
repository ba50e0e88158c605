"""The paper's math word-problem study: two skills in two adapters, composed problems.

Run:
  python -m experiments.run --config=configs/math.py --workdir=runs/math
  (variant `configs/math.py:no_domain` turns off domain-specific pretraining: no composed
  problems of other forms in the corpus.)
Skill 1 (hop1): multiplication in "a box holds x; n boxes hold ?" problems; skill 2 (hop2):
subtraction in "has y, gives away z" problems; the composed test needs skill 1's result as
skill 2's input. Expected: see runs/math/report.md (the "math" tier row).
"""

from ml_collections import config_dict

from configs import two_hop


def get_config(variant: str = "") -> config_dict.ConfigDict:
  c = two_hop.get_config()
  c.task = "math"
  c.world = config_dict.ConfigDict(dict(
      max_factor=7, max_subtrahend=5, test_pairs=12, test_triples=32, target_triples=96,
      target_disjoint="pairs", domain_pretraining=True, domain_problems=256,
      skill_facts=False, background_repeats=3, scene_sentences=600))
  if variant == "no_domain":
    c.world.domain_pretraining = False
    c.world.domain_problems = 0
  elif variant == "quick":
    c.seeds = (0,)
    c.recycle.methods = ("uniform_factors", "sum", "arrow")
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; allowed: '', 'no_domain', 'quick'")
  return c
