"""Math word problems: arithmetic, held-out combinations, knobs, determinism, validation."""

import dataclasses

import pytest
from hypothesis import HealthCheck, event, given, settings as hyp_settings
from hypothesis import strategies as st

from lora_limits.tasks import common, corpus, math_word

SMALL = dict(max_factor=5, max_subtrahend=3, test_pairs=5, test_triples=12, target_triples=30,
             domain_problems=40, scene_sentences=200)


def small(**kw) -> math_word.MathSettings:
  return math_word.MathSettings(**{**SMALL, **kw})


@pytest.fixture(scope="module")
def world():
  return math_word.build(small())


def test_answers_are_right(world):
  sp = world.splits["math"]
  for e in sp["hop1"] + sp["test_hop1"]:
    x, n = e.meta["numbers"]
    assert e.answer == str(x * n)
    assert f" {x} " in f" {e.prompt} " and f" {n} " in f" {e.prompt} "
  for e in sp["hop2"] + sp["test_hop2"]:
    y, z = e.meta["numbers"]
    assert e.answer == str(y - z) and y > z
  for e in sp["target"] + sp["test_two_hop_direct"]:
    x, n, z = e.meta["numbers"]
    assert e.answer == str(x * n - z)
  for e in sp["target_cot"] + sp["test_two_hop_cot"]:
    x, n, z = e.meta["numbers"]
    words = e.answer.split()
    assert words[e.meta["bridge_at"][0]] == e.meta["bridge"] == str(x * n)
    assert words[-1] == e.meta["final"] == str(x * n - z)
    assert f"{x * n} minus {z} is {x * n - z}" in e.answer


def test_skills_cover_the_test_and_the_combinations_are_held_out(world):
  sp = world.splits["math"]
  hop1 = {tuple(e.meta["numbers"]) for e in sp["hop1"]}
  hop2 = {tuple(e.meta["numbers"]) for e in sp["hop2"]}
  test = {tuple(e.meta["numbers"]) for e in sp["test_two_hop_direct"]}
  target = {tuple(e.meta["numbers"]) for e in sp["target"]}
  assert len(test) == world.settings.test_triples
  for x, n, z in test:
    assert (x, n) in hop1 and (x * n, z) in hop2
  assert not {(x, n) for x, n, _ in test} & {(x, n) for x, n, _ in target}
  prompts = {e.prompt for e in sp["hop1"] + sp["hop2"]}
  assert not prompts & {e.prompt for e in sp["test_hop1"] + sp["test_hop2"]}


def test_triples_mode_allows_shared_pairs_but_not_triples():
  w = math_word.build(small(target_disjoint="triples", target_triples=200))
  sp = w.splits["math"]
  test = {tuple(e.meta["numbers"]) for e in sp["test_two_hop_direct"]}
  target = {tuple(e.meta["numbers"]) for e in sp["target"]}
  assert not test & target
  assert {t[:2] for t in test} & {t[:2] for t in target}


def test_domain_pretraining_knob(world):
  # On: composed problems of the other form (subtract, then multiply), never the test form.
  assert world.corpus_parts["domain"] > 0
  assert any(t.endswith(tuple(f" is {r}" for r in range(100))) and " times " in t
             for t in world.corpus)
  test_form = [t for t in world.corpus if " gives away " in t and " are left ? " in t]
  assert not test_form
  off = math_word.build(small(domain_pretraining=False))
  assert "domain" not in off.corpus_parts
  assert not any("now ?" in t for t in off.corpus)
  corpus.check_no_leak(off)


def test_skill_facts_knob():
  w = math_word.build(small(skill_facts=True))
  assert "3 times 4 is 12 ." in w.corpus and "12 minus 3 is 9 ." in w.corpus
  assert "3 times 4 is 12 ." not in world_corpus_default()


def world_corpus_default():
  return math_word.build(small()).corpus


def test_deterministic_and_seeded(world):
  assert common.content_hash(math_word.build(small())) == common.content_hash(world)
  assert common.content_hash(math_word.build(small(seed=3))) != common.content_hash(world)


def test_numbers_are_single_tokens_and_pretrained(world):
  seen = {w for t in world.corpus for w in t.split()}
  for i in range(world.settings.max_number + 1):
    assert str(i) in seen
  corpus.check_coverage(world)


@pytest.mark.parametrize("kw, match", [
    (dict(max_factor=1), "max_factor"),
    (dict(test_pairs=16), "test_pairs"),
    (dict(target_disjoint="entities"), "target_disjoint"),
    (dict(people=("tom",)), "people"),
    (dict(items=("apples", "apples")), "items"),
    (dict(containers_plural=("boxes",)), "containers_plural"),
    (dict(items=("3",)), "scene word"),
    (dict(items=("holds",)), "scene word"),
    (dict(domain_pretraining="yes"), "domain_pretraining"),
])
def test_bad_settings_name_the_field(kw, match):
  with pytest.raises(ValueError, match=match):
    math_word.build(small(**kw))


def test_settings_round_trip_through_dict():
  s = small(skill_facts=True)
  assert math_word.MathSettings.from_dict(s.to_dict()) == s
  assert dataclasses.replace(s, seed=2).to_dict()["seed"] == 2


_FIELDS = {
    "seed": st.integers(-2, 3),
    "max_factor": st.integers(0, 6),
    "max_subtrahend": st.integers(-1, 40),
    "test_pairs": st.integers(-1, 30),
    "test_triples": st.integers(-1, 40),
    "target_triples": st.integers(-1, 40),
    "target_disjoint": st.sampled_from(["pairs", "triples", "x"]),
    "domain_pretraining": st.sampled_from([True, False, 1]),
    "domain_problems": st.integers(-1, 30),
    "skill_facts": st.sampled_from([True, False, None]),
    "background_repeats": st.integers(-1, 3),
    "scene_sentences": st.integers(-1, 100),
    "people": st.lists(st.sampled_from(["tom", "ana", "x y", "Tom", "5"]), max_size=3).map(tuple),
    "items": st.lists(st.sampled_from(["pens", "cups", "holds", ""]), max_size=2).map(tuple),
}


@hyp_settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.fixed_dictionaries({}, optional=_FIELDS))
def test_fuzz_settings_give_a_world_or_a_value_error(kw):
  try:
    w = math_word.build(math_word.MathSettings(**kw))
  except ValueError as e:
    assert str(e)
    event("ValueError")
    return
  event("built")
  corpus.check_no_leak(w)
