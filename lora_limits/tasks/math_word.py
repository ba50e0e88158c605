"""Word problems whose two skills are taught apart and needed together.

Skill 1 (multiply): "a box holds 3 pens . how many pens are in 4 boxes ?" → 12.
Skill 2 (subtract): "tom has 12 pens and gives away 5 . how many are left ?" → 7.
Composed: "a box holds 3 pens . tom has 4 boxes and gives away 5 . how many are left ?"
→ 7 (direct) or, asked with the cue word ("… how many are left ? explain"),
"3 times 4 is 12 . 12 minus 5 is 7" (chain of thought; the intermediate product 12 is the
bridge). Splits use the names shared with the two-hop world ("hop i" = skill i).

Held out by product. The test problems' products (every factor pair with such a product,
so commuted pairs too) and hence every sub-step of a test problem — "x times n is y",
"n times x is y", "y minus z is r" — appear in no adapter's training data and in no
composed problem of pretraining: `hop1`/`hop2` (the skill adapters) train on the other
products, `target` on composed problems whose product is not a test product, and the
one-hop tests `test_hop1`/`test_hop2` ask each skill on the held-out operands of the test.
`check_substeps_disjoint` enforces this from the numbers and from the text.

Two number systems (`numbers`):
  'words' (default; lookup tables): every number is one token, x and n range over
    [2, max_factor]. The skill facts are tables the base model learns in pretraining:
    bare facts ("3 times 4 is 12 .", "12 minus 5 is 7 .") for every pair the world uses,
    the test's included, in every arm. A skill adapter maps the word problem onto a fact
    the base model holds, so it can answer held-out operands.
  'digits' (procedures): numbers are written digit by digit ("2 3" is 23), x ranges over
    [10, max_multiplicand] and n over [2, 9] (two-digit × one-digit, then subtraction). The
    bare facts in pretraining cover only the non-test products, so no fact of a test problem
    is stated anywhere: a skill adapter must carry out the procedure on new operands.

Pretraining corpus: counting sentences ("after 4 comes 5 ."), scene sentences that use every
template word but state no result, and the skill facts — in every arm. One knob:
  domain_pretraining: composed problems (the test's format and procedure, direct and
    chain of thought) on products disjoint from the test's. With it off, the corpus is the
    same texts less exactly these.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from lora_limits import validate
from lora_limits.tasks import common
from lora_limits.tasks import corpus as corpus_lib

GROUP = "math"
NUMBERS = ("words", "digits")
_NAME = "MathConfig"

SKILL1 = ("a {c} holds {x} {item} . how many {item} are in {n} {cs} ?",
          "each {c} has {x} {item} . how many {item} do {n} {cs} have ?")
SKILL2 = ("{p} has {y} {item} and gives away {z} . how many are left ?",
          "{p} had {y} {item} and lost {z} . how many remain ?")
COMPOSED = ("a {c} holds {x} {item} . {p} has {n} {cs} and gives away {z} . how many are left ?",
            "each {c} has {x} {item} . {p} had {n} {cs} and lost {z} . how many remain ?")
STEP1 = "{x} times {n} is {y}"
STEP2 = "{y} minus {z} is {r}"
COMPOSED_COT = f"{STEP1} {common.STEP_SEPARATOR} {STEP2}"
COUNTING = "after {i} comes {j} ."
SCENES = (
    "a {c} holds {x} {item} .", "each {c} has {x} {item} .", "{p} has {n} {cs} .",
    "{p} had {y} {item} .", "{p} gives away {z} {item} .", "{p} lost {z} {item} .",
    "{p} asks how many {item} are in the {c} .", "{p} asks how many {item} remain .",
    "{p} asks how many are left .", "{p} and {q} do have {item} .",
    "{p} writes {i} and {j} on the board .", "{p} counts what {q} gave away .",
    "how many {item} are in the {c} ? nobody knows .",
    "{p} can explain how many {item} remain .",
)
FACTS = (f"{STEP1} .", f"{STEP2} .")


@dataclasses.dataclass(frozen=True)
class MathConfig:
  """Generator settings (see the module docstring).

  numbers: 'words' (one token per number; skills are lookup tables) or 'digits' (numbers
    digit by digit; skills are procedures on held-out operands).
  max_factor: words: x and n range over [2, max_factor] (products reach max_factor²).
  max_multiplicand: digits: x ranges over [10, max_multiplicand], n over [2, 9].
  max_subtrahend: z ranges over [1, max_subtrahend] (and stays below the minuend).
  test_triples: composed (x, n, z) test problems: products are drawn at random and all their
    problems held out until this many are held out, then exactly this many are kept.
  target_triples: composed problems for the target adapter, on non-test products (at most).
  domain_pretraining / domain_problems: composed problems on non-test products in
    pretraining (each in direct and chain-of-thought form); the one knob of the corpus.
  fact_repeats: copies of each skill fact in the corpus (every arm).
  background_repeats: copies of the counting sentences; scene_sentences: scene count.
  people, items, containers (singular), containers_plural: the words of the scenes.
  """

  seed: int = 0
  numbers: str = "words"
  max_factor: int = 10
  max_multiplicand: int = 49
  max_subtrahend: int = 7
  test_triples: int = 200
  target_triples: int = 96
  domain_pretraining: bool = True
  domain_problems: int = 256
  fact_repeats: int = 3
  background_repeats: int = 3
  scene_sentences: int = 600
  people: tuple[str, ...] = ("tom", "ana", "li", "sam", "eva", "max")
  items: tuple[str, ...] = ("apples", "pens", "eggs", "cards", "stones", "shells")
  containers: tuple[str, ...] = ("box", "bag", "crate", "basket")
  containers_plural: tuple[str, ...] = ("boxes", "bags", "crates", "baskets")

  def __post_init__(self):
    validate.integer(f"{_NAME}.seed", self.seed, 0, 2**32 - 1)
    validate.choice(f"{_NAME}.numbers", self.numbers, NUMBERS)
    validate.integer(f"{_NAME}.max_factor", self.max_factor, 3, 30)
    validate.integer(f"{_NAME}.max_multiplicand", self.max_multiplicand, 11, 99)
    validate.integer(f"{_NAME}.max_subtrahend", self.max_subtrahend, 1, 100)
    validate.integer(f"{_NAME}.test_triples", self.test_triples, 1, 100_000)
    validate.integer(f"{_NAME}.target_triples", self.target_triples, 1, 100_000)
    validate.boolean(f"{_NAME}.domain_pretraining", self.domain_pretraining)
    validate.integer(f"{_NAME}.domain_problems", self.domain_problems,
                     1 if self.domain_pretraining else 0, 100_000)
    validate.integer(f"{_NAME}.fact_repeats", self.fact_repeats, 1, 1000)
    validate.integer(f"{_NAME}.background_repeats", self.background_repeats, 1, 1000)
    validate.integer(f"{_NAME}.scene_sentences", self.scene_sentences, 0, 1_000_000)
    for name, min_len in (("people", 2), ("items", 1), ("containers", 1),
                          ("containers_plural", 1)):
      common.check_words(f"{_NAME}.{name}", getattr(self, name), min_len)
    if len(self.containers) != len(self.containers_plural):
      raise ValueError(f"{_NAME}.containers_plural has {len(self.containers_plural)} words, "
                       f"containers has {len(self.containers)}; give one plural per container")
    pool = self.people + self.items + self.containers + self.containers_plural
    template_words = _template_words()
    for w in pool:
      if w.isdigit() or w in template_words or pool.count(w) > 1:
        raise ValueError(f"{_NAME}: the scene word {w!r} is a number, a template word or used "
                         "twice; people, items and containers must be distinct new words")
    if self.max_subtrahend >= self.max_number:
      raise ValueError(f"{_NAME}.max_subtrahend={self.max_subtrahend} must be below the "
                       f"largest product {self.max_number}")

  @property
  def max_number(self) -> int:
    """The largest product."""
    if self.numbers == "words":
      return self.max_factor ** 2
    return self.max_multiplicand * 9

  @property
  def k(self) -> int:
    return 2

  def factor_pairs(self) -> list[tuple[int, int]]:
    """Every (x, n) the world uses (x: per container, n: containers)."""
    if self.numbers == "words":
      xs = ns = range(2, self.max_factor + 1)
    else:
      xs, ns = range(10, self.max_multiplicand + 1), range(2, 10)
    return [(x, n) for x in xs for n in ns]

  def to_dict(self) -> dict[str, Any]:
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    for key in ("people", "items", "containers", "containers_plural"):
      out[key] = list(out[key])
    return out

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "MathConfig":
    return common.settings_from_mapping(cls, d)


def _template_words() -> set[str]:
  out: set[str] = {common.COT_CUE}
  for t in SKILL1 + SKILL2 + COMPOSED + SCENES + FACTS + (COMPOSED_COT, COUNTING):
    out |= common.template_words(t)
  return out


def vocabulary(settings: MathConfig) -> tuple[str, ...]:
  """Every word a world with these settings can contain, for any seed (sorted)."""
  if settings.numbers == "words":
    numbers = {str(i) for i in range(settings.max_number + 1)}
  else:
    numbers = {str(i) for i in range(10)}
  words = numbers | _template_words()
  words |= set(settings.people + settings.items + settings.containers
               + settings.containers_plural)
  return tuple(sorted(words))


def render(settings: MathConfig, value: int) -> str:
  """A number as text: one word ('words') or its digits separated by spaces ('digits')."""
  if value < 0:
    raise ValueError(f"render: numbers are non-negative, got {value}")
  return str(value) if settings.numbers == "words" else " ".join(str(value))


def _scene(settings: MathConfig, rng) -> dict[str, str]:
  """Random scene words: person p (and another, q), item, container c and its plural cs."""
  ci = int(rng.integers(len(settings.containers)))
  pi, qi = rng.choice(len(settings.people), size=2, replace=False)
  return {"p": settings.people[pi], "q": settings.people[qi],
          "item": settings.items[int(rng.integers(len(settings.items)))],
          "c": settings.containers[ci], "cs": settings.containers_plural[ci]}


# ------------------------------------------------------------------ sub-steps


def substeps(numbers: Sequence[int]) -> set[str]:
  """The sub-step keys of a multiplication (x, n) or a composed problem (x, n, z).

  Keys: the unordered factor pair (so a commuted pair is the same key), the product, and
  for a composed problem its subtraction step.
  """
  if len(numbers) == 2:
    x, n = numbers
    return {f"pair:{min(x, n)}x{max(x, n)}", f"product:{x * n}"}
  if len(numbers) == 3:
    x, n, z = numbers
    return substeps((x, n)) | {f"step2:{x * n}-{z}"}
  raise ValueError(f"substeps needs 2 or 3 operands, got {list(numbers)}")


def example_substeps(example: common.Example, digits: bool) -> set[str]:
  """Sub-step keys of one example from meta['numbers'], which must be the prompt's numbers.

  A subtraction problem (answer_type 'difference', operands (y, z)) has the keys of its
  minuend as a product and of its step.
  """
  meta = example.meta
  nums = [int(v) for v in meta["numbers"]]
  found = [int(w) for w in _merge_numbers(example.prompt.split(), digits) if w.isdigit()]
  if found != nums:
    raise corpus_lib.LeakError(f"example {example.prompt!r}: its numbers {found} are not its "
                               f"recorded operands {nums}")
  if meta["answer_type"] == "difference":
    y, z = nums
    return {f"product:{y}", f"step2:{y}-{z}"}
  return substeps(nums)


def _merge_numbers(words: Sequence[str], digits: bool) -> list[str]:
  """Words with each run of digit tokens joined into one number ('2 3' → '23') if `digits`."""
  out: list[str] = []
  for w in words:
    if digits and w.isdigit() and out and out[-1].isdigit():
      out[-1] += w
    else:
      out.append(w)
  return out


def _step_strings(x: int, n: int, z: int) -> set[tuple[str, ...]]:
  """The sub-step statements of a composed problem, as number-merged word tuples."""
  y = x * n
  return {(str(x), "times", str(n), "is", str(y)), (str(n), "times", str(x), "is", str(y)),
          (str(y), "minus", str(z), "is", str(y - z))}


def check_substeps_disjoint(world: common.World) -> None:
  """Raise LeakError unless no sub-step of a test problem reached training data.

  (1) From the operands: no example of a training split, and no composed problem of the
  pretraining corpus (the domain probes), shares a factor pair (either order), a product or
  a subtraction step with any test example. (2) From the text: no training example and no
  pretraining text states a test sub-step ("x times n is y", "n times x is y",
  "y minus z is r"), except the bare skill facts of a 'words' world, which are pretraining
  knowledge in every arm by design.
  """
  digits = world.settings.numbers == "digits"
  tests = set(common.test_splits(world.k))
  for group, splits in world.splits.items():
    test_keys: dict[str, str] = {}
    test_steps: set[tuple[str, ...]] = set()
    for split in sorted(tests & set(splits)):
      for e in splits[split]:
        for key in example_substeps(e, digits):
          test_keys.setdefault(key, f"{group}/{split}")
        if len(e.meta["numbers"]) == 3:
          test_steps |= _step_strings(*[int(v) for v in e.meta["numbers"]])
    train = [(f"{group}/{s}", ex) for s, ex in splits.items() if s not in tests]
    train.append(("pretraining (composed problems)",
                  tuple(e for e in world.recall if e.meta.get("source") == "domain")))
    for where, examples in train:
      for i, e in enumerate(examples):
        shared = sorted(example_substeps(e, digits) & set(test_keys))
        if shared:
          raise corpus_lib.LeakError(
              f"{where}[{i}] {e.prompt!r} shares the sub-step {shared[0]} with "
              f"{test_keys[shared[0]]}; training data must be disjoint from the test by "
              "factor pair, product and subtraction step")
        _check_text(f"{where}[{i}]", e.text, test_steps, digits)
    for i, text in enumerate(world.corpus):
      if not digits and _is_fact(text):
        continue
      _check_text(f"pretraining text {i}", text, test_steps, digits)


def _is_fact(text: str) -> bool:
  """A bare skill fact of a 'words' world ("3 times 4 is 12 .")."""
  ws = text.split()
  return (len(ws) == 6 and ws[1] in ("times", "minus") and ws[3] == "is" and ws[5] == "."
          and all(ws[j].isdigit() for j in (0, 2, 4)))


def _check_text(where: str, text: str, steps: set[tuple[str, ...]], digits: bool) -> None:
  ws = _merge_numbers(text.split(), digits)
  for i in range(len(ws) - 4):
    gram = tuple(ws[i:i + 5])
    if gram in steps:
      raise corpus_lib.LeakError(f"{where} ({text!r}) states the test sub-step "
                                 f"{' '.join(gram)!r}")


# ---------------------------------------------------------------------- build


def _split_products(s: MathConfig, pairs: Sequence[tuple[int, int]]):
  """(test triples, non-test triples): test products drawn until test_triples are covered."""
  zs = range(1, s.max_subtrahend + 1)
  by_product: dict[int, list[tuple[int, int, int]]] = {}
  for x, n in pairs:
    by_product.setdefault(x * n, []).extend((x, n, z) for z in zs if z < x * n)
  products = sorted(by_product)
  order = common.rng_for(s.seed, 10).permutation(len(products))
  held: list[int] = []
  covered = 0
  for i in order:
    if covered >= s.test_triples:
      break
    held.append(products[i])
    covered += len(by_product[products[i]])
  if covered < s.test_triples or len(held) == len(products):
    total = sum(len(v) for v in by_product.values())
    raise ValueError(f"{_NAME}.test_triples={s.test_triples} needs products covering "
                     f"{s.test_triples} problems and leaving some products for training, but "
                     f"the {len(products)} products give {total} problems; ask for fewer or "
                     "raise max_factor / max_multiplicand / max_subtrahend")
  candidates = sorted(t for p in held for t in by_product[p])
  pick = common.rng_for(s.seed, 16).permutation(len(candidates))[:s.test_triples]
  test = sorted(candidates[i] for i in pick)
  # Every product drawn stays out of training, even where its problems were not all kept.
  rest = sorted(t for p in products if p not in set(held) for t in by_product[p])
  return test, rest, set(held)


def build(settings: MathConfig) -> common.World:
  """The world for `settings` (deterministic in settings.seed)."""
  if not isinstance(settings, MathConfig):
    raise ValueError(f"build needs MathConfig, got {type(settings).__name__}")
  s = settings
  pairs = s.factor_pairs()
  test, rest, test_products = _split_products(s, pairs)
  train_pairs = [(x, n) for x, n in pairs if x * n not in test_products]
  all_subs = sorted({(x * n, z) for x, n, z in test + rest})
  train_subs = [(y, z) for y, z in all_subs if y not in test_products]
  target = sorted(rest[i] for i in common.rng_for(s.seed, 11).permutation(len(rest))[
      :s.target_triples])
  num = lambda v: render(s, v)  # noqa: E731

  def meta(split, fmt, final, answer_type, numbers, template, **extra):
    out = {"group": GROUP, "split": split, "format": fmt, "final": num(final),
           "answer_type": answer_type, "template": template, "numbers": list(numbers), **extra}
    out["units"] = sorted(substeps(numbers) if answer_type != "difference"
                          else {f"product:{numbers[0]}", f"step2:{numbers[0]}-{numbers[1]}"})
    return out

  scene_rng = common.rng_for(s.seed, 12)

  def skill1(pair_list, split):  # every template: the held-out test has few pairs
    return tuple(
        common.Example(common.fill(SKILL1[j], x=num(x), n=num(n), **_scene(s, scene_rng)),
                       num(x * n), meta(split, "direct", x * n, "product", (x, n), f"skill1/{j}",
                                        hop=1))
        for x, n in pair_list
        for j in range(len(SKILL1)))

  def skill2(sub_list, split):
    return tuple(
        common.Example(common.fill(SKILL2[j], y=num(y), z=num(z), **_scene(s, scene_rng)),
                       num(y - z), meta(split, "direct", y - z, "difference", (y, z),
                                        f"skill2/{j}", hop=2))
        for m, (y, z) in enumerate(sub_list)
        for j in (range(len(SKILL2)) if split == "hop2" else [m % len(SKILL2)]))

  def composed_one(x, n, z, j, fmt, split, rng, **extra_meta):
    y, r = x * n, x * n - z
    sc = _scene(s, rng)
    mt = meta(split, fmt, r, "result", (x, n, z), f"composed/{j}", **extra_meta)
    if fmt == "direct":
      answer = num(r)
    else:
      answer = common.fill(COMPOSED_COT, x=num(x), n=num(n), y=num(y), z=num(z), r=num(r))
      at = len(common.fill(STEP1, x=num(x), n=num(n), y="").split())
      mt.update(bridges=[num(y)], bridge_at=[at], bridge_steps=[0], bridge=num(y))
    prompt = common.ask(common.fill(COMPOSED[j], x=num(x), n=num(n), z=num(z), **sc), fmt)
    return common.Example(prompt, answer, mt)

  def composed(triple_list, split, fmt, one_per):
    return tuple(composed_one(x, n, z, j, fmt, split, scene_rng)
                 for m, (x, n, z) in enumerate(triple_list)
                 for j in ([m % len(COMPOSED)] if one_per else range(len(COMPOSED))))

  sp: dict[str, tuple[common.Example, ...]] = {}
  sp["hop1"] = skill1(train_pairs, "hop1")
  sp["hop2"] = skill2(train_subs, "hop2")
  sp["union"] = tuple(
      common.Example(e.prompt, e.answer, {**e.meta, "split": "union", "source": e.meta["split"]})
      for e in sp["hop1"] + sp["hop2"])
  sp["target"] = composed(target, "target", "direct", False)
  sp["target_cot"] = composed(target, "target_cot", "cot", False)
  sp["test_hop1"] = skill1(sorted({(x, n) for x, n, _ in test}), "test_hop1")
  sp["test_hop2"] = skill2(sorted({(x * n, z) for x, n, z in test}), "test_hop2")
  sp["test_two_hop_direct"] = composed(test, "test_two_hop_direct", "direct", True)
  sp["test_two_hop_cot"] = composed(test, "test_two_hop_cot", "cot", True)

  parts, recall = _corpus_parts(s, pairs, all_subs, test_products, rest, composed_one)
  corpus, counts = corpus_lib.mix(parts, common.rng_for(s.seed, 15))
  names = common.split_names(2)
  disjoint = tuple((tr, te) for tr in common.train_splits(2) for te in common.test_splits(2)
                   if tr in names)
  world = common.World(
      kind="math", settings=s, k=2, corpus=corpus, corpus_parts=counts, splits={GROUP: sp},
      recall=tuple(recall), chance={GROUP: common.chance_levels(sp)},
      majority={GROUP: common.majority_levels(sp)},
      rules={GROUP: common.LeakRules(disjoint=disjoint)}, vocabulary=vocabulary(s))
  world.check_vocabulary()
  corpus_lib.check_coverage(world)
  corpus_lib.check_recall_in_corpus(world)
  corpus_lib.check_unambiguous(world)
  corpus_lib.check_no_leak(world)
  check_substeps_disjoint(world)
  return world


def _corpus_parts(s: MathConfig, pairs, all_subs, test_products, rest, composed_one):
  """(corpus parts, recall probes): counting, scenes, skill facts; domain problems if on."""
  num = lambda v: render(s, v)  # noqa: E731
  parts: list[corpus_lib.Part] = []
  recall: list[common.Example] = []

  def probe(text: str, source: str, answer_type: str, answer_words: int, **extra):
    w = text.split()
    answer = " ".join(w[-answer_words:])
    recall.append(common.Example(" ".join(w[:-answer_words]), answer,
                                 {"group": GROUP, "split": "recall", "format": "direct",
                                  "final": answer, "answer_type": answer_type,
                                  "source": source, **extra}))

  counting = []
  for i in range(s.max_number if s.numbers == "words" else 100):
    counting.append(common.fill(COUNTING, i=num(i), j=num(i + 1)))
    probe(counting[-1], "counting", "count", len(num(i + 1).split()) + 1)
  parts.append(corpus_lib.Part("counting", tuple(counting), s.background_repeats))

  bg_rng = common.rng_for(s.seed, 13)
  x_lo, x_hi = (2, s.max_factor) if s.numbers == "words" else (10, s.max_multiplicand)
  n_hi = s.max_factor if s.numbers == "words" else 9
  scenes = []
  for m in range(s.scene_sentences):
    sc = _scene(s, bg_rng)
    nums = {name: num(int(bg_rng.integers(lo, hi + 1))) for name, lo, hi in (
        ("x", x_lo, x_hi), ("n", 2, n_hi), ("y", 1, s.max_number),
        ("z", 1, s.max_subtrahend), ("i", 0, s.max_number), ("j", 0, s.max_number))}
    scenes.append(common.fill(SCENES[m % len(SCENES)], **sc, **nums))
  parts.append(corpus_lib.Part("scenes", tuple(scenes)))

  # Skill facts, in every arm: words — every pair and step the world uses (lookup tables the
  # base model holds); digits — only those of non-test products (the test needs a procedure).
  keep = (lambda y: True) if s.numbers == "words" else (lambda y: y not in test_products)
  facts = []
  for x, n in pairs:
    if keep(x * n):
      facts.append(common.fill(FACTS[0], x=num(x), n=num(n), y=num(x * n)))
      probe(facts[-1], "skill_facts", "product", len(num(x * n).split()) + 1)
  for y, z in all_subs:
    if keep(y):
      facts.append(common.fill(FACTS[1], y=num(y), z=num(z), r=num(y - z)))
      probe(facts[-1], "skill_facts", "difference", len(num(y - z).split()) + 1)
  parts.append(corpus_lib.Part("skill_facts", tuple(facts), s.fact_repeats))

  if s.domain_pretraining:
    dom_rng = common.rng_for(s.seed, 14)
    pick = sorted(dom_rng.permutation(len(rest))[:s.domain_problems])
    domain = []
    for m, i in enumerate(pick):
      x, n, z = rest[i]
      for fmt in common.FORMATS:
        e = composed_one(x, n, z, m % len(COMPOSED), fmt, "recall", dom_rng, source="domain")
        e = common.Example(e.prompt, e.answer, {**e.meta, "answer_type": "domain"})
        domain.append(e.text)
        recall.append(e)
    parts.append(corpus_lib.Part("domain", tuple(domain)))
  return parts, recall
