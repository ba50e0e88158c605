"""Word problems whose two skills are taught apart and needed together.

Skill 1 (multiply): "a box holds 3 pens . how many pens are in 4 boxes ?" → 12.
Skill 2 (subtract): "tom has 12 pens and gives away 5 . how many are left ?" → 7.
Composed: "a box holds 3 pens . tom has 4 boxes and gives away 5 . how many are left ?"
→ 7 (direct) or, asked with the cue word ("… how many are left ? explain"),
"4 boxes hold 12 . 12 minus 5 is 7" (chain of thought; the intermediate result 12 is the
bridge). Numbers are single word tokens 0 … max_factor².

Splits (names shared with the two-hop world, "hop i" = skill i): hop1 has skill-1 problems
for every factor pair, hop2 skill-2 problems for every (minuend, subtrahend) pair, so each
skill adapter can serve every composed problem; the composed test triples (x, n, z) are
held out, and the `target` split holds composed problems on combinations disjoint from them
— by factor pair (target_disjoint='pairs', the analogue of the two-hop world's disjoint
entities) or by triple. The one-hop tests use held-out paraphrases.

The pretraining corpus always holds counting sentences ("after 4 comes 5 .") and scene
sentences that use every template word but state no result. Knobs:
  domain_pretraining: composed problems of *another form* (subtract, then multiply:
    "tom had 6 boxes and gave away 2 . each box holds 3 pens . how many pens now ?" →
    "tom has 4 boxes . 4 times 3 is 12"), direct and chain-of-thought — the paper's
    domain-specific pretraining;
  skill_facts: bare arithmetic facts ("3 times 4 is 12 .", "12 minus 5 is 7 .") for every
    pair the skills use, so both skills are pretraining knowledge.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from lora_limits.tasks import common
from lora_limits.tasks import corpus as corpus_lib

GROUP = "math"
TARGET_DISJOINT = ("pairs", "triples")
_NAME = "MathSettings"

SKILL1 = ("a {c} holds {x} {item} . how many {item} are in {n} {cs} ?",
          "each {c} has {x} {item} . how many {item} do {n} {cs} have ?")
SKILL1_HELDOUT = ("{n} {cs} with {x} {item} each . how many {item} in total ?",)
SKILL2 = ("{p} has {y} {item} and gives away {z} . how many are left ?",
          "{p} had {y} {item} and lost {z} . how many remain ?")
SKILL2_HELDOUT = ("{p} owned {y} {item} but gave {z} away . what is left ?",)
COMPOSED = ("a {c} holds {x} {item} . {p} has {n} {cs} and gives away {z} . how many are left ?",
            "each {c} has {x} {item} . {p} had {n} {cs} and lost {z} . how many remain ?")
COMPOSED_COT = "{n} {cs} hold {y} . {y} minus {z} is {r}"
# Another form of composition, for domain-specific pretraining: subtract, then multiply.
OTHER_FORM = ("{p} had {y} {cs} and gave away {z} . each {c} holds {x} {item} . how many "
              "{item} now ?",)
OTHER_FORM_COT = "{p} has {n} {cs} . {n} times {x} is {r}"
COUNTING = "after {i} comes {j} ."
SCENES = (
    "a {c} holds {x} {item} .", "each {c} has {x} {item} .", "{p} has {n} {cs} .",
    "{p} had {y} {item} .", "{p} gives away {z} {item} .", "{p} lost {z} {item} .",
    "{p} owned {y} {item} but gave some away .", "{p} asks how many {item} are in the {c} .",
    "{p} asks how many {item} remain .", "{p} asks what is left .",
    "{n} {cs} with {item} each .", "{p} counts the {item} in total .",
    "{p} writes {i} minus {j} on the board .", "{p} writes {i} times {j} on the board .",
    "{n} {cs} hold {item} .", "{p} will have {item} now .", "{p} and {q} do have {item} .",
    "{p} gave the {item} away and lost {z} {cs} .", "{p} gives away {cs} .",
    "how many {item} are in the {c} ? nobody knows .",
    "{p} can explain how many {item} remain .",
)
FACTS = ("{x} times {n} is {r} .", "{y} minus {z} is {r} .")


@dataclasses.dataclass(frozen=True)
class MathSettings:
  """Generator settings (see the module docstring).

  max_factor: x and n range over [2, max_factor]; products reach max_factor².
  max_subtrahend: z ranges over [1, max_subtrahend] (and stays below the minuend).
  test_pairs: factor pairs (x, n) the composed test problems are drawn from.
  test_triples: composed (x, n, z) problems held out for the test (at most; fewer if the
    test pairs give fewer).
  target_triples: composed problems for the target adapter (at most; fewer if the
    disjointness leaves fewer).
  target_disjoint: 'pairs' (target shares no factor pair with the test) or 'triples'.
  domain_pretraining / domain_problems: other-form composed problems in pretraining.
  skill_facts: bare arithmetic facts in pretraining.
  background_repeats: copies of the counting sentences; scene_sentences: scene count.
  people, items, containers (singular), containers_plural: the words of the scenes.
  """

  seed: int = 0
  max_factor: int = 7
  max_subtrahend: int = 5
  test_pairs: int = 12
  test_triples: int = 32
  target_triples: int = 96
  target_disjoint: str = "pairs"
  domain_pretraining: bool = True
  domain_problems: int = 256
  skill_facts: bool = False
  background_repeats: int = 3
  scene_sentences: int = 600
  people: tuple[str, ...] = ("tom", "ana", "li", "sam", "eva", "max")
  items: tuple[str, ...] = ("apples", "pens", "eggs", "cards", "stones", "shells")
  containers: tuple[str, ...] = ("box", "bag", "crate", "basket")
  containers_plural: tuple[str, ...] = ("boxes", "bags", "crates", "baskets")

  def __post_init__(self):
    common.check_int(_NAME, "seed", self.seed, 0, 2**32 - 1)
    common.check_int(_NAME, "max_factor", self.max_factor, 2, 30)
    common.check_int(_NAME, "max_subtrahend", self.max_subtrahend, 1, 100)
    common.check_int(_NAME, "test_pairs", self.test_pairs, 1, 100_000)
    common.check_int(_NAME, "test_triples", self.test_triples, 1, 100_000)
    common.check_int(_NAME, "target_triples", self.target_triples, 1, 100_000)
    common.check_choice(_NAME, "target_disjoint", self.target_disjoint, TARGET_DISJOINT)
    common.check_bool(_NAME, "domain_pretraining", self.domain_pretraining)
    common.check_int(_NAME, "domain_problems", self.domain_problems,
                     1 if self.domain_pretraining else 0, 100_000)
    common.check_bool(_NAME, "skill_facts", self.skill_facts)
    common.check_int(_NAME, "background_repeats", self.background_repeats, 1, 1000)
    common.check_int(_NAME, "scene_sentences", self.scene_sentences, 0, 1_000_000)
    for name, min_len in (("people", 2), ("items", 1), ("containers", 1),
                          ("containers_plural", 1)):
      common.check_words(_NAME, name, getattr(self, name), min_len)
    if len(self.containers) != len(self.containers_plural):
      raise ValueError(f"{_NAME}.containers_plural has {len(self.containers_plural)} words, "
                       f"containers has {len(self.containers)}; give one plural per container")
    pool = self.people + self.items + self.containers + self.containers_plural
    numbers = {str(i) for i in range(self.max_number + 1)}
    template_words = _template_words()
    for w in pool:
      if w in numbers or w in template_words or pool.count(w) > 1:
        raise ValueError(f"{_NAME}: the scene word {w!r} is a number, a template word or used "
                         "twice; people, items and containers must be distinct new words")
    if self.max_subtrahend >= self.max_factor ** 2:
      raise ValueError(f"{_NAME}.max_subtrahend={self.max_subtrahend} must be below "
                       f"max_factor²={self.max_factor ** 2}")

  @property
  def max_number(self) -> int:
    return self.max_factor ** 2

  @property
  def k(self) -> int:
    return 2

  def to_dict(self) -> dict[str, Any]:
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    for key in ("people", "items", "containers", "containers_plural"):
      out[key] = list(out[key])
    return out

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "MathSettings":
    return common.settings_from_mapping(cls, d)


def _template_words() -> set[str]:
  out: set[str] = {common.COT_CUE}
  for t in SKILL1 + SKILL1_HELDOUT + SKILL2 + SKILL2_HELDOUT + COMPOSED + OTHER_FORM + \
      SCENES + FACTS + (COMPOSED_COT, OTHER_FORM_COT, COUNTING):
    out |= common.template_words(t)
  return out


def vocabulary(settings: MathSettings) -> tuple[str, ...]:
  """Every word a world with these settings can contain, for any seed (sorted)."""
  top = max(settings.max_number, settings.max_factor + settings.max_subtrahend)
  words = {str(i) for i in range(top + 1)} | _template_words()
  words |= set(settings.people + settings.items + settings.containers
               + settings.containers_plural)
  return tuple(sorted(words))


def _scene(settings: MathSettings, rng) -> dict[str, str]:
  """Random scene words: person p (and another, q), item, container c and its plural cs."""
  ci = int(rng.integers(len(settings.containers)))
  pi, qi = rng.choice(len(settings.people), size=2, replace=False)
  return {"p": settings.people[pi], "q": settings.people[qi],
          "item": settings.items[int(rng.integers(len(settings.items)))],
          "c": settings.containers[ci], "cs": settings.containers_plural[ci]}


def _example(prompt_t: str, answer: str, meta: dict, **slots) -> common.Example:
  return common.Example(common.fill(prompt_t, **slots), answer, meta)


def build(settings: MathSettings) -> common.World:
  """The world for `settings` (deterministic in settings.seed)."""
  if not isinstance(settings, MathSettings):
    raise ValueError(f"build needs MathSettings, got {type(settings).__name__}")
  s = settings
  rng = common.rng_for(s.seed, 10)
  factors = range(2, s.max_factor + 1)
  pairs = [(x, n) for x in factors for n in factors]
  subs = [(y, z) for z in range(1, s.max_subtrahend + 1) for y in range(z + 1, s.max_number + 1)]
  triples = [(x, n, z) for x, n in pairs for z in range(1, s.max_subtrahend + 1) if z < x * n]
  if s.test_pairs >= len(pairs):
    raise ValueError(f"{_NAME}.test_pairs={s.test_pairs} must be below the {len(pairs)} factor "
                     f"pairs of max_factor={s.max_factor}, to leave pairs for the target split")
  test_pairs = {pairs[i] for i in rng.permutation(len(pairs))[:s.test_pairs]}
  candidates = [t for t in triples if (t[0], t[1]) in test_pairs]
  test = sorted(candidates[i] for i in rng.permutation(len(candidates))[:s.test_triples])
  test_pairs = {(x, n) for x, n, _ in test}
  if s.target_disjoint == "pairs":
    rest = [t for t in triples if (t[0], t[1]) not in test_pairs]
  else:
    rest = [t for t in triples if t not in set(test)]
  sel = common.rng_for(s.seed, 11).permutation(len(rest))[:s.target_triples]
  target = sorted(rest[i] for i in sel)

  def unit(x, n, z):
    return f"{x}x{n}" if s.target_disjoint == "pairs" else f"{x}x{n}-{z}"

  def meta(split, fmt, final, answer_type, units, template, **extra):
    return {"group": GROUP, "split": split, "format": fmt, "final": str(final),
            "answer_type": answer_type, "units": units, "template": template, **extra}

  scene_rng = common.rng_for(s.seed, 12)
  sp: dict[str, tuple[common.Example, ...]] = {}
  sp["hop1"] = tuple(
      _example(t, str(x * n), meta("hop1", "direct", x * n, "product", [f"{x}x{n}"],
                                   f"skill1/{j}", numbers=[x, n]),
               x=x, n=n, **_scene(s, scene_rng))
      for x, n in pairs for j, t in enumerate(SKILL1))
  sp["hop2"] = tuple(
      _example(t, str(y - z), meta("hop2", "direct", y - z, "difference", [f"{y}-{z}"],
                                   f"skill2/{j}", numbers=[y, z]),
               y=y, z=z, **_scene(s, scene_rng))
      for y, z in subs for j, t in enumerate(SKILL2))
  sp["union"] = tuple(
      common.Example(e.prompt, e.answer, {**e.meta, "split": "union", "source": e.meta["split"]})
      for e in sp["hop1"] + sp["hop2"])

  def composed(triple_list, split, fmt, one_per):
    out = []
    for m, (x, n, z) in enumerate(triple_list):
      y, r = x * n, x * n - z
      js = [m % len(COMPOSED)] if one_per else range(len(COMPOSED))
      for j in js:
        sc = _scene(s, scene_rng)
        mt = meta(split, fmt, r, "result", [unit(x, n, z)], f"composed/{j}", numbers=[x, n, z])
        if fmt == "direct":
          answer = str(r)
        else:
          answer = common.fill(COMPOSED_COT, n=n, cs=sc["cs"], y=y, z=z, r=r)
          mt.update(bridges=[str(y)], bridge_at=[3], bridge_steps=[0], bridge=str(y))
        out.append(_example(common.ask(COMPOSED[j], fmt), answer, mt, x=x, n=n, z=z, **sc))
    return tuple(out)

  sp["target"] = composed(target, "target", "direct", False)
  sp["target_cot"] = composed(target, "target_cot", "cot", False)
  test_pairs_sorted = sorted(test_pairs)
  sp["test_hop1"] = tuple(
      _example(SKILL1_HELDOUT[m % len(SKILL1_HELDOUT)], str(x * n),
               meta("test_hop1", "direct", x * n, "product", [f"{x}x{n}"], "skill1/heldout",
                    numbers=[x, n]), x=x, n=n, **_scene(s, scene_rng))
      for m, (x, n) in enumerate(test_pairs_sorted))
  test_subs = sorted({(x * n, z) for x, n, z in test})
  sp["test_hop2"] = tuple(
      _example(SKILL2_HELDOUT[m % len(SKILL2_HELDOUT)], str(y - z),
               meta("test_hop2", "direct", y - z, "difference", [f"{y}-{z}"],
                    "skill2/heldout", numbers=[y, z]), y=y, z=z, **_scene(s, scene_rng))
      for m, (y, z) in enumerate(test_subs))
  sp["test_two_hop_direct"] = composed(test, "test_two_hop_direct", "direct", True)
  sp["test_two_hop_cot"] = composed(test, "test_two_hop_cot", "cot", True)

  # Pretraining corpus.
  parts: list[corpus_lib.Part] = []
  recall: list[common.Example] = []
  counting = []
  for i in range(s.max_number):
    counting.append(common.fill(COUNTING, i=i, j=i + 1))
    recall.append(common.Example(f"after {i} comes", f"{i + 1} .",
                                 {"group": GROUP, "split": "recall", "format": "direct",
                                  "final": f"{i + 1} .", "answer_type": "count",
                                  "source": "counting"}))
  parts.append(corpus_lib.Part("counting", tuple(counting), s.background_repeats))
  bg_rng = common.rng_for(s.seed, 13)
  scenes = []
  for m in range(s.scene_sentences):
    sc = _scene(s, bg_rng)
    nums = {name: int(bg_rng.integers(lo, hi + 1)) for name, lo, hi in (
        ("x", 2, s.max_factor), ("n", 2, s.max_factor), ("y", 1, s.max_number),
        ("z", 1, s.max_subtrahend), ("i", 0, s.max_number), ("j", 0, s.max_number))}
    scenes.append(common.fill(SCENES[m % len(SCENES)], **sc, **nums))
  parts.append(corpus_lib.Part("scenes", tuple(scenes)))
  if s.skill_facts:
    facts = [common.fill(FACTS[0], x=x, n=n, r=x * n) for x, n in pairs]
    facts += [common.fill(FACTS[1], y=y, z=z, r=y - z) for y, z in subs]
    parts.append(corpus_lib.Part("skill_facts", tuple(facts), s.background_repeats))
    for f in facts:
      w = f.split()
      recall.append(common.Example(" ".join(w[:-2]), " ".join(w[-2:]),
                                   {"group": GROUP, "split": "recall", "format": "direct",
                                    "final": " ".join(w[-2:]), "answer_type": "fact",
                                    "source": "skill_facts"}))
  if s.domain_pretraining:
    other = [(y, z, x) for z in range(1, s.max_subtrahend + 1)
             for y in range(z + 2, s.max_factor + z + 1) for x in factors]
    dom_rng = common.rng_for(s.seed, 14)
    pick = dom_rng.permutation(len(other))[:s.domain_problems]
    domain = []
    for m in sorted(pick):
      y, z, x = other[m]
      n, r = y - z, (y - z) * x
      sc = _scene(s, dom_rng)
      prompt = common.fill(OTHER_FORM[0], y=y, z=z, x=x, **sc)
      for fmt, answer in (("direct", str(r)),
                          ("cot", common.fill(OTHER_FORM_COT, p=sc["p"], n=n, cs=sc["cs"],
                                              x=x, r=r))):
        e = common.Example(common.ask(prompt, fmt), answer,
                           {"group": GROUP, "split": "recall", "format": fmt, "final": str(r),
                            "answer_type": "other_form", "source": "domain"})
        domain.append(e.text)
        recall.append(e)
    parts.append(corpus_lib.Part("domain", tuple(domain)))
  corpus, counts = corpus_lib.mix(parts, common.rng_for(s.seed, 15))

  disjoint = tuple((tr, te) for tr in common.TARGET_SPLITS for te in common.COMPOSED_TESTS)
  world = common.World(
      kind="math", settings=s, k=2, corpus=corpus, corpus_parts=counts, splits={GROUP: sp},
      recall=tuple(recall), chance={GROUP: common.chance_levels(sp)},
      rules={GROUP: common.LeakRules(disjoint=disjoint)}, vocabulary=vocabulary(s))
  world.check_vocabulary()
  corpus_lib.check_coverage(world)
  corpus_lib.check_recall_in_corpus(world)
  corpus_lib.check_unambiguous(world)
  corpus_lib.check_no_leak(world)
  return world
