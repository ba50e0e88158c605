"""A k-hop fact world whose familiarity is set by what the pretraining corpus contains.

Entities are people, cities and countries. By default (`name_style='token'`) each name is
one word ("kabo"), drawn from an inventory fixed by the settings (not the seed), so every
seed's tokenizer is the same; `name_style='syllables'` (the ablation) spells names as 2-3
syllable words ("ka ro mi"). Relations chain A →r1→ B →r2→ C (default: person →spouse→
person →lives_in→ city; any k >= 2 whose types chain). The final entities come from one
shared pool (`pool_size` cities), assigned in balance, so chance equals the majority-answer
baseline on every composed test.

What the pretraining corpus holds, by group:
  fillers (never in any split) carry the language and the procedures. Every filler fact is
    stated in every statement form; the *QA fillers* also have every question form
    (held-out ones included), which teaches extraction (Allen-Zhu & Li); of those,
    `filler_composed` chains also show composed questions with direct and chain-of-thought
    answers ("... ? explain" → "A 's spouse is B . B lives in C"), which teaches the CoT
    procedure. Two probe sets measure what pretraining taught: *statement-only fillers*
    (facts only as statements; extraction = answering questions about them) and
    *never-composed fillers* (QA facts, no composed question; CoT on them is the procedure,
    not recall). They are the `filler` group's test splits.
  fact-free texts: every person of every group appears in `fact_free_exposure` echo texts
    ("echo X . X") and as many frame texts ("the spouse of X repeat X"): the copy steps of
    the CoT procedure, for every entity, so a tier-F entity is unfamiliar without being an
    untrained vector. They hold no fact.
Per familiarity tier, beyond the fact-free texts:
  F (fictional): nothing — no fact or background sentence about the tier's entities;
  H (hybrid, hybrid='background'): every entity in `background_exposure` unrelated
    background sentences ("kabo likes tea ."), no fact; hybrid='one_hop' adds every hop-1
    fact in `fact_exposure` texts;
  R (real): the background and every hop fact in `fact_exposure` texts (statements and
    training questions), so the tier's one-hop facts are known before any adapter.
So accuracy can differ between tiers only through what the corpus says about their
entities: nothing (F), that they exist (H), or the facts themselves (R). No tier ever sees a
composed (A, C) question about its own entities, nor a held-out question form applied to
them. Exposure is counted from the corpus text (`corpus.exposure_report`) and checked against
these definitions by `check_familiarity`.

Per tier the splits (see `common`) come from `test_chains` test chains and `target_chains`
target chains with disjoint entities: hop-i facts of both in statement forms and training
question forms (one statement form is exactly the CoT step, "A 's spouse is B ."), composed
questions of the target chains (target-task adapter) and of the test chains (the test); the
one-hop tests ask the held-out question form.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lora_limits import validate
from lora_limits.tasks import common
from lora_limits.tasks import corpus as corpus_lib

ENTITY_TYPES = ("person", "city", "country")
POOL_TYPES = ("city", "country")
TIERS = ("F", "H", "R")
HYBRID_MODES = ("background", "one_hop")
_MAX_COUNT = 100_000
_EAGER_NAMES = 1_000_000  # a name length with more combinations than this is drawn, not listed
_NAME = "TwoHopConfig"


@dataclasses.dataclass(frozen=True)
class Relation:
  """A relation with its paraphrase templates.

  statements: fact sentences with {a} (subject) and {b} (object), for the corpus;
  questions: training question paraphrases with {a}; the answer is the object;
  heldout: question paraphrases never used for a split's entities in training (the
    one-hop tests); fillers use them in pretraining, so the base model knows them;
  phrase: a noun phrase with {a} for nesting in composed questions ("the spouse of {a}");
  cot: a chain-of-thought step with {a} and ending in {b} ("{a} 's spouse is {b}").
  """

  name: str
  subject: str
  object: str
  statements: tuple[str, ...]
  questions: tuple[str, ...]
  heldout: tuple[str, ...]
  phrase: str
  cot: str

  def __post_init__(self):
    where = f"Relation({self.name!r})"
    if not isinstance(self.name, str) or not self.name.isidentifier():
      raise ValueError(f"Relation.name must be an identifier, got {self.name!r}")
    validate.choice(f"{where}.subject", self.subject, ENTITY_TYPES)
    validate.choice(f"{where}.object", self.object, ENTITY_TYPES)
    for field, required in (("statements", ("a", "b")), ("questions", ("a",)),
                            ("heldout", ("a",))):
      templates = getattr(self, field)
      if not isinstance(templates, tuple) or not templates:
        raise ValueError(f"{where}.{field} must be a non-empty tuple of templates, "
                         f"got {templates!r}")
      for i, t in enumerate(templates):
        common.check_template(t, required, f"{where}.{field}[{i}]")
    overlap = set(self.questions) & set(self.heldout)
    if overlap:
      raise ValueError(f"{where}: held-out questions {sorted(overlap)} are also training "
                       "questions")
    common.check_template(self.phrase, ("a",), f"{where}.phrase")
    common.check_template(self.cot, ("a", "b"), f"{where}.cot")
    if not self.cot.endswith("{b}") or self.cot.count("{b}") != 1 or self.cot == "{b}":
      raise ValueError(f"{where}.cot={self.cot!r} must contain {{b}} once, at its end, "
                       "after at least one word")
    if self.cot.split("{b}")[0].strip() == "":
      raise ValueError(f"{where}.cot={self.cot!r} needs words before {{b}}")
    if common.STEP_SEPARATOR in self.cot.split():
      raise ValueError(f"{where}.cot={self.cot!r} must be one step, without "
                       f"{common.STEP_SEPARATOR!r}")
    if f"{self.cot} {common.STEP_SEPARATOR}" not in self.statements:
      raise ValueError(f"{where}.statements must include the chain-of-thought step as a "
                       f"sentence, {self.cot + ' ' + common.STEP_SEPARATOR!r}, so an adapter "
                       "trained on the statements knows the step")

  def templates(self) -> tuple[str, ...]:
    return self.statements + self.questions + self.heldout + (self.phrase, self.cot)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


RELATIONS: dict[str, Relation] = {
    r.name: r for r in (
        Relation("spouse", "person", "person",
                 statements=("{a} 's spouse is {b} .", "{a} is married to {b} ."),
                 questions=("who is the spouse of {a} ?", "who is {a} married to ?"),
                 heldout=("whom did {a} marry ?",),
                 phrase="the spouse of {a}", cot="{a} 's spouse is {b}"),
        Relation("mentor", "person", "person",
                 statements=("{a} 's mentor is {b} .", "{a} was trained by {b} ."),
                 questions=("who is the mentor of {a} ?", "who trained {a} ?"),
                 heldout=("who taught {a} ?",),
                 phrase="the mentor of {a}", cot="{a} 's mentor is {b}"),
        Relation("lives_in", "person", "city",
                 statements=("{a} lives in {b} .", "the home of {a} is in {b} ."),
                 questions=("where does {a} live ?", "where is {a} living ?"),
                 heldout=("which city is home to {a} ?",),
                 phrase="the home town of {a}", cot="{a} lives in {b}"),
        Relation("in_country", "city", "country",
                 statements=("{a} is in {b} .", "{a} lies in {b} ."),
                 questions=("which country is {a} in ?", "in which country is {a} ?"),
                 heldout=("{a} belongs to which country ?",),
                 phrase="the country of {a}", cot="{a} is in {b}"),
    )
}

# Background sentences per entity type: (template with {a} and {x}, values of {x}). Each
# entity gets one fixed value per template, so the background is consistent, and each
# sentence mentions exactly one entity.
BACKGROUND: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "person": (
        ("{a} likes {x} .", ("tea", "music", "boats", "rain", "bread", "dogs")),
        ("{a} was born in {x} .", ("spring", "summer", "autumn", "winter")),
        ("{a} works as a {x} .", ("baker", "pilot", "teacher", "farmer", "doctor", "painter")),
    ),
    "city": (
        ("{a} has a famous {x} .", ("bridge", "market", "tower", "park", "harbor")),
        ("{a} is known for its {x} .", ("food", "weather", "songs", "festival")),
    ),
    "country": (
        ("{a} is a land of {x} .", ("hills", "lakes", "forests", "deserts")),
        ("the flag of {a} is {x} .", ("red", "green", "blue", "white")),
    ),
}

# Fact-free texts: the copy steps of the chain-of-thought procedure, with one person each.
ECHO = "echo {a} . {a}"  # the bridge step: copy the name before the period
FRAME = "{phrase} repeat {a}"  # the first step: copy the head out of the question's frame
FACT_FREE_WORDS = ("echo", "repeat")

# Consonant-vowel syllables that are not words of any template.
DEFAULT_SYLLABLES = (
    "ba", "bi", "bo", "bu", "da", "di", "du", "fa", "fe", "fi", "fo", "fu", "ga", "gi",
    "gu", "ka", "ke", "ki", "ko", "ku", "la", "le", "li", "lo", "lu", "mi", "mo", "mu",
    "na", "ne", "ni", "nu", "pa", "pe", "pi", "po", "pu", "ra", "re", "ri")
NAME_STYLES = ("token", "syllables")
_INVENTORY_SEED = 20261202  # fixes the order of the token-name inventory for every seed


def reserved_words(relations: Sequence[Relation]) -> set[str]:
  """Words of every template and background value (syllables must avoid them)."""
  out: set[str] = {common.COT_CUE, *FACT_FREE_WORDS}
  for r in relations:
    for t in r.templates():
      out |= common.template_words(t)
  for entries in BACKGROUND.values():
    for template, values in entries:
      out |= common.template_words(template) | set(values)
  return out


def vocabulary(settings: "TwoHopConfig") -> tuple[str, ...]:
  """Every word a world with these settings can contain, for any seed (sorted)."""
  names = (name_inventory(settings) if settings.name_style == "token"
           else settings.syllables)
  return tuple(sorted(set(names) | reserved_words(settings.chain)))


@dataclasses.dataclass(frozen=True)
class TwoHopConfig:
  """Generator settings; see the module docstring for the groups and tier definitions.

  relations: names in RELATIONS or Relation objects, chained (k = len(relations) >= 2).
  tiers: which familiarity groups to build (each has its own entities).
  test_chains / target_chains: chains per tier for the test and for the target adapter.
  filler_chains: chains of filler entities that carry the language in pretraining; a share
    `composed_share` of them also show composed questions and a share `statement_share`
    have their facts only as statements (at least one chain); the rest (at least one) are
    QA fillers never shown a composed question.
  probe_chains: filler chains per probe split (extraction, CoT on never-composed fillers),
    at most as many as there are.
  pool_size: final entities (cities) of the one shared answer pool.
  name_style: 'token' (one word per name) or 'syllables' (2-3 syllable words, the ablation).
  syllables, name_lengths: what names are made of (joined into one word for 'token').
  background_exposure: background sentences per H / R person.
  fact_exposure: texts per fact in pretraining (R; and hop 1 in H with hybrid='one_hop').
  hybrid: 'background' or 'one_hop' (see the module docstring).
  fact_free_exposure: echo texts and frame texts per person (each).
  filler_repeats: how often each filler text appears in the corpus.
  """

  seed: int = 0
  relations: tuple[Any, ...] = ("spouse", "lives_in")
  tiers: tuple[str, ...] = TIERS
  test_chains: int = 32
  target_chains: int = 32
  filler_chains: int = 400
  composed_share: float = 0.4
  statement_share: float = 0.15
  probe_chains: int = 32
  pool_size: int = 16
  name_style: str = "token"
  syllables: tuple[str, ...] = DEFAULT_SYLLABLES
  name_lengths: tuple[int, ...] = (2, 3)
  background_exposure: int = 4
  fact_exposure: int = 8
  hybrid: str = "background"
  fact_free_exposure: int = 2
  filler_repeats: int = 2

  def __post_init__(self):
    validate.integer(f"{_NAME}.seed", self.seed, 0, 2**32 - 1)
    if not isinstance(self.relations, tuple) or not 2 <= len(self.relations) <= 6:
      raise ValueError(f"{_NAME}.relations must be a tuple of 2 to 6 relations, got "
                       f"{self.relations!r}")
    chain = []
    for i, r in enumerate(self.relations):
      if isinstance(r, str):
        if r not in RELATIONS:
          raise ValueError(f"{_NAME}.relations[{i}]={r!r} is not one of {sorted(RELATIONS)} "
                           "(or pass a Relation)")
        r = RELATIONS[r]
      elif not isinstance(r, Relation):
        raise ValueError(f"{_NAME}.relations[{i}] must be a relation name or a Relation, got "
                         f"{r!r}")
      chain.append(r)
    if chain[0].subject != "person":
      raise ValueError(f"{_NAME}.relations[0]={chain[0].name!r} must start from a person, "
                       f"not a {chain[0].subject}")
    for i in range(1, len(chain)):
      if chain[i - 1].object != chain[i].subject:
        raise ValueError(
            f"{_NAME}.relations do not chain: {chain[i - 1].name!r} ends at a "
            f"{chain[i - 1].object}, {chain[i].name!r} starts from a {chain[i].subject}")
    if not isinstance(self.tiers, tuple) or not self.tiers:
      raise ValueError(f"{_NAME}.tiers must be a non-empty tuple of {list(TIERS)}, got "
                       f"{self.tiers!r}")
    for t in self.tiers:
      validate.choice(f"{_NAME}.tiers", t, TIERS)
    if len(set(self.tiers)) != len(self.tiers):
      raise ValueError(f"{_NAME}.tiers repeats a tier: {self.tiers!r}")
    for name in ("test_chains", "target_chains", "filler_chains", "pool_size",
                 "filler_repeats", "probe_chains"):
      validate.integer(f"{_NAME}.{name}", getattr(self, name), 1, _MAX_COUNT)
    for name in ("background_exposure", "fact_exposure", "fact_free_exposure"):
      validate.integer(f"{_NAME}.{name}", getattr(self, name), 0, _MAX_COUNT)
    for name in ("composed_share", "statement_share"):
      validate.number(f"{_NAME}.{name}", getattr(self, name), 0, 1, high_open=True)
    composed, statement, never = self.filler_roles
    if statement < 1 or never < 1:
      raise ValueError(
          f"{_NAME}: filler_chains={self.filler_chains} with composed_share="
          f"{self.composed_share} and statement_share={self.statement_share} leaves "
          f"{statement} statement-only and {never} never-composed fillers; each probe needs "
          "at least one (more filler chains, or smaller shares)")
    validate.choice(f"{_NAME}.hybrid", self.hybrid, HYBRID_MODES)
    validate.choice(f"{_NAME}.name_style", self.name_style, NAME_STYLES)
    if "H" in self.tiers and self.background_exposure < 1:
      raise ValueError(f"{_NAME}.background_exposure must be >= 1 when tier H is built "
                       "(H entities appear in background sentences)")
    if ("R" in self.tiers or ("H" in self.tiers and self.hybrid == "one_hop")) and \
        self.fact_exposure < 1:
      raise ValueError(f"{_NAME}.fact_exposure must be >= 1 when tier R (or H with "
                       "hybrid='one_hop') is built")
    common.check_words(f"{_NAME}.syllables", self.syllables, min_len=2)
    for s in self.syllables:
      if not s.isalpha():
        raise ValueError(f"{_NAME}.syllables has {s!r}; syllables must be letters only")
    clash = sorted(set(self.syllables) & reserved_words(chain))
    if clash:
      raise ValueError(f"{_NAME}.syllables {clash} are also template words; names must be "
                       "distinguishable from the templates")
    if not isinstance(self.name_lengths, tuple) or not self.name_lengths:
      raise ValueError(f"{_NAME}.name_lengths must be a non-empty tuple of ints in [2, 6], "
                       f"got {self.name_lengths!r}")
    for n in self.name_lengths:
      validate.integer(f"{_NAME}.name_lengths", n, 2, 6)
    if self.name_style == "token":
      available = sum(len(self.syllables) ** n for n in set(self.name_lengths))
      if names_needed(self) > min(available, 200_000):
        raise ValueError(
            f"{_NAME}: {names_needed(self)} names are needed but {len(self.syllables)} "
            f"syllables of lengths {list(self.name_lengths)} give {available}; add syllables "
            "or name lengths, or ask for fewer chains")

  @property
  def filler_roles(self) -> tuple[int, int, int]:
    """(composed, statement-only, never-composed) filler chain counts."""
    composed = int(round(self.composed_share * self.filler_chains))
    statement = max(1, int(round(self.statement_share * self.filler_chains)))
    return composed, statement, self.filler_chains - composed - statement

  @property
  def chain(self) -> tuple[Relation, ...]:
    return tuple(RELATIONS[r] if isinstance(r, str) else r for r in self.relations)

  @property
  def k(self) -> int:
    return len(self.relations)

  def to_dict(self) -> dict[str, Any]:
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    out["relations"] = [r if isinstance(r, str) else r.to_dict() for r in self.relations]
    for key in ("tiers", "syllables", "name_lengths"):
      out[key] = list(out[key])
    return out

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "TwoHopConfig":
    d = dict(d)
    if "relations" in d and isinstance(d["relations"], (list, tuple)):
      rels = []
      for r in d["relations"]:
        if isinstance(r, Mapping):
          r = common.settings_from_mapping(Relation, r)
        rels.append(r)
      d["relations"] = tuple(rels)
    return common.settings_from_mapping(cls, d)


def _people_per_chain(chain: Sequence[Relation]) -> int:
  return 1 + sum(1 for r in chain if r.object == "person")


def _pool_types(chain: Sequence[Relation]) -> list[str]:
  return sorted({r.object for r in chain} & set(POOL_TYPES))


def names_needed(settings: TwoHopConfig) -> int:
  """How many distinct names one world of these settings uses (every seed the same)."""
  chains = settings.filler_chains + len(settings.tiers) * (
      settings.test_chains + settings.target_chains)
  return (chains * _people_per_chain(settings.chain)
          + settings.pool_size * len(_pool_types(settings.chain)))


def name_inventory(settings: TwoHopConfig) -> tuple[str, ...]:
  """The one-word names of `name_style='token'`: syllables joined, the shortest lengths
  first, each length in a fixed pseudo-random order; exactly `names_needed` of them, so every
  seed uses (and pretraining trains) every name token, in a different assignment."""
  rng = np.random.default_rng(_INVENTORY_SEED)
  need = names_needed(settings)
  out: list[str] = []
  syl = list(settings.syllables)
  for length in sorted(set(settings.name_lengths)):
    count = len(syl) ** length
    if count <= _EAGER_NAMES:
      combos = ["".join(c) for c in itertools.product(syl, repeat=length)]
      out.extend(combos[i] for i in rng.permutation(count))
    else:  # too many to list (40 syllables, 6 long: 4e9): draw only the names still needed
      for i in rng.choice(count, size=min(need - len(out), count), replace=False):
        digits = []
        for _ in range(length):
          i, d = divmod(int(i), len(syl))
          digits.append(syl[d])
        out.append("".join(reversed(digits)))
    if len(out) >= need:
      break
  return tuple(out[:need])


class _TokenNames:
  """Draws one-word names from the inventory in a seeded order (no name twice)."""

  def __init__(self, settings: TwoHopConfig, rng: np.random.Generator):
    inventory = name_inventory(settings)
    self._order = [inventory[i] for i in rng.permutation(len(inventory))]

  def draw(self, n: int, *, what: str = "names", cover: bool = False) -> list[str]:
    del cover
    if n > len(self._order):
      raise ValueError(f"{what}: {n} more names requested, {len(self._order)} left")
    out, self._order = self._order[:n], self._order[n:]
    return out


# ----------------------------------------------------------------------- build


@dataclasses.dataclass
class _Group:
  """Entities and facts of one group (a tier, or the fillers), before text generation."""

  name: str
  test: list[list[str]]  # chains: entity names e0..ek
  target: list[list[str]]
  attrs: dict[str, tuple[str, ...]]  # entity → its background values
  etype: dict[str, str]

  def chains(self) -> list[list[str]]:
    return self.test + self.target

  def hop_facts(self, i: int, chains: Sequence[Sequence[str]] | None = None):
    """Unique (subject, object) of hop i (0-based), in chain order."""
    seen, out = set(), []
    for c in (self.chains() if chains is None else chains):
      f = (c[i], c[i + 1])
      if f not in seen:
        seen.add(f)
        out.append(f)
    return out

  def people(self, chains: Sequence[Sequence[str]] | None = None) -> list[str]:
    seen, out = set(), []
    for c in (self.chains() if chains is None else chains):
      for e in c:
        if self.etype[e] == "person" and e not in seen:
          seen.add(e)
          out.append(e)
    return out


def _balanced(n: int, pool: Sequence[str], rng: np.random.Generator) -> list[str]:
  """n draws from the pool, each entry as often as possible equally (shuffled blocks)."""
  out: list[str] = []
  while len(out) < n:
    out.extend(pool[i] for i in rng.permutation(len(pool)))
  return out[:n]


def _make_group(name: str, settings: TwoHopConfig, names, pools: Mapping[str, list[str]],
                memo: dict[tuple[str, str], str], rng, sizes: Sequence[int],
                cover: bool) -> tuple[_Group, list[list[list[str]]]]:
  """A group whose chains come in blocks of `sizes` (e.g. test, target); the final entity
  is balanced over the pool within each block when the last hop starts from a person.
  `memo` ((relation, subject) → object) is shared by every group, so facts about pooled
  entities ("a city is in a country") are the same everywhere."""
  chain = settings.chain
  etype: dict[str, str] = {}
  n_people = sum(sizes) * _people_per_chain(chain)
  people = list(reversed(names.draw(n_people, what=f"people of group {name}", cover=cover)))
  for p in people:
    etype[p] = "person"
  for t, pool in pools.items():
    etype.update((n, t) for n in pool)
  blocks: list[list[list[str]]] = []
  for size in sizes:
    finals = (_balanced(size, pools[chain[-1].object], rng)
              if chain[-1].object in POOL_TYPES and chain[-1].subject == "person" else None)
    block = []
    for m in range(size):
      ents = [people.pop()]
      for j, r in enumerate(chain):
        key = (r.name, ents[-1])
        if key not in memo:
          if r.object == "person":
            memo[key] = people.pop()
          elif j == len(chain) - 1 and finals is not None:
            memo[key] = finals[m]
          else:
            pool = pools[r.object]
            memo[key] = pool[int(rng.integers(len(pool)))]
        ents.append(memo[key])
      block.append(ents)
    blocks.append(block)
  entities = sorted({e for b in blocks for c in b for e in c})
  attrs = {e: tuple(values[int(rng.integers(len(values)))] for _, values in BACKGROUND[etype[e]])
           for e in entities}
  # test / target: the first block and the rest (for the fillers, every chain either way).
  test = blocks[0] if blocks else []
  target = [c for b in blocks[1:] for c in b]
  return _Group(name, test, target, attrs, etype), blocks


def exposed_hops(tier: str, settings: TwoHopConfig) -> tuple[int, ...]:
  """0-based hops whose facts the tier's pretraining corpus contains."""
  if tier == "R":
    return tuple(range(settings.k))
  if tier == "H" and settings.hybrid == "one_hop":
    return (0,)
  return ()


