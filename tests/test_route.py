"""Routers: Arrow (hand-computed and against numpy), oracle, similarity, LoraHub."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_limits import data as data_lib
from lora_limits import lora as lora_lib
from lora_limits.models import transformer
from lora_limits.recycle import lorahub as lorahub_lib
from lora_limits.recycle import merge as merge_lib
from lora_limits.recycle import route

CFG = transformer.ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, d_ff=24,
                              max_len=16)


def run(params, tokens, lora=None):
  """The model's logits, jitted (eager Flax dispatch compiles every op separately)."""
  return jax.jit(lambda p, t: transformer.apply(p, CFG, t, lora=lora))(params, tokens)


def _factors(a, b, scale=1.0):
  return lora_lib.LoraFactors(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), scale)


# Two adapters on one 3 -> 2 kernel. ΔW_1 = [[2,0],[0,0],[0,0]]: input direction e1.
# ΔW_2 = [[0,0],[3,0],[0,1]]: singular values 3 (input e2) and 1 (input e3): prototype e2.
HAND = [{"p/kernel": _factors([[1.0], [0.0], [0.0]], [[2.0, 0.0]])},
        {"p/kernel": _factors([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], [[3.0, 0.0], [0.0, 1.0]])}]
TOKENS = np.asarray([[[3.0, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 5.0]]], np.float32)


def test_arrow_hand_computed_two_adapters_three_tokens():
  protos = np.asarray(route.arrow_prototypes(HAND)["p/kernel"])
  np.testing.assert_allclose(np.abs(protos), [[1, 0, 0], [0, 1, 0]], atol=1e-6)
  # logits |<v_k, x_t>|: t1 (3, 1), t2 (1, 2), t3 (0, 0).
  w = route.arrow_weights(jnp.asarray(TOKENS), jnp.asarray(protos), top_k=2)
  want = [[0.8807971, 0.1192029], [0.2689414, 0.7310586], [0.5, 0.5]]
  np.testing.assert_allclose(np.asarray(w[0]), want, atol=1e-6)
  w1 = route.arrow_weights(jnp.asarray(TOKENS), jnp.asarray(protos), top_k=1)
  np.testing.assert_allclose(np.asarray(w1[0]), [[1, 0], [0, 1], [1, 0]])
  wt = route.arrow_weights(jnp.asarray(TOKENS), jnp.asarray(protos), top_k=2, temperature=2.0)
  np.testing.assert_allclose(np.asarray(wt[0, 0]), [0.7310586, 0.2689414], atol=1e-6)
  wn = route.arrow_weights(jnp.asarray(TOKENS), jnp.asarray(protos), top_k=2,
                           normalize_tokens=True)
  gap = (3.0 - 1.0) / math.sqrt(10.0)
  np.testing.assert_allclose(np.asarray(wn[0, 0]), [1 / (1 + math.exp(-gap)),
                                                    1 / (1 + math.exp(gap))], atol=1e-6)
  # The mixed output per token: y_t = sum_k w_tk x_t ΔW_k. t1: .8808*[6,0] + .1192*[3,0].
  mix = route.arrow_router(HAND, top_k=2)
  y, routing = mix.apply_at("p/kernel", jnp.asarray(TOKENS))
  np.testing.assert_allclose(np.asarray(routing[0]), want, atol=1e-6)
  np.testing.assert_allclose(np.asarray(y[0]), [[5.6423912, 0.0], [0.2689414 * 2 + 0.7310586 * 6,
                                                                   0.0], [0.0, 2.5]], atol=1e-5)


def _random_adapters(params, ranks, seed=0):
  out = []
  for k, r in enumerate(ranks):
    ad = lora_lib.init(jax.random.key(seed + k), params, lora_lib.LoraConfig(rank=r, alpha=2.0 * r))
    out.append({p: lora_lib.LoraFactors(
        f.a, 0.3 * jax.random.normal(jax.random.key(100 * seed + 10 * k + i), f.b.shape),
        f.scale) for i, (p, f) in enumerate(sorted(ad.items()))})
  return out


