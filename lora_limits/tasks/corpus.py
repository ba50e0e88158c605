"""Pretraining corpora: mixing sources at set frequencies, exposure counts, leak checks.

A corpus is a tuple of texts. `mix` repeats each source part the requested number of times
and shuffles with a seeded generator. Exposure is *counted from the text*, never taken from
the generator's bookkeeping: a name occurs where its word sequence occurs (names are
sub-span free, see `common.make_names`), and a fact (subject, object) occurs in a text that
contains both names. `check_no_leak` enforces a world's rules and raises `LeakError`.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from lora_limits import validate
from lora_limits.tasks import common


class LeakError(ValueError):
  """A test question, answer or held-out fact reached training data or pretraining."""


@dataclasses.dataclass(frozen=True)
class Part:
  """A named source of texts, each repeated `repeats` times in the corpus."""

  name: str
  texts: tuple[str, ...]
  repeats: int = 1

  def __post_init__(self):
    validate.integer(f"Part({self.name!r}).repeats", self.repeats, 0)
    for t in self.texts:
      if not isinstance(t, str) or not t or t != common.normalise(t):
        raise ValueError(f"Part({self.name!r}) has a text that is not normalised: {t!r}")


def mix(parts: Sequence[Part], rng: np.random.Generator) -> tuple[tuple[str, ...], dict[str, int]]:
  """(shuffled corpus, texts per part) from parts with their repeat counts."""
  texts: list[str] = []
  counts: dict[str, int] = {}
  for part in parts:
    if part.name in counts:
      raise ValueError(f"corpus part {part.name!r} appears twice")
    block = list(part.texts) * part.repeats
    counts[part.name] = len(block)
    texts.extend(block)
  if not texts:
    raise ValueError("the corpus is empty: every part has no texts or zero repeats")
  order = rng.permutation(len(texts))
  return tuple(texts[i] for i in order), counts


class NameIndex:
  """Finds whole-name occurrences (word sequences) in texts."""

  def __init__(self, names: Iterable[str]):
    self.names = {tuple(n.split()): n for n in names}
    if any(len(k) == 0 for k in self.names):
      raise ValueError("NameIndex got an empty name")
    self.lengths = sorted({len(k) for k in self.names})

  def find(self, text: str) -> collections.Counter:
    ws = text.split()
    found: collections.Counter = collections.Counter()
    for L in self.lengths:
      for i in range(len(ws) - L + 1):
        name = self.names.get(tuple(ws[i:i + L]))
        if name is not None:
          found[name] += 1
    return found


def count_mentions(corpus: Sequence[str], names: Iterable[str]) -> dict[str, int]:
  """Occurrences of each name in the corpus (every occurrence counts)."""
  names = list(names)
  index = NameIndex(names)
  total: collections.Counter = collections.Counter()
  for text in corpus:
    total.update(index.find(text))
  return {n: int(total[n]) for n in names}


def count_cooccurrences(corpus: Sequence[str],
                        pairs: Iterable[tuple[str, str]]) -> dict[tuple[str, str], int]:
  """Number of corpus texts that contain both names of each pair."""
  pairs = list(pairs)
  index = NameIndex({n for p in pairs for n in p})
  wanted = collections.defaultdict(list)
  for p in pairs:
    wanted[p[0]].append(p)
  counts: collections.Counter = collections.Counter()
  for text in corpus:
    present = index.find(text)
    if not present:
      continue
    for a in present:
      for p in wanted.get(a, ()):
        if p[1] in present:
          counts[p] += 1
  return {p: int(counts[p]) for p in pairs}


def exposure_report(world: common.World) -> dict[str, Any]:
  """Per group: mentions of each entity role and co-occurrence counts of each fact kind.

  Every value is (min, max) over the names / facts of that kind, counted in the corpus;
  mentions outside the fact-free texts (`mentions/<role>`) and inside them
  (`fact_free/<role>`, only when the world has fact-free texts) are counted apart.
  """
  out: dict[str, Any] = {}
  fact_free = set(world.fact_free)
  factual = [t for t in world.corpus if t not in fact_free]
  free = [t for t in world.corpus if t in fact_free]
  for group in world.groups:
    entry: dict[str, Any] = {}
    for role, names in world.entities.get(group, {}).items():
      counts = count_mentions(factual, names).values()
      entry[f"mentions/{role}"] = _min_max(counts)
      if free:
        entry[f"fact_free/{role}"] = _min_max(count_mentions(free, names).values())
    for hop, facts in world.facts.get(group, {}).items():
      entry[f"facts/{hop}"] = _min_max(count_cooccurrences(world.corpus, facts).values())
    composed = world.composed.get(group, ())
    if composed:
      entry["facts/composed"] = _min_max(count_cooccurrences(world.corpus, composed).values())
    out[group] = entry
  return out


def _min_max(values: Iterable[int]) -> list[int]:
  values = list(values)
  return [min(values), max(values)] if values else [0, 0]


def _ngrams(texts: Sequence[str], lengths: Iterable[int]) -> set[tuple[str, ...]]:
  out: set[tuple[str, ...]] = set()
  for text in texts:
    ws = text.split()
    for n in lengths:
      out.update(tuple(ws[i:i + n]) for i in range(len(ws) - n + 1))
  return out


def check_no_leak(world: common.World) -> None:
  """Raise LeakError unless no test question (or held-out fact) reached training data.

  Checked for every group: (1) no test prompt is the prompt of any training example of
  any group; (2) no test prompt occurs inside a pretraining text (but those marked
  meta['shared']: tests of facts every group shares, e.g. a pooled city's country); (3) the
  group's rules:
  absent names never occur in the corpus outside its fact-free texts (`World.fact_free`),
  absent pairs never share a corpus text, and the
  named (train, test) splits share no meta['units'].
  """
  train_prompts: dict[str, str] = {}
  test_names = set(common.test_splits(world.k))
  for group, splits in world.splits.items():
    for split, examples in splits.items():
      if split in test_names:
        continue
      for e in examples:
        train_prompts.setdefault(common.normalise(e.prompt), f"{group}/{split}")
  test_prompts = [e.prompt for g in world.splits.values() for s, ex in g.items()
                  if s in test_names for e in ex]
  corpus_grams = _ngrams(world.corpus, {len(p.split()) for p in test_prompts})
  for group, splits in world.splits.items():
    for split, examples in splits.items():
      if split not in test_names:
        continue
      for i, e in enumerate(examples):
        p = common.normalise(e.prompt)
        if p in train_prompts:
          raise LeakError(f"{group}/{split}[{i}] prompt {e.prompt!r} is also a training "
                          f"prompt in {train_prompts[p]}")
        if tuple(p.split()) in corpus_grams and not e.meta.get("shared"):
          raise LeakError(f"{group}/{split}[{i}] prompt {e.prompt!r} occurs in the "
                          "pretraining corpus")
  fact_free = set(world.fact_free)
  factual = [t for t in world.corpus if t not in fact_free]
  for group, rules in world.rules.items():
    if rules.absent_names:
      mentions = count_mentions(factual, rules.absent_names)
      bad = [n for n, c in mentions.items() if c]
      if bad:
        raise LeakError(f"group {group}: {len(bad)} name(s) that must never appear in "
                        f"pretraining outside the fact-free texts do, e.g. {bad[0]!r} "
                        f"({mentions[bad[0]]} times)")
    if rules.absent_pairs:
      co = count_cooccurrences(world.corpus, rules.absent_pairs)
      bad = [p for p, c in co.items() if c]
      if bad:
        raise LeakError(f"group {group}: {len(bad)} fact(s) kept out of pretraining occur in "
                        f"it, e.g. {bad[0]} in {co[bad[0]]} text(s)")
    for train, test in rules.disjoint:
      splits = world.splits[group]
      units = {u for e in splits[train] for u in e.meta.get("units", ())}
      shared = sorted({u for e in splits[test] for u in e.meta.get("units", ())} & units)
      if shared:
        raise LeakError(f"group {group}: {train} and {test} share units {shared[:3]} "
                        f"({len(shared)} in all); they must be disjoint")


def check_coverage(world: common.World) -> None:
  """Raise ValueError unless every word of every example occurs in the corpus.

  So no token of a split is an untrained embedding: a fictional name is a new combination
  of syllables the base model has seen.
  """
  seen = {w for t in world.corpus for w in t.split()}
  for group, splits in world.splits.items():
    for split, examples in splits.items():
      for e in examples:
        missing = sorted(set(e.text.split()) - seen)
        if missing:
          raise ValueError(f"{group}/{split}: words {missing[:5]} never occur in the "
                           "pretraining corpus (untrained embeddings); two-hop: give the "
                           "fillers more entities or the inventory fewer syllables")


def check_unambiguous(world: common.World) -> None:
  """Raise ValueError if one prompt has two different answers anywhere in the world.

  (E.g. a direct and a chain-of-thought answer to the same question: the prompt must say
  which format it wants, see `common.COT_CUE`.)
  """
  answers: dict[str, tuple[str, str]] = {}
  for group, splits in world.splits.items():
    for split, examples in splits.items():
      for e in examples:
        _check_one(answers, e, f"{group}/{split}")
  for e in world.recall:
    _check_one(answers, e, "recall")


def _check_one(answers: dict[str, tuple[str, str]], e: common.Example, where: str) -> None:
  seen = answers.setdefault(e.prompt, (e.answer, where))
  if seen[0] != e.answer:
    raise ValueError(f"prompt {e.prompt!r} has the answer {e.answer!r} in {where} but "
                     f"{seen[0]!r} in {seen[1]}")


def check_recall_in_corpus(world: common.World) -> None:
  """Raise ValueError unless every recall probe's text is a corpus text."""
  corpus_set = set(world.corpus)
  for i, e in enumerate(world.recall):
    if e.text not in corpus_set:
      raise ValueError(f"recall probe {i} ({e.text!r}) is not a pretraining text")


def replace_split(world: common.World, group: str, split: str,
                  examples: Sequence[common.Example]) -> common.World:
  """A copy of the world with one split replaced (for audits and contamination tests)."""
  splits = {g: dict(s) for g, s in world.splits.items()}
  if group not in splits or split not in splits[group]:
    raise ValueError(f"world has no split {group}/{split}")
  splits[group][split] = tuple(examples)
  return dataclasses.replace(world, splits=splits)
