"""Hugging Face checkpoints in and out of our JAX model.

`load_checkpoint(dir)` reads a local transformers directory (`config.json`, `*.safetensors`
single or sharded with an index, tokenizer files) into `(ModelConfig, params, tokenizer)`;
`export_checkpoint` writes our params back as a directory `AutoModelForCausalLM` loads.
Supported: Llama (grouped-query attention, 'linear'/'llama3' rope scaling, tied or untied
embeddings, attention/MLP biases), Qwen2 (q/k/v biases), Mistral (sliding window), GPT-2
(learned positions, LayerNorm, tanh-GELU, fused Conv1D `c_attn`). Anything else that would
change the numerics (another `model_type`, rope 'dynamic'/'yarn'/'longrope', partial
rotary, per-layer sliding windows, GPT-2's inverse-layer attention scaling, ...) is refused
with a ValueError naming the field, never loaded approximately.

Layouts: torch `nn.Linear` stores [out, in] and we store [in, out], so Llama-family kernels
are transposed; GPT-2's Conv1D already stores [in, out], and its `c_attn` [d, 3d] holds
q | k | v side by side, split on load and concatenated on export.

transformers is used for configs and tokenizers only; weights go through safetensors.
"""

from __future__ import annotations

import functools
import json
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import transformers
from safetensors.numpy import save_file

from lora_limits import sharding as shard_lib
from lora_limits import tree as tree_lib
from lora_limits.interop import safetensors_io
from lora_limits.models import transformer

ARCHS = ("llama", "qwen2", "mistral", "gpt2")
_CAUSAL_LM_CLASSES = {
    "llama": ("LlamaForCausalLM",),
    "qwen2": ("Qwen2ForCausalLM",),
    "mistral": ("MistralForCausalLM",),
    "gpt2": ("GPT2LMHeadModel",),
}
_CONFIG_CLASSES = {
    "llama": transformers.LlamaConfig,
    "qwen2": transformers.Qwen2Config,
    "mistral": transformers.MistralConfig,
    "gpt2": transformers.GPT2Config,
}
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
_ACTIVATION_OUT = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}
_ROPE_KEYS = {"default": (), "linear": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                         "original_max_position_embeddings")}
_GENERIC_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")

# Our module path (under layers/<i>/) -> the Hugging Face module name (under the layer).
LLAMA_MODULES = {
    "attn/q_proj": "self_attn.q_proj", "attn/k_proj": "self_attn.k_proj",
    "attn/v_proj": "self_attn.v_proj", "attn/o_proj": "self_attn.o_proj",
    "mlp/gate_proj": "mlp.gate_proj", "mlp/up_proj": "mlp.up_proj",
    "mlp/down_proj": "mlp.down_proj",
}
# GPT-2's q, k and v are one fused module, attn.c_attn (parts in this order).
GPT2_MODULES = {
    "attn/q_proj": "attn.c_attn", "attn/k_proj": "attn.c_attn", "attn/v_proj": "attn.c_attn",
    "attn/o_proj": "attn.c_proj", "mlp/up_proj": "mlp.c_fc", "mlp/down_proj": "mlp.c_proj",
}
GPT2_QKV = ("attn/q_proj", "attn/k_proj", "attn/v_proj")
# Prefix of the decoder layers inside the *ForCausalLM / LMHeadModel module tree.
LAYER_PREFIX = {"llama": "model.layers", "qwen2": "model.layers", "mistral": "model.layers",
                "gpt2": "transformer.h"}
# Checkpoint keys that carry no parameter of ours (buffers written by old versions).
_IGNORED_KEYS = re.compile(r"(\.attn\.bias|\.attn\.masked_bias|\.rotary_emb\.inv_freq)$")


def _check_arch(arch: str) -> str:
  if arch not in ARCHS:
    raise ValueError(f"architecture {arch!r} is not supported; supported: {list(ARCHS)}")
  return arch


def _refuse(arch: str, field: str, value: Any, allowed: str):
  raise ValueError(f"{arch} config field {field}={value!r} is not supported ({allowed})")


def _activation(arch: str, name: Any) -> str:
  if name not in _ACTIVATIONS:
    _refuse(arch, "activation", name, f"supported: {sorted(_ACTIVATIONS)}")
  return _ACTIVATIONS[name]