def composed_phrase(chain: Sequence[Relation], head: str) -> str:
  """The nested noun phrase of every relation but the last ("the spouse of A")."""
  phrase = head
  for r in chain[:-1]:
    phrase = common.fill(r.phrase, a=phrase)
  return phrase


def composed_prompt(chain: Sequence[Relation], head: str, question: str) -> str:
  """The last relation's question about the nested phrase of the earlier ones."""
  return common.fill(question, a=composed_phrase(chain, head))


def cot_answer(chain: Sequence[Relation], ents: Sequence[str]) -> tuple[str, list[int]]:
  """(chain-of-thought answer, word offsets of the bridge entities e1..e(k-1))."""
  steps, bridge_at, pos = [], [], 0
  for i, r in enumerate(chain):
    step = common.fill(r.cot, a=ents[i], b=ents[i + 1])
    if i < len(chain) - 1:
      before = common.fill(r.cot.split("{b}")[0], a=ents[i])
      bridge_at.append(pos + len(before.split()))
    pos += len(step.split()) + 1  # the step and its " ."
    steps.append(step)
  return f" {common.STEP_SEPARATOR} ".join(steps), bridge_at


def _units(group: _Group, names: Sequence[str]) -> list[str]:
  """The entities that identify a chain (people; pooled cities are shared)."""
  return [n for n in names if group.etype[n] not in POOL_TYPES]


