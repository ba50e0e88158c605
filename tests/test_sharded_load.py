"""Sharded checkpoint loading on 4 fake CPU devices (conftest): `sharding`'s rules and
placement, `interop.safetensors_io`'s per-block reads."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lora_limits import sharding as shard_lib
from lora_limits import tree as tree_lib
from lora_limits.interop import hf, safetensors_io
from lora_limits.models import transformer

LLAMA = transformer.ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                d_ff=96, tie_embeddings=False, init_std=0.1)
GPT2 = transformer.ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, d_ff=96,
                               max_len=32, norm="layer", norm_eps=1e-5, mlp="gelu",
                               activation="gelu_tanh", pos="learned", qkv_bias=True,
                               o_bias=True, mlp_bias=True, init_std=0.1)
# Kernels split on d_out instead: exercises the column offsets of GPT-2's fused c_attn.
COLUMN_RULES = ((r"/kernel$", P(None, shard_lib.FSDP_AXIS)),) + shard_lib.fsdp_rules()


def mesh_of(kind):
  if kind == "fsdp4":
    return shard_lib.fsdp_mesh(4)
  auto = jax.sharding.AxisType.Auto
  return jax.make_mesh((2, 2), (shard_lib.DATA_AXIS, shard_lib.FSDP_AXIS),
                       axis_types=(auto, auto))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """Our random params exported as transformers directories (sharded files), by arch."""
  out = {}
  for name, cfg in (("llama", LLAMA), ("gpt2", GPT2)):
    params = transformer.init(jax.random.key(0), cfg)
    directory = tmp_path_factory.mktemp(name)
    hf.export_checkpoint(params, cfg, directory, max_shard_bytes=40_000)
    out[name] = directory
  return out


def test_spec_for_follows_the_first_matching_rule_and_divisibility():
  mesh = mesh_of("data2_fsdp2")
  rules = shard_lib.fsdp_rules()
  assert shard_lib.spec_for("layers/0/attn/q_proj/kernel", (64, 32), rules, mesh) == P("fsdp", None)
  assert shard_lib.spec_for("embed/embedding", (128, 64), rules, mesh) == P("fsdp", None)
  assert shard_lib.spec_for("layers/0/attn_norm/scale", (64,), rules, mesh) == P()
  # 7 rows do not split over 2 devices: that dimension stays whole.
  assert shard_lib.spec_for("layers/0/mlp/up_proj/kernel", (7, 64), rules, mesh) == P(None, None)
  both = ((r"kernel$", P(("data", "fsdp"), None)),)
  assert shard_lib.spec_for("a/kernel", (8, 3), both, mesh) == P(("data", "fsdp"), None)
  assert shard_lib.spec_for("a/kernel", (6, 3), both, mesh) == P(None, None)
  assert shard_lib.spec_for("unmatched", (8,), both, mesh) == P()
  with pytest.raises(ValueError, match="mesh axis 'model'"):
    shard_lib.spec_for("a/kernel", (8, 8), ((r"kernel", P("model")),), mesh)
  with pytest.raises(ValueError, match="shape \\(8,\\)"):
    shard_lib.spec_for("a/bias", (8,), ((r"bias", P("fsdp", None)),), mesh)


def test_batch_sharding_uses_data_and_fsdp_when_they_divide():
  mesh = mesh_of("data2_fsdp2")
  assert shard_lib.batch_sharding(mesh, 8).spec == P(("data", "fsdp"))
  assert shard_lib.batch_sharding(mesh, 2).spec == P(("data",))
  assert shard_lib.batch_sharding(mesh, 3).spec == P()
  assert shard_lib.batch_sharding(mesh_of("fsdp4"), 4).spec == P(("fsdp",))


@pytest.mark.parametrize("arch, mesh_kind, rules", [
    ("llama", "fsdp4", None),
    ("llama", "data2_fsdp2", None),
    ("gpt2", "fsdp4", COLUMN_RULES),
])
def test_sharded_load_gives_the_unsharded_logits(checkpoints, arch, mesh_kind, rules):
  mesh = mesh_of(mesh_kind)
  cfg, params, _ = hf.load_checkpoint(checkpoints[arch], tokenizer=False)
  cfg_s, params_s, _ = hf.load_checkpoint(checkpoints[arch], mesh=mesh, rules=rules,
                                          tokenizer=False)
  assert cfg_s == cfg
  q = params_s["layers"]["0"]["attn"]["q_proj"]["kernel"]
  expected = P("fsdp", None) if rules is None else P(None, "fsdp")
  assert q.sharding.spec == expected
  assert len({s.device for s in q.addressable_shards}) == 4
  if mesh_kind == "fsdp4":  # every device holds a different quarter
    assert {s.data.shape for s in q.addressable_shards} == (
        {(16, 64)} if rules is None else {(64, 16)})
  flat, flat_s = tree_lib.flatten(params), tree_lib.flatten(params_s)
  for path in flat:
    np.testing.assert_array_equal(np.asarray(flat[path]), np.asarray(flat_s[path]), err_msg=path)
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 12)).astype(np.int32)
  forward = jax.jit(lambda p, t: transformer.apply(p, cfg, t))
  logits = forward(params, jnp.asarray(tokens))
  logits_s = forward(params_s, jax.device_put(tokens, shard_lib.batch_sharding(mesh, 4)))
  np.testing.assert_allclose(np.asarray(logits_s), np.asarray(logits), atol=1e-5, rtol=0)


def test_each_device_reads_only_its_block(checkpoints):
  """Host memory stays near one shard: no read is larger than a quarter of the biggest
  tensor, yet every byte of every sharded tensor is read once."""
  mesh = mesh_of("fsdp4")
  abstract = hf.abstract_params(LLAMA)
  shardings = tree_lib.flatten(shard_lib.param_shardings(tree_lib.unflatten(abstract), mesh))
  with safetensors_io.SafetensorsCheckpoint(checkpoints["llama"]) as ckpt:
    sizes = {k: int(np.prod(ckpt.shape(k))) * 4 for k in ckpt.keys()}
    params = safetensors_io.load_params(ckpt, hf.param_sources(LLAMA, "llama"), abstract, shardings)
    assert ckpt.max_read_bytes <= max(sizes.values()) // 4
    # replicated tensors (norm scales) may be read by each of the 4 devices, the rest once
    replicated = sum(v for k, v in sizes.items() if "norm" in k)
    assert sum(sizes.values()) <= ckpt.bytes_read <= sum(sizes.values()) + 3 * replicated
  assert set(params) == set(abstract)


def test_shard_params_places_in_memory_params():
  mesh = mesh_of("fsdp4")
  params = transformer.init(jax.random.key(1), LLAMA)
  placed = shard_lib.shard_params(params, mesh)
  assert placed["embed"]["embedding"].sharding.spec == P("fsdp", None)
  assert placed["final_norm"]["scale"].sharding.spec == P()
  np.testing.assert_array_equal(np.asarray(placed["lm_head"]["kernel"]),
                                np.asarray(params["lm_head"]["kernel"]))


def test_source_shapes_are_checked_before_reading(checkpoints):
  with safetensors_io.SafetensorsCheckpoint(checkpoints["gpt2"]) as ckpt:
    src = safetensors_io.Source("transformer.h.0.attn.c_attn.weight", offset=64, fused=3)
    assert safetensors_io.source_shape(ckpt, src) == (64, 64)
    with pytest.raises(ValueError, match="cannot split into 5 parts"):
      safetensors_io.source_shape(ckpt, safetensors_io.Source(src.key, fused=5))
    with pytest.raises(ValueError, match="not in the checkpoint"):
      ckpt.shape("transformer.h.9.attn.c_attn.weight")