def test_arrow_prototypes_and_weights_match_numpy_on_random_adapters():
  params = transformer.init(jax.random.key(0), CFG)
  ads = _random_adapters(params, [2, 3, 2])
  protos = route.arrow_prototypes(ads)
  x = np.random.default_rng(0).normal(size=(2, 5, CFG.d_model)).astype(np.float32)
  for p in ["layers/0/attn/q_proj/kernel", "layers/0/mlp/gate_proj/kernel"]:
    want = []
    for ad in ads:
      d = np.asarray(ad[p].a, np.float64) @ np.asarray(ad[p].b, np.float64) * ad[p].scale
      u, _, _ = np.linalg.svd(d)  # [d_in, d_out]: the input side is the left side
      want.append(u[:, 0])
    want = np.stack(want)
    got = np.asarray(protos[p])
    np.testing.assert_allclose(np.abs(np.sum(got * want, axis=1)), 1.0, atol=1e-4)
    logits = np.abs(x @ want.T) / 0.7
    top2 = np.argsort(-logits, axis=-1)[..., :2]
    expect = np.zeros_like(logits)
    for idx in np.ndindex(logits.shape[:-1]):
      sel = logits[idx][top2[idx]]
      expect[idx + (top2[idx],)] = np.exp(sel - sel.max()) / np.exp(sel - sel.max()).sum()
    got_w = route.arrow_weights(jnp.asarray(x), protos[p], top_k=2, temperature=0.7)
    np.testing.assert_allclose(np.asarray(got_w), expect, atol=1e-5)


def test_arrow_in_the_model_reports_routing_and_reduces_to_uniform_mixes():
  params = transformer.init(jax.random.key(1), CFG)
  ads = _random_adapters(params, [2, 2], seed=3)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, CFG.vocab_size, (2, 6)), jnp.int32)
  mix = route.arrow_router(ads, top_k=1)
  _, aux = transformer.apply(params, CFG, tokens, lora=mix, return_aux=True)
  assert sorted(aux["routing"]) == sorted(ads[0])
  for w in aux["routing"].values():
    assert w.shape == (2, 6, 2)
    np.testing.assert_allclose(np.asarray(w).sum(-1), 1.0, atol=1e-6)
    assert set(np.unique(np.asarray(w))) <= {0.0, 1.0}
  # With every adapter kept and a huge temperature the weights are 1/K everywhere: outputs
  # mode is the average of updates, factors mode is the average of factors.
  flat = route.arrow_router(ads, top_k=2, temperature=1e9)
  got = run(params, tokens, flat)
  want = run(merge_lib.merge(ads, "uniform_delta").apply(params), tokens)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4)
  flat_f = route.arrow_router(ads, top_k=2, temperature=1e9, mode="factors")
  got = run(params, tokens, flat_f)
  want = run(merge_lib.merge(ads, "uniform_factors").apply(params), tokens)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4)


def test_oracle_weights_and_mix():
  w = np.asarray(route.oracle_weights([1, 0, 2], 3))
  np.testing.assert_array_equal(w, [[0, 1, 0], [1, 0, 0], [0, 0, 1]])
  w = np.asarray(route.oracle_weights([[0, 2], [1, -1]], 3, normalize=True))
  np.testing.assert_allclose(w, [[0.5, 0, 0.5], [0, 1, 0]])
  params = transformer.init(jax.random.key(2), CFG)
  ads = _random_adapters(params, [2, 2], seed=5)
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, CFG.vocab_size, (2, 5)), jnp.int32)
  got = run(params, tokens, route.oracle_mix(ads, [1, 0]))
  for row, gold in enumerate([1, 0]):
    want = run(lora_lib.merge(params, ads[gold]), tokens)
    np.testing.assert_allclose(np.asarray(got[row]), np.asarray(want[row]), atol=1e-4)
  with pytest.raises(ValueError, match=r"gold indices must be in \[0, 3\)"):
    route.oracle_weights([3], 3)
  with pytest.raises(ValueError, match=r"gold rows \[0\] name no adapter"):
    route.oracle_weights([[-1, -1]], 3)


