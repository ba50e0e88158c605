"""PEFT adapters ↔ ours, checked against PEFT's own forward on tiny random transformers models."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

torch = pytest.importorskip("torch")
tr = pytest.importorskip("transformers")
peft_lib = pytest.importorskip("peft")

from lora_limits import lora  # noqa: E402
from lora_limits.interop import hf  # noqa: E402
from lora_limits.interop import peft as ipeft  # noqa: E402
from lora_limits.models import transformer  # noqa: E402

# peft 0.21 reads transformers' deprecated `is_gradient_checkpointing` when wrapping a model.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

V = 128
MODELS = {
    "llama": lambda: (tr.LlamaForCausalLM, tr.LlamaConfig(
        vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1)),
    "gpt2": lambda: (tr.GPT2LMHeadModel, tr.GPT2Config(
        vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=32, initializer_range=0.1,
        bos_token_id=1, eos_token_id=2)),
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
  """{arch: (checkpoint dir, our cfg, our params)} from seeded random transformers models."""
  out = {}
  for arch, make in MODELS.items():
    cls, config = make()
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp(arch)
    cls(config).save_pretrained(directory)
    cfg, params, _ = hf.load_checkpoint(directory, tokenizer=False)
    out[arch] = (directory, cfg, params)
  return out


def torch_base(bases, arch):
  return tr.AutoModelForCausalLM.from_pretrained(bases[arch][0]).eval()


TOKENS = np.random.default_rng(0).integers(0, V, (2, 10)).astype(np.int32)


def torch_logits(model):
  with torch.no_grad():
    return model(torch.tensor(TOKENS)).logits.numpy()


def our_logits(bases, arch, adapter=None):
  _, cfg, params = bases[arch]
  mix = None if adapter is None else lora.LoraMix.single(adapter)
  return np.asarray(transformer.apply(params, cfg, jnp.asarray(TOKENS), lora=mix))


def make_peft_adapter(bases, arch, directory, seed=0, **config):
  """A PEFT adapter with random (non-zero) A and B, saved; returns PEFT's adapted logits."""
  torch.manual_seed(seed)
  model = peft_lib.get_peft_model(torch_base(bases, arch), peft_lib.LoraConfig(
      init_lora_weights=False, fan_in_fan_out=arch == "gpt2", **config)).eval()
  model.save_pretrained(directory)
  return torch_logits(model)


@pytest.mark.parametrize("arch, config", [
    ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                   rank_pattern={"layers.1.self_attn.q_proj": 2},
                   alpha_pattern={"down_proj": 3})),
    ("llama", dict(r=4, lora_alpha=6, use_rslora=True,
                   target_modules=["k_proj", "o_proj", "gate_proj", "up_proj"])),
    ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc", "c_proj"])),
])
def test_peft_adapter_loads_with_peft_logits(bases, tmp_path, arch, config):
  ref = make_peft_adapter(bases, arch, tmp_path, **config)
  adapter = ipeft.load_adapter(tmp_path, bases[arch][2])
  ours = our_logits(bases, arch, adapter)
  assert np.abs(ours - our_logits(bases, arch)).max() > 1e-2  # the adapter does something
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
  if arch == "gpt2":  # c_attn became q/k/v sharing one `a`
    a = [adapter[f"layers/0/attn/{p}_proj/kernel"].a for p in "qkv"]
    assert all(np.array_equal(a[0], x) for x in a[1:])
    # ... and goes back to one rank-4 c_attn adapter
    written = ipeft.save_adapter(adapter, tmp_path / "back", arch="gpt2", num_layers=2)
    assert written["r"] == 4
    assert written["target_modules"] == ["attn.c_proj", "c_attn", "c_fc", "mlp.c_proj"]
    back = peft_lib.PeftModel.from_pretrained(torch_base(bases, arch), tmp_path / "back").eval()
    np.testing.assert_allclose(torch_logits(back), ref, atol=1e-4, rtol=0)


