"""Two-hop world: determinism, tier definitions counted in the corpus, splits, validation."""

import dataclasses

import pytest
from hypothesis import HealthCheck, event, given, settings as hyp_settings
from hypothesis import strategies as st

from lora_limits.tasks import common, corpus, two_hop

SMALL = dict(test_chains=6, target_chains=5, filler_chains=24, pool_size=4,
             background_exposure=3, fact_exposure=5)


def small(**kw) -> two_hop.TwoHopConfig:
  return two_hop.TwoHopConfig(**{**SMALL, **kw})


@pytest.fixture(scope="module")
def world():
  return two_hop.build(small())


def _count(corpus_texts, name):
  """Independent of corpus.NameIndex: whole-word substring occurrences."""
  needle = f" {name} "
  return sum(f" {t} ".count(needle) for t in corpus_texts)


def _cooccur(corpus_texts, a, b):
  return sum(1 for t in corpus_texts if f" {a} " in f" {t} " and f" {b} " in f" {t} ")


def _chains(world, tier, split):
  return [e.meta["entities"] for e in world.splits[tier][split]]


def _factual(world):
  """The corpus without its fact-free copy texts."""
  free = set(world.fact_free)
  return [t for t in world.corpus if t not in free]


def test_same_seed_same_world_other_seed_other_world(world):
  again = two_hop.build(small())
  assert common.content_hash(again) == common.content_hash(world)
  assert again.corpus == world.corpus
  other = two_hop.build(small(seed=1))
  assert common.content_hash(other) != common.content_hash(world)
  assert other.corpus != world.corpus


def test_tier_f_people_only_in_fact_free_texts_and_no_fact_anywhere(world):
  s = world.settings
  chains = _chains(world, "F", "test_two_hop_direct") + _chains(world, "F", "target")
  people = {n for c in chains for n in c[:-1]}
  factual = _factual(world)
  assert people and all(_count(factual, n) == 0 for n in people)
  free = list(world.fact_free)
  for n in people:  # an echo and a frame text per exposure, the name twice in each
    assert sum(1 for t in world.corpus if f" {n} " in f" {t} ") == 2 * s.fact_free_exposure
    assert _count(world.corpus, n) == 4 * s.fact_free_exposure
    assert f"echo {n} . {n}" in free and f"the spouse of {n} repeat {n}" in free
  for a, b, c in chains:
    assert _cooccur(world.corpus, a, b) == _cooccur(world.corpus, b, c) == 0
    assert _cooccur(world.corpus, a, c) == 0


def test_tier_h_entities_in_background_only(world):
  s = world.settings
  chains = _chains(world, "H", "test_two_hop_direct") + _chains(world, "H", "target")
  factual = _factual(world)
  for a, b, c in chains:
    assert _count(factual, a) == s.background_exposure
    assert _count(factual, b) == s.background_exposure
    assert c in world.entities["H"]["final"]  # a city of the shared pool
    assert _cooccur(world.corpus, a, b) == 0
    assert _cooccur(world.corpus, b, c) == 0
    assert _cooccur(world.corpus, a, c) == 0


def test_tier_r_both_hops_at_the_set_frequency_composed_never(world):
  s = world.settings
  chains = _chains(world, "R", "test_two_hop_direct") + _chains(world, "R", "target")
  for a, b, c in chains:
    assert _cooccur(world.corpus, a, b) == s.fact_exposure
    assert _cooccur(world.corpus, b, c) == s.fact_exposure
    assert _cooccur(world.corpus, a, c) == 0
    assert _count(_factual(world), a) == s.background_exposure + s.fact_exposure
    assert _count(_factual(world), b) == s.background_exposure + 2 * s.fact_exposure


def test_hybrid_one_hop_knows_the_first_hop_only():
  w = two_hop.build(small(tiers=("H",), hybrid="one_hop"))
  for a, b, c in _chains(w, "H", "test_two_hop_direct"):
    assert _cooccur(w.corpus, a, b) == w.settings.fact_exposure
    assert _cooccur(w.corpus, b, c) == 0
    assert _cooccur(w.corpus, a, c) == 0


def test_exposure_report_matches_the_definitions(world):
  rep = corpus.exposure_report(world)
  s = world.settings
  assert rep["F"]["mentions/head"] == rep["F"]["mentions/bridge"] == [0, 0]
  assert rep["F"]["fact_free/head"] == [4 * s.fact_free_exposure] * 2
  assert rep["F"]["facts/hop1"] == rep["F"]["facts/hop2"] == rep["F"]["facts/composed"] == [0, 0]
  assert rep["H"]["mentions/head"] == [s.background_exposure] * 2
  assert rep["H"]["facts/hop1"] == [0, 0]
  assert rep["R"]["facts/hop1"] == rep["R"]["facts/hop2"] == [s.fact_exposure] * 2
  assert rep["R"]["facts/composed"] == [0, 0]


def test_familiarity_check_fails_when_a_fact_is_added(world):
  a, b, _ = _chains(world, "H", "test_two_hop_direct")[0]
  bad = dataclasses.replace(world, corpus=world.corpus + (f"{a} is married to {b} .",))
  with pytest.raises(ValueError, match="tier H"):
    two_hop.check_familiarity(bad)