def test_similarity_selection_picks_the_nearest_centroid():
  params = transformer.init(jax.random.key(3), CFG)
  rng = np.random.default_rng(3)
  sets = []
  for lo in (0, 16):  # two "tasks" with disjoint prompt vocabularies
    pairs = [(rng.integers(lo, lo + 16, 4).tolist(), [1]) for _ in range(12)]
    sets.append(data_lib.encode(pairs, eos_id=2, pad_id=0, max_len=8))
  centroids = jnp.stack([route.adapter_centroid(params, CFG, d, batch_size=6) for d in sets])
  want0 = route.prompt_embeddings(params, CFG, sets[0]["tokens"], sets[0]["prompt_len"]).mean(0)
  np.testing.assert_allclose(np.asarray(centroids[0]), np.asarray(want0), atol=1e-5)
  w = route.similarity_weights(centroids, centroids, top_k=1)
  np.testing.assert_array_equal(np.asarray(w), np.eye(2))
  q = np.asarray(route.prompt_embeddings(params, CFG, sets[1]["tokens"], sets[1]["prompt_len"]))
  c = np.asarray(centroids)
  cos = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (
      c / np.linalg.norm(c, axis=1, keepdims=True)).T
  soft = np.exp(cos / 0.5) / np.exp(cos / 0.5).sum(1, keepdims=True)
  got = route.similarity_weights(jnp.asarray(q), centroids, top_k=2, temperature=0.5)
  np.testing.assert_allclose(np.asarray(got), soft, atol=1e-5)
  ads = _random_adapters(params, [2, 2], seed=7)
  mix = route.similarity_mix(params, CFG, ads, centroids, sets[1]["tokens"][:3],
                             sets[1]["prompt_len"][:3])
  assert mix.weights.shape == (3, 2)


def test_router_errors():
  with pytest.raises(ValueError, match=r"top_k=3 must be an int in \[1, K=2\]"):
    route.arrow_router(HAND, top_k=3)
  with pytest.raises(ValueError, match=r"temperature=0.0 must be > 0"):
    route.arrow_router(HAND, top_k=1, temperature=0.0)
  with pytest.raises(ValueError, match=r"top_k=5 must be an int in \[1, K=2\]"):
    route.similarity_weights(jnp.ones((1, 4)), jnp.ones((2, 4)), top_k=5)
  with pytest.raises(ValueError, match=r"LoraHubConfig.generations must be a positive int"):
    lorahub_lib.LoraHubConfig(generations=0)


def test_lorahub_finds_weights_better_than_the_base_and_is_deterministic():
  params = transformer.init(jax.random.key(4), CFG)
  ads = _random_adapters(params, [2, 2], seed=11)
  ads = [{p: lora_lib.LoraFactors(f.a * 4.0, f.b * 4.0, f.scale) for p, f in ad.items()}
         for ad in ads]
  rng = np.random.default_rng(4)
  tokens = rng.integers(3, CFG.vocab_size, (6, 8)).astype(np.int32)
  # Targets: what the model with adapter 0 predicts, so adapter 0 is the helpful one.
  pred = np.asarray(jnp.argmax(run(lora_lib.merge(params, ads[0]),
                                   jnp.asarray(tokens[:, :-1])), -1))
  batch = {"inputs": tokens[:, :-1], "targets": pred.astype(np.int32),
           "weights": np.ones(pred.shape, np.float32)}
  config = lorahub_lib.LoraHubConfig(generations=5, population_size=6)
  result = lorahub_lib.lorahub_search(params, ads, batch, jax.random.key(0), cfg=CFG,
                                      config=config)
  again = lorahub_lib.lorahub_search(params, ads, batch, jax.random.key(0), cfg=CFG,
                                     config=config)
  np.testing.assert_array_equal(result.weights, again.weights)
  assert np.all(np.abs(result.weights) <= 1.5)
  base = float(np.mean(-jax.nn.log_softmax(run(
      params, jnp.asarray(batch["inputs"])))[np.arange(6)[:, None], np.arange(7),
                                                   batch["targets"]]))
  assert result.fitness < base
  merged = lora_lib.merge(params, result.adapter(ads))
  logits = run(merged, jnp.asarray(batch["inputs"]))
  logp = jax.nn.log_softmax(logits)
  loss = -np.mean(np.take_along_axis(np.asarray(logp), batch["targets"][..., None], -1))
  np.testing.assert_allclose(result.loss, loss, rtol=1e-4)
  np.testing.assert_allclose(result.fitness, loss + 0.05 * np.mean(np.abs(result.weights)),
                             rtol=1e-4)
  fits = [h["best_fitness"] for h in result.history]
  assert len(fits) == 5 and all(b <= a for a, b in zip(fits, fits[1:]))
