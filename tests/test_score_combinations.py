"""score_combinations: equals a loop of single evaluations, compiles once per shape, pads C
for chunks and devices, respects the memory budget, and rejects bad input."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_limits import lora as lora_lib
from lora_limits import metrics as metrics_lib
from lora_limits.models import transformer
from lora_limits.recycle import merge as merge_lib
from lora_limits.recycle import score as score_lib

CFG = transformer.ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, d_ff=24,
                              max_len=16)
METRICS = ("loss", "exact_match", "token_accuracy")


@pytest.fixture(scope="module")
def setup():
  params = transformer.init(jax.random.key(0), CFG)
  ads = []
  for k in range(3):
    ad = lora_lib.init(jax.random.key(10 + k), params, lora_lib.LoraConfig(rank=2, alpha=4.0))
    ads.append({p: lora_lib.LoraFactors(
        2.0 * f.a, 0.5 * jax.random.normal(jax.random.key(100 * k + i), f.b.shape), f.scale)
        for i, (p, f) in enumerate(sorted(ad.items()))})
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, CFG.vocab_size, (6, 7)).astype(np.int32)
  # Targets from the model with adapter 0, so exact match is non-trivial near w = e_0.
  logits = jax.jit(lambda p, t: transformer.apply(p, CFG, t))(
      lora_lib.merge(params, ads[0]), jnp.asarray(tokens[:, :-1]))
  targets = np.asarray(jnp.argmax(logits, -1)).astype(np.int32)
  targets[0, 2] = (targets[0, 2] + 1) % CFG.vocab_size  # one row that never matches
  weights = np.zeros(targets.shape, np.float32)
  weights[:, 2:] = 1.0  # an "answer" span
  batch = {"inputs": tokens[:, :-1], "targets": targets, "weights": weights}
  w = np.asarray([[1, 0, 0], [0, 1, 0], [0.5, 0.5, 0], [1, 0.2, -0.3], [0.3, 0.3, 0.3],
                  [0, 0, 1], [1.2, -0.5, 0.4]], np.float32)
  return params, ads, batch, w


_apply = jax.jit(lambda p, t: transformer.apply(p, CFG, t))


def loop_reference(params, ads, batch, w, method, **opts):
  """One merged model per combination, evaluated one by one (each a jitted single call)."""

  @jax.jit
  def single(params, ads, row):  # arguments, not closures: XLA would constant-fold the merge
    if method == "mix":
      merged = params
      for k, ad in enumerate(ads):
        merged = lora_lib.merge(merged, ad, weight=row[k])
    else:
      merged = merge_lib.merge(ads, method, row, **opts).apply(params)
    logits = transformer.apply(merged, CFG, jnp.asarray(batch["inputs"]))
    return metrics_lib.batch_metrics(logits, jnp.asarray(batch["targets"]),
                                     jnp.asarray(batch["weights"]))

  out = {m: [] for m in METRICS}
  for row in w:
    m = single(params, ads, jnp.asarray(row))
    for name in METRICS:
      out[name].append(float(m[name]))
  return {k: np.asarray(v) for k, v in out.items()}


@pytest.mark.parametrize("method,opts,chunk", [
    ("mix", {}, 3),
    ("uniform_factors", {}, 2),
    ("ties", {"options": {"density": 0.5}}, 4),
    ("dare_ties", {"options": {"density": 0.5}, "key": jax.random.key(3)}, None),
])
def test_equals_a_loop_of_single_evaluations(setup, method, opts, chunk):
  params, ads, batch, w = setup
  got = score_lib.score_combinations(params, ads, w, batch, cfg=CFG, method=method,
                                    metric=METRICS, chunk_size=chunk, **opts)
  ref_opts = dict(opts.get("options", {}))
  if "key" in opts:
    ref_opts["key"] = opts["key"]
  want = loop_reference(params, ads, batch, w, method, **ref_opts)
  for name in METRICS:
    assert got[name].shape == (len(w),)
    np.testing.assert_allclose(np.asarray(got[name]), want[name], rtol=1e-4, atol=1e-5,
                               err_msg=name)
  if method == "mix":  # adapter 0 alone answers all rows but the corrupted one
    np.testing.assert_allclose(float(got["exact_match"][0]), 5 / 6)


def test_sum_merges_use_the_mixing_path_with_their_scale(setup):
  params, ads, batch, w = setup
  mix = score_lib.score_combinations(params, ads, 0.5 * w, batch, cfg=CFG, method="mix")
  ta = score_lib.score_combinations(params, ads, w, batch, cfg=CFG, method="task_arithmetic",
                                   options={"scale": 0.5})
  np.testing.assert_allclose(np.asarray(ta), np.asarray(mix), rtol=1e-6)
  plan = score_lib.make_plan(params, ads, 7, (6, 6), cfg=CFG, method="cat", flavor="peft")
  assert plan.route == "mix"
  assert score_lib.make_plan(params, ads, 7, (6, 6), cfg=CFG, method="svd").route == "factors"
  assert score_lib.make_plan(params, ads, 7, (6, 6), cfg=CFG, method="ties").route == "dense"


def test_compiles_once_per_shape(setup, monkeypatch):
  params, ads, batch, w = setup
  monkeypatch.setattr(score_lib, "_score_all", chex.assert_max_traces(score_lib._score_all, n=1))
  score_lib._compiled.cache_clear()
  try:
    first = score_lib.score_combinations(params, ads, w, batch, cfg=CFG, chunk_size=2)
    second = score_lib.score_combinations(params, ads, w[::-1].copy(), batch, cfg=CFG,
                                         chunk_size=2)
    np.testing.assert_allclose(np.asarray(second), np.asarray(first)[::-1], rtol=1e-6)
    with pytest.raises(AssertionError, match="traced > 1 times"):
      score_lib.score_combinations(params, ads, w[:5], batch, cfg=CFG, chunk_size=4)
  finally:
    chex.clear_trace_counter()
    score_lib._compiled.cache_clear()


@pytest.mark.parametrize("c,chunk,devices", [(7, 2, 4), (5, 3, 1), (3, 1, 4)])
def test_padding_for_chunks_and_devices(setup, c, chunk, devices):
  params, ads, batch, w = setup
  assert len(jax.devices()) >= 4
  ws = np.concatenate([w, w[:2] * 0.5])[:c]
  mesh = None
  if devices > 1:
    mesh = jax.make_mesh((devices,), ("c",), axis_types=(jax.sharding.AxisType.Auto,))
  plan = score_lib.make_plan(params, ads, c, (6, 6), cfg=CFG, chunk_size=chunk, mesh=mesh)
  assert plan.padded % (devices * plan.chunk) == 0 and plan.padded >= c
  got = score_lib.score_combinations(params, ads, ws, batch, cfg=CFG, metric=["loss"],
                                    chunk_size=chunk, mesh=mesh)["loss"]
  assert got.shape == (c,)
  np.testing.assert_allclose(np.asarray(got), loop_reference(params, ads, batch, ws, "mix")["loss"],
                             rtol=1e-4)


def test_chunk_size_follows_the_memory_budget(setup):
  params, ads, batch, w = setup
  w16 = np.tile(w, (3, 1))[:16]
  per = score_lib.estimate_bytes(CFG, (6, 6), "dense", ads)
  fixed = sum(x.nbytes for x in jax.tree.leaves((params, ads)))
  budget = fixed + 3 * per + 10
  stats, plan = score_lib.memory_analysis(params, ads, w16, batch, cfg=CFG, method="ties",
                                         memory_budget_bytes=budget)
  assert plan.chunk == 3 and plan.padded == 18
  assert stats.temp_size_in_bytes <= budget
  big = score_lib.make_plan(params, ads, 16, (6, 6), cfg=CFG, method="ties")
  assert big.chunk == 16  # the default 4 GiB holds every combination at once
  with pytest.raises(ValueError, match=r"memory_budget_bytes=1 .* cannot hold one combination"):
    score_lib.make_plan(params, ads, 16, (6, 6), cfg=CFG, memory_budget_bytes=1)
  tiny = score_lib.make_plan(params, ads, 16, (6, 6), cfg=CFG, memory_budget_bytes=budget,
                            chunk_target_bytes=1)
  assert tiny.chunk == 1
  # The working-set target caps the chunk too (wide vmaps are slower on a CPU).
  capped = score_lib.make_plan(params, ads, 16, (6, 6), cfg=CFG, method="ties",
                              chunk_target_bytes=5 * per + 1)
  assert capped.chunk == 5 and capped.padded == 20


def test_batch_metrics_by_hand():
  logits = jnp.log(jnp.asarray([[[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]],
                                [[0.1, 0.1, 0.8], [0.6, 0.2, 0.2], [0.2, 0.5, 0.3]]]))
  targets = jnp.asarray([[0, 1, 0], [2, 1, 1]])
  weights = jnp.asarray([[0.0, 1.0, 1.0], [0.0, 1.0, 1.0]])
  m = metrics_lib.batch_metrics(logits, targets, weights)
  np.testing.assert_allclose(float(m["loss"]), -np.log([0.8, 0.3, 0.2, 0.5]).mean(), rtol=1e-6)
  np.testing.assert_allclose(float(m["token_accuracy"]), 0.5)
  np.testing.assert_allclose(float(m["exact_match"]), 0.0)  # each row misses one position
  m = metrics_lib.batch_metrics(logits, targets, jnp.asarray([[0.0, 1.0, 0.0], [0, 0, 0]]))
  np.testing.assert_allclose(float(m["exact_match"]), 1.0)  # the empty row is left out


def test_bad_input(setup):
  params, ads, batch, w = setup
  with pytest.raises(ValueError, match=r"weights_CxK has shape \(7, 2\); expected \[C, K\]"):
    score_lib.score_combinations(params, ads, w[:, :2], batch, cfg=CFG)
  with pytest.raises(ValueError, match=r"is not one of \['loss', 'exact_match'"):
    score_lib.score_combinations(params, ads, w, batch, cfg=CFG, metric="bleu")
  with pytest.raises(ValueError, match=r"valid methods: "):
    score_lib.score_combinations(params, ads, w, batch, cfg=CFG, method="average")
  with pytest.raises(ValueError, match=r"chunk_size=0 must be a positive int"):
    score_lib.score_combinations(params, ads, w, batch, cfg=CFG, chunk_size=0)
  with pytest.raises(ValueError, match=r"pass key=jax.random.key"):
    score_lib.score_combinations(params, ads, w, batch, cfg=CFG, method="dare_linear",
                                options={"density": 0.5})
  with pytest.raises(ValueError, match=r"batch lacks \['weights'\]"):
    score_lib.score_combinations(params, ads, w, {"inputs": 1, "targets": 1}, cfg=CFG)
  with pytest.raises(ValueError, match=r"is not a parameter of the model"):
    score_lib.score_combinations(params, [{"nope/kernel": ads[0][sorted(ads[0])[0]]}],
                                w[:, :1], batch, cfg=CFG)