def random_adapter(params, targets, ranks, scales, seed=0):
  """Ours, with random non-zero b, one (rank, scale) per target path in turn."""
  paths = lora.target_paths(params, targets)
  key = jax.random.key(seed)
  out = {}
  for i, path in enumerate(paths):
    spec = lora.LoraConfig(rank=ranks[i % len(ranks)], alpha=1.0, targets=f"^{path}$")
    f = lora.init(jax.random.fold_in(key, i), params, spec)[path]
    b = 0.5 * jax.random.normal(jax.random.fold_in(key, 1000 + i), f.b.shape)
    out[path] = lora.LoraFactors(f.a, b, scales[i % len(scales)])
  return out


@pytest.mark.parametrize("arch, targets, ranks, scales, fold", [
    ("llama", r"attn/(q|v)_proj/kernel$|mlp/up_proj", [4, 2, 3], [2.0, 0.5], False),
    ("llama", r"layers/1/mlp/down_proj", [3], [1.5], True),
    # q and v only, different ranks and scales: a block-diagonal c_attn adapter of rank 4 + 2
    ("gpt2", r"attn/(q|v)_proj/kernel$|mlp/down_proj", [4, 2], [2.0, 0.75], False),
])
def test_our_adapter_saves_to_peft_with_our_logits(bases, tmp_path, arch, targets, ranks,
                                                   scales, fold):
  _, cfg, params = bases[arch]
  adapter = random_adapter(params, targets, ranks, scales)
  config = ipeft.save_adapter(adapter, tmp_path, arch=arch, num_layers=cfg.n_layers,
                              base_model_name_or_path="tiny", fold_scale=fold)
  if fold:
    assert config["lora_alpha"] == config["r"] and not config["alpha_pattern"]
  model = peft_lib.PeftModel.from_pretrained(torch_base(bases, arch), tmp_path).eval()
  ours = our_logits(bases, arch, adapter)
  assert np.abs(ours - our_logits(bases, arch)).max() > 1e-2
  np.testing.assert_allclose(torch_logits(model), ours, atol=1e-4, rtol=0)
  # and back into ours: the same function (GPT-2's q/v come back as a fused rank-6 triple)
  again = ipeft.load_adapter(tmp_path, params)
  np.testing.assert_allclose(our_logits(bases, arch, again), ours, atol=1e-5, rtol=0)


def test_merged_adapter_of_any_rank_and_scale_is_writable(bases, tmp_path):
  """e.g. the concatenation of two adapters (their sum) at rank r1 + r2, scale folded."""
  _, cfg, params = bases["llama"]
  one = random_adapter(params, r"attn/v_proj", [2], [2.0], seed=1)
  two = random_adapter(params, r"attn/v_proj", [3], [0.5], seed=2)
  merged = {p: lora.LoraFactors(jnp.concatenate([one[p].a, two[p].a], axis=1),
                                jnp.concatenate([one[p].b * one[p].scale,
                                                 two[p].b * two[p].scale], axis=0), 1.0)
            for p in one}
  config = ipeft.save_adapter(merged, tmp_path, arch="llama", num_layers=cfg.n_layers)
  assert (config["r"], config["lora_alpha"], config["target_modules"]) == (5, 5, ["v_proj"])
  model = peft_lib.PeftModel.from_pretrained(torch_base(bases, "llama"), tmp_path).eval()
  summed = lora.LoraMix.of([one, two])
  _, cfg, params = bases["llama"]
  expected = transformer.apply(params, cfg, jnp.asarray(TOKENS), lora=summed)
  np.testing.assert_allclose(torch_logits(model), np.asarray(expected), atol=1e-4, rtol=0)


