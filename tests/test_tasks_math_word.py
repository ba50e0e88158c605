"""Math word problems: arithmetic, held-out sub-steps, the one knob, counts, validation."""

import collections
import dataclasses

import pytest
from hypothesis import HealthCheck, event, given, settings as hyp_settings
from hypothesis import strategies as st

from lora_limits.tasks import common, corpus, math_word

SMALL = dict(max_factor=6, max_subtrahend=3, test_triples=24, target_triples=30,
             domain_problems=40, scene_sentences=200)


def small(**kw) -> math_word.MathConfig:
  return math_word.MathConfig(**{**SMALL, **kw})


@pytest.fixture(scope="module")
def world():
  return math_word.build(small())


@pytest.fixture(scope="module")
def digits():
  return math_word.build(small(numbers="digits", max_multiplicand=14, test_triples=40))


def _value(text: str) -> int:
  return int(text.replace(" ", ""))


@pytest.mark.parametrize("which", ["world", "digits"])
def test_answers_are_right(which, request):
  w = request.getfixturevalue(which)
  sp = w.splits["math"]
  num = lambda v: math_word.render(w.settings, v)  # noqa: E731
  for e in sp["hop1"] + sp["test_hop1"]:
    x, n = e.meta["numbers"]
    assert _value(e.answer) == x * n and e.answer == num(x * n)
    assert f" {num(x)} " in f" {e.prompt} " and f" {num(n)} " in f" {e.prompt} "
  for e in sp["hop2"] + sp["test_hop2"]:
    y, z = e.meta["numbers"]
    assert e.answer == num(y - z) and y > z
  for e in sp["target"] + sp["test_two_hop_direct"]:
    x, n, z = e.meta["numbers"]
    assert e.answer == num(x * n - z)
  for e in sp["target_cot"] + sp["test_two_hop_cot"]:
    x, n, z = e.meta["numbers"]
    words = e.answer.split()
    at, bridge = e.meta["bridge_at"][0], e.meta["bridge"]
    assert " ".join(words[at:at + len(bridge.split())]) == bridge == num(x * n)
    assert e.meta["final"] == num(x * n - z) and e.answer.endswith(f" is {num(x * n - z)}")
    assert e.answer == (f"{num(x)} times {num(n)} is {num(x * n)} . "
                        f"{num(x * n)} minus {num(z)} is {num(x * n - z)}")


def test_digits_world_writes_numbers_digit_by_digit(digits):
  assert set(w for w in digits.vocabulary if w.isdigit()) == {str(i) for i in range(10)}
  x, n = digits.splits["math"]["test_hop1"][0].meta["numbers"]
  assert 10 <= x <= 14 and 2 <= n <= 9


@pytest.mark.parametrize("which", ["world", "digits"])
def test_training_data_is_disjoint_from_the_test_by_every_substep(which, request):
  w = request.getfixturevalue(which)
  sp = w.splits["math"]
  test = [tuple(e.meta["numbers"]) for e in sp["test_two_hop_direct"]]
  products = {x * n for x, n, _ in test}
  pairs = {frozenset((x, n)) for x, n, _ in test}
  steps = {(x * n, z) for x, n, z in test}
  for split in ("hop1", "target", "target_cot"):
    for e in sp[split]:
      x, n = e.meta["numbers"][:2]
      assert x * n not in products and frozenset((x, n)) not in pairs
  for e in sp["target"] + sp["target_cot"]:
    x, n, z = e.meta["numbers"]
    assert (x * n, z) not in steps
  for e in sp["hop2"]:
    assert e.meta["numbers"][0] not in products
  # The one-hop tests ask each skill on the held-out operands of the composed test.
  assert {tuple(e.meta["numbers"]) for e in sp["test_hop1"]} == {t[:2] for t in test}
  assert {tuple(e.meta["numbers"]) for e in sp["test_hop2"]} == steps
  # No training text states a test sub-step ("12 minus 5 is 7") in any number system.
  num = lambda v: math_word.render(w.settings, v)  # noqa: E731
  stated = {f" {num(y)} minus {num(z)} is {num(y - z)} " for y, z in steps}
  for e in sp["target_cot"]:
    assert not any(s in f" {e.answer} " for s in stated)


