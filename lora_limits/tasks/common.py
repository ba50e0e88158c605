"""Records shared by the synthetic worlds: examples, worlds, fictional names, text helpers.

All text is lower-case words separated by single spaces (punctuation is its own word), so a
word-level tokenizer round-trips every string exactly. A `World` is pure data: the
pretraining corpus, the question/answer splits per group (the familiarity tiers of the
two-hop world; one group for the math world), recall probes of what the corpus teaches, and
the leak rules that `corpus.check_no_leak` enforces.

Split names are shared by both worlds so one pipeline runs either; in the math world
"hop i" means "skill i" and "two_hop" means the composed problem:
  hop1..hopK       one-hop facts (skill-i problems) as question → answer, for adapter i
  union            hop1 ∪ … ∪ hopK, for the union-data adapter
  target           composed questions on units disjoint from the tests, direct answers
  target_cot       the same questions with chain-of-thought answers
  test_hop1..K     held-out paraphrases of the one-hop facts of the test units
  test_two_hop_direct / test_two_hop_cot   the composed test questions
Chain-of-thought questions end with the cue word `COT_CUE`; direct ones do not.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import string
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

FORMATS = ("direct", "cot")
# Appended to a question to ask for a chain-of-thought answer; without it the answer is
# direct. Both formats of a question appear in pretraining (fillers), so the prompt must
# say which one is wanted.
COT_CUE = "explain"
# Chain-of-thought steps are joined by this word; each step that states a bridge ends with it.
STEP_SEPARATOR = "."
COMPOSED_TESTS = ("test_two_hop_direct", "test_two_hop_cot")
TARGET_SPLITS = ("target", "target_cot")


def hop_splits(k: int) -> tuple[str, ...]:
  return tuple(f"hop{i}" for i in range(1, k + 1))


def test_hop_splits(k: int) -> tuple[str, ...]:
  return tuple(f"test_hop{i}" for i in range(1, k + 1))


def split_names(k: int) -> tuple[str, ...]:
  """All split names of a world whose composed question has k hops (skills)."""
  return hop_splits(k) + ("union",) + TARGET_SPLITS + test_hop_splits(k) + COMPOSED_TESTS


def train_splits(k: int) -> tuple[str, ...]:
  return hop_splits(k) + ("union",) + TARGET_SPLITS


def test_splits(k: int) -> tuple[str, ...]:
  return test_hop_splits(k) + COMPOSED_TESTS


# --------------------------------------------------------------------------- text


def words(text: str) -> list[str]:
  return text.split()


def normalise(text: str) -> str:
  """Lower case, single spaces, no surrounding space: the form exact match compares."""
  return " ".join(text.lower().split())


def template_fields(template: str, where: str) -> set[str]:
  """The {slot} names of a template; a malformed template is a ValueError naming `where`."""
  if not isinstance(template, str):
    raise ValueError(f"{where} must be a string, got {template!r}")
  try:
    parsed = list(string.Formatter().parse(template))
  except ValueError as e:
    raise ValueError(f"{where}={template!r} is not a valid template: {e}") from e
  fields = set()
  for _, name, spec, conv in parsed:
    if name is None:
      continue
    if name == "" or not name.isidentifier() or spec or conv:
      raise ValueError(f"{where}={template!r} has a malformed slot {{{name}}}; use plain "
                       "{name} slots")
    fields.add(name)
  return fields


def check_template(template: str, required: Iterable[str], where: str,
                   optional: Iterable[str] = ()) -> None:
  """Raise ValueError unless `template` has every required slot and no unknown slot."""
  fields = template_fields(template, where)
  required, optional = set(required), set(optional)
  missing = sorted(required - fields)
  if missing:
    raise ValueError(f"{where}={template!r} lacks the slot(s) "
                     f"{', '.join('{' + m + '}' for m in missing)}")
  unknown = sorted(fields - required - optional)
  if unknown:
    raise ValueError(f"{where}={template!r} has unknown slot(s) {unknown}; allowed: "
                     f"{sorted(required | optional)}")
  if template != normalise(template) or not template:
    raise ValueError(f"{where}={template!r} must be non-empty lower-case words separated by "
                     "single spaces")


def fill(template: str, **slots: str) -> str:
  return template.format(**slots)


def ask(question: str, fmt: str) -> str:
  """The prompt for `question` in answer format `fmt` ('direct' or 'cot')."""
  if fmt not in FORMATS:
    raise ValueError(f"answer format {fmt!r} is not one of {list(FORMATS)}")
  return question if fmt == "direct" else f"{question} {COT_CUE}"


def template_words(template: str) -> set[str]:
  """The literal words of a template (slots removed)."""
  out = set()
  for literal, _, _, _ in string.Formatter().parse(template):
    out.update(literal.split())
  return out


# ------------------------------------------------------------------- validation


def check_words(field: str, value: Any, min_len: int = 1) -> None:
  """A tuple of distinct single lower-case words (no spaces, no braces): the words a world's
  templates are filled with. (Numbers, ints and choices: `lora_limits.validate`.)"""
  if not isinstance(value, tuple):
    raise ValueError(f"{field}={value!r} must be a tuple of words")
  if len(value) < min_len:
    raise ValueError(f"{field} needs at least {min_len} entries, got {len(value)}")
  for w in value:
    if (not isinstance(w, str) or not w or w != w.strip().lower() or len(w.split()) != 1
        or "{" in w or "}" in w):
      raise ValueError(f"{field} has {w!r}; entries must be single lower-case words")
  if len(set(value)) != len(value):
    dup = sorted({w for w in value if value.count(w) > 1})
    raise ValueError(f"{field} repeats {dup}")


def settings_from_mapping(cls, mapping: Mapping[str, Any]):
  """A settings dataclass from a plain mapping: unknown keys are an error; lists → tuples."""
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(mapping) - fields)
  if unknown:
    raise ValueError(f"{cls.__name__} has no field(s) {unknown}; allowed: {sorted(fields)}")
  kwargs = {}
  for k, v in mapping.items():
    kwargs[k] = _to_tuple(v)
  return cls(**kwargs)


def _to_tuple(v: Any) -> Any:
  if isinstance(v, list):
    return tuple(_to_tuple(x) for x in v)
  return v


# -------------------------------------------------------------------- records


@dataclasses.dataclass(frozen=True)
class Example:
  """One question → answer pair. meta holds at least:

  group, split, format ('direct' | 'cot'), final (the answer entity / number, which ends
  the answer), answer_type (for the chance level), units (entities or number combinations
  the example is about), template (template id); CoT examples also bridges (the
  intermediate answers), bridge_steps (the step, between STEP_SEPARATOR words, that each
  bridge ends), bridge_at (their word offsets in the answer) and bridge (the first).
  """

  prompt: str
  answer: str
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    for name in ("prompt", "answer"):
      value = getattr(self, name)
      if not isinstance(value, str) or not value or value != normalise(value):
        raise ValueError(f"Example.{name}={value!r} must be non-empty normalised text")
    final = self.meta.get("final")
    if final is not None:
      fw, aw = words(final), words(self.answer)
      if self.meta.get("format") == "statement":  # "A 's spouse is" → "B ."
        fw = fw + [STEP_SEPARATOR]
      if aw[len(aw) - len(fw):] != fw:
        raise ValueError(f"Example answer {self.answer!r} does not end with its final "
                         f"answer {final!r}")

  @property
  def text(self) -> str:
    """The example as one pretraining text."""
    return f"{self.prompt} {self.answer}"

  def to_dict(self) -> dict[str, Any]:
    return {"prompt": self.prompt, "answer": self.answer, "meta": dict(self.meta)}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "Example":
    unknown = set(d) - {"prompt", "answer", "meta"}
    if unknown:
      raise ValueError(f"Example record has unknown keys {sorted(unknown)}")
    return cls(d["prompt"], d["answer"], dict(d.get("meta", {})))


@dataclasses.dataclass(frozen=True)
class LeakRules:
  """What must never occur, checked by `corpus.check_no_leak`.

  absent_names: names that never occur in the pretraining corpus (tier F entities).
  absent_pairs: name pairs that never occur in one corpus text (facts kept out of it).
  disjoint: (train split, test split) pairs whose examples share no meta['units'].
  """

  absent_names: tuple[str, ...] = ()
  absent_pairs: tuple[tuple[str, str], ...] = ()
  disjoint: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass(frozen=True)
class World:
  """A synthetic world: pretraining corpus, splits per group, probes and audit data.

  kind: 'two_hop' | 'math'; k: hops (skills) of the composed question.
  corpus: pretraining texts in a fixed shuffled order; corpus_parts: texts per source.
  splits: {group: {split: examples}}; groups are tiers 'F', 'H', 'R' and the 'filler'
    probes (test splits only) in the two-hop world, or 'math'.
  recall: question → answer probes whose text is in the corpus (pretraining recall).
  chance: {group: {split: chance accuracy}} from the answer space.
  majority: {group: {split: majority-answer accuracy}} (`majority_levels`); empty where a
    world does not fill it.
  entities: {group: {role: names}}; facts: {group: {hopI: ((subject, object), ...)}};
  composed: {group: ((head, final), ...)} — the audit data behind the exposure counts.
  fact_free: the distinct corpus texts that carry no fact (copy texts naming one entity);
    names a tier keeps out of pretraining may occur only there.
  rules: {group: LeakRules}.
  vocabulary: every word the settings can produce, whatever the seed (sorted); a tokenizer
    built from it serves every seed of these settings.
  """

  kind: str
  settings: Any
  k: int
  corpus: tuple[str, ...]
  corpus_parts: Mapping[str, int]
  splits: Mapping[str, Mapping[str, tuple[Example, ...]]]
  recall: tuple[Example, ...]
  chance: Mapping[str, Mapping[str, float]]
  rules: Mapping[str, LeakRules]
  vocabulary: tuple[str, ...] = ()
  entities: Mapping[str, Mapping[str, tuple[str, ...]]] = dataclasses.field(default_factory=dict)
  facts: Mapping[str, Mapping[str, tuple[tuple[str, str], ...]]] = dataclasses.field(
      default_factory=dict)
  composed: Mapping[str, tuple[tuple[str, str], ...]] = dataclasses.field(default_factory=dict)
  majority: Mapping[str, Mapping[str, float]] = dataclasses.field(default_factory=dict)
  fact_free: tuple[str, ...] = ()

  @property
  def groups(self) -> tuple[str, ...]:
    return tuple(self.splits)

  def examples(self) -> Iterable[Example]:
    for group in self.splits.values():
      for examples in group.values():
        yield from examples
    yield from self.recall

  def check_vocabulary(self) -> None:
    """Raise ValueError if a text uses a word outside `vocabulary`."""
    vocab = set(self.vocabulary)
    for text in self.texts():
      extra = set(text.split()) - vocab
      if extra:
        raise ValueError(f"{self.kind} world: words {sorted(extra)[:5]} of {text!r} are not in "
                         "its declared vocabulary")

  def texts(self) -> list[str]:
    """Every string of the world (corpus, prompts, answers): what a tokenizer must cover."""
    out = list(self.corpus)
    for e in self.examples():
      out.append(e.prompt)
      out.append(e.answer)
    return out


def chance_levels(splits: Mapping[str, Sequence[Example]]) -> dict[str, float]:
  """Per split: mean over its examples of 1 / (distinct final answers of that answer type).

  The candidates of a type are every answer of that type the group's splits ever use —
  what a model that learned the answer space but not the facts picks among.
  """
  space: dict[str, set[str]] = {}
  for examples in splits.values():
    for e in examples:
      space.setdefault(e.meta["answer_type"], set()).add(e.meta["final"])
  out = {}
  for name, examples in splits.items():
    if not examples:
      raise ValueError(f"split {name!r} is empty")
    out[name] = float(np.mean([1.0 / len(space[e.meta["answer_type"]]) for e in examples]))
  return out


def majority_levels(splits: Mapping[str, Sequence[Example]]) -> dict[str, float]:
  """Per split: the accuracy of always giving the most frequent final answer of each answer type.

  The best any constant answer can do on that split (the majority-answer baseline). It equals
  the chance level only when the answers are balanced.
  """
  out = {}
  for name, examples in splits.items():
    if not examples:
      raise ValueError(f"split {name!r} is empty")
    counts: dict[str, dict[str, int]] = {}
    for e in examples:
      by_type = counts.setdefault(e.meta["answer_type"], {})
      by_type[e.meta["final"]] = by_type.get(e.meta["final"], 0) + 1
    out[name] = float(sum(max(c.values()) for c in counts.values()) / len(examples))
  return out


def content_hash(world: World) -> str:
  """sha256 over the canonical JSON of settings, corpus, splits and probes."""
  h = hashlib.sha256()
  payload = {
      "kind": world.kind,
      "settings": world.settings.to_dict(),
      "corpus": list(world.corpus),
      "splits": {g: {s: [e.to_dict() for e in ex] for s, ex in sp.items()}
                 for g, sp in world.splits.items()},
      "recall": [e.to_dict() for e in world.recall],
  }
  h.update(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode("utf-8"))
  return h.hexdigest()


def manifest(world: World, exposure: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Counts per group and split, generator settings, content hash (JSON-ready)."""
  out: dict[str, Any] = {
      "kind": world.kind,
      "k": world.k,
      "settings": world.settings.to_dict(),
      "content_hash": content_hash(world),
      "corpus": {"texts": len(world.corpus),
                 "words": int(sum(len(t.split()) for t in world.corpus)),
                 "parts": dict(world.corpus_parts)},
      "splits": {g: {s: len(ex) for s, ex in sp.items()} for g, sp in world.splits.items()},
      "chance": {g: dict(c) for g, c in world.chance.items()},
      "recall": len(world.recall),
  }
  if world.majority:
    out["majority"] = {g: dict(m) for g, m in world.majority.items()}
  if exposure is not None:
    out["exposure"] = exposure
  return out