def _rope(arch: str, hf: Any) -> tuple[float, tuple[tuple[str, Any], ...] | None]:
  """(rope_theta, our hashable rope_scaling) from a v5 config's `rope_parameters`."""
  rp = dict(getattr(hf, "rope_parameters", None) or {})
  if rp and all(isinstance(v, Mapping) for v in rp.values()):
    _refuse(arch, "rope_parameters", rp, "per-layer-type rope parameters")
  rope_type = rp.get("rope_type", rp.get("type", "default"))
  if rope_type not in _ROPE_KEYS:
    _refuse(arch, "rope_parameters.rope_type", rope_type, f"supported: {sorted(_ROPE_KEYS)}")
  partial = rp.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", None))
  if partial not in (None, 1, 1.0):
    _refuse(arch, "partial_rotary_factor", partial, "only full rotary embeddings")
  theta = float(rp.get("rope_theta", getattr(hf, "rope_theta", 10000.0)))
  if rope_type == "default":
    return theta, None
  missing = [k for k in _ROPE_KEYS[rope_type] if rp.get(k) is None]
  if missing:
    raise ValueError(f"{arch} rope_parameters of type {rope_type!r} lack {missing}")
  scaling = {k: rp[k] for k in _ROPE_KEYS[rope_type]}
  scaling["rope_type"] = rope_type
  return theta, tuple(sorted(scaling.items()))


