"""WUDI merging (default flavour) and GenKnowSub before Arrow (route)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_limits import lora as lora_lib
from lora_limits import metrics as metrics_lib
from lora_limits.models import transformer
from lora_limits.recycle import merge as merge_lib
from lora_limits.recycle import route as route_lib
from lora_limits.recycle import score as score_lib

DIMS = {"l1/kernel": (12, 9), "l2/kernel": (9, 10)}


def _adapter(seed, rank, scale=1.5, dims=DIMS):
  rng = np.random.default_rng(seed)
  return {p: lora_lib.LoraFactors(jnp.asarray(rng.normal(size=(i, rank)), jnp.float32),
                                  jnp.asarray(rng.normal(size=(rank, o)), jnp.float32), scale)
          for p, (i, o) in dims.items()}


def _wudi_loss(d, taus):
  """The paper's objective in our layout: Σ_k ‖τ_kᵀ (ΔW − τ_k)‖² / ‖τ_k‖²."""
  return sum(jnp.sum(jnp.square(t.T @ (d - t))) / jnp.sum(t * t) for t in taus)


def test_wudi_single_adapter_is_reproduced_and_negated():
  ad = _adapter(0, 3)
  want = lora_lib.delta(ad)
  for w in (1.0, -1.0, 0.5):
    got = merge_lib.merge([ad], "wudi", [w]).delta()
    for p in want:
      np.testing.assert_allclose(np.asarray(got[p]), w * np.asarray(want[p]), atol=1e-4)


def test_wudi_is_the_stationary_point_of_its_objective_and_beats_the_sum():
  ads = [_adapter(1, 3, 2.0), _adapter(2, 2, 0.5), _adapter(3, 4, 1.0)]  # mixed ranks, scales
  w = jnp.asarray([1.0, -0.7, 1.3])
  got = merge_lib.merge(ads, "wudi", w)
  assert got.kind == "factors"
  for p in DIMS:
    taus = [w[k] * lora_lib.delta(ad)[p] for k, ad in enumerate(ads)]
    d = got.delta()[p]
    grad = jax.grad(_wudi_loss)(d, taus)
    scale = jnp.abs(jax.grad(_wudi_loss)(sum(taus), taus)).max()
    assert float(jnp.abs(grad).max()) < 1e-3 * float(scale)
    assert float(_wudi_loss(d, taus)) < float(_wudi_loss(sum(taus), taus))
    assert got.adapter[p].rank <= 9


def test_wudi_of_tasks_on_orthogonal_inputs_is_their_sum():
  rng = np.random.default_rng(4)
  a1 = np.zeros((12, 2), np.float32)
  a1[:6] = rng.normal(size=(6, 2))
  a2 = np.zeros((12, 2), np.float32)
  a2[6:] = rng.normal(size=(6, 2))
  ads = [{"l/kernel": lora_lib.LoraFactors(jnp.asarray(a), jnp.asarray(rng.normal(size=(2, 5)),
                                                                        jnp.float32), 1.0)}
         for a in (a1, a2)]
  got = merge_lib.merge(ads, "wudi", [1.0, 2.0]).delta()["l/kernel"]
  want = lora_lib.delta(ads[0])["l/kernel"] + 2.0 * lora_lib.delta(ads[1])["l/kernel"]
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4)


def test_wudi_zero_weight_drops_the_task():
  ads = [_adapter(5, 3), _adapter(6, 3)]
  got = merge_lib.merge(ads, "wudi", [0.0, 1.0]).delta()
  for p in DIMS:
    np.testing.assert_allclose(np.asarray(got[p]), np.asarray(lora_lib.delta(ads[1])[p]),
                               atol=1e-4)