def _fact_meta(group: _Group, r: Relation, hop: int, s: str, o: str, split: str, fmt: str,
               template: str) -> dict[str, Any]:
  return {"group": group.name, "split": split, "format": fmt, "final": o,
          "answer_type": r.object, "units": _units(group, (s, o)), "hop": hop + 1,
          "relation": r.name, "template": template}


def _fact_examples(group: _Group, settings: TwoHopConfig, hop: int, facts, split: str,
                   templates: str, one_per_fact: bool) -> tuple[common.Example, ...]:
  """Question → answer examples of hop-`hop` facts ('questions' or 'heldout' templates)."""
  r = settings.chain[hop]
  qs = r.questions if templates == "questions" else r.heldout
  out = []
  for m, (s, o) in enumerate(facts):
    js = [m % len(qs)] if one_per_fact else range(len(qs))
    for j in js:
      out.append(common.Example(
          common.fill(qs[j], a=s), o,
          _fact_meta(group, r, hop, s, o, split, "direct", f"{r.name}/{templates}/{j}")))
  return tuple(out)


def _shared(r: Relation, tests: tuple[common.Example, ...]) -> tuple[common.Example, ...]:
  """A fact about a pooled entity (a city's country) is shared world knowledge, stated in
  every form by the fillers: its one-hop test measures recall, not a group's own facts."""
  if r.subject not in POOL_TYPES:
    return tests
  return tuple(common.Example(e.prompt, e.answer, {**e.meta, "shared": True}) for e in tests)


