"""Parity of our JAX model with transformers on tiny random checkpoints, and export round trips."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

torch = pytest.importorskip("torch")
tr = pytest.importorskip("transformers")

from lora_limits import tree as tree_lib  # noqa: E402
from lora_limits.interop import hf  # noqa: E402
from lora_limits.models import transformer  # noqa: E402

V = 128
SMALL = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, initializer_range=0.1, bos_token_id=1, eos_token_id=2,
             pad_token_id=3)
# Each case: (model class, config) — every supported architecture and the switches that
# change the numerics (GQA, rope scaling, tying, biases, sliding window, fused c_attn).
CASES = {
    "llama_gqa_llama3rope_untied": lambda: (tr.LlamaForCausalLM, tr.LlamaConfig(
        **SMALL, num_key_value_heads=2, max_position_embeddings=64, rope_parameters={
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8})),
    "llama_tied_biases_linearrope": lambda: (tr.LlamaForCausalLM, tr.LlamaConfig(
        **SMALL, tie_word_embeddings=True, attention_bias=True, mlp_bias=True, head_dim=32,
        rope_parameters={"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0})),
    "qwen2_tied": lambda: (tr.Qwen2ForCausalLM, tr.Qwen2Config(
        **SMALL, num_key_value_heads=2, tie_word_embeddings=True, rms_norm_eps=1e-5)),
    "mistral_window4": lambda: (tr.MistralForCausalLM, tr.MistralConfig(
        **SMALL, num_key_value_heads=1, sliding_window=4)),
    "gpt2": lambda: (tr.GPT2LMHeadModel, tr.GPT2Config(
        vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=32, initializer_range=0.1,
        bos_token_id=1, eos_token_id=2, pad_token_id=3)),
}


def make_tokenizer():
  """A word-level tokenizer over 't4'..'t127' plus specials, with a chat template."""
  tokenizers = pytest.importorskip("tokenizers")
  vocab = {f"t{i}": i for i in range(4, V)}
  vocab.update({"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3})
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  fast = tr.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                    eos_token="</s>", pad_token="<pad>")
  fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
  return fast


def save_torch_model(directory, case, max_shard_size=None):
  cls, config = CASES[case]()
  torch.manual_seed(0)
  model = cls(config).eval()
  kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
  model.save_pretrained(directory, **kwargs)
  make_tokenizer().save_pretrained(directory)
  return model


def torch_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens))).logits.numpy()


def random_tokens(batch=2, length=12, seed=0):
  return np.random.default_rng(seed).integers(4, V, (batch, length)).astype(np.int32)


def greedy(params, cfg, prompt_BxT, steps, eos_id):
  """Greedy decoding with one compile: a right-padded buffer (causal, so pad never matters)."""
  b, t0 = prompt_BxT.shape
  forward = jax.jit(lambda p, t: transformer.apply(p, cfg, t))
  tokens = np.zeros((b, t0 + steps), np.int32)
  tokens[:, :t0] = prompt_BxT
  for i in range(steps):
    logits = forward(params, jnp.asarray(tokens))
    tokens[:, t0 + i] = np.asarray(jnp.argmax(logits[:, t0 + i - 1], axis=-1))
  return [_until_eos(row[t0:], eos_id) for row in tokens]


def torch_greedy(model, prompt_BxT, steps, eos_id):
  with torch.no_grad():
    out = model.generate(torch.tensor(prompt_BxT), attention_mask=torch.ones(prompt_BxT.shape,
                         dtype=torch.long), max_new_tokens=steps, do_sample=False,
                         eos_token_id=eos_id, pad_token_id=eos_id)
  return [_until_eos(row, eos_id) for row in out[:, prompt_BxT.shape[1]:].numpy()]


def _until_eos(row, eos_id):
  row = list(int(x) for x in row)
  return row[:row.index(eos_id) + 1] if eos_id in row else row


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_and_greedy_generation_match_transformers(tmp_path, case):
  # The first case also goes through the sharded index path.
  shard = "20KB" if case == "llama_gqa_llama3rope_untied" else None
  model = save_torch_model(tmp_path, case, max_shard_size=shard)
  if shard:
    assert (tmp_path / "model.safetensors.index.json").exists()
  cfg, params, tok = hf.load_checkpoint(tmp_path)
  assert hf.infer_arch(cfg) == case.split("_")[0]
  tokens = random_tokens()
  ours = np.asarray(transformer.apply(params, cfg, jnp.asarray(tokens)))
  np.testing.assert_allclose(ours, torch_logits(model, tokens), atol=1e-4, rtol=0)
  prompt = random_tokens(batch=2, length=5, seed=1)
  assert greedy(params, cfg, prompt, 8, tok.eos_token_id) == torch_greedy(
      model, prompt, 8, tok.eos_token_id)


def test_sliding_window_changes_numerics_at_test_length(tmp_path):
  """The Mistral parity above is meaningful: full attention would give other logits."""
  save_torch_model(tmp_path, "mistral_window4")
  cfg, params, _ = hf.load_checkpoint(tmp_path, tokenizer=False)
  assert cfg.sliding_window == 4
  tokens = jnp.asarray(random_tokens())
  full = transformer.apply(params, cfg.__class__(**{**cfg.__dict__, "sliding_window": None}), tokens)
  windowed = transformer.apply(params, cfg, tokens)
  np.testing.assert_allclose(full[:, :4], windowed[:, :4], atol=1e-6)
  assert float(jnp.abs(full[:, 4:] - windowed[:, 4:]).max()) > 1e-3


def test_tokenizer_and_chat_template_come_from_the_checkpoint(tmp_path):
  save_torch_model(tmp_path, "qwen2_tied")
  _, _, tok = hf.load_checkpoint(tmp_path)
  assert tok("t5 t9 t100", add_special_tokens=False)["input_ids"] == [5, 9, 100]
  assert tok.eos_token_id == 2 and tok.pad_token_id == 3
  text = tok.apply_chat_template([{"role": "user", "content": "t7 t8"}], tokenize=False)
  assert text.strip() == "t7 t8"


def test_bfloat16_weights_and_compute_run_and_stay_close(tmp_path):
  model = save_torch_model(tmp_path, "llama_gqa_llama3rope_untied")
  cfg, params, _ = hf.load_checkpoint(tmp_path, dtype="bfloat16", tokenizer=False)
  assert cfg.dtype == cfg.param_dtype == "bfloat16"
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
  tokens = random_tokens()
  ours = np.asarray(transformer.apply(params, cfg, jnp.asarray(tokens)))
  ref = torch_logits(model, tokens)
  assert np.abs(ours - ref).max() < 0.1 * np.abs(ref).max()


@pytest.mark.parametrize("case", ["llama_gqa_llama3rope_untied", "qwen2_tied", "gpt2"])
def test_export_round_trip_through_transformers(tmp_path, case):
  """Ours → directory → AutoModelForCausalLM gives our logits; → load_checkpoint gives our
  params bit for bit. Sharded export writes an index transformers follows."""
  save_torch_model(tmp_path / "src", case)
  cfg, _, tok = hf.load_checkpoint(tmp_path / "src")
  params = transformer.init(jax.random.key(3), cfg)  # fresh weights: not the torch ones
  arch = hf.export_checkpoint(params, cfg, tmp_path / "out", tokenizer=tok,
                              max_shard_bytes=30_000)
  assert arch == case.split("_")[0]
  index = json.loads((tmp_path / "out/model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 1
  model = tr.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
  tokens = random_tokens()
  ours = np.asarray(transformer.apply(params, cfg, jnp.asarray(tokens)))
  np.testing.assert_allclose(torch_logits(model, tokens), ours, atol=1e-4, rtol=0)
  cfg2, params2, tok2 = hf.load_checkpoint(tmp_path / "out")
  assert cfg2 == cfg
  assert tok2.eos_token_id == tok.eos_token_id
  flat, flat2 = tree_lib.flatten(params), tree_lib.flatten(params2)
  assert flat.keys() == flat2.keys()
  for path in flat:
    np.testing.assert_array_equal(np.asarray(flat[path]), np.asarray(flat2[path]), err_msg=path)


def test_config_round_trip_and_inexpressible_configs_are_refused():
  cfg = transformer.ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2,
                                d_ff=48, rope_scaling=(("factor", 2.0), ("rope_type", "linear")))
  back, arch = hf.config_from_hf(hf.hf_config(cfg))
  assert arch == "llama" and back == cfg
  with pytest.raises(ValueError, match="norm='rms' cannot be exported as gpt2"):
    hf.hf_config(cfg, "gpt2")
  gpt2_like = dict(norm="layer", pos="learned", mlp="gelu", activation="gelu_tanh",
                   qkv_bias=True, o_bias=True, mlp_bias=True)
  with pytest.raises(ValueError, match="n_kv_heads=2 cannot be exported as gpt2"):
    hf.hf_config(transformer.ModelConfig(n_kv_heads=2, **gpt2_like), "gpt2")
  back, arch = hf.config_from_hf(hf.hf_config(transformer.ModelConfig(**gpt2_like)))
  assert arch == "gpt2" and back == transformer.ModelConfig(**gpt2_like)
  with pytest.raises(ValueError, match="qkv_bias"):
    hf.hf_config(transformer.ModelConfig(qkv_bias=True), "mistral")
  with pytest.raises(ValueError, match="'bert' is not supported"):
    hf.hf_config(cfg, "bert")


def test_legacy_rope_fields_are_read():
  """config.json files written before transformers v5 keep rope_theta / rope_scaling."""
  cfg, _ = hf.config_from_hf(dict(
      model_type="llama", vocab_size=V, hidden_size=64, intermediate_size=96,
      num_hidden_layers=1, num_attention_heads=4, rope_theta=500000.0,
      rope_scaling={"type": "linear", "factor": 2.0}))
  assert cfg.rope_theta == 500000.0
  assert cfg.rope_scaling == (("factor", 2.0), ("rope_type", "linear"))
  cfg, arch = hf.config_from_hf(dict(
      model_type="qwen2", vocab_size=V, hidden_size=64, intermediate_size=96,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6,
      rope_scaling=None, use_sliding_window=False, sliding_window=131072,
      max_window_layers=28, tie_word_embeddings=True))
  assert (arch, cfg.rope_theta, cfg.rope_scaling, cfg.sliding_window) == ("qwen2", 1e6, None, None)
  assert cfg.qkv_bias and not cfg.o_bias and cfg.n_kv_heads == 2


def _llama_config(**kw):
  base = dict(model_type="llama", vocab_size=V, hidden_size=64, intermediate_size=96,
              num_hidden_layers=1, num_attention_heads=4)
  return {**base, **kw}


@pytest.mark.parametrize("config, match", [
    (dict(model_type="bert", vocab_size=V), "architecture 'bert' is not supported"),
    (_llama_config(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}),
     "rope_type='yarn'"),
    (_llama_config(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}),
     "rope_type='dynamic'"),
    (_llama_config(rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                    "partial_rotary_factor": 0.5}), "partial_rotary_factor"),
    (_llama_config(architectures=["LlamaForSequenceClassification"]), "architectures"),
    (_llama_config(hidden_act="gelu_fast"), "activation='gelu_fast'"),
    (dict(model_type="gpt2", vocab_size=V, n_embd=64, n_layer=1, n_head=4,
          scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
    (dict(model_type="qwen2", vocab_size=V, hidden_size=64, intermediate_size=96,
          num_hidden_layers=2, num_attention_heads=4, use_sliding_window=True, sliding_window=4,
          max_window_layers=1), "layer_types"),
])
def test_unsupported_fields_are_refused_by_name(config, match):
  with pytest.raises(ValueError, match=match):
    hf.config_from_hf(config)


def test_broken_checkpoints_are_refused(tmp_path):
  save_torch_model(tmp_path, "qwen2_tied")
  weights = tmp_path / "model.safetensors"
  tensors = safetensors.numpy.load_file(weights)
  tensors["model.layers.0.self_attn.q_norm.weight"] = np.ones(16, np.float32)
  safetensors.numpy.save_file(tensors, weights, metadata={"format": "pt"})
  with pytest.raises(ValueError, match="would ignore.*q_norm"):
    hf.load_checkpoint(tmp_path)
  del tensors["model.layers.0.self_attn.q_norm.weight"]
  del tensors["model.layers.1.mlp.up_proj.weight"]
  safetensors.numpy.save_file(tensors, weights, metadata={"format": "pt"})
  with pytest.raises(ValueError, match="lacks tensors.*layers.1.mlp.up_proj"):
    hf.load_checkpoint(tmp_path)
  tensors["model.layers.1.mlp.up_proj.weight"] = np.ones((95, 64), np.float32)
  safetensors.numpy.save_file(tensors, weights, metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"shape \(64, 95\).*implies \(64, 96\)"):
    hf.load_checkpoint(tmp_path)
  for f in tmp_path.glob("tokenizer*"):
    f.unlink()
  with pytest.raises(ValueError, match="no tokenizer files"):
    hf.load_tokenizer(tmp_path)
  weights.unlink()
  with pytest.raises(ValueError, match="no \\*.safetensors"):
    hf.load_checkpoint(tmp_path)
  with pytest.raises(ValueError, match="no config.json"):
    hf.load_checkpoint(tmp_path / "missing")
