"""Model + LoRA pytree transforms: identities, merged == unmerged, ranks, clear errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_limits import lora as lora_lib
from lora_limits import tree as tree_lib
from lora_limits.models import transformer

CFG = transformer.ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                              d_ff=48, tie_embeddings=False)


@pytest.fixture(scope="module")
def params():
  return transformer.init(jax.random.key(0), CFG)


@pytest.fixture(scope="module")
def tokens():
  return jax.random.randint(jax.random.key(1), (3, 7), 0, CFG.vocab_size)


def _random_adapter(key, params, rank=4, **kw):
  ad = lora_lib.init(key, params, lora_lib.LoraConfig(rank=rank, **kw))
  return {p: lora_lib.LoraFactors(f.a, 0.2 * jax.random.normal(jax.random.fold_in(key, i), f.b.shape),
                                  f.scale) for i, (p, f) in enumerate(sorted(ad.items()))}


def test_params_are_named_by_path(params):
  flat = tree_lib.flatten(params)
  assert flat["layers/1/attn/q_proj/kernel"].shape == (32, 32)
  assert flat["layers/1/attn/k_proj/kernel"].shape == (32, 16)  # 2 KV heads of dim 8
  assert flat["layers/0/mlp/gate_proj/kernel"].shape == (32, 48)
  assert flat["lm_head/kernel"].shape == (32, 61)
  assert flat["embed/embedding"].shape == (61, 32)


def test_default_targets_cover_attention_and_mlp(params):
  ad = lora_lib.init(jax.random.key(2), params, lora_lib.LoraConfig(rank=2))
  names = {p.split("/")[-2] for p in ad}
  assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
  assert len(ad) == 14
  assert "lm_head/kernel" not in ad


def test_fresh_adapter_leaves_model_unchanged(params, tokens):
  ad = lora_lib.init(jax.random.key(2), params, lora_lib.LoraConfig(rank=4))
  base = transformer.apply(params, CFG, tokens)
  adapted = transformer.apply(params, CFG, tokens, lora=lora_lib.LoraMix.single(ad))
  np.testing.assert_array_equal(np.asarray(base), np.asarray(adapted))
  np.testing.assert_array_equal(np.asarray(transformer.apply(lora_lib.merge(params, ad), CFG, tokens)),
                                np.asarray(base))


def test_scaling_alpha_over_r_and_rslora():
  assert lora_lib.LoraConfig(rank=4, alpha=8).scale == 2.0
  assert lora_lib.LoraConfig(rank=4, alpha=8, rslora=True).scale == 4.0


@pytest.mark.parametrize("shape", ["K", "BK", "BTK"])
def test_merged_equals_unmerged(params, tokens, shape):
  ads = [_random_adapter(jax.random.key(10 + k), params, rank=r) for k, r in enumerate([2, 4, 3])]
  w = jnp.array([0.5, -1.25, 0.75])
  merged = params
  for a, wk in zip(ads, w):
    merged = lora_lib.merge(merged, a, float(wk))
  weights = {"K": w, "BK": jnp.broadcast_to(w, (3, 3)), "BTK": jnp.broadcast_to(w, (3, 7, 3))}[shape]
  unmerged = transformer.apply(params, CFG, tokens, lora=lora_lib.LoraMix.of(ads, weights))
  np.testing.assert_allclose(transformer.apply(merged, CFG, tokens), unmerged, atol=1e-5)


def test_per_example_weights_select_per_row(params, tokens):
  ads = [_random_adapter(jax.random.key(20 + k), params) for k in range(2)]
  w_BxK = jnp.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
  mixed = transformer.apply(params, CFG, tokens, lora=lora_lib.LoraMix.of(ads, w_BxK))
  for row, w in enumerate(w_BxK):
    m = params
    for a, wk in zip(ads, w):
      m = lora_lib.merge(m, a, float(wk))
    np.testing.assert_allclose(mixed[row], transformer.apply(m, CFG, tokens[row:row + 1])[0],
                               atol=1e-5)


def test_factor_mode_equals_merging_averaged_factors(params, tokens):
  ads = [_random_adapter(jax.random.key(30 + k), params) for k in range(2)]
  w = jnp.array([0.5, 0.5])
  mixed = transformer.apply(params, CFG, tokens, lora=lora_lib.LoraMix.of(ads, w, mode="factors"))
  avg = {p: lora_lib.LoraFactors(0.5 * (ads[0][p].a + ads[1][p].a),
                                 0.5 * (ads[0][p].b + ads[1][p].b), ads[0][p].scale) for p in ads[0]}
  np.testing.assert_allclose(mixed, transformer.apply(lora_lib.merge(params, avg), CFG, tokens),
                             atol=1e-5)
  # ... which is not the average of the updates (cross terms).
  outputs = transformer.apply(params, CFG, tokens, lora=lora_lib.LoraMix.of(ads, w))
  assert float(jnp.abs(outputs - mixed).max()) > 1e-4


def test_unmerge_inverts_merge(params):
  ad = _random_adapter(jax.random.key(3), params)
  back = lora_lib.unmerge(lora_lib.merge(params, ad), ad)
  chex.assert_trees_all_close(back, params, atol=1e-6)


@pytest.mark.parametrize("rank", [1, 3, 8])
def test_delta_rank_at_most_r(params, rank):
  ad = _random_adapter(jax.random.key(4), params, rank=rank)
  for path, d in lora_lib.delta(ad).items():
    assert np.linalg.matrix_rank(np.asarray(d, np.float64), tol=1e-5) <= rank, path


def test_stack_pads_mixed_ranks_and_folds_differing_scales(params):
  a1 = _random_adapter(jax.random.key(5), params, rank=2, alpha=4.0)
  a2 = _random_adapter(jax.random.key(6), params, rank=4, alpha=4.0)
  st = lora_lib.stack([a1, a2])
  f = st["layers/0/attn/q_proj/kernel"]
  assert f.a.shape == (2, 32, 4) and f.b.shape == (2, 4, 32) and f.scale == 1.0
  for k, ad in enumerate([a1, a2]):
    np.testing.assert_allclose(lora_lib.delta({"p": lora_lib.LoraFactors(f.a[k], f.b[k], 1.0)})["p"],
                               lora_lib.delta(ad)["layers/0/attn/q_proj/kernel"], atol=1e-6)


def test_routing_weights_are_reported(params, tokens):
  class Half:
    def __call__(self, path, x, factors, state):
      return jnp.full(x.shape[:-1] + (factors.a.shape[0],), 0.5)

    def __hash__(self):
      return 0

    def __eq__(self, other):
      return isinstance(other, Half)

  ads = [_random_adapter(jax.random.key(40 + k), params) for k in range(2)]
  mix = lora_lib.LoraMix(stack=lora_lib.stack(ads), router=Half())
  logits, aux = transformer.apply(params, CFG, tokens, lora=mix, return_aux=True)
  assert set(aux["routing"]) == set(ads[0])
  assert aux["routing"]["layers/0/mlp/down_proj/kernel"].shape == (3, 7, 2)
  fixed = transformer.apply(params, CFG, tokens, lora=lora_lib.LoraMix.of(ads, jnp.array([.5, .5])))
  np.testing.assert_allclose(logits, fixed, atol=1e-6)
  assert aux["hidden"].shape == (3, 7, 32)


def test_attention_is_causal(params):
  """Right padding needs no mask: later tokens never change earlier logits."""
  a = jnp.array([[5, 6, 7, 8, 9]])
  b = jnp.array([[5, 6, 7, 0, 0]])
  np.testing.assert_allclose(transformer.apply(params, CFG, a)[:, :3],
                             transformer.apply(params, CFG, b)[:, :3], atol=1e-6)


@pytest.mark.parametrize("variant", [
    dict(norm="layer", mlp="gelu", activation="gelu_tanh", pos="learned", qkv_bias=True,
         o_bias=True, mlp_bias=True),
    dict(qkv_bias=True, tie_embeddings=True, rope_scaling=(("factor", 2.0), ("rope_type", "linear"))),
])
def test_architecture_variants_run(variant, tokens):
  cfg = transformer.ModelConfig(vocab_size=61, d_model=32, n_layers=1, n_heads=4, d_ff=40, **variant)
  p = transformer.init(jax.random.key(0), cfg)
  out = transformer.apply(p, cfg, tokens)
  assert out.shape == (3, 7, 61) and bool(jnp.all(jnp.isfinite(out)))


# --- clear errors -------------------------------------------------------------------------

def test_error_target_regex_matches_nothing(params):
  with pytest.raises(ValueError, match=r"targets='nothing_here' matches no 2-D kernel"):
    lora_lib.init(jax.random.key(0), params, lora_lib.LoraConfig(targets="nothing_here"))


@pytest.mark.parametrize("rank", [0, -2])
def test_error_nonpositive_rank(rank):
  with pytest.raises(ValueError, match="LoraConfig.rank must be a positive int"):
    lora_lib.LoraConfig(rank=rank)


def test_error_rank_exceeds_dims(params):
  with pytest.raises(ValueError, match=r"rank=17 exceeds min\(d_in, d_out\)=16 at 'layers/0/attn/k_proj/kernel'"):
    lora_lib.init(jax.random.key(0), params, lora_lib.LoraConfig(rank=17, targets="k_proj"))


def test_error_adapter_shape_mismatch(params):
  other_cfg = transformer.ModelConfig(vocab_size=61, d_model=48, n_layers=2, n_heads=4, d_ff=48)
  other = transformer.init(jax.random.key(0), other_cfg)
  ad = lora_lib.init(jax.random.key(0), other, lora_lib.LoraConfig(rank=2))
  with pytest.raises(ValueError, match=r"adapter at 'layers/0/attn/k_proj/kernel' has a \(48, 2\)"):
    lora_lib.merge(params, ad)


def test_error_adapter_path_missing(params):
  ad = lora_lib.init(jax.random.key(0), params, lora_lib.LoraConfig(rank=2))
  ad["layers/9/attn/q_proj/kernel"] = ad["layers/0/attn/q_proj/kernel"]
  with pytest.raises(ValueError, match="'layers/9/attn/q_proj/kernel' is not a parameter"):
    lora_lib.check_compatible(params, ad)


def test_error_mix_weights_wrong_length(params):
  ads = [_random_adapter(jax.random.key(k), params) for k in range(2)]
  with pytest.raises(ValueError, match=r"weights has shape \(3,\); expected \[K\]"):
    lora_lib.LoraMix.of(ads, jnp.ones(3))


def test_error_stack_different_paths(params):
  a = lora_lib.init(jax.random.key(0), params, lora_lib.LoraConfig(rank=2, targets="q_proj"))
  b = lora_lib.init(jax.random.key(0), params, lora_lib.LoraConfig(rank=2, targets="v_proj"))
  with pytest.raises(ValueError, match="adapter 1 adapts other paths"):
    lora_lib.stack([a, b])


@pytest.mark.parametrize("field,value", [("norm", "batch"), ("n_layers", 0), ("pos", "alibi")])
def test_error_bad_model_config(field, value):
  with pytest.raises(ValueError, match=f"ModelConfig.{field}"):
    transformer.ModelConfig(**{field: value})