def _statement_examples(group: _Group, settings: TwoHopConfig, hop: int, facts,
                        split: str) -> tuple[common.Example, ...]:
  """Every statement form of each fact: "A 's spouse is" → "B ." (the statement's text)."""
  r = settings.chain[hop]
  out = []
  for s, o in facts:
    for j, t in enumerate(r.statements):
      before, after = t.split("{b}")
      out.append(common.Example(
          common.fill(before.strip(), a=s), f"{o}{after.rstrip()}".strip(),
          _fact_meta(group, r, hop, s, o, split, "statement", f"{r.name}/statements/{j}")))
  return tuple(out)


def _composed_examples(group: _Group, settings: TwoHopConfig, chains, split: str, fmt: str,
                       one_per_chain: bool) -> tuple[common.Example, ...]:
  rels = settings.chain
  qs = rels[-1].questions
  out = []
  for m, ents in enumerate(chains):
    js = [m % len(qs)] if one_per_chain else range(len(qs))
    for j in js:
      prompt = common.ask(composed_prompt(rels, ents[0], qs[j]), fmt)
      meta = {"group": group.name, "split": split, "format": fmt, "final": ents[-1],
              "answer_type": rels[-1].object, "units": _units(group, ents),
              "entities": list(ents), "relations": [r.name for r in rels],
              "template": f"{rels[-1].name}/questions/{j}"}
      if fmt == "direct":
        out.append(common.Example(prompt, ents[-1], meta))
      else:
        answer, bridge_at = cot_answer(rels, ents)
        meta.update(bridges=list(ents[1:-1]), bridge_at=bridge_at,
                    bridge_steps=list(range(len(rels) - 1)), bridge=ents[1])
        out.append(common.Example(prompt, answer, meta))
  return tuple(out)