@pytest.mark.slow  # compiles the scorer (~15 s on 2 busy cores)
def test_wudi_runs_inside_the_many_combination_scorer():
  cfg = transformer.ModelConfig(vocab_size=16, d_model=16, n_layers=1, n_heads=2, d_ff=32,
                                max_len=8)
  params = transformer.init(jax.random.key(0), cfg)
  ads = [lora_lib.init(jax.random.key(k), params, lora_lib.LoraConfig(rank=2, alpha=4.0))
         for k in (1, 2)]
  ads = [{p: lora_lib.LoraFactors(f.a, f.a[:f.b.shape[1]].T * 0.3 if f.a.shape[0] >= f.b.shape[1]
                                  else jnp.ones_like(f.b) * 0.1, f.scale)
          for p, f in ad.items()} for ad in ads]
  tokens = np.random.default_rng(0).integers(2, 16, (3, 6)).astype(np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "weights": np.ones((3, 5), np.float32)}
  w = np.asarray([[1.0, 0.0], [0.5, 0.5], [1.0, -1.0]], np.float32)
  scores = score_lib.score_combinations(params, ads, w, batch, cfg=cfg, method="wudi")
  for c in range(3):
    merged = merge_lib.merge(ads, "wudi", w[c]).apply(params)
    logits = transformer.apply(merged, cfg, jnp.asarray(batch["inputs"]))
    loss = metrics_lib.batch_metrics(logits, jnp.asarray(batch["targets"]),
                                     jnp.asarray(batch["weights"]))["loss"]
    np.testing.assert_allclose(float(scores[c]), float(loss), rtol=1e-4)


# ------------------------------------------------------------------------------ GenKnowSub


def test_genknowsub_factors_is_peft_subtraction_of_mean_factors():
  tasks = [_adapter(10, 3, 2.0), _adapter(11, 3, 0.5)]
  gens = [_adapter(12, 3, 7.0), _adapter(13, 3, 1.0)]
  got = route_lib.genknowsub(tasks, gens)
  for t, g in zip(tasks, got):
    for p in DIMS:
      mean_a = (np.asarray(gens[0][p].a) + np.asarray(gens[1][p].a)) / 2
      mean_b = (np.asarray(gens[0][p].b) + np.asarray(gens[1][p].b)) / 2
      np.testing.assert_allclose(np.asarray(g[p].a), np.asarray(t[p].a) - mean_a, atol=1e-6)
      np.testing.assert_allclose(np.asarray(g[p].b), np.asarray(t[p].b) - mean_b, atol=1e-6)
      assert g[p].scale == t[p].scale


def test_genknowsub_delta_subtracts_the_mean_update_exactly():
  tasks = [_adapter(20, 3, 2.0)]
  gens = [_adapter(21, 2, 7.0), _adapter(22, 4, 1.0)]  # ranks may differ in this mode
  got = route_lib.genknowsub(tasks, gens, mode="delta")[0]
  for p in DIMS:
    want = lora_lib.delta(tasks[0])[p] - (lora_lib.delta(gens[0])[p]
                                          + lora_lib.delta(gens[1])[p]) / 2
    np.testing.assert_allclose(np.asarray(lora_lib.delta(got)[p]), np.asarray(want), atol=1e-4)


def test_genknowsub_router_is_arrow_over_the_purified_adapters():
  tasks = [_adapter(30, 3), _adapter(31, 3)]
  gens = [_adapter(32, 3)]
  mix = route_lib.genknowsub_router(tasks, gens, top_k=1)
  ref = route_lib.arrow_router(route_lib.genknowsub(tasks, gens), top_k=1)
  for p in DIMS:
    np.testing.assert_allclose(np.abs(np.asarray(mix.router_state[p])),
                               np.abs(np.asarray(ref.router_state[p])), atol=1e-6)
    np.testing.assert_allclose(np.asarray(mix.stack[p].a), np.asarray(ref.stack[p].a))
  assert mix.router == ref.router


@pytest.mark.parametrize("general,mode,match", [
    ([], "factors", "general_adapters must be a non-empty"),
    (None, "nope", "mode='nope' is not one of"),
    ("rank", "factors", "needs equal ranks"),
])
def test_genknowsub_refuses_bad_input(general, mode, match):
  tasks = [_adapter(40, 3)]
  if general is None:
    general = [_adapter(41, 3)]
  elif general == "rank":
    general = [_adapter(41, 2)]
  with pytest.raises(ValueError, match=match):
    route_lib.genknowsub(tasks, general, mode)
