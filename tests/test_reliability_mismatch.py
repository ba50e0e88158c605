"""Adapters that do not fit the model are refused with the path, never run or merged silently;
the many-combination evaluator picks a chunk within its memory budget or says what fits.

Mismatches tried: an adapter of a deeper model (extra layers), of another architecture
(GELU MLP without gate_proj; grouped-query attention with other k/v widths), of another
width or MLP width, with other targets than its library, in another dtype; a PEFT adapter
exported for another model; an adapter checkpoint resumed on another base. Each is tried at every entry
point that takes an adapter: the forward (`LoraMix`), `lora.merge`, `lora.stack`, the
recycling merges and `score_combinations`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_limits import checkpoint as ckpt_lib
from lora_limits import data as data_lib
from lora_limits import lora as lora_lib
from lora_limits import train
from lora_limits.interop import peft
from lora_limits.models import transformer
from lora_limits.recycle import score as score_lib
from lora_limits.recycle import merge as merge_lib

BASE = transformer.ModelConfig(vocab_size=24, d_model=16, n_layers=1, n_heads=2, d_ff=32)
OTHERS = {
    "deeper": transformer.ModelConfig(vocab_size=24, d_model=16, n_layers=2, n_heads=2, d_ff=32),
    "wider": transformer.ModelConfig(vocab_size=24, d_model=24, n_layers=1, n_heads=2, d_ff=32),
    "grouped_kv": transformer.ModelConfig(vocab_size=24, d_model=16, n_layers=1, n_heads=2,
                                          n_kv_heads=1, d_ff=32),
    "other_ff": transformer.ModelConfig(vocab_size=24, d_model=16, n_layers=1, n_heads=2,
                                        d_ff=48),
}
# What the error must name for an adapter of OTHERS[name] on BASE.
EXPECTED = {
    "deeper": r"'layers/1/attn/(k|o|q|v)_proj/kernel' is not a parameter of the model",
    "wider": r"adapter at 'layers/0/\w+/\w+_proj/kernel' has a \((1, )?24, 2\)",
    "grouped_kv": r"adapter at 'layers/0/attn/(k|v)_proj/kernel' has a .* b \((1, )?2, 8\), "
                  r"which do not fit the kernel 16x16",
    "other_ff": r"adapter at 'layers/0/mlp/\w+_proj/kernel' has a \((1, )?(16|48), 2\)",
}
TOKENS = jnp.asarray([[3, 4, 5, 6, 7, 1]], jnp.int32)


def _nonzero(adapter, shift=0.05):
  return {p: lora_lib.LoraFactors(f.a, f.b + shift, f.scale) for p, f in adapter.items()}


@pytest.fixture(scope="module")
def params():
  return transformer.init(jax.random.key(0), BASE)


def _adapter_for(cfg, seed=1, **spec):
  other_params = transformer.init(jax.random.key(seed), cfg)
  return _nonzero(lora_lib.init(jax.random.key(seed), other_params,
                                lora_lib.LoraConfig(rank=2, **spec)))


def _entry_points(params, adapter):
  """Every way an adapter reaches a model."""
  own = _nonzero(lora_lib.init(jax.random.key(9), params, lora_lib.LoraConfig(rank=2)))
  weights = np.ones((2, 2), np.float32)
  batch = {k: jnp.asarray(v) for k, v in data_lib.lm_batch(
      data_lib.encode([([3, 4, 5], [6, 7])], eos_id=1, pad_id=0), "answer").items()}
  return {
      "forward": lambda: transformer.apply(params, BASE, TOKENS,
                                           lora=lora_lib.LoraMix.single(adapter)),
      "lora.merge": lambda: lora_lib.merge(params, adapter),
      "merged library forward": lambda: merge_lib.merge([adapter], "sum").apply(params),
      "score_combinations": lambda: score_lib.score_combinations(
          params, [adapter, adapter], weights, batch, cfg=BASE),
      "stack with a fitting adapter": lambda: transformer.apply(
          params, BASE, TOKENS, lora=lora_lib.LoraMix.of([own, adapter])),
  }


NAMES_A_KERNEL = r"'layers/\d/(attn|mlp)/\w+_proj/kernel'"


@pytest.mark.parametrize("other", sorted(OTHERS))
def test_adapter_of_another_model_is_refused_everywhere(params, other):
  adapter = _adapter_for(OTHERS[other])
  for entry, call in _entry_points(params, adapter).items():
    # The forward and lora.merge say what does not fit; the others name the path.
    match = EXPECTED[other] if entry in ("forward", "lora.merge") else NAMES_A_KERNEL
    with pytest.raises(ValueError, match=match):
      call()


def test_adapter_of_a_gated_mlp_on_a_gelu_model_is_refused():
  """Another architecture: GPT-2-style blocks (LayerNorm, learned positions, GELU MLP without
  gate_proj) cannot take a Llama-style adapter."""
  gelu = transformer.ModelConfig(vocab_size=24, d_model=16, n_layers=1, n_heads=2, d_ff=32,
                                 mlp="gelu", norm="layer", pos="learned")
  gelu_params = transformer.init(jax.random.key(0), gelu)
  adapter = _adapter_for(BASE)
  match = r"'layers/0/mlp/gate_proj/kernel' is not a parameter of the model"
  with pytest.raises(ValueError, match=match):
    transformer.apply(gelu_params, gelu, TOKENS, lora=lora_lib.LoraMix.single(adapter))
  with pytest.raises(ValueError, match=match):
    lora_lib.merge(gelu_params, adapter)


def test_other_targets_are_refused_in_a_library(params):
  all_targets = _nonzero(lora_lib.init(jax.random.key(1), params, lora_lib.LoraConfig(rank=2)))
  attention = _nonzero(lora_lib.init(jax.random.key(2), params, lora_lib.LoraConfig(
      rank=2, targets=r"attn/(q|v)_proj/kernel$")))
  batch = {k: jnp.asarray(v) for k, v in data_lib.lm_batch(
      data_lib.encode([([3, 4, 5], [6, 7])], eos_id=1, pad_id=0), "answer").items()}
  match = r"other paths than (adapter 0|adapters\[0\]).*mlp/down_proj/kernel"
  with pytest.raises(ValueError, match=match):
    lora_lib.stack([all_targets, attention])
  with pytest.raises(ValueError, match=match):
    merge_lib.merge([all_targets, attention], "ties", density=0.5)
  with pytest.raises(ValueError, match=match):
    score_lib.score_combinations(params, [all_targets, attention], np.ones((1, 2)), batch,
                                cfg=BASE)
  # Alone, an adapter of fewer targets fits.
  transformer.apply(params, BASE, TOKENS, lora=lora_lib.LoraMix.single(attention))


def test_mixed_ranks_stack_exactly(params):
  """Not a mismatch: ranks may differ (zero-padded), and the mix equals the sum."""
  r2 = _nonzero(lora_lib.init(jax.random.key(1), params, lora_lib.LoraConfig(rank=2)))
  r4 = _nonzero(lora_lib.init(jax.random.key(2), params, lora_lib.LoraConfig(rank=4)), 0.02)
  mixed = transformer.apply(params, BASE, TOKENS, lora=lora_lib.LoraMix.of([r2, r4]))
  merged = transformer.apply(lora_lib.merge(lora_lib.merge(params, r2), r4), BASE, TOKENS)
  np.testing.assert_allclose(np.asarray(mixed), np.asarray(merged), atol=2e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_adapter_in_another_dtype_is_refused(params, dtype):
  adapter = _adapter_for(BASE)
  cast = jax.tree.map(lambda x: x.astype(dtype), adapter)
  for entry, call in _entry_points(params, cast).items():
    if entry in ("merged library forward", "score_combinations",
                 "stack with a fitting adapter"):
      continue  # stacking with a float32 adapter promotes (exactly); the scorer: below
    with pytest.raises(ValueError, match=rf"has dtype a {jnp.dtype(dtype).name}.*kernel is "
                                         r"float32"):
      call()
  # The recycling merges compute in float32, so a merged bfloat16 library fits a float32
  # model (promotion, exact); on a bfloat16 model its float32 result is refused as above.
  with pytest.raises(ValueError, match=r"has dtype"):
    score_lib.score_combinations(params, [cast, cast], np.ones((1, 2)), {
        k: jnp.asarray(v) for k, v in data_lib.lm_batch(data_lib.encode(
            [([3, 4, 5], [6, 7])], eos_id=1, pad_id=0), "answer").items()}, cfg=BASE)


def test_peft_adapter_of_another_model_is_refused(params, tmp_path):
  peft.save_adapter(_adapter_for(OTHERS["wider"]), tmp_path / "wider")
  with pytest.raises(ValueError, match=r"adapter at '\S+' has a .* which do not fit the kernel"):
    peft.load_adapter(tmp_path / "wider", params)
  peft.save_adapter(_adapter_for(OTHERS["deeper"]), tmp_path / "deeper")
  with pytest.raises(ValueError, match=r"'layers/1/\w+/\w+_proj/kernel' is not a parameter"):
    peft.load_adapter(tmp_path / "deeper", params)


def test_adapter_checkpoint_resumed_on_another_base_is_refused(params, tmp_path):
  """A cached adapter's checkpoint directory reused with a base of other shapes."""
  rows = data_lib.encode([([3, 4, 5], [6, 7]), ([4, 5, 6], [7, 8])], eos_id=1, pad_id=0)
  kwargs = dict(optim=train.OptimConfig(), checkpoint_dir=str(tmp_path))
  train.train_lora(params, BASE, lora_lib.LoraConfig(rank=2), rows,
                   loop=train.LoopConfig(steps=2, batch_size=2), **kwargs)
  wider = transformer.init(jax.random.key(0), OTHERS["wider"])
  with pytest.raises(ckpt_lib.CheckpointError, match=rf"checkpoint step 2 in {tmp_path}"):
    train.train_lora(wider, OTHERS["wider"], lora_lib.LoraConfig(rank=2), rows,
                     loop=train.LoopConfig(steps=4, batch_size=2), **kwargs)
  with pytest.raises(ckpt_lib.CheckpointError, match=rf"checkpoint step 2 in {tmp_path}"):
    train.train_lora(params, BASE, lora_lib.LoraConfig(rank=4), rows,
                     loop=train.LoopConfig(steps=4, batch_size=2), **kwargs)