def _background_texts(group: _Group, entity: str, count: int | None = None) -> list[str]:
  """`count` background sentences about `entity` (default: one per template), cycling."""
  entries = BACKGROUND[group.etype[entity]]
  count = len(entries) if count is None else count
  return [common.fill(entries[j % len(entries)][0], a=entity,
                      x=group.attrs[entity][j % len(entries)]) for j in range(count)]


def _fact_forms(r: Relation, s: str, o: str, questions: bool,
                heldout: bool) -> list[tuple[str, str | None]]:
  """(text, question or None) forms of a fact, questions and statements interleaved."""
  qs = (list(r.questions) + (list(r.heldout) if heldout else [])) if questions else []
  forms: list[tuple[str, str | None]] = []
  for j in range(max(len(qs), len(r.statements))):
    if j < len(qs):
      q = common.fill(qs[j], a=s)
      forms.append((f"{q} {o}", q))
    if j < len(r.statements):
      forms.append((common.fill(r.statements[j], a=s, b=o), None))
  return forms


def fact_free_texts(settings: TwoHopConfig, person: str) -> list[str]:
  """The echo and frame texts of one person, `fact_free_exposure` of each."""
  phrase = composed_phrase(settings.chain, person)
  texts = [common.fill(ECHO, a=person), FRAME.format(phrase=phrase, a=person)]
  return [t for _ in range(settings.fact_free_exposure) for t in texts]