def config_from_hf(hf: Any, dtype: str = "float32") -> tuple[transformer.ModelConfig, str]:
  """(our ModelConfig, arch) from a transformers config object or a config.json dict."""
  if isinstance(hf, Mapping):
    d = dict(hf)
    model_type = d.pop("model_type", None)
    _check_arch(model_type)
    hf = transformers.AutoConfig.for_model(model_type, **d)
  arch = _check_arch(getattr(hf, "model_type", None))
  architectures = getattr(hf, "architectures", None) or []
  unsupported = [a for a in architectures if a not in _CAUSAL_LM_CLASSES[arch]]
  if unsupported:
    _refuse(arch, "architectures", architectures,
            f"only {list(_CAUSAL_LM_CLASSES[arch])} (a causal language model head)")
  common = dict(vocab_size=hf.vocab_size, dtype=dtype, param_dtype=dtype,
                tie_embeddings=bool(hf.tie_word_embeddings),
                init_std=float(hf.initializer_range) or 0.02)
  if arch == "gpt2":
    if not hf.scale_attn_weights:
      _refuse(arch, "scale_attn_weights", False, "attention is always scaled by 1/sqrt(head_dim)")
    if hf.scale_attn_by_inverse_layer_idx:
      _refuse(arch, "scale_attn_by_inverse_layer_idx", True, "no per-layer attention scaling")
    if getattr(hf, "add_cross_attention", False):
      _refuse(arch, "add_cross_attention", True, "decoder-only models")
    return transformer.ModelConfig(
        d_model=hf.n_embd, n_layers=hf.n_layer, n_heads=hf.n_head,
        d_ff=hf.n_inner or 4 * hf.n_embd, max_len=hf.n_positions, norm="layer",
        norm_eps=float(hf.layer_norm_epsilon), mlp="gelu",
        activation=_activation(arch, hf.activation_function), pos="learned",
        qkv_bias=True, o_bias=True, mlp_bias=True, **common), arch
  theta, scaling = _rope(arch, hf)
  if arch == "llama":
    if int(getattr(hf, "pretraining_tp", 1) or 1) != 1:
      _refuse(arch, "pretraining_tp", hf.pretraining_tp, "only 1")
    qkv_bias = o_bias = bool(hf.attention_bias)
    mlp_bias = bool(hf.mlp_bias)
    window = None
  else:
    qkv_bias, o_bias, mlp_bias = arch == "qwen2", False, False
    window = _sliding_window(arch, hf)
  # Canonical form: None where the value is the default one (so round trips compare equal).
  heads, kv_heads = hf.num_attention_heads, hf.num_key_value_heads or hf.num_attention_heads
  head_dim = getattr(hf, "head_dim", None)
  return transformer.ModelConfig(
      d_model=hf.hidden_size, n_layers=hf.num_hidden_layers, n_heads=heads,
      n_kv_heads=None if kv_heads == heads else kv_heads,
      head_dim=None if head_dim in (None, hf.hidden_size // heads) else head_dim,
      d_ff=hf.intermediate_size, max_len=hf.max_position_embeddings, norm="rms",
      norm_eps=float(hf.rms_norm_eps), mlp="swiglu",
      activation=_activation(arch, hf.hidden_act), pos="rope", rope_theta=theta,
      rope_scaling=scaling, sliding_window=window, qkv_bias=qkv_bias, o_bias=o_bias,
      mlp_bias=mlp_bias, **common), arch


def _sliding_window(arch: str, hf: Any) -> int | None:
  if arch == "mistral":
    return hf.sliding_window
  # Qwen2: a window applies only to the layers `layer_types` marks as sliding.
  kinds = set(getattr(hf, "layer_types", None) or ["full_attention"])
  if kinds == {"full_attention"}:
    return None
  if kinds == {"sliding_attention"} and hf.sliding_window:
    return hf.sliding_window
  _refuse(arch, "layer_types", hf.layer_types,
          "all layers must use the same attention (full, or sliding with one window)")


def infer_arch(cfg: transformer.ModelConfig) -> str:
  """The Hugging Face architecture whose layout matches `cfg`'s switches."""
  if cfg.pos == "learned" or cfg.norm == "layer":
    return "gpt2"
  if cfg.qkv_bias and not cfg.o_bias:
    return "qwen2"
  if cfg.sliding_window is not None:
    return "mistral"
  return "llama"


def hf_config(cfg: transformer.ModelConfig, arch: str | None = None,
              **overrides: Any) -> transformers.PreTrainedConfig:
  """The transformers config of `arch` equivalent to `cfg` (inverse of `config_from_hf`).

  overrides: further fields (bos/eos/pad token ids, ...). Raises ValueError if `cfg` has a
  switch `arch` cannot express.
  """
  arch = _check_arch(arch or infer_arch(cfg))

  def need(field: str, ok: bool, what: str):
    if not ok:
      raise ValueError(
          f"ModelConfig.{field}={getattr(cfg, field)!r} cannot be exported as {arch} ({what})")

  fields: dict[str, Any] = dict(vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings,
                                initializer_range=cfg.init_std)
  if arch == "gpt2":
    need("norm", cfg.norm == "layer", "GPT-2 uses LayerNorm")
    need("pos", cfg.pos == "learned", "GPT-2 uses learned positions")
    need("mlp", cfg.mlp == "gelu", "GPT-2 has a plain MLP")
    need("n_kv_heads", cfg.resolved_kv_heads == cfg.n_heads, "no grouped-query attention")
    need("head_dim", cfg.resolved_head_dim * cfg.n_heads == cfg.d_model,
         "head_dim * n_heads must equal d_model")
    need("qkv_bias", cfg.qkv_bias and cfg.o_bias and cfg.mlp_bias, "GPT-2 has all biases")
    need("sliding_window", cfg.sliding_window is None, "full attention only")
    fields.update(n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads,
                  n_inner=cfg.d_ff, n_positions=cfg.max_len, layer_norm_epsilon=cfg.norm_eps,
                  activation_function=_ACTIVATION_OUT[cfg.activation])
  else:
    need("norm", cfg.norm == "rms", f"{arch} uses RMSNorm")
    need("pos", cfg.pos == "rope", f"{arch} uses rotary positions")
    need("mlp", cfg.mlp == "swiglu", f"{arch} has a gated MLP")
    if arch == "llama":
      need("qkv_bias", cfg.qkv_bias == cfg.o_bias, "one attention_bias covers q, k, v and o")
      need("sliding_window", cfg.sliding_window is None, "Llama has full attention")
      fields.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    elif arch == "qwen2":
      need("qkv_bias", cfg.qkv_bias and not cfg.o_bias and not cfg.mlp_bias,
           "Qwen2 has q/k/v biases only")
      if cfg.sliding_window is not None:
        fields.update(use_sliding_window=True, sliding_window=cfg.sliding_window,
                      max_window_layers=0)
    else:
      need("qkv_bias", not (cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias), "Mistral has no biases")
      fields.update(sliding_window=cfg.sliding_window)
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
      rope.update(dict(cfg.rope_scaling))
    fields.update(hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
                  num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.resolved_kv_heads,
                  head_dim=cfg.resolved_head_dim, intermediate_size=cfg.d_ff,
                  max_position_embeddings=cfg.max_len, rms_norm_eps=cfg.norm_eps,
                  hidden_act=_ACTIVATION_OUT[cfg.activation], rope_parameters=rope)
  fields.update(overrides)
  config = _CONFIG_CLASSES[arch](**fields)
  config.architectures = list(_CAUSAL_LM_CLASSES[arch])
  config.dtype = cfg.param_dtype
  return config


def param_sources(cfg: transformer.ModelConfig, arch: str) -> dict[str, safetensors_io.Source]:
  """{our parameter path: where it lives in a transformers checkpoint of `arch`}."""
  _check_arch(arch)
  S = safetensors_io.Source
  out: dict[str, safetensors_io.Source] = {}
  if arch == "gpt2":
    d = cfg.d_model
    out["embed/embedding"] = S("transformer.wte.weight")
    out["pos_embed"] = S("transformer.wpe.weight")
    for i in range(cfg.n_layers):
      h, o = f"transformer.h.{i}.", f"layers/{i}/"
      for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
        out[o + ours + "/scale"] = S(h + theirs + ".weight")
        out[o + ours + "/bias"] = S(h + theirs + ".bias")
      for part, name in enumerate(GPT2_QKV):
        for leaf, suffix in (("kernel", "weight"), ("bias", "bias")):
          out[f"{o}{name}/{leaf}"] = S(f"{h}attn.c_attn.{suffix}", offset=part * d, fused=3)
      for ours in ("attn/o_proj", "mlp/up_proj", "mlp/down_proj"):
        out[f"{o}{ours}/kernel"] = S(f"{h}{GPT2_MODULES[ours]}.weight")
        out[f"{o}{ours}/bias"] = S(f"{h}{GPT2_MODULES[ours]}.bias")
    out["final_norm/scale"] = S("transformer.ln_f.weight")
    out["final_norm/bias"] = S("transformer.ln_f.bias")
  else:
    out["embed/embedding"] = S("model.embed_tokens.weight")
    for i in range(cfg.n_layers):
      h, o = f"model.layers.{i}.", f"layers/{i}/"
      out[o + "attn_norm/scale"] = S(h + "input_layernorm.weight")
      out[o + "mlp_norm/scale"] = S(h + "post_attention_layernorm.weight")
      for ours, theirs in LLAMA_MODULES.items():
        out[f"{o}{ours}/kernel"] = S(f"{h}{theirs}.weight", transpose=True)
        has_bias = (cfg.mlp_bias if ours.startswith("mlp") else
                    cfg.o_bias if ours == "attn/o_proj" else cfg.qkv_bias)
        if has_bias:
          out[f"{o}{ours}/bias"] = S(f"{h}{theirs}.bias")
    out["final_norm/scale"] = S("model.norm.weight")
  if not cfg.tie_embeddings:
    out["lm_head/kernel"] = S("lm_head.weight", transpose=True)
  return out


def abstract_params(cfg: transformer.ModelConfig) -> dict[str, jax.ShapeDtypeStruct]:
  """{path: ShapeDtypeStruct} of `transformer.init(·, cfg)`, without allocating."""
  tree = jax.eval_shape(functools.partial(transformer.init, cfg=cfg), jax.random.key(0))
  return tree_lib.flatten(tree)


def _resolve_keys(sources: dict[str, safetensors_io.Source], keys: set[str]) -> dict[str, safetensors_io.Source]:
  """Accept checkpoints saved from the bare model (`layers.0...` without `model.`)."""
  out = {}
  for path, src in sources.items():
    if src.key not in keys:
      bare = src.key.split(".", 1)[1]
      if bare in keys and src.key.startswith(("model.", "transformer.")):
        src = safetensors_io.Source(bare, src.transpose, src.offset, src.fused)
    out[path] = src
  return out


def read_config(path: str | pathlib.Path) -> tuple[dict[str, Any], transformers.PreTrainedConfig]:
  """(raw config.json, the transformers config it loads as) of a checkpoint directory."""
  path = pathlib.Path(path)
  config_file = path / "config.json"
  if not config_file.exists():
    raise ValueError(f"checkpoint directory {str(path)!r} has no config.json")
  raw = safetensors_io.read_json(config_file)
  if not isinstance(raw, dict):
    raise ValueError(f"{str(config_file)!r} must hold a JSON object, got {type(raw).__name__}")
  _check_arch(raw.get("model_type"))
  try:
    return raw, transformers.AutoConfig.from_pretrained(str(path))
  except Exception as e:  # transformers validates fields with its own (non-ValueError) errors
    raise ValueError(f"{str(config_file)!r} does not load as a {raw['model_type']} config "
                     f"({type(e).__name__}: {str(e)[:300]})") from e


def load_tokenizer(path: str | pathlib.Path):
  """The checkpoint's tokenizer (`AutoTokenizer`, local files only); chat template included."""
  path = pathlib.Path(path)
  if not any((path / f).exists() for f in _TOKENIZER_FILES):
    raise ValueError(
        f"checkpoint directory {str(path)!r} has no tokenizer files (looked for "
        f"{list(_TOKENIZER_FILES)}); pass tokenizer=False to load the weights only")
  # transformers v5's AutoTokenizer swaps a generic saved class ('TokenizersBackend') for the
  # model type's own tokenizer class, which can rebuild the pre-tokenizer; load what was saved.
  config_file = path / "tokenizer_config.json"
  saved_class = safetensors_io.read_json(config_file).get("tokenizer_class") if (
      config_file.exists()) else None
  if (path / "tokenizer.json").exists():
    safetensors_io.read_json(path / "tokenizer.json")  # a damaged file is named, not a bare parse error
  try:
    if saved_class in _GENERIC_TOKENIZERS and (path / "tokenizer.json").exists():
      return transformers.PreTrainedTokenizerFast.from_pretrained(str(path),
                                                                  local_files_only=True)
    return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
  except (OSError, ValueError, TypeError, KeyError) as e:
    raise ValueError(f"the tokenizer files in {str(path)!r} cannot be loaded "
                     f"({type(e).__name__}: {str(e)[:300]})") from e


def load_checkpoint(path: str | pathlib.Path, dtype: str = "float32",
                    mesh: jax.sharding.Mesh | None = None, *,
                    rules: shard_lib.Rules | None = None, tokenizer: bool = True):
  """(ModelConfig, params, tokenizer or None) from a local transformers directory.

  dtype: weights and compute ('float32' default, 'bfloat16' for large models).
  mesh: place parameters by `rules` (default `lora_limits.sharding.fsdp_rules()`); every device
    reads only its own block of each tensor. None: whole tensors on the default device.
  Raises ValueError for an unsupported architecture or field, a missing or misshapen
  tensor, or checkpoint tensors the model would not use.
  """
  path = pathlib.Path(path)
  _, hf = read_config(path)
  cfg, arch = config_from_hf(hf, dtype)
  abstract = abstract_params(cfg)
  with safetensors_io.SafetensorsCheckpoint(path) as ckpt:
    keys = set(ckpt.keys())
    sources = _resolve_keys(param_sources(cfg, arch), keys)
    missing = sorted({s.key for s in sources.values()} - keys)
    if missing:
      raise ValueError(f"{arch} checkpoint at {str(path)!r} lacks tensors {missing[:5]}")
    used = {s.key for s in sources.values()}
    extra = sorted(k for k in keys - used if not _IGNORED_KEYS.search(k)
                   and not (cfg.tie_embeddings and k == "lm_head.weight"))
    if extra:
      raise ValueError(
          f"{arch} checkpoint at {str(path)!r} has tensors our model would ignore: {extra[:5]} "
          "(an unsupported variant of the architecture?)")
    shardings = None
    if mesh is not None:
      shardings = tree_lib.flatten(
          shard_lib.param_shardings(tree_lib.unflatten(abstract), mesh, rules))
    flat = safetensors_io.load_params(ckpt, sources, abstract, shardings)
  params = tree_lib.unflatten(flat)
  return cfg, params, (load_tokenizer(path) if tokenizer else None)


def export_tensors(params: Mapping[str, Any], cfg: transformer.ModelConfig,
                   arch: str) -> dict[str, np.ndarray]:
  """{checkpoint key: numpy array} of `params` in `arch`'s layout (q/k/v fused for GPT-2)."""
  flat = tree_lib.flatten(params)
  sources = param_sources(cfg, arch)
  if set(sources) != set(flat):
    diff = sorted(set(sources) ^ set(flat))
    raise ValueError(f"params do not match the config's layout; they differ at {diff[:5]}")
  parts: dict[str, list[tuple[int, np.ndarray]]] = {}
  for path, src in sources.items():
    x = np.asarray(jax.device_get(flat[path]))
    parts.setdefault(src.key, []).append((src.offset, x.T if src.transpose else x))
  out = {}
  for key, pieces in parts.items():
    pieces.sort(key=lambda p: p[0])
    arrays = [p[1] for p in pieces]
    out[key] = np.ascontiguousarray(
        arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=-1))
  return out


