"""The paper's math word-problem study: two skills in two adapters, composed problems.

Run:
  python -m experiments.run --config=configs/math.py --workdir=runs/math
Variants: `configs/math.py:no_domain` — the same world without domain-specific pretraining
(the corpus less exactly its composed problems; the skill facts stay); `:quick` — one seed,
three methods; `:quick_no_domain` — both; `:digits` — the procedure variant (numbers digit
by digit, two-digit × one-digit then subtraction; slower and harder, not the default).
Skill 1 (hop1): multiplication in "a box holds x; n boxes hold ?" problems; skill 2 (hop2):
subtraction in "has y, gives away z" problems; the composed test (200 problems per seed)
needs skill 1's result as skill 2's input. Every product of a test problem is held out of
every adapter's training data, so the one-hop tests ask each skill on held-out operands.
Expected: see runs/math/report.md (the "math" tier row).
"""

from ml_collections import config_dict

from configs import two_hop

VARIANTS = ("", "no_domain", "quick", "quick_no_domain", "digits")


def get_config(variant: str = "") -> config_dict.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; allowed: {list(VARIANTS)}")
  c = two_hop.get_config()
  c.task = "math"
  c.world = config_dict.ConfigDict(dict(
      numbers="words", max_factor=10, max_multiplicand=49, max_subtrahend=7, test_triples=200,
      target_triples=96, domain_pretraining=True, domain_problems=256, fact_repeats=3,
      background_repeats=3, scene_sentences=600))
  if variant in ("no_domain", "quick_no_domain"):
    c.world.domain_pretraining = False
    c.world.domain_problems = 0
  if variant.startswith("quick"):
    c.seeds = (0,)
    c.recycle.methods = ("uniform_factors", "sum", "arrow")
  if variant == "digits":
    c.world.numbers = "digits"
  return c