def build(settings: TwoHopConfig) -> common.World:
  """The world for `settings` (deterministic in settings.seed); see the module docstring."""
  if not isinstance(settings, TwoHopConfig):
    raise ValueError(f"build needs TwoHopConfig, got {type(settings).__name__}")
  rels, k = settings.chain, settings.k
  if settings.name_style == "token":
    names = _TokenNames(settings, common.rng_for(settings.seed, 0))
  else:
    names = common.NameSource(common.rng_for(settings.seed, 0), settings.syllables,
                              settings.name_lengths)
  pools = {t: names.draw(settings.pool_size, what=f"{t} pool") for t in _pool_types(rels)}
  memo: dict[tuple[str, str], str] = {}  # (relation, subject) → object: facts are functions
  filler, (f_composed, f_statement, f_never) = _make_group(
      "filler", settings, names, pools, memo, common.rng_for(settings.seed, 1),
      settings.filler_roles, cover=True)
  f_qa = f_composed + f_never
  tiers = [t for t in TIERS if t in settings.tiers]
  groups = {t: _make_group(t, settings, names, pools, memo, common.rng_for(settings.seed, 2, i),
                           (settings.test_chains, settings.target_chains), cover=False)[0]
            for i, t in enumerate(tiers)}

  parts: list[corpus_lib.Part] = []
  recall: list[common.Example] = []

  def add_recall(group: str, q: str | None, answer: str, meta: dict):
    if q is not None:
      recall.append(common.Example(q, answer, {"group": group, "split": "recall", **meta}))

  # Fillers: background of every filler person and every pooled entity, every fact form.
  pooled = [n for p in pools.values() for n in p]
  pool_attrs = _Group("pool", [], [], {}, {})
  prng = common.rng_for(settings.seed, 4)
  for t, pool in pools.items():
    for n in pool:
      pool_attrs.etype[n] = t
      pool_attrs.attrs[n] = tuple(values[int(prng.integers(len(values)))]
                                  for _, values in BACKGROUND[t])
  fb = [x for e in filler.people() for x in _background_texts(filler, e)]
  fb += [x for e in pooled for x in _background_texts(pool_attrs, e)]
  parts.append(corpus_lib.Part("filler/background", tuple(fb), settings.filler_repeats))
  ff = []
  for chains, questions in ((f_qa, True), (f_statement, False)):
    for i, r in enumerate(rels):
      for s, o in filler.hop_facts(i, chains):
        for text, q in _fact_forms(r, s, o, questions=questions, heldout=True):
          ff.append(text)
          add_recall("filler", q, o, {"format": "direct", "final": o,
                                      "answer_type": r.object, "hop": i + 1})
  parts.append(corpus_lib.Part("filler/facts", tuple(ff), settings.filler_repeats))
  if f_composed:
    fc = []
    for fmt in common.FORMATS:
      for e in _composed_examples(filler, settings, f_composed, "recall", fmt, False):
        fc.append(e.text)
        recall.append(e)
    parts.append(corpus_lib.Part("filler/two_hop", tuple(fc), settings.filler_repeats))
  every_person = filler.people() + [p for g in groups.values() for p in g.people()]
  fact_free = tuple(t for p in every_person for t in fact_free_texts(settings, p))
  if fact_free:
    parts.append(corpus_lib.Part("fact_free", fact_free))

  splits: dict[str, dict[str, tuple[common.Example, ...]]] = {}
  rules: dict[str, common.LeakRules] = {}
  entities: dict[str, dict[str, tuple[str, ...]]] = {}
  facts: dict[str, dict[str, tuple[tuple[str, str], ...]]] = {}
  composed: dict[str, tuple[tuple[str, str], ...]] = {}
  for t, g in groups.items():
    exposed = exposed_hops(t, settings)
    if t in ("H", "R"):
      bg = [x for e in g.people() for x in _background_texts(g, e, settings.background_exposure)]
      parts.append(corpus_lib.Part(f"{t}/background", tuple(bg)))
    if exposed:
      fx = []
      for i in exposed:
        for s, o in g.hop_facts(i):
          forms = _fact_forms(rels[i], s, o, questions=True, heldout=False)
          used = [forms[j % len(forms)] for j in range(settings.fact_exposure)]
          fx.extend(text for text, _ in used)
          for _, q in dict.fromkeys(used):
            add_recall(t, q, o, {"format": "direct", "final": o,
                                 "answer_type": rels[i].object, "hop": i + 1})
      parts.append(corpus_lib.Part(f"{t}/facts", tuple(fx)))

    sp: dict[str, tuple[common.Example, ...]] = {}
    for i in range(k):
      sp[f"hop{i + 1}"] = (
          _statement_examples(g, settings, i, g.hop_facts(i), f"hop{i + 1}")
          + _fact_examples(g, settings, i, g.hop_facts(i), f"hop{i + 1}", "questions",
                           one_per_fact=False))
    sp["union"] = tuple(
        common.Example(e.prompt, e.answer, {**e.meta, "split": "union", "source": e.meta["split"]})
        for i in range(k) for e in sp[f"hop{i + 1}"])
    sp["target"] = _composed_examples(g, settings, g.target, "target", "direct", False)
    sp["target_cot"] = _composed_examples(g, settings, g.target, "target_cot", "cot", False)
    for i in range(k):
      sp[f"test_hop{i + 1}"] = _shared(rels[i], _fact_examples(
          g, settings, i, g.hop_facts(i, g.test), f"test_hop{i + 1}", "heldout",
          one_per_fact=True))
    sp["test_two_hop_direct"] = _composed_examples(g, settings, g.test, "test_two_hop_direct",
                                                   "direct", True)
    sp["test_two_hop_cot"] = _composed_examples(g, settings, g.test, "test_two_hop_cot", "cot",
                                                True)
    splits[t] = sp

    heads = tuple(dict.fromkeys(c[0] for c in g.chains()))
    bridges = tuple(dict.fromkeys(e for c in g.chains() for e in c[1:-1]))
    finals = tuple(dict.fromkeys(c[-1] for c in g.chains()))
    entities[t] = {"head": heads, "bridge": bridges, "final": finals,
                   "person": tuple(g.people())}
    facts[t] = {f"hop{i + 1}": tuple(g.hop_facts(i)) for i in range(k)}
    composed[t] = tuple(dict.fromkeys((c[0], c[-1]) for c in g.chains()))
    hidden_facts = tuple(f for i in range(k) if i not in exposed
                         and rels[i].subject not in POOL_TYPES for f in g.hop_facts(i))
    disjoint = tuple((tr, te) for tr in common.TARGET_SPLITS for te in common.COMPOSED_TESTS)
    rules[t] = common.LeakRules(absent_names=tuple(g.people()) if t == "F" else (),
                                absent_pairs=composed[t] + hidden_facts, disjoint=disjoint)

  # The filler probes: extraction on statement-only fillers, composition on never-composed.
  n_probe = settings.probe_chains
  fp: dict[str, tuple[common.Example, ...]] = {}
  for i in range(k):
    fp[f"test_hop{i + 1}"] = _shared(rels[i], _fact_examples(
        filler, settings, i, filler.hop_facts(i, f_statement[:n_probe]), f"test_hop{i + 1}",
        "heldout", one_per_fact=True))
  for fmt in common.FORMATS:
    fp[f"test_two_hop_{fmt}"] = _composed_examples(filler, settings, f_never[:n_probe],
                                                   f"test_two_hop_{fmt}", fmt, True)
  splits[FILLER] = fp

  corpus, counts = corpus_lib.mix(parts, common.rng_for(settings.seed, 3))
  world = common.World(
      kind="two_hop", settings=settings, k=k, corpus=corpus, corpus_parts=counts,
      splits=splits, recall=_dedupe(recall),
      chance={t: common.chance_levels(sp) for t, sp in splits.items()},
      majority={t: common.majority_levels(sp) for t, sp in splits.items()}, rules=rules,
      vocabulary=vocabulary(settings), entities=entities, facts=facts, composed=composed,
      fact_free=tuple(dict.fromkeys(fact_free)))
  world.check_vocabulary()
  corpus_lib.check_coverage(world)
  corpus_lib.check_recall_in_corpus(world)
  corpus_lib.check_unambiguous(world)
  corpus_lib.check_no_leak(world)
  check_familiarity(world)
  return world