def export_checkpoint(params: Mapping[str, Any], cfg: transformer.ModelConfig,
                      path: str | pathlib.Path, *, arch: str | None = None, tokenizer=None,
                      max_shard_bytes: int | None = None, **config_overrides: Any) -> str:
  """Write `params` as a transformers checkpoint directory; returns the arch written.

  arch: defaults to `infer_arch(cfg)`. tokenizer: saved alongside if given (its bos/eos/pad
  ids go into the config unless overridden). max_shard_bytes: split the weights into
  `model-0000k-of-0000n.safetensors` files of at most this many bytes (plus the index).
  config_overrides: extra transformers config fields.
  """
  arch = _check_arch(arch or infer_arch(cfg))
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  if tokenizer is not None:
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
      value = getattr(tokenizer, name, None)
      if value is not None:
        config_overrides.setdefault(name, value)
  config = hf_config(cfg, arch, **config_overrides)
  tensors = export_tensors(params, cfg, arch)
  if max_shard_bytes is not None and max_shard_bytes <= 0:
    raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
  for old in list(path.glob("model*.safetensors")) + list(path.glob("model.safetensors.index.json")):
    old.unlink()
  total = sum(t.nbytes for t in tensors.values())
  if max_shard_bytes is None or total <= max_shard_bytes:
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
  else:
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key in sorted(tensors):
      if shards[-1] and size + tensors[key].nbytes > max_shard_bytes:
        shards.append({})
        size = 0
      shards[-1][key] = tensors[key]
      size += tensors[key].nbytes
    weight_map = {}
    n = len(shards)
    for k, piece in enumerate(shards, start=1):
      name = f"model-{k:05d}-of-{n:05d}.safetensors"
      save_file(piece, str(path / name), metadata={"format": "pt"})
      weight_map.update({key: name for key in piece})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
  config.save_pretrained(str(path))
  if tokenizer is not None:
    tokenizer.save_pretrained(str(path))
  return arch


