"""Pre-flight diagnostics: the theory's claims in the key–value toy, then tiny random adapters."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_limits import lora as lora_lib
from lora_limits import preflight as pf
from lora_limits.recycle import merge as merge_lib
from lora_limits.theory import kv_model as kv
from lora_limits.theory import statements as st

READOUT = "layers/0/mlp/down_proj/kernel"  # the toy's W: d_ff keys → entity values


def _toy():
  cfg = kv.KVConfig(n_entities=16, n_relations=2, d_model=16, d_ff=64)
  return st.build_toy(jax.random.key(0), cfg)


def _as_adapter(delta_NxF: np.ndarray, rank: int) -> dict:
  """The toy's update ΔW [N, F] (paper layout) as our kernel's adapter (ΔWᵀ = a b)."""
  b_nr, a_fr = kv.balanced_factors(delta_NxF, rank)
  return {READOUT: lora_lib.LoraFactors(jnp.asarray(a_fr), jnp.asarray(b_nr.T), 1.0)}


def _facts(toy, n):
  entity, relation, target = kv.all_facts(toy.table_RxN)
  h = kv.hidden(toy.model, entity[:n], relation[:n])
  new = (target[:n] + 1) % toy.n
  return h, target[:n], new


# ---------------------------------------------------------------------------- theory


def test_recovered_keys_match_true_keys_for_a_trained_lora():
  toy = _toy()
  h, _, new = _facts(toy, 1)
  fit = kv.train_lora(jax.random.key(1), toy.w_NxF, h, new, rank=1,
                      gd=kv.GDConfig(steps=200, learning_rate=0.3, record_every=200))
  assert kv.accuracy(toy.w_NxF + fit.delta, h, new) == 1.0
  key = pf.keys_of(_as_adapter(fit.delta, 1)[READOUT]).keys_IxM[:, 0]
  cos = abs(key @ h[0]) / np.linalg.norm(h[0])
  assert cos >= 0.99


def test_recovered_key_space_matches_true_keys_for_several_facts():
  toy = _toy()
  h, _, new = _facts(toy, 4)
  delta = kv.min_norm_edit(toy.w_NxF, h, new)
  keys = pf.keys_of(_as_adapter(delta, 4)[READOUT]).keys_IxM
  q_true, _ = np.linalg.qr(h.T)
  cosines = np.linalg.svd(keys.T @ q_true, compute_uv=False)
  assert keys.shape == (64, 4)
  assert cosines.min() >= 0.99


def test_bridge_path_of_one_hop_edits_in_the_one_layer_model_is_zero():
  toy = _toy()
  task = st.make_two_hop(toy, key=jax.random.key(2), n_chains=4, expert_source="closed_form")
  d = task.deltas_KxNxF
  hop1, hop2 = _as_adapter(d[0], 4), _as_adapter(d[1], 4)
  summed = merge_lib.merge([hop1, hop2], "sum").adapter
  for writer, reader in ((hop1, hop2), (hop2, hop1), (summed, summed)):
    rec = pf.bridge_path({}, writer, reader)
    assert (rec.pairs, rec.strength, rec.exists) == (0, 0.0, False)


def test_sum_of_edits_with_orthogonal_keys_has_retention_one():
  toy = _toy()
  h, _, new = _facts(toy, 3)
  q, _ = np.linalg.qr(h.T)  # orthogonal keys spanning the same space
  edits = [_as_adapter(kv.rank_one_edit(q[:, i], int(new[i]), 0, toy.n), 1) for i in range(3)]
  recs = pf.merge_retention(edits, "sum")
  np.testing.assert_allclose([r.retention for r in recs], 1.0, atol=1e-9)
  # the real (overlapping, ReLU) keys interfere: the prediction drops below 1
  overlapping = [_as_adapter(kv.rank_one_edit(h[i], int(new[i]), 0, toy.n), 1)
                 for i in range(3)]
  assert max(r.retention for r in pf.merge_retention(overlapping, "sum")) < 0.999


# --------------------------------------------------------------- tiny random adapters


D_IN, D_OUT = 8, 8
PATHS = ("layers/0/attn/q_proj/kernel", "layers/0/mlp/down_proj/kernel")


def _random(key, rank=2, scale=2.0):
  out = {}
  for i, p in enumerate(PATHS):
    ka, kb = jax.random.split(jax.random.fold_in(key, i))
    out[p] = lora_lib.LoraFactors(jax.random.normal(ka, (D_IN, rank)),
                                  jax.random.normal(kb, (rank, D_OUT)), scale)
  return out


def _orthogonal(k, rank, gains=None):
  """K adapters on disjoint coordinate blocks of the input and of the output (orthogonal keys
  and writes; full rank each within its block)."""
  out = []
  for i in range(k):
    a = np.zeros((D_IN, rank), np.float32)
    a[i * rank:(i + 1) * rank] = np.eye(rank) * (1.0 + i if gains is None else gains[i])
    b = np.zeros((rank, D_OUT), np.float32)
    b[:, i * rank:(i + 1) * rank] = np.asarray(jax.random.normal(jax.random.key(10 + i),
                                                                 (rank, rank)))
    out.append({p: lora_lib.LoraFactors(jnp.asarray(a), jnp.asarray(b), 1.0) for p in PATHS})
  return out


def test_shapes_and_record_fields():
  ads = [_random(jax.random.key(i)) for i in range(3)]
  recs = pf.merge_retention(ads, "ties", density=0.5, names=["x", "y", "z"])
  assert [r.adapter for r in recs] == ["x", "y", "z"]
  for r in recs:
    assert r.method == "ties" and 0.0 <= r.retention <= 1.0
    assert [p.path for p in r.paths] == sorted(PATHS)
    assert all(p.key_retention_M.shape == (2,) for p in r.paths)
    assert r.to_dict()["paths"][0]["n_keys"] == 2
  keys = pf.keys_of(ads[0][PATHS[0]])
  assert keys.keys_IxM.shape == (D_IN, 2) and keys.writes_OxM.shape == (D_OUT, 2)
  dense = np.asarray(lora_lib.delta({PATHS[0]: ads[0][PATHS[0]]})[PATHS[0]])
  np.testing.assert_allclose(keys.keys_IxM @ np.diag(keys.sigma_M) @ keys.writes_OxM.T,
                             dense, rtol=1e-4, atol=1e-4)
  assert pf.top_keys(ads[0][PATHS[0]], 1).shape == (D_IN, 1)


@pytest.mark.parametrize("method,options", [
    ("sum", {}), ("uniform_delta", {}), ("uniform_factors", {}), ("cat", {}),
    ("svd", {"rank": 2}), ("ties", {}), ("knots", {"inner": "linear"})])
def test_merge_of_one_adapter_with_weight_one_has_retention_one(method, options):
  (rec,) = pf.merge_retention([_random(jax.random.key(0))], method, [1.0], **options)
  assert rec.retention == pytest.approx(1.0, abs=1e-4)
  assert all(p.crosstalk == 0.0 and p.method_residual < 1e-4 for p in rec.paths)


def test_orthogonal_adapters_under_sum_have_retention_one_and_average_halves():
  ads = _orthogonal(2, 4)
  assert all(r.retention == pytest.approx(1.0, abs=1e-5) for r in pf.merge_retention(ads, "sum"))
  for r in pf.merge_retention(ads, "uniform_delta"):
    assert r.retention == pytest.approx(0.5, abs=1e-5)
    assert all(p.gain == pytest.approx(0.5, abs=1e-5) for p in r.paths)


def test_rank_truncating_merge_of_orthogonal_full_rank_adapters_loses_retention():
  ads = _orthogonal(2, 4, gains=(1.0, 100.0))  # 2 × rank 4 on an 8-dim input: full rank
  weak, strong = pf.merge_retention(ads, "svd", rank=4)
  assert weak.retention < 0.01 and strong.retention > 0.99  # the weaker one is truncated away
  equal = pf.merge_retention(_orthogonal(2, 4, gains=(1.0, 1.0)), "svd", rank=4)
  assert sum(r.retention for r in equal) < 1.9
  caps = pf.capacity(ads, merge_lib.merge(ads, "svd", rank=4))
  assert all(c.keys_needed == 8 and c.merged_rank_limit == 4 and c.ratio == 0.5 for c in caps)
  assert all(all(c.adapter_saturated.values()) for c in caps)


def test_factor_averaging_cross_terms_show_as_method_residual():
  ads = [_random(jax.random.key(i)) for i in range(2)]
  recs = pf.merge_retention(ads, "uniform_factors")
  assert all(p.method_residual > 0.1 for r in recs for p in r.paths)
  for r in pf.merge_retention(ads, "sum"):
    assert all(p.method_residual < 1e-4 for p in r.paths)
    assert all(p.crosstalk > 0 for p in r.paths)


def test_arrow_on_orthogonal_adapters_routes_each_key_home():
  ads = _orthogonal(2, 1)
  rec = pf.arrow_retention(ads, top_k=1, names=["a", "b"])
  assert rec.routing_entropy == pytest.approx(0.0, abs=1e-6)
  assert rec.self_weight == pytest.approx({"a": 1.0, "b": 1.0})
  assert all(r.retention == pytest.approx(1.0, abs=1e-5) for r in rec.retention)
  np.testing.assert_allclose(rec.prototype_overlap[PATHS[0]], np.eye(2), atol=1e-6)
  same = pf.arrow_retention([ads[0], ads[0]], top_k=2)
  assert same.routing_entropy == pytest.approx(math.log(2), abs=1e-5)


def test_bridge_path_across_layers():
  d = 8
  params = {"layers": {str(l): {"attn_norm": {"scale": np.ones(d)},
                                "mlp_norm": {"scale": np.ones(d)}} for l in range(2)}}
  e = np.eye(d, dtype=np.float32)
  write = {"layers/0/attn/o_proj/kernel": lora_lib.LoraFactors(e[:, :1], e[2:3], 1.0)}
  read_yes = {"layers/1/attn/q_proj/kernel": lora_lib.LoraFactors(e[:, 2:3], e[:1], 1.0)}
  read_no = {"layers/1/attn/q_proj/kernel": lora_lib.LoraFactors(e[:, 5:6], e[:1], 1.0)}
  read_early = {"layers/0/attn/q_proj/kernel": lora_lib.LoraFactors(e[:, 2:3], e[:1], 1.0)}
  yes = pf.bridge_path(params, write, read_yes)
  assert yes.pairs == 1 and yes.strength == pytest.approx(1.0) and yes.exists
  no = pf.bridge_path(params, write, read_no)
  assert no.pairs == 1 and no.strength == pytest.approx(0.0, abs=1e-12) and not no.exists
  assert pf.bridge_path(params, write, read_early).pairs == 0


def test_baselines_and_statistics():
  a = _random(jax.random.key(0))
  ortho = _orthogonal(2, 4)
  assert pf.task_vector_cosine(a, a) == pytest.approx(1.0, abs=1e-5)
  assert pf.cka(a, a) == pytest.approx(1.0, abs=1e-5)
  assert pf.subspace_overlap(a, a) == pytest.approx(1.0, abs=1e-5)
  assert pf.cka(*ortho) == pytest.approx(0.0, abs=1e-9)
  assert pf.subspace_overlap(*ortho) == pytest.approx(0.0, abs=1e-9)
  base = pf.baselines(ortho, names=["p", "q"])
  assert set(base) == {"p", "q"} and base["p"]["cka"] == pytest.approx(0.0, abs=1e-9)
  np.testing.assert_allclose(pf.rankdata([3, 1, 3, 2]), [3.5, 1, 3.5, 2])
  assert pf.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
  assert pf.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
  assert math.isnan(pf.spearman([1, 1, 1], [1, 2, 3]))
  rho, lo, hi = pf.bootstrap_spearman(np.arange(20.0), np.arange(20.0) ** 2, seed=0, n_boot=50)
  assert rho == pytest.approx(1.0) and lo == pytest.approx(1.0) and hi == pytest.approx(1.0)


def test_bad_inputs_raise():
  a = _random(jax.random.key(0))
  with pytest.raises(ValueError, match="reference_weights"):
    pf.retention([a], merge_lib.merge([a], "sum"), reference_weights=[1.0, 2.0])
  with pytest.raises(ValueError, match="top_k"):
    pf.arrow_retention([a, a], top_k=3)
  with pytest.raises(ValueError, match="names"):
    pf.merge_retention([a], "sum", names=["x", "y"])
  with pytest.raises(ValueError, match="margin"):
    pf.bridge_path({}, a, a, margin=0.5)
  with pytest.raises(ValueError, match="k="):
    pf.top_keys(a[PATHS[0]], 3)


def test_probe_retention_counts_input_overlap():
  from lora_limits.models import transformer
  cfg = transformer.ModelConfig(vocab_size=24, d_model=8, n_layers=1, n_heads=2, d_ff=8)
  params = transformer.init(jax.random.key(0), cfg)
  probes = pf.embedding_probes(params, list(PATHS))
  assert probes[PATHS[0]].shape == (24, D_IN) and probes[PATHS[1]].shape == (24, 8)
  ads = _orthogonal(2, 4)
  (one,) = pf.probe_retention([ads[0]], merge_lib.merge([ads[0]], "sum"), probes)
  assert one.retention == pytest.approx(1.0, abs=1e-5)
  # orthogonal keys, but every probe touches both adapters' keys: the sum interferes
  both = pf.probe_retention(ads, merge_lib.merge(ads, "sum"), probes)
  assert all(r.retention < 0.99 for r in both)
  routed = pf.probe_retention(ads, None, probes, arrow_top_k=1)
  assert all(0.0 <= r.retention <= 1.0 for r in routed)
  with pytest.raises(ValueError, match="probes lack"):
    pf.probe_retention(ads, merge_lib.merge(ads, "sum"), {})
