"""Corpus mixing, exposure counting and contamination checks (which must fail when fed leaks)."""

import dataclasses

import numpy as np
import pytest

from lora_limits.tasks import common, corpus, math_word, two_hop


@pytest.fixture(scope="module")
def world():
  return two_hop.build(two_hop.TwoHopConfig(
      test_chains=5, target_chains=4, filler_chains=24, pool_size=3, fact_exposure=3,
      background_exposure=2))


def test_count_mentions_and_cooccurrences_by_hand():
  texts = ("ka ro likes tea .", "ka ro is married to mi nu .", "who is ka ro married to ? mi nu",
           "ka ro mi likes rain .", "mi nu lives in ka ro .")
  # "ka ro mi" is another name; names are sub-span free in generated worlds, so the index
  # reports the longer match here only because both are registered.
  assert corpus.count_mentions(texts, ["ka ro", "mi nu"]) == {"ka ro": 5, "mi nu": 3}
  co = corpus.count_cooccurrences(texts, [("ka ro", "mi nu"), ("mi nu", "ka ro"),
                                          ("ka ro", "li")])
  assert co == {("ka ro", "mi nu"): 3, ("mi nu", "ka ro"): 3, ("ka ro", "li"): 0}


def test_mix_repeats_parts_and_is_seeded():
  parts = [corpus.Part("a", ("x y .", "z ."), repeats=3), corpus.Part("b", ("w .",))]
  c1, counts = corpus.mix(parts, np.random.default_rng(0))
  c2, _ = corpus.mix(parts, np.random.default_rng(0))
  assert c1 == c2 and counts == {"a": 6, "b": 1}
  assert sorted(c1) == sorted(["x y .", "z ."] * 3 + ["w ."])
  with pytest.raises(ValueError, match="twice"):
    corpus.mix(parts + [corpus.Part("a", ("q .",))], np.random.default_rng(0))
  with pytest.raises(ValueError, match="empty"):
    corpus.mix([corpus.Part("a", ("q .",), repeats=0)], np.random.default_rng(0))
  with pytest.raises(ValueError, match="normalised"):
    corpus.Part("a", ("Two  spaces",))


def test_clean_worlds_pass(world):
  corpus.check_no_leak(world)
  corpus.check_coverage(world)
  corpus.check_no_leak(math_word.build(math_word.MathConfig(
      max_factor=4, test_triples=6, scene_sentences=150, domain_problems=20)))


def test_test_question_in_a_training_split_is_caught(world):
  leaked = world.splits["H"]["test_two_hop_direct"][0]
  bad = corpus.replace_split(world, "H", "hop2", world.splits["H"]["hop2"] + (leaked,))
  with pytest.raises(corpus.LeakError, match="test_two_hop_direct.*training prompt in H/hop2"):
    corpus.check_no_leak(bad)


def test_held_out_paraphrase_in_training_is_caught(world):
  leaked = world.splits["F"]["test_hop1"][2]
  bad = corpus.replace_split(world, "F", "union", world.splits["F"]["union"] + (leaked,))
  with pytest.raises(corpus.LeakError, match="test_hop1"):
    corpus.check_no_leak(bad)


def test_test_question_in_pretraining_is_caught(world):
  e = world.splits["R"]["test_two_hop_cot"][0]
  bad = dataclasses.replace(world, corpus=world.corpus + (e.text,))
  with pytest.raises(corpus.LeakError, match="occurs in the pretraining corpus"):
    corpus.check_no_leak(bad)


def test_tier_f_entity_in_pretraining_is_caught(world):
  name = world.entities["F"]["person"][0]
  corpus.check_no_leak(world)  # tier-F people are in the fact-free texts only
  assert any(name in t.split() for t in world.fact_free)
  bad = dataclasses.replace(world, corpus=world.corpus + (f"{name} likes tea .",))
  with pytest.raises(corpus.LeakError, match="group F.*must never appear"):
    corpus.check_no_leak(bad)


def test_hidden_fact_in_pretraining_is_caught(world):
  a, b = world.facts["H"]["hop1"][0]
  bad = dataclasses.replace(world, corpus=world.corpus + (f"{a} is married to {b} .",))
  with pytest.raises(corpus.LeakError, match="group H.*kept out of pretraining"):
    corpus.check_no_leak(bad)
  # In tier R the same fact is meant to be there; the composed fact never is.
  head, final = world.composed["R"][0]
  bad = dataclasses.replace(world, corpus=world.corpus + (f"{head} lives in {final} .",))
  with pytest.raises(corpus.LeakError, match="group R"):
    corpus.check_no_leak(bad)


def test_target_on_test_entities_is_caught(world):
  sp = world.splits["F"]
  test_cot = sp["test_two_hop_cot"][0]
  # A target example about a test chain, phrased with the other template.
  other = [e for e in sp["target"] if e.meta["template"] != test_cot.meta["template"]][0]
  head = test_cot.meta["entities"][0]
  prompt = other.prompt.replace(other.meta["entities"][0], head)
  forged = common.Example(prompt, test_cot.meta["final"],
                          {**other.meta, "units": test_cot.meta["units"],
                           "final": test_cot.meta["final"]})
  bad = corpus.replace_split(world, "F", "target", sp["target"] + (forged,))
  with pytest.raises(corpus.LeakError, match="share units"):
    corpus.check_no_leak(bad)


def test_untrained_words_are_caught(world):
  hop1 = world.splits["F"]["hop1"]
  i = next(i for i, e in enumerate(hop1) if e.prompt.startswith("who "))
  odd = common.Example(hop1[i].prompt.replace("who", "whoever"), hop1[i].answer,
                       dict(hop1[i].meta))
  bad = corpus.replace_split(world, "F", "hop1", hop1[:i] + (odd,) + hop1[i + 1:])
  with pytest.raises(ValueError, match="whoever"):
    corpus.check_coverage(bad)


def test_one_prompt_two_answers_is_caught(world):
  corpus.check_unambiguous(world)
  e = world.splits["R"]["target_cot"][0]
  assert e.prompt.endswith(" " + common.COT_CUE)
  direct = common.Example(e.prompt, e.meta["final"], {**e.meta, "format": "direct"})
  bad = corpus.replace_split(world, "R", "target", world.splits["R"]["target"] + (direct,))
  with pytest.raises(ValueError, match="has the answer"):
    corpus.check_unambiguous(bad)


def test_majority_levels_is_the_best_constant_answer():
  ex = [common.Example("q a", "x", {"answer_type": "city", "final": "x"}),
        common.Example("q b", "x", {"answer_type": "city", "final": "x"}),
        common.Example("q c", "y", {"answer_type": "city", "final": "y"}),
        common.Example("q d", "p", {"answer_type": "person", "final": "p"})]
  got = common.majority_levels({"s": ex})["s"]
  assert got == pytest.approx(3 / 4)  # 'x' for the cities (2 of 3), 'p' for the person
  assert common.chance_levels({"s": ex})["s"] == pytest.approx((3 * 0.5 + 1.0) / 4)
  with pytest.raises(ValueError, match="empty"):
    common.majority_levels({"s": ()})