def _planted(w, triple):
  """A target_cot example on `triple` made by the generator's own rules."""
  sp = w.splits["math"]
  x, n, z = triple
  num = lambda v: math_word.render(w.settings, v)  # noqa: E731
  prompt = common.ask(common.fill(math_word.COMPOSED[0], x=num(x), n=num(n), z=num(z), c="box",
                                  cs="boxes", item="pens", p="tom"), "cot")
  answer = common.fill(math_word.COMPOSED_COT, x=num(x), n=num(n), y=num(x * n), z=num(z),
                       r=num(x * n - z))
  meta = {**sp["target_cot"][0].meta, "numbers": [x, n, z], "final": num(x * n - z),
          "units": sorted(math_word.substeps((x, n, z)))}
  return common.Example(prompt, answer, meta)


def _contaminations(w):
  """(what, triple) overlaps of a target problem with a test problem, by kind."""
  test = [tuple(e.meta["numbers"]) for e in w.splits["math"]["test_two_hop_direct"]]
  x, n, z = next(t for t in test if t[0] != t[1])
  other_z = next(k for k in range(1, w.settings.max_subtrahend + 1) if k != z and k < x * n)
  out = [("commuted pair", (n, x, other_z)), ("same triple", (x, n, z))]
  same_product = [(a, b) for a, b in w.settings.factor_pairs()
                  if a * b == x * n and {a, b} != {x, n}]
  if same_product:
    out.append(("same product", (*same_product[0], other_z)))
  return out


@pytest.mark.parametrize("which", ["world", "digits"])
def test_substep_check_catches_a_planted_overlap(which, request):
  w = request.getfixturevalue(which)
  math_word.check_substeps_disjoint(w)
  kinds = set()
  for what, triple in _contaminations(w):
    bad = corpus.replace_split(w, "math", "target_cot",
                               w.splits["math"]["target_cot"] + (_planted(w, triple),))
    with pytest.raises(corpus.LeakError, match="sub-step"):
      math_word.check_substeps_disjoint(bad)
    with pytest.raises(corpus.LeakError, match="share units"):
      corpus.check_no_leak(bad)
    kinds.add(what)
  assert {"commuted pair", "same triple"} <= kinds


def test_substep_check_reads_the_text_not_only_the_records(world):
  sp = world.splits["math"]
  x, n, z = sp["test_two_hop_direct"][0].meta["numbers"]
  # A target CoT answer that states a test step while its recorded operands are innocent.
  e = sp["target_cot"][0]
  lie = common.Example(e.prompt, f"{x * n} minus {z} is {x * n - z} . {e.answer}", e.meta)
  bad = corpus.replace_split(world, "math", "target_cot", (lie,) + sp["target_cot"][1:])
  with pytest.raises(corpus.LeakError, match="states the test sub-step"):
    math_word.check_substeps_disjoint(bad)
  # A pretraining text that states a commuted test product inside a composed problem.
  text = f"{sp['target_cot'][0].prompt} {n} times {x} is {x * n} ."
  with pytest.raises(corpus.LeakError, match="states the test sub-step"):
    math_word.check_substeps_disjoint(dataclasses.replace(world, corpus=world.corpus + (text,)))
  # Records that disagree with their prompt are refused.
  wrong = common.Example(e.prompt, e.answer, {**e.meta, "numbers": [x, n, z]})
  with pytest.raises(corpus.LeakError, match="recorded operands"):
    math_word.check_substeps_disjoint(
        corpus.replace_split(world, "math", "target_cot", (wrong,)))


def test_digit_numbers_are_merged_before_matching(digits):
  # "2 2 5 minus 3 is 2 2 2" holds the words of "2 5 minus 3 is 2 2" but not that step.
  steps = {("25", "minus", "3", "is", "22")}
  math_word._check_text("t", "2 2 5 minus 3 is 2 2 2 .", steps, digits=True)
  with pytest.raises(corpus.LeakError):
    math_word._check_text("t", "tom : 2 5 minus 3 is 2 2 .", steps, digits=True)


@pytest.mark.parametrize("numbers", ["words", "digits"])
def test_domain_pretraining_is_one_knob(numbers):
  kw = dict(numbers=numbers, max_multiplicand=14, test_triples=40) if numbers == "digits" else {}
  on = math_word.build(small(**kw))
  off = math_word.build(small(domain_pretraining=False, domain_problems=0, **kw))
  c_on, c_off = collections.Counter(on.corpus), collections.Counter(off.corpus)
  assert not c_off - c_on  # nothing of the no-domain arm is missing from the domain arm
  added = c_on - c_off
  domain = [e for e in on.recall if e.meta.get("source") == "domain"]
  assert added == collections.Counter(e.text for e in domain)
  assert sum(added.values()) == on.corpus_parts["domain"] == 2 * on.settings.domain_problems
  # What it adds is composed problems, direct and chain of thought, of the test's form.
  assert {e.meta["format"] for e in domain} == {"direct", "cot"}
  assert all(len(e.meta["numbers"]) == 3 for e in domain)
  # The skill facts are in both arms; everything else is equal, splits included.
  assert on.corpus_parts["skill_facts"] == off.corpus_parts["skill_facts"] > 0
  assert {k: v for k, v in on.corpus_parts.items() if k != "domain"} == off.corpus_parts
  assert on.splits == off.splits
  corpus.check_no_leak(off)