def test_splits_are_disjoint_and_consistent(world):
  s = world.settings
  for tier in s.tiers:
    sp = world.splits[tier]
    assert set(sp) == set(common.split_names(2))
    test_units = {u for e in sp["test_two_hop_direct"] for u in e.meta["units"]}
    target_units = {u for e in sp["target"] for u in e.meta["units"]}
    assert test_units and target_units and not test_units & target_units
    assert len(sp["test_two_hop_direct"]) == len(sp["test_two_hop_cot"]) == s.test_chains
    # Every hop of every test chain is taught by the hop splits (so adapters can know it).
    hop1 = {(e.meta["units"][0], e.answer) for e in sp["hop1"]}
    hop2 = {e.prompt: e.answer for e in sp["hop2"]}
    for a, b, c in _chains(world, tier, "test_two_hop_direct"):
      assert (a, b) in hop1
      assert hop2[f"where does {b} live ?"] == c
    assert len(sp["union"]) == len(sp["hop1"]) + len(sp["hop2"])
    # One-hop tests use held-out paraphrases only.
    heldout = {"whom did {a} marry ?", "which city is home to {a} ?"}
    for split in ("test_hop1", "test_hop2"):
      for e in sp[split]:
        assert "heldout" in e.meta["template"]
        subject = e.meta["units"][0]
        assert e.prompt in {t.format(a=subject) for t in heldout}


def test_cot_answer_states_the_bridge_then_the_answer(world):
  for e in world.splits["F"]["test_two_hop_cot"]:
    a, b, c = e.meta["entities"]
    assert e.answer == f"{a} 's spouse is {b} . {b} lives in {c}"
    at = e.meta["bridge_at"][0]
    assert e.answer.split()[at:at + len(b.split())] == b.split()
    assert e.meta["bridge_steps"] == [0] and e.answer.split(" . ")[0].endswith(" " + b)
    assert e.meta["bridge"] == b and e.meta["final"] == c


def test_names_are_one_token_and_every_token_is_pretrained(world):
  seen = {w for t in world.corpus for w in t.split()}
  for e in world.splits["F"]["test_two_hop_direct"]:
    assert len(e.answer.split()) == 1
    assert set(e.text.split()) <= seen
  # The inventory is fixed by the settings: every seed uses (and trains) the same tokens.
  other = two_hop.build(small(seed=3))
  assert other.vocabulary == world.vocabulary
  used = {w for t in world.corpus for w in t.split()}
  assert set(two_hop.name_inventory(world.settings)) <= used


def test_syllable_names_ablation_spells_names_in_several_tokens():
  w = two_hop.build(small(name_style="syllables", tiers=("F",)))
  seen = {x for t in w.corpus for x in t.split()}
  for e in w.splits["F"]["test_two_hop_cot"]:
    assert all(len(n.split()) >= 2 for n in e.meta["entities"])
    assert set(e.text.split()) <= seen
  corpus.check_no_leak(w)


def test_answers_are_balanced_so_chance_equals_majority():
  w = two_hop.build(small(test_chains=8, pool_size=4))
  for tier in ("F", "H", "R"):
    finals = [e.meta["final"] for e in w.splits[tier]["test_two_hop_cot"]]
    assert sorted(finals.count(c) for c in set(finals)) == [2, 2, 2, 2]
    assert w.chance[tier]["test_two_hop_cot"] == w.majority[tier]["test_two_hop_cot"] == 0.25


def test_filler_probes_measure_extraction_and_the_procedure(world):
  probes = world.splits[two_hop.FILLER]
  assert set(probes) == set(common.test_splits(2))
  texts = " | ".join(world.corpus)
  for e in probes["test_hop1"] + probes["test_hop2"]:
    a = e.meta["units"][0]
    assert e.prompt not in texts  # never asked: statement-only fillers
    assert f"{a} 's spouse is {e.answer} ." in world.corpus or \
        f"{a} lives in {e.answer} ." in world.corpus
  for e in probes["test_two_hop_cot"]:
    a, b, c = e.meta["entities"]
    assert _cooccur(world.corpus, a, c) == 0  # never composed
    assert f"who is the spouse of {a} ? {b}" in world.corpus  # but its facts have questions


def test_recall_probes_are_corpus_texts(world):
  texts = set(world.corpus)
  assert world.recall and all(e.text in texts for e in world.recall)
  r_probes = [e for e in world.recall if e.meta["group"] == "R"]
  assert r_probes  # tier-R facts can be probed after pretraining


def test_three_hops_chain_with_two_bridges():
  w = two_hop.build(small(relations=("spouse", "lives_in", "in_country"), tiers=("F",)))
  assert set(w.splits["F"]) == set(common.split_names(3))
  e = w.splits["F"]["test_two_hop_cot"][0]
  a, b, c, d = e.meta["entities"]
  assert e.prompt in (f"which country is the home town of the spouse of {a} in ? explain",
                      f"in which country is the home town of the spouse of {a} ? explain")
  assert e.answer == f"{a} 's spouse is {b} . {b} lives in {c} . {c} is in {d}"
  words = e.answer.split()
  for bridge, at in zip(e.meta["bridges"], e.meta["bridge_at"]):
    assert words[at:at + len(bridge.split())] == bridge.split()