FILLER = "filler"


def _dedupe(examples: Sequence[common.Example]) -> tuple[common.Example, ...]:
  seen, out = set(), []
  for e in examples:
    if e.text not in seen:
      seen.add(e.text)
      out.append(e)
  return tuple(out)


def expected_exposure(world: common.World, group: str) -> tuple[dict[str, int], dict[str, int]]:
  """(mentions per person outside the fact-free texts, texts per fact kind) that the tier
  definition prescribes. Pooled entities (cities) are shared by every group: not counted."""
  s: TwoHopConfig = world.settings
  exposed = exposed_hops(group, s)
  bg = s.background_exposure if group in ("H", "R") else 0
  mentions = {n: bg for n in world.entities[group]["person"]}
  for i in exposed:
    for subj, obj in world.facts[group][f"hop{i + 1}"]:
      for n in (subj, obj):
        if n in mentions:
          mentions[n] += s.fact_exposure
  per_fact = {f"hop{i + 1}": (s.fact_exposure if i in exposed else 0) for i in range(world.k)}
  per_fact["composed"] = 0
  return mentions, per_fact


def check_familiarity(world: common.World) -> None:
  """Raise ValueError unless the corpus counts match the tier definitions exactly: each
  person's mentions outside the fact-free texts, each fact's texts, and each person's
  fact-free texts."""
  fact_free = set(world.fact_free)
  factual = [t for t in world.corpus if t not in fact_free]
  free = [t for t in world.corpus if t in fact_free]
  per_person = 2 * world.settings.fact_free_exposure
  for group in world.entities:
    want_mentions, want_facts = expected_exposure(world, group)
    got = corpus_lib.count_mentions(factual, want_mentions)
    for name, n in want_mentions.items():
      if got[name] != n:
        raise ValueError(f"tier {group}: entity {name!r} occurs {got[name]} times in the "
                         f"corpus outside the fact-free texts; the tier definition prescribes {n}")
    got_free = corpus_lib.count_cooccurrences(free, [(n, n) for n in want_mentions])
    for (name, _), n in got_free.items():
      if n != per_person:
        raise ValueError(f"tier {group}: entity {name!r} is in {n} fact-free texts; "
                         f"fact_free_exposure={world.settings.fact_free_exposure} prescribes "
                         f"{per_person}")
    chain = world.settings.chain
    # Facts about pooled entities (a city's country) are shared by every group: not counted.
    kinds = {f"hop{i + 1}": pairs for i, pairs in enumerate(world.facts[group].values())
             if chain[i].subject not in POOL_TYPES}
    kinds["composed"] = world.composed[group]
    for kind, pairs in kinds.items():
      co = corpus_lib.count_cooccurrences(world.corpus, pairs)
      for pair, n in co.items():
        if n != want_facts[kind]:
          raise ValueError(f"tier {group}: {kind} fact {pair} is in {n} corpus texts; the "
                           f"tier definition prescribes {want_facts[kind]}")