def module_name(path: str, arch: str) -> tuple[str, int]:
  """(Hugging Face module name in the *ForCausalLM tree, part) of one of our kernel paths.

  part is the index among a fused module's parts (GPT-2 c_attn: q 0, k 1, v 2), else 0.
  """
  m = re.fullmatch(r"layers/(\d+)/(attn/\w+|mlp/\w+)/kernel", path)
  table = GPT2_MODULES if arch == "gpt2" else LLAMA_MODULES
  if not m or m.group(2) not in table:
    raise ValueError(
        f"parameter {path!r} has no {arch} module counterpart (adaptable: "
        f"layers/<i>/{{{', '.join(sorted(table))}}}/kernel)")
  part = GPT2_QKV.index(m.group(2)) if m.group(2) in GPT2_QKV and arch == "gpt2" else 0
  return f"{LAYER_PREFIX[arch]}.{m.group(1)}.{table[m.group(2)]}", part


def kernel_paths(module: str) -> tuple[str, list[str]]:
  """(arch family, our kernel path(s)) of a Hugging Face module name (inverse of module_name).

  A GPT-2 `attn.c_attn` gives the three paths q, k, v in their fused order.
  """
  m = re.fullmatch(r"(?:model\.)?layers\.(\d+)\.(\w+\.\w+)", module)
  if m:
    inverse = {v: k for k, v in LLAMA_MODULES.items()}
    if m.group(2) in inverse:
      return "llama", [f"layers/{m.group(1)}/{inverse[m.group(2)]}/kernel"]
  m = re.fullmatch(r"(?:transformer\.)?h\.(\d+)\.(\w+\.\w+)", module)
  if m:
    i, name = m.group(1), m.group(2)
    if name == "attn.c_attn":
      return "gpt2", [f"layers/{i}/{p}/kernel" for p in GPT2_QKV]
    inverse = {v: k for k, v in GPT2_MODULES.items() if k not in GPT2_QKV}
    if name in inverse:
      return "gpt2", [f"layers/{i}/{inverse[name]}/kernel"]
  raise ValueError(
      f"module {module!r} is not an adaptable linear layer of a supported architecture "
      f"(Llama/Qwen2/Mistral: {LAYER_PREFIX['llama']}.<i>.{{{', '.join(LLAMA_MODULES.values())}}}; "
      f"GPT-2: {LAYER_PREFIX['gpt2']}.<i>.{{attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj}})")