# ----------------------------------------------------------------------- memory guard


def _scoring_setup(params, n_rows=6, k=3):
  ads = [_nonzero(lora_lib.init(jax.random.key(i), params, lora_lib.LoraConfig(rank=2)), 0.01 * i)
         for i in range(k)]
  rng = np.random.default_rng(0)
  pairs = [(list(rng.integers(3, 24, 4)), list(rng.integers(3, 24, 2))) for _ in range(n_rows)]
  batch = {k: jnp.asarray(v) for k, v in data_lib.lm_batch(
      data_lib.encode(pairs, eos_id=1, pad_id=0), "answer").items()}
  weights = rng.uniform(-1, 2, (11, k)).astype(np.float32)
  return ads, batch, weights


@pytest.mark.parametrize("method", ["mix", "ties"])
def test_chunk_is_chosen_within_the_memory_budget(params, method):
  ads, batch, w = _scoring_setup(params)
  shape = tuple(batch["inputs"].shape)
  route = "mix" if method == "mix" else "dense"
  per = score_lib.estimate_bytes(BASE, shape, route, ads)
  fixed = sum(x.nbytes for x in jax.tree.leaves((params, ads)))
  opts = {"density": 0.5} if method == "ties" else None
  for room in (1, 2, 5):
    budget = fixed + room * per + 1
    plan = score_lib.make_plan(params, ads, len(w), shape, cfg=BASE, method=method,
                              options=opts, memory_budget_bytes=budget, chunk_target_bytes=None)
    assert plan.chunk == room and fixed + plan.chunk * per <= budget
  small = score_lib.score_combinations(params, ads, w, batch, cfg=BASE, method=method,
                                      options=opts, memory_budget_bytes=fixed + 2 * per + 1,
                                      chunk_target_bytes=None)
  whole = score_lib.score_combinations(params, ads, w, batch, cfg=BASE, method=method,
                                      options=opts, chunk_size=len(w))
  np.testing.assert_allclose(np.asarray(small), np.asarray(whole), rtol=1e-5)


def test_a_budget_that_cannot_hold_one_combination_says_what_fits(params):
  ads, batch, w = _scoring_setup(params)
  fixed = sum(x.nbytes for x in jax.tree.leaves((params, ads)))
  with pytest.raises(ValueError, match=r"memory_budget_bytes=\d+ .* cannot hold one combination:"
                                       r" parameters and adapters take .* MiB .* chunk_size=1"):
    score_lib.score_combinations(params, ads, w, batch, cfg=BASE, memory_budget_bytes=fixed)
  # The documented way out: an explicit chunk runs regardless of the estimate.
  got = score_lib.score_combinations(params, ads, w, batch, cfg=BASE, memory_budget_bytes=fixed,
                                    chunk_size=1)
  assert got.shape == (len(w),) and bool(jnp.all(jnp.isfinite(got)))
