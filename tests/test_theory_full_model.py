"""Item 6: spectra, subspace angles and overlap coefficients for adapters of the full model."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_limits import data as data_lib
from lora_limits import lora as lora_lib
from lora_limits import train as train_lib
from lora_limits.models import transformer
from lora_limits.theory import full_model as fm

CFG = transformer.ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, d_ff=48,
                              max_len=8)
PAD, EOS, REL1, REL2 = 0, 1, 38, 39
N_CHAINS = 6


@pytest.fixture(scope="module")
def params():
  return transformer.init(jax.random.key(0), CFG)


def _random_adapter(key, params, rank=4, targets=lora_lib.DEFAULT_TARGETS):
  ad = lora_lib.init(key, params, lora_lib.LoraConfig(rank=rank, targets=targets))
  return {p: lora_lib.LoraFactors(f.a, jax.random.normal(jax.random.fold_in(key, i), f.b.shape),
                                  f.scale) for i, (p, f) in enumerate(sorted(ad.items()))}


@pytest.fixture(scope="module")
def chains():
  """Chains A —REL1→ B —REL2→ C as token prompts (entity tokens 2..37)."""
  rng = np.random.default_rng(0)
  ents = rng.permutation(np.arange(2, 38))
  a, b, c = ents[:N_CHAINS], ents[N_CHAINS:2 * N_CHAINS], ents[2 * N_CHAINS:3 * N_CHAINS]
  enc = lambda pairs: data_lib.encode(pairs, eos_id=EOS, pad_id=PAD, max_len=6)  # noqa: E731
  hop1 = enc([([x, REL1], [y]) for x, y in zip(a, b)])
  hop2 = enc([([x, REL2], [y]) for x, y in zip(b, c)])
  two = enc([([x, REL1, REL2], [y]) for x, y in zip(a, c)])
  return hop1, hop2, two


def test_spectrum_matches_the_dense_svd(params):
  ad = _random_adapter(jax.random.key(1), params, rank=4)
  dense = lora_lib.delta(ad)
  for path, rec in fm.spectra(ad).items():
    s = np.linalg.svd(np.asarray(dense[path], np.float64), compute_uv=False)[:4]
    np.testing.assert_allclose(rec.singular_values, s, rtol=1e-4)
    assert rec.numerical_rank == 4 and rec.nominal_rank == 4
    assert 1.0 <= rec.stable_rank <= 4.0 and 1.0 <= rec.effective_rank <= 4.0
  json.dumps({p: r.to_dict() for p, r in fm.spectra(ad).items()})


def test_numerical_rank_sees_rank_deficiency(params):
  ad = _random_adapter(jax.random.key(2), params, rank=4)
  path = sorted(ad)[0]
  f = ad[path]
  low = lora_lib.LoraFactors(f.a.at[:, 2:].set(0.0), f.b, f.scale)  # only 2 directions
  assert fm.spectrum(path, low).numerical_rank == 2
  dup = lora_lib.LoraFactors(f.a, f.b.at[1].set(f.b[0]).at[2:].set(0.0), f.scale)
  assert fm.spectrum(path, dup).numerical_rank == 1  # a_0 b_0 + a_1 b_0 = (a_0 + a_1) b_0
  fresh = lora_lib.init(jax.random.key(3), params, lora_lib.LoraConfig(rank=4))  # b = 0
  rec = fm.spectrum(path, fresh[path])
  assert rec.numerical_rank == 0 and rec.stable_rank == 0.0
  assert np.all(np.isfinite(rec.singular_values))


def test_principal_angles(params):
  ad1 = _random_adapter(jax.random.key(4), params, rank=4)
  ad2 = _random_adapter(jax.random.key(5), params, rank=4)
  path = "layers/0/mlp/down_proj/kernel"
  same = fm.subspace_angles(path, ad1[path], ad1[path])
  assert np.max(same.read_angles_deg) < 0.1 and np.max(same.write_angles_deg) < 0.1
  # Same read space (A mixed by an invertible matrix), a different write space.
  mixer = jnp.asarray(np.random.default_rng(0).normal(size=(4, 4)), jnp.float32)
  mixed = lora_lib.LoraFactors(ad1[path].a @ mixer, ad2[path].b, 1.0)
  rec = fm.subspace_angles(path, ad1[path], mixed)
  assert np.max(rec.read_angles_deg) < 0.1 and rec.read_overlap > 0.999
  assert np.max(rec.write_angles_deg) > 10.0
  # Independent random adapters: far from aligned, near the random-subspace baseline.
  rnd = fm.subspace_angles(path, ad1[path], ad2[path])
  assert rnd.read_overlap < 0.5 and rnd.write_overlap < 0.5
  assert abs(rnd.read_overlap - rnd.read_random_baseline) < 0.3
  with pytest.raises(ValueError, match="dim=5"):
    fm.subspace_angles(path, ad1[path], ad2[path], dim=5)


def test_capture_records_inputs_and_changes_nothing(params):
  tokens = jax.random.randint(jax.random.key(6), (3, 5), 0, CFG.vocab_size)
  paths = ["layers/0/attn/q_proj/kernel", "layers/0/attn/v_proj/kernel",
           "layers/1/mlp/down_proj/kernel", "layers/1/mlp/up_proj/kernel",
           "layers/1/mlp/gate_proj/kernel"]
  logits, aux = transformer.apply(params, CFG, tokens, capture=paths)
  np.testing.assert_array_equal(logits, transformer.apply(params, CFG, tokens))
  assert set(aux["captured"]) == set(paths)
  x = fm.layer_inputs(params, CFG, tokens, paths)
  # Layer 0's attention reads RMSNorm(embedding) · scale.
  emb = np.asarray(params["embed"]["embedding"], np.float64)[np.asarray(tokens)]
  scale = np.asarray(params["layers"]["0"]["attn_norm"]["scale"], np.float64)
  manual = emb / np.sqrt(np.mean(emb ** 2, -1, keepdims=True) + CFG.norm_eps) * scale
  np.testing.assert_allclose(x[paths[0]], manual, rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(x[paths[0]], x[paths[1]])  # q and v read the same input
  np.testing.assert_array_equal(x[paths[3]], x[paths[4]])  # up and gate too
  assert x[paths[2]].shape == (3, 5, CFG.d_ff)
  # down_proj's input is the SwiGLU hidden: silu(x W_gate) · (x W_up).
  flat_mlp = params["layers"]["1"]["mlp"]
  hid = x[paths[3]]
  gate = hid @ np.asarray(flat_mlp["gate_proj"]["kernel"], np.float64)
  up = hid @ np.asarray(flat_mlp["up_proj"]["kernel"], np.float64)
  np.testing.assert_allclose(x[paths[2]], gate / (1 + np.exp(-gate)) * up, rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match="no kernel"):
    fm.layer_inputs(params, CFG, tokens, ["layers/0/attn/nope/kernel"])


def test_overlaps_are_one_on_identical_prompts(params, chains):
  hop1, hop2, _ = chains
  ads = [_random_adapter(jax.random.key(7), params), _random_adapter(jax.random.key(8), params)]
  over = fm.overlap_coefficients(params, CFG, ads, [hop1, hop2], hop1)
  for rec in over.values():
    np.testing.assert_allclose(rec.c_KxN[0], 1.0, rtol=1e-6)
    np.testing.assert_allclose(rec.trigger_KxN[0], 1.0, rtol=1e-6)
    assert rec.c_KxN.shape == (2, N_CHAINS)
  # Layer 0's attention input at the last prompt token is the relation token's embedding
  # alone, so "A REL1" vs "A REL1 REL2" differ there, and "B REL2" vs it coincide.
  _, _, two = chains
  over2 = fm.overlap_coefficients(params, CFG, ads, [hop1, hop2], two)
  q0 = over2["layers/0/attn/q_proj/kernel"]
  np.testing.assert_allclose(q0.c_KxN[1], 1.0, rtol=1e-6)
  assert np.all(q0.c_KxN[0] < 0.999)


def test_bad_inputs_are_refused(params, chains):
  hop1, hop2, two = chains
  ad = _random_adapter(jax.random.key(9), params)
  with pytest.raises(ValueError, match="one set per adapter"):
    fm.overlap_coefficients(params, CFG, [ad, ad], [hop1], two)
  with pytest.raises(ValueError, match="aligned"):
    fm.overlap_coefficients(params, CFG, [ad], [data_lib.take(hop1, np.arange(3))], two)
  with pytest.raises(ValueError, match="prompt_len"):
    fm.overlap_coefficients(params, CFG, [ad], [{"tokens": hop1["tokens"]}], two)
  with pytest.raises(ValueError, match="distinct names"):
    fm.analyse_adapters(params, CFG, [ad, ad], names=["x", "x"])
  with pytest.raises(ValueError, match="both"):
    fm.analyse_adapters(params, CFG, [ad], one_hop_prompts=[hop1])
  stacked = lora_lib.stack([ad, ad])
  with pytest.raises(ValueError, match="not a stack"):
    fm.spectra(stacked)
  other = transformer.init(jax.random.key(0), transformer.ModelConfig(
      vocab_size=40, d_model=16, n_layers=2, n_heads=4, d_ff=48))
  with pytest.raises(ValueError, match="do not fit"):
    fm.analyse_adapters(other, CFG, [ad])


def test_trained_adapters_end_to_end(params, chains):
  """Two adapters trained by the core training code on the two hops, analysed together."""
  hop1, hop2, two = chains
  spec = lora_lib.LoraConfig(rank=4, alpha=8.0, targets=r"mlp/(up|down)_proj/kernel$")
  optim = train_lib.OptimConfig(learning_rate=1e-2, warmup_steps=2)
  ads = []
  for seed, data in enumerate([hop1, hop2]):
    loop = train_lib.LoopConfig(steps=30, batch_size=N_CHAINS, seed=seed)
    ad, history, _ = train_lib.train_lora(params, CFG, spec, data, optim=optim, loop=loop)
    assert history[-1]["loss"] < history[0]["loss"]
    ads.append(ad)
  report = fm.analyse_adapters(params, CFG, ads, names=["hop1", "hop2"],
                               one_hop_prompts=[hop1, hop2], two_hop_prompts=two)
  assert set(report.spectra) == {"hop1", "hop2"}
  for per_path in report.spectra.values():
    assert set(per_path) == set(ads[0])
    for rec in per_path.values():
      assert 1 <= rec.numerical_rank <= 4
  assert len(report.angles) == len(ads[0])  # one pair, every shared path
  for ang in report.angles:
    assert np.all((ang.read_angles_deg >= 0) & (ang.read_angles_deg <= 90.0 + 1e-6))
  assert set(report.overlaps) == set(ads[0])
  for rec in report.overlaps.values():
    assert np.all(np.isfinite(rec.c_KxN)) and np.all(rec.trigger_KxN > 0)
  json.dumps(report.to_dict())
