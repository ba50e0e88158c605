"""The theory toy (float64): Proposition 1, multi-fact edits, Theorem 2, Arrow, the bridge.

Every statement is checked against its own record and against a variant that must fail
(a wrong closed form, an initialisation outside the assumption, a library that cheats).
Tolerances: identities to 1e-9 (float64), GD convergence cosine ≥ 0.99 and relative error
≤ 5 %, accuracies ≥ 0.95, "at chance" ≤ 1/N + 3·√(p(1−p)/m).
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st_h

from lora_limits.theory import kv_model as kv
from lora_limits.theory import statements as st

CFG = kv.KVConfig(n_entities=64, n_relations=2, d_model=64, d_ff=256)


@pytest.fixture(scope="module")
def toy():
  return st.build_toy(jax.random.key(0), CFG)


@pytest.fixture(scope="module")
def task(toy):
  return st.make_two_hop(toy, key=jax.random.key(3), n_chains=24, expert_source="trained")


@pytest.fixture(scope="module")
def task_closed(toy):
  return st.make_two_hop(toy, key=jax.random.key(4), n_chains=24, expert_source="closed_form")


@pytest.fixture(scope="module")
def prop1(toy):
  return st.proposition_1(toy, key=jax.random.key(1))


# ---------------------------------------------------------------------------- the model


def test_keys_follow_the_paper_formula(toy):
  m = toy.model
  h = kv.hidden(m, [3, 5], [0, 1])
  x = np.stack([m.value_DxD @ m.entity_NxD[3] + m.relation_RxD[0],
                m.value_DxD @ m.entity_NxD[5] + m.relation_RxD[1]])
  np.testing.assert_allclose(h, np.maximum(x @ m.up_FxD.T, 0), atol=1e-14)
  assert h.dtype == np.float64 and h.shape == (2, CFG.d_ff)
  np.testing.assert_allclose(m.value_DxD.T @ m.value_DxD, np.eye(CFG.d_model), atol=1e-12)
  np.testing.assert_allclose(np.linalg.norm(m.entity_NxD, axis=1), 1.0)
  np.testing.assert_allclose(np.linalg.norm(m.relation_RxD, axis=1), CFG.relation_scale)


def test_two_hop_key_never_sees_the_bridge_and_reduces_without_carry():
  model = kv.init(jax.random.key(0), dataclasses.replace(CFG, two_hop_carry=0.0))
  a = np.arange(5)
  np.testing.assert_allclose(kv.two_hop_hidden(model, a, 0, 1),
                             kv.hidden(model, a, np.ones(5, int)))
  carried = kv.init(jax.random.key(0), CFG)
  x = (carried.entity_NxD[a] @ carried.value_DxD.T + carried.relation_RxD[0]
       + carried.relation_RxD[1])
  np.testing.assert_allclose(kv.two_hop_hidden(carried, a, 0, 1),
                             np.maximum(x @ carried.up_FxD.T, 0))


def test_base_recall_by_least_squares_and_by_training(toy):
  assert toy.base_recall == 1.0
  entity, relation, target = kv.all_facts(toy.table_RxN)
  h = kv.hidden(toy.model, entity, relation)
  np.testing.assert_allclose(kv.logits(toy.w_NxF, h), kv.one_hot(target, CFG.n_entities),
                             atol=1e-9)
  trained = st.build_toy(jax.random.key(0), CFG, readout="train")
  assert trained.base_recall == 1.0
  # Trained, not solved: close to one-hot logits but not exactly.
  err = np.abs(kv.logits(trained.w_NxF, h) - kv.one_hot(target, CFG.n_entities)).max()
  assert 1e-6 < err < 0.5


def test_too_few_hidden_units_cannot_store_every_fact():
  small = st.build_toy(jax.random.key(0), dataclasses.replace(CFG, d_ff=32))
  assert small.base_recall < 0.9


def test_float64_stays_local(toy, prop1):
  assert not jax.config.jax_enable_x64
  assert jnp.ones(2).dtype == jnp.float32
  assert prop1.trajectory_cosine.dtype == np.float64


# ---------------------------------------------------------------------------- Proposition 1


def test_proposition_1_holds(prop1):
  assert prop1.passed, prop1.checks
  assert prop1.closed_form_rank == 1
  assert prop1.paper_form_difference < 1e-12  # least-squares W: W h = i_old exactly
  assert prop1.trained_cosine >= 0.99 and prop1.trained_relative_error <= 0.05
  assert prop1.trained_other_rows_norm < 1e-9  # GD writes only the rows i_new and i_old
  assert prop1.null_perturbation_min_gain > 0
  # The trajectory approaches the closed form.
  assert prop1.trajectory_relative_error[-1] < prop1.trajectory_relative_error[0]
  json.dumps(prop1.to_dict())


def test_proposition_1_rejects_a_wrong_closed_form(toy):
  def wrong_norm(w, h, new):  # ‖h‖ instead of ‖h‖²
    return np.outer(kv.one_hot(new, w.shape[0]) - w @ h, h) / np.linalg.norm(h)

  def wrong_direction(w, h, new):  # a rank-one update along a key other than h
    other = kv.hidden(toy.model, [7], [1])[0]
    return np.outer(kv.one_hot(new, w.shape[0]) - w @ h, other) / float(other @ h)

  for form in (wrong_norm, wrong_direction):
    rec = st.proposition_1(toy, key=jax.random.key(1), closed_form=form,
                           gd=kv.GDConfig(steps=300))
    assert not rec.passed
    assert not rec.checks["gradient_descent_converges_to_closed_form"]
  rec = st.proposition_1(toy, key=jax.random.key(1), closed_form=wrong_norm,
                         gd=kv.GDConfig(steps=300))
  assert not rec.checks["edited_output_is_target"]
  assert not rec.checks["minimum_norm"]
  rec = st.proposition_1(toy, key=jax.random.key(1), closed_form=wrong_direction,
                         gd=kv.GDConfig(steps=300))
  assert rec.checks["edited_output_is_target"]  # it also solves the edit ...
  assert not rec.checks["minimum_norm"]  # ... but is not the shortest solution
  assert not rec.checks["shift_on_other_keys_is_c_times_edit"]


def test_gradient_descent_needs_a_small_initialisation(prop1, toy):
  # The usual LoRA init (a ~ U(±1/√F), b = 0) keeps a's component orthogonal to h.
  assert prop1.peft_init_cosine < 0.95
  assert prop1.peft_init_relative_error > 0.2
  big = st.proposition_1(toy, key=jax.random.key(1), gd=kv.GDConfig(init_scale=0.05))
  assert not big.checks["gradient_descent_converges_to_closed_form"]


def test_collateral_flips_are_reported_not_assumed(prop1):
  coll = prop1.collateral_flips_all_facts
  assert 0.0 < coll["fraction_with_none"] <= 1.0
  assert coll["max"] >= prop1.other_facts_flipped
  assert 0.0 < prop1.max_overlap_other


@settings(max_examples=25, deadline=None)
@given(seed=st_h.integers(0, 2**31 - 1), n=st_h.integers(2, 12), f=st_h.integers(1, 20))
def test_rank_one_edit_is_exact_and_shortest(seed, n, f):
  rng = np.random.default_rng(seed)
  h = rng.random(f) + 0.1
  w = rng.normal(size=(n, f))
  new = int(rng.integers(n))
  delta = st.general_rank_one_edit(w, h, new)
  np.testing.assert_allclose((w + delta) @ h, kv.one_hot(new, n), atol=1e-9)
  # Any other solution differs by Z with Z h = 0, orthogonal to ΔW in Frobenius.
  z = rng.normal(size=(n, f))
  z -= np.outer(z @ h, h) / (h @ h)
  assert np.sum((delta + z) ** 2) >= np.sum(delta ** 2) - 1e-12
  assert abs(np.sum(delta * z)) < 1e-9


# ---------------------------------------------------------------------------- multi-fact


@pytest.fixture(scope="module")
def multi(toy):
  return st.multi_fact(toy, key=jax.random.key(2), n_facts=12)


def test_multi_fact_edit_and_rank_capacity(multi):
  assert multi.passed, multi.checks
  assert multi.edit_rank == 12 and multi.target_change_rank == 12
  assert multi.edit_accuracy == 1.0
  assert multi.orthogonal_keys_sum_error < 1e-9
  # On the model's own (overlapping) keys the sum of rank-one terms is a different matrix.
  assert multi.model_keys_sum_error > 0.1
  for r, k_c, k_t in zip(multi.ranks, multi.exact_fits_closed_form, multi.exact_fits_trained):
    assert k_c <= r and k_t <= r
  # Below rank m the residual is bounded away from zero (Eckart–Young, σ_i(D) ≥ 1 here).
  assert multi.eckart_young_residual[-2] >= 1.0 - 1e-9
  assert multi.residual_trained[-2] >= multi.eckart_young_residual[-2] * (1 - 1e-6)
  assert multi.accuracy_closed_form[0] < 0.5 and multi.accuracy_closed_form[-1] == 1.0
  assert multi.saturation_rank_closed_form is not None
  assert multi.saturation_rank_closed_form <= 12
  json.dumps(multi.to_dict())


def test_rank_capacity_check_catches_a_false_bound(multi):
  # If a rank-(m-1) update could store all m facts exactly, the check would have to fail.
  faked = dataclasses.replace(
      multi, exact_fits_closed_form=[*multi.exact_fits_closed_form[:-2], 12, 12])
  assert not all(k <= r for k, r in zip(faked.exact_fits_closed_form, faked.ranks))


# ---------------------------------------------------------------------------- Theorem 2


@pytest.mark.parametrize("which", ["task", "task_closed"])
def test_theorem_2_sum_and_averages_do_not_compose(which, toy, request):
  task = request.getfixturevalue(which)
  rec = st.theorem_2(toy, task)
  assert rec.passed, rec.checks
  acc = rec.two_hop_accuracy
  assert rec.one_hop_accuracy["expert_1"] >= 0.95 and rec.one_hop_accuracy["expert_2"] >= 0.95
  assert acc["target_adapter"] >= 0.95
  for method in ("sum", "mean_updates", "mean_factors"):
    assert acc[method] <= rec.chance_bound
    assert acc["target_adapter"] - acc[method] >= 0.85
  assert max(rec.span_residual.values()) < 1e-8
  # The second expert is not re-triggered: its own key's pseudo-inverse coefficient ~ 0,
  # while the first expert's is ~ 1 (the two-hop prompt shares A with "A REL1").
  assert rec.pinv_coefficient_own["expert_2"] < 0.2 < 0.8 < rec.pinv_coefficient_own["expert_1"]
  assert rec.logit_gain_answer < 0.2 < rec.logit_gain_bridge
  json.dumps(rec.to_dict())


def test_theorem_2_check_fails_when_the_library_holds_the_composed_fact(toy, task):
  # A library whose second adapter was trained on A→C itself does answer: the check notices.
  cheat = dataclasses.replace(
      task, b_KxNxR=task.b_KxNxR[[0, 2, 2]], a_KxFxR=task.a_KxFxR[[0, 2, 2]])
  rec = st.theorem_2(toy, cheat)
  assert not rec.checks["sum_at_chance"]
  assert rec.two_hop_accuracy["sum"] > 0.3


def test_overlap_coefficients_match_rank_one_experts(toy, task):
  # With one chain and rank-one closed-form experts, ΔW_j h_2hop = c_j (i_new − W h_j).
  one = st.make_two_hop(toy, key=jax.random.key(9), n_chains=1, expert_source="closed_form")
  w, d = toy.w_NxF, one.deltas_KxNxF
  h2 = one.keys2hop_MxF[0]
  for k, keys, tgt in ((0, one.keys1_MxF, one.b_M), (1, one.keys2_MxF, one.c_M)):
    h = keys[0]
    c = h @ h2 / (h @ h)
    np.testing.assert_allclose(d[k] @ h2, c * (kv.one_hot(tgt[0], toy.n) - w @ h), atol=1e-9)


# ---------------------------------------------------------------------------- Arrow


def test_arrow_weights():
  protos = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]) / np.array([[1], [1], [np.sqrt(2)]])
  h = np.array([[3.0, 0.1], [-0.1, -2.0]])
  w1 = kv.arrow_weights(protos, h, top_k=1)
  np.testing.assert_array_equal(w1, [[1, 0, 0], [0, 1, 0]])
  w2 = kv.arrow_weights(protos, h, top_k=2, temperature=0.5)
  np.testing.assert_allclose(w2.sum(1), 1.0)
  assert np.count_nonzero(w2[0]) == 2 and w2[0, 1] == 0.0
  s = np.abs(h[0] @ protos.T) / 0.5
  np.testing.assert_allclose(w2[0, [0, 2]], np.exp(s[[0, 2]]) / np.exp(s[[0, 2]]).sum())
  with pytest.raises(ValueError, match="top_k"):
    kv.arrow_weights(protos, h, top_k=4)
  with pytest.raises(ValueError, match="temperature"):
    kv.arrow_weights(protos, h, temperature=0.0)


@pytest.mark.parametrize("top_k", [1, 2])
def test_arrow_is_no_better_than_the_sum(toy, task, top_k):
  rec = st.arrow_in_toy(toy, task, top_k=top_k)
  assert rec.passed, rec.checks
  assert rec.two_hop_accuracy <= rec.chance_bound
  np.testing.assert_allclose(sum(rec.routing_two_hop_mean), 1.0)
  json.dumps(rec.to_dict())


# ---------------------------------------------------------------------------- the bridge


@pytest.mark.parametrize("which", ["task", "task_closed"])
def test_explicit_bridge_composes(which, toy, request):
  rec = st.explicit_bridge(toy, request.getfixturevalue(which))
  assert rec.passed, rec.checks
  assert rec.chain_accuracy >= 0.95 and rec.direct_accuracy <= rec.chance_bound
  assert rec.overlap_c2_explicit["min"] > 0.999  # the answer step reads expert 2's own key
  json.dumps(rec.to_dict())


# ---------------------------------------------------------------------------- bad settings


@pytest.mark.parametrize("kwargs, match", [
    ({"n_entities": 1}, "n_entities"),
    ({"d_ff": 0}, "d_ff"),
    ({"relation_scale": -1.0}, "relation_scale"),
    ({"two_hop_carry": float("nan")}, "two_hop_carry"),
    ({"n_relations": 2.5}, "n_relations"),
])
def test_bad_config_is_refused(kwargs, match):
  with pytest.raises(ValueError, match=match):
    kv.KVConfig(**kwargs)


def test_inconsistent_settings_are_refused(toy):
  with pytest.raises(ValueError, match="n_chains=40"):
    st.make_two_hop(toy, key=jax.random.key(0), n_chains=40)  # 80 entities needed, 64 exist
  with pytest.raises(ValueError, match="rank=65"):
    st.make_two_hop(toy, key=jax.random.key(0), n_chains=4, rank=65)
  with pytest.raises(ValueError, match="rel1 and rel2"):
    st.make_two_hop(toy, key=jax.random.key(0), rel1=1, rel2=1)
  with pytest.raises(ValueError, match="expert_source"):
    st.make_two_hop(toy, key=jax.random.key(0), expert_source="magic")
  with pytest.raises(ValueError, match="n_facts=129"):
    st.multi_fact(toy, key=jax.random.key(0), n_facts=129)  # more than 64·2 facts
  with pytest.raises(ValueError, match="free"):
    st.multi_fact(toy, key=jax.random.key(0), n_facts=40)  # not enough unused new targets
  with pytest.raises(ValueError, match="ranks"):
    st.multi_fact(toy, key=jax.random.key(0), n_facts=4, ranks=[0, 2])
  with pytest.raises(ValueError, match="new_target"):
    st.proposition_1(toy, key=jax.random.key(0), new_target=int(toy.table_RxN[0, 0]))
  with pytest.raises(ValueError, match="entity=64"):
    st.proposition_1(toy, key=jax.random.key(0), entity=64)
  one_rel = st.build_toy(jax.random.key(0), dataclasses.replace(CFG, n_relations=1))
  with pytest.raises(ValueError, match="n_relations >= 2"):
    st.make_two_hop(one_rel, key=jax.random.key(0))
  with pytest.raises(ValueError, match="method"):
    kv.fit_readout(toy.model, toy.table_RxN, method="svd")
  with pytest.raises(ValueError, match="rank=300"):
    kv.train_lora(jax.random.key(0), toy.w_NxF, kv.hidden(toy.model, [0], [0]), [1], rank=300)
  with pytest.raises(ValueError, match="GDConfig.init"):
    kv.GDConfig(init="zeros")
  with pytest.raises(ValueError, match="entity has values"):
    kv.hidden(toy.model, [64], [0])


# ---------------------------------------------------------------------------- the study


def test_theory_study_writes_results_and_plots(tmp_path):
  import ml_collections

  from configs import theory as theory_config
  from experiments import schema
  from experiments.studies import theory as study

  config = theory_config.get_config()
  config.toy.n_entities, config.toy.d_ff = 32, 128
  config.multi_fact.n_facts, config.multi_fact.gd.steps = 6, 800
  config.two_hop.n_chains, config.two_hop.gd.steps = 8, 800
  config.prop1.gd.steps = 200
  study.main(config, tmp_path)
  out = json.loads((tmp_path / "results.json").read_text())
  assert out["all_passed"], out["failed_checks"]
  assert set(out["statements"]) == {"proposition_1", "multi_fact", "theorem_2", "arrow_top1",
                                    "arrow_top2", "explicit_bridge"}
  for rec in out["statements"].values():
    assert rec["passed"] is True and all(rec["checks"].values())
  assert out["two_hop_accuracy_by_method"]["sum"] <= out["statements"]["theorem_2"]["chance_bound"]
  for png in ("prop1_trained_vs_closed_form.png", "accuracy_vs_rank.png",
              "two_hop_accuracy.png"):
    assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
  bad = theory_config.get_config()
  bad.unlock()
  bad.two_hop.colour = "red"
  with pytest.raises(schema.ConfigError, match="colour"):
    study.main(bad, tmp_path)
  bad = theory_config.get_config()
  bad.two_hop.expert_source = "magic"
  with pytest.raises(ValueError, match="expert_source"):
    study.main(bad, tmp_path)
  bad = theory_config.get_config()
  bad.prop1.entity = 500
  with pytest.raises(ValueError, match="prop1"):
    study.main(bad, tmp_path)
  assert isinstance(config, ml_collections.ConfigDict)