@pytest.mark.parametrize("kw, match", [
    (dict(tiers=("F", "X")), "tiers"),
    (dict(tiers=()), "tiers"),
    (dict(relations=("lives_in", "spouse")), "chain"),
    (dict(relations=("spouse", "flies_to")), "flies_to"),
    (dict(relations=("spouse",)), "relations"),
    (dict(test_chains=0), "test_chains"),
    (dict(fact_exposure=0), "fact_exposure"),
    (dict(hybrid="half"), "hybrid"),
    (dict(syllables=("ka", "is")), "template words"),
    (dict(name_lengths=(1, 2)), "name_lengths"),
    (dict(composed_share=1.5), "composed_share"),
    (dict(name_style="x"), "name_style"),
    (dict(filler_chains=2), "at least one"),
    (dict(pool_size=True), "pool_size"),
])
def test_bad_settings_name_the_field(kw, match):
  with pytest.raises(ValueError, match=match):
    two_hop.TwoHopConfig(**kw)


def test_more_entities_than_names():
  with pytest.raises(ValueError, match="names"):
    small(syllables=("ka", "ro", "mi"), name_lengths=(2,), test_chains=8)
  s = small(syllables=("ka", "ro", "mi"), name_lengths=(2,), test_chains=8,
            name_style="syllables")
  with pytest.raises(ValueError, match="names"):
    two_hop.build(s)


def test_template_without_its_slot():
  r = two_hop.RELATIONS["spouse"]
  with pytest.raises(ValueError, match=r"questions\[0\].*\{a\}"):
    dataclasses.replace(r, questions=("who is the spouse ?",))
  with pytest.raises(ValueError, match="statements"):
    dataclasses.replace(r, statements=("{a} is married .",))
  with pytest.raises(ValueError, match="cot"):
    dataclasses.replace(r, cot="{b} is the spouse of {a}")
  with pytest.raises(ValueError, match="one step"):
    dataclasses.replace(r, cot="{a} is here . {a} 's spouse is {b}")


def test_settings_round_trip_through_dict():
  s = small(relations=("spouse", "lives_in"), hybrid="one_hop")
  assert two_hop.TwoHopConfig.from_dict(s.to_dict()) == s
  with pytest.raises(ValueError, match="no field"):
    two_hop.TwoHopConfig.from_dict({"test_chain": 3})


_FIELD_VALUES = {
    "seed": st.one_of(st.integers(-3, 5), st.just("0")),
    "relations": st.one_of(
        st.lists(st.sampled_from(["spouse", "lives_in", "in_country", "mentor", "x"]),
                 max_size=4).map(tuple),
        st.just(["spouse", "lives_in"])),
    "tiers": st.lists(st.sampled_from(["F", "H", "R", "Q"]), max_size=4).map(tuple),
    "test_chains": st.integers(-1, 6),
    "target_chains": st.integers(-1, 6),
    "filler_chains": st.one_of(st.integers(-1, 30), st.just(2.5)),
    "pool_size": st.integers(-1, 5),
    "syllables": st.one_of(
        st.just(two_hop.DEFAULT_SYLLABLES),
        st.lists(st.sampled_from(["ka", "ro", "mi", "is", "Ka", "k a", "", "ka"]),
                 max_size=5).map(tuple)),
    "name_lengths": st.lists(st.integers(0, 7), max_size=3).map(tuple),
    "background_exposure": st.integers(-1, 4),
    "fact_exposure": st.integers(-1, 4),
    "hybrid": st.sampled_from(["background", "one_hop", "other", None]),
    "filler_repeats": st.integers(-1, 3),
    "composed_share": st.sampled_from([0.0, 0.4, 0.99, 1.0, -0.1, "x"]),
    "name_style": st.sampled_from(["token", "syllables", "x"]),
}


@hyp_settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.fixed_dictionaries({}, optional=_FIELD_VALUES))
def test_fuzz_settings_give_a_world_or_a_value_error(kw):
  try:
    s = two_hop.TwoHopConfig(**kw)
    w = two_hop.build(s)
  except ValueError as e:
    assert str(e)
    event("ValueError")
    return
  event("built")
  corpus.check_no_leak(w)
  assert all(len(ex) > 0 for sp in w.splits.values() for ex in sp.values())


def test_long_names_are_drawn_without_listing_every_combination():
  # 40 syllables, 6 long: 4e9 combinations; listing them exhausted memory (found by the fuzz test).
  s = two_hop.TwoHopConfig(name_lengths=(6,))
  names = two_hop.name_inventory(s)
  assert len(names) == len(set(names)) == two_hop.names_needed(s)
  assert all(len(n) >= 6 for n in names)
  assert names == two_hop.name_inventory(s)  # fixed, like the listed lengths
  assert two_hop.name_inventory(two_hop.TwoHopConfig()) == two_hop.name_inventory(
      two_hop.TwoHopConfig())