# ---------------------------------------------------------------------- names


class NameSource:
  """Draws fictional names (tuples of syllables); no name is a contiguous sub-span of another.

  Sub-span freedom makes a name's occurrence in text unambiguous, so exposure counts are
  exact. Deterministic given the generator; draws are remembered across calls.
  """

  def __init__(self, rng: np.random.Generator, syllables: Sequence[str],
               lengths: Sequence[int]):
    self.rng = rng
    self.syllables = tuple(syllables)
    self.lengths = tuple(sorted(set(lengths)))
    self.capacity = sum(len(self.syllables) ** L for L in self.lengths)
    self._accepted: set[tuple[str, ...]] = set()
    self._spans: set[tuple[str, ...]] = set()

  def _try_add(self, name: tuple[str, ...], out: list[str]) -> bool:
    subs = _sub_spans(name)
    if name in self._accepted or name in self._spans or any(s in self._accepted for s in subs):
      return False
    self._accepted.add(name)
    self._spans.update(subs)
    out.append(" ".join(name))
    return True

  def draw(self, n: int, *, what: str = "names", cover: bool = False) -> list[str]:
    """n new names as space-joined syllables; cover=True first uses every syllable once.

    Raises ValueError naming `what` if the inventory cannot supply them.
    """
    if n + len(self._accepted) > self.capacity:
      raise ValueError(
          f"{what}: {n} more names requested ({len(self._accepted)} already drawn) but "
          f"{len(self.syllables)} syllables of lengths {list(self.lengths)} give at most "
          f"{self.capacity}; add syllables or name lengths, or ask for fewer entities")
    out: list[str] = []
    if cover and n > 0:
      order = [self.syllables[i] for i in self.rng.permutation(len(self.syllables))]
      length = self.lengths[0]
      for start in range(0, len(order), length):
        chunk = order[start:start + length]
        while len(chunk) < length:
          chunk.append(self.syllables[int(self.rng.integers(len(self.syllables)))])
        if len(out) < n:
          self._try_add(tuple(chunk), out)
    attempts, limit = 0, 50 * n + 1000
    while len(out) < n:
      attempts += 1
      if attempts > limit:
        raise ValueError(
            f"{what}: could only draw {len(out)} of {n} distinct names from "
            f"{len(self.syllables)} syllables of lengths {list(self.lengths)}; add syllables "
            "or ask for fewer entities")
      length = self.lengths[int(self.rng.integers(len(self.lengths)))]
      idx = self.rng.integers(len(self.syllables), size=length)
      self._try_add(tuple(self.syllables[i] for i in idx), out)
    return out


def _sub_spans(name: tuple[str, ...]) -> list[tuple[str, ...]]:
  """Proper contiguous sub-spans."""
  n = len(name)
  return [name[i:j] for i in range(n) for j in range(i + 1, n + 1) if j - i < n]


def rng_for(seed: int, *stream: int) -> np.random.Generator:
  """A NumPy generator keyed by (seed, stream...): no global RNG, independent streams."""
  return np.random.default_rng([int(seed), *[int(s) for s in stream]])