def test_skill_facts_cover_the_test_in_words_but_not_in_digits(world, digits):
  x, n, z = world.splits["math"]["test_two_hop_direct"][0].meta["numbers"]
  assert f"{x} times {n} is {x * n} ." in world.corpus
  assert f"{x * n} minus {z} is {x * n - z} ." in world.corpus
  x, n, z = digits.splits["math"]["test_two_hop_direct"][0].meta["numbers"]
  num = lambda v: math_word.render(digits.settings, v)  # noqa: E731
  assert not any(f"times {num(n)} is {num(x * n)} ." in t for t in digits.corpus)
  assert any(t.endswith(" .") and " times " in t.split(" . ")[0] for t in digits.corpus)


def test_default_world_counts():
  w = math_word.build(math_word.MathConfig())
  sp = w.splits["math"]
  assert len(sp["test_two_hop_direct"]) == len(sp["test_two_hop_cot"]) == 200
  assert len({tuple(e.meta["numbers"]) for e in sp["test_two_hop_cot"]}) == 200
  assert len(sp["test_hop1"]) >= 40 and len(sp["test_hop2"]) >= 40
  assert len(sp["target"]) == len(sp["target_cot"]) == 2 * 96
  # The majority-answer baseline is reported beside chance and is never below it.
  for split, chance in w.chance["math"].items():
    assert 0 < chance <= w.majority["math"][split] <= 1
  assert common.manifest(w)["majority"]["math"] == w.majority["math"]


def test_deterministic_and_seeded(world):
  assert common.content_hash(math_word.build(small())) == common.content_hash(world)
  assert common.content_hash(math_word.build(small(seed=3))) != common.content_hash(world)


def test_numbers_are_pretrained(world):
  seen = {w for t in world.corpus for w in t.split()}
  for i in range(world.settings.max_number + 1):
    assert str(i) in seen
  corpus.check_coverage(world)


@pytest.mark.parametrize("kw, match", [
    (dict(max_factor=2), "max_factor"),
    (dict(numbers="roman"), "numbers"),
    (dict(max_multiplicand=9), "max_multiplicand"),
    (dict(test_triples=10_000), "test_triples"),
    (dict(people=("tom",)), "people"),
    (dict(items=("apples", "apples")), "items"),
    (dict(containers_plural=("boxes",)), "containers_plural"),
    (dict(items=("3",)), "scene word"),
    (dict(items=("holds",)), "scene word"),
    (dict(domain_pretraining="yes"), "domain_pretraining"),
    (dict(fact_repeats=0), "fact_repeats"),
])
def test_bad_settings_name_the_field(kw, match):
  with pytest.raises(ValueError, match=match):
    math_word.build(small(**kw))


def test_settings_round_trip_through_dict():
  s = small(numbers="digits")
  assert math_word.MathConfig.from_dict(s.to_dict()) == s
  assert dataclasses.replace(s, seed=2).to_dict()["seed"] == 2


_FIELDS = {
    "seed": st.integers(-2, 3),
    "max_factor": st.integers(1, 6),
    "max_subtrahend": st.integers(-1, 40),
    "test_triples": st.integers(-1, 60),
    "target_triples": st.integers(-1, 40),
    "domain_pretraining": st.sampled_from([True, False, 1]),
    "domain_problems": st.integers(-1, 30),
    "fact_repeats": st.integers(-1, 2),
    "background_repeats": st.integers(-1, 3),
    "scene_sentences": st.integers(-1, 100),
    "people": st.lists(st.sampled_from(["tom", "ana", "x y", "Tom", "5"]), max_size=3).map(tuple),
    "items": st.lists(st.sampled_from(["pens", "cups", "holds", ""]), max_size=2).map(tuple),
}


@hyp_settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.fixed_dictionaries({}, optional=_FIELDS))
def test_fuzz_settings_give_a_world_or_a_value_error(kw):
  kw.setdefault("max_factor", 5)
  kw.setdefault("test_triples", 20)
  try:
    w = math_word.build(math_word.MathConfig(**kw))
  except ValueError as e:
    assert str(e)
    event("ValueError")
    return
  event("built")
  corpus.check_no_leak(w)
  math_word.check_substeps_disjoint(w)