def test_subset_of_layers_is_targeted_exactly(bases, tmp_path):
  _, cfg, params = bases["llama"]
  adapter = random_adapter(params, r"layers/1/attn/q_proj", [2], [1.0])
  config = ipeft.save_adapter(adapter, tmp_path, arch="llama", num_layers=cfg.n_layers)
  assert config["target_modules"] == r"model\.layers\.1\.self_attn\.q_proj"
  model = peft_lib.PeftModel.from_pretrained(torch_base(bases, "llama"), tmp_path).eval()
  np.testing.assert_allclose(torch_logits(model), our_logits(bases, "llama", adapter),
                             atol=1e-4, rtol=0)


@pytest.fixture
def plain_adapter_dir(bases, tmp_path):
  """A valid saved adapter whose config or tensors a test then breaks."""
  adapter = random_adapter(bases["llama"][2], r"layers/0/attn/q_proj", [2], [1.0])
  ipeft.save_adapter(adapter, tmp_path, arch="llama")
  return tmp_path


@pytest.mark.parametrize("field, value, match", [
    ("use_dora", True, "use_dora=True"),
    ("lora_bias", True, "lora_bias=True"),
    ("bias", "all", "bias='all'"),
    ("modules_to_save", ["lm_head"], "modules_to_save"),
    ("peft_type", "IA3", "peft_type='IA3'"),
    ("init_lora_weights", "pissa_niter_4", "rewritten base model"),
    ("alora_invocation_tokens", [5, 6], "alora_invocation_tokens"),
    ("r", 3, "has rank 2, its config says 3"),
])
def test_unsupported_adapter_configs_are_refused(bases, plain_adapter_dir, field, value, match):
  config_file = plain_adapter_dir / ipeft.CONFIG_FILE
  config = json.loads(config_file.read_text())
  config[field] = value
  config_file.write_text(json.dumps(config))
  with pytest.raises(ValueError, match=match):
    ipeft.load_adapter(plain_adapter_dir, bases["llama"][2])


@pytest.mark.parametrize("key, shape, match", [
    ("base_model.model.model.embed_tokens.lora_embedding_A", (2, V), "embedding adapter"),
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", (64,), "DoRA"),
    ("base_model.model.lm_head.lora_A.weight", (2, 64), "lm_head"),
])
def test_unsupported_adapter_tensors_are_refused(bases, plain_adapter_dir, key, shape, match):
  weights = plain_adapter_dir / ipeft.WEIGHTS_FILE
  tensors = safetensors.numpy.load_file(weights)
  tensors[key] = np.zeros(shape, np.float32)
  if key.endswith("lora_A.weight"):
    tensors[key.replace("lora_A", "lora_B")] = np.zeros((V, 2), np.float32)
  safetensors.numpy.save_file(tensors, weights)
  with pytest.raises(ValueError, match=match):
    ipeft.load_adapter(plain_adapter_dir, bases["llama"][2])


def test_misfits_are_refused(bases, plain_adapter_dir, tmp_path):
  # a k_proj adapter of the grouped-query Llama (64x32) does not fit GPT-2's k (64x64)
  adapter = random_adapter(bases["llama"][2], r"layers/0/attn/k_proj", [2], [1.0])
  ipeft.save_adapter(adapter, tmp_path / "k", arch="llama")
  with pytest.raises(ValueError, match="do not\\s+fit the kernel 64x64"):
    ipeft.load_adapter(tmp_path / "k", bases["gpt2"][2])
  stacked = lora.stack([adapter, adapter])
  with pytest.raises(ValueError, match="is stacked"):
    ipeft.save_adapter(stacked, tmp_path / "s")
  with pytest.raises(ValueError, match="no gpt2 module counterpart"):
    ipeft.save_adapter({"layers/0/mlp/gate_proj/kernel": adapter["layers/0/attn/k_proj/kernel"]},
                       tmp_path / "g", arch="gpt2")
  with pytest.raises(ValueError, match="no adapter_config.json"):
    ipeft.load_adapter(tmp_path / "missing", bases["llama"][2])
