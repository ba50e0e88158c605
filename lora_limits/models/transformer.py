"""A decoder-only transformer in Flax Linen behind a pure functional boundary.

`init(key, cfg) -> params` and `apply(params, cfg, tokens, ...) -> logits`, where `params` is a
plain nested dict whose '/'-joined paths name the kernels, e.g.
`layers/3/attn/q_proj/kernel`. The default is Llama-style (RMSNorm, rotary positions,
SwiGLU, optional grouped-query attention, tied or untied embeddings); the switches in
`ModelConfig` also cover Qwen2 (q/k/v biases) and GPT-2 (LayerNorm, learned positions,
GELU MLP) so real checkpoints load into the same code.

Every projection is a 2-D kernel `[d_in, d_out]` and consults an optional `LoraMix`
(see `lora_limits.lora`): y = x W + b + sum_k w_k s_k (x A_k) B_k, computed without ever
forming the dense update, with mixing weights that are fixed or produced per token and per
layer by a router.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_limits import lora as lora_lib
from lora_limits import validate

Params = dict[str, Any]

_NORMS = ("rms", "layer")
_MLPS = ("swiglu", "gelu")
_ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
_POSITIONS = ("rope", "learned")
_DTYPES = ("float32", "bfloat16", "float16")
_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Sizes and architecture switches. Defaults: a small Llama-style model for the CPU."""

  vocab_size: int = 512
  d_model: int = 128
  n_layers: int = 2
  n_heads: int = 4
  n_kv_heads: int | None = None  # grouped-query attention; None means n_heads
  head_dim: int | None = None  # None means d_model // n_heads
  d_ff: int = 344
  max_len: int = 128  # only bounds learned positions and the rope table
  norm: str = "rms"
  norm_eps: float = 1e-6
  mlp: str = "swiglu"
  activation: str = "silu"
  pos: str = "rope"
  rope_theta: float = 10000.0
  # Hashable form of a Hugging Face `rope_scaling` dict: (("rope_type", "llama3"), ...).
  rope_scaling: tuple[tuple[str, Any], ...] | None = None
  # Mistral-style local attention: query t sees keys s with t - window < s <= t. None: full.
  sliding_window: int | None = None
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  tie_embeddings: bool = True
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  init_std: float = 0.02

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_len"):
      validate.integer(f"ModelConfig.{name}", getattr(self, name), 1)
    for name, allowed in (("norm", _NORMS), ("mlp", _MLPS), ("activation", _ACTIVATIONS),
                          ("pos", _POSITIONS), ("dtype", _DTYPES), ("param_dtype", _DTYPES)):
      validate.choice(f"ModelConfig.{name}", getattr(self, name), allowed)
    if self.n_kv_heads is not None and (
        self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads):
      raise ValueError(
          f"ModelConfig.n_kv_heads={self.n_kv_heads} must be positive and divide "
          f"n_heads={self.n_heads}")
    if self.head_dim is None and self.d_model % self.n_heads:
      raise ValueError(
          f"ModelConfig.d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
          "set head_dim explicitly")
    if self.pos == "rope" and self.resolved_head_dim % 2:
      raise ValueError(f"rotary positions need an even head_dim, got {self.resolved_head_dim}")
    if self.norm_eps <= 0 or self.init_std <= 0 or self.rope_theta <= 0:
      raise ValueError("ModelConfig.norm_eps, init_std and rope_theta must be > 0")
    if self.sliding_window is not None and (
        not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
      raise ValueError(
          f"ModelConfig.sliding_window must be None or a positive int, got {self.sliding_window!r}")
    if self.rope_scaling is not None:
      rope_type = dict(self.rope_scaling).get("rope_type", "default")
      validate.choice("ModelConfig.rope_scaling.rope_type", rope_type, _ROPE_TYPES)

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

  @property
  def resolved_kv_heads(self) -> int:
    return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

  def to_dict(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    if self.rope_scaling is not None:
      out["rope_scaling"] = dict(self.rope_scaling)
    return out

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
    d = dict(d)
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"unknown ModelConfig fields {sorted(unknown)}")
    if isinstance(d.get("rope_scaling"), dict):
      d["rope_scaling"] = tuple(sorted(d["rope_scaling"].items()))
    return cls(**d)


def _dtype(name: str):
  return jnp.dtype(name)


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
  """Inverse frequencies of the rotary embedding, with Hugging Face's rope scaling rules."""
  dim = cfg.resolved_head_dim
  inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  if cfg.rope_scaling is None:
    return inv_freq
  scaling = dict(cfg.rope_scaling)
  rope_type = scaling.get("rope_type", "default")
  if rope_type == "linear":
    return inv_freq / float(scaling["factor"])
  if rope_type == "llama3":
    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_len = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)
  return inv_freq


def apply_rope(x_BxTxHxD: jax.Array, positions_BxT: jax.Array, inv_freq: jax.Array):
  """Rotary embedding in the 'rotate half' convention used by Llama/Qwen2 checkpoints."""
  angles = positions_BxT[..., None].astype(jnp.float32) * inv_freq  # [B,T,D/2]
  cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)[:, :, None, :]
  sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1)[:, :, None, :]
  x = x_BxTxHxD.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return (x * cos + rotated * sin).astype(x_BxTxHxD.dtype)


class Linear(nn.Module):
  """A dense projection `[d_in, d_out]` that consults the LoRA mix for its own path."""

  features: int
  use_bias: bool
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, lora: lora_lib.LoraMix | None, deterministic: bool):
    kernel = self.param(
        "kernel", nn.initializers.normal(self.cfg.init_std), (x.shape[-1], self.features),
        _dtype(self.cfg.param_dtype))
    dtype = _dtype(self.cfg.dtype)
    self.sow("captures", "input", x)  # kept only when `apply(..., capture=...)` asks
    y = jnp.einsum("...d,df->...f", x.astype(dtype), kernel.astype(dtype))
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,),
                        _dtype(self.cfg.param_dtype))
      y = y + bias.astype(dtype)
    if lora is not None:
      path = "/".join(self.path) + "/kernel"
      dropout_key = None
      if not deterministic and lora.dropout > 0 and path in lora.stack:
        dropout_key = self.make_rng("dropout")
      delta, routing = lora.apply_at(path, x, dropout_key=dropout_key)
      if delta is not None:
        y = y + delta.astype(y.dtype)
      if routing is not None:
        self.sow("intermediates", "routing", routing)
    return y


class Norm(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    pdt = _dtype(self.cfg.param_dtype)
    x32 = x.astype(jnp.float32)
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), pdt)
    if self.cfg.norm == "rms":
      y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.norm_eps)
      y = y * scale.astype(jnp.float32)
    else:
      bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],), pdt)
      mean = jnp.mean(x32, axis=-1, keepdims=True)
      var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
      y = (x32 - mean) * jax.lax.rsqrt(var + self.cfg.norm_eps)
      y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(_dtype(self.cfg.dtype))


def _activation(name: str):
  return {
      "silu": jax.nn.silu,
      "gelu": lambda x: jax.nn.gelu(x, approximate=False),
      "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
      "relu": jax.nn.relu,
  }[name]


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, segments_BxT, lora, deterministic):
    cfg = self.cfg
    h, kv, dh = cfg.n_heads, cfg.resolved_kv_heads, cfg.resolved_head_dim
    b, t, _ = x_BxTxD.shape
    q = Linear(h * dh, cfg.qkv_bias, cfg, name="q_proj")(x_BxTxD, lora, deterministic)
    k = Linear(kv * dh, cfg.qkv_bias, cfg, name="k_proj")(x_BxTxD, lora, deterministic)
    v = Linear(kv * dh, cfg.qkv_bias, cfg, name="v_proj")(x_BxTxD, lora, deterministic)
    q = q.reshape(b, t, h, dh)
    k = k.reshape(b, t, kv, dh)
    v = v.reshape(b, t, kv, dh)
    if cfg.pos == "rope":
      inv_freq = rope_inv_freq(cfg)
      q = apply_rope(q, positions_BxT, inv_freq)
      k = apply_rope(k, positions_BxT, inv_freq)
    groups = h // kv
    q = q.reshape(b, t, kv, groups, dh)
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32) / math.sqrt(dh)
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    if cfg.sliding_window is not None:
      causal = causal & ~jnp.tril(causal, -cfg.sliding_window)
    if segments_BxT is not None:
      # Packed rows: a token attends only to earlier tokens of its own sequence.
      same = segments_BxT[:, :, None] == segments_BxT[:, None, :]  # [B, T, S]
      causal = causal[None] & same
      causal = causal[:, None, None]  # [B, 1, 1, T, S] against logits [B, kv, g, T, S]
    logits = jnp.where(causal, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h * dh)
    return Linear(cfg.d_model, cfg.o_bias, cfg, name="o_proj")(out, lora, deterministic)


class Mlp(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, lora, deterministic):
    cfg = self.cfg
    act = _activation(cfg.activation)
    up = Linear(cfg.d_ff, cfg.mlp_bias, cfg, name="up_proj")(x, lora, deterministic)
    if cfg.mlp == "swiglu":
      gate = Linear(cfg.d_ff, cfg.mlp_bias, cfg, name="gate_proj")(x, lora, deterministic)
      hidden = act(gate) * up
    else:
      hidden = act(up)
    return Linear(cfg.d_model, cfg.mlp_bias, cfg, name="down_proj")(hidden, lora, deterministic)


class Block(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, positions, segments, lora, deterministic):
    x = x + Attention(self.cfg, name="attn")(
        Norm(self.cfg, name="attn_norm")(x), positions, segments, lora, deterministic)
    x = x + Mlp(self.cfg, name="mlp")(Norm(self.cfg, name="mlp_norm")(x), lora, deterministic)
    return x


class Layers(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, positions, segments, lora, deterministic):
    for i in range(self.cfg.n_layers):
      x = Block(self.cfg, name=str(i))(x, positions, segments, lora, deterministic)
    return x


class Transformer(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxT, positions_BxT, segments_BxT, lora, deterministic):
    cfg = self.cfg
    embed = nn.Embed(cfg.vocab_size, cfg.d_model,
                     embedding_init=nn.initializers.normal(cfg.init_std),
                     param_dtype=_dtype(cfg.param_dtype), name="embed")
    x = embed(tokens_BxT).astype(_dtype(cfg.dtype))
    if cfg.pos == "learned":
      pos_embed = self.param("pos_embed", nn.initializers.normal(cfg.init_std),
                             (cfg.max_len, cfg.d_model), _dtype(cfg.param_dtype))
      x = x + jnp.take(pos_embed, positions_BxT, axis=0).astype(x.dtype)
    x = Layers(cfg, name="layers")(x, positions_BxT, segments_BxT, lora, deterministic)
    hidden = Norm(cfg, name="final_norm")(x)
    if cfg.tie_embeddings:
      logits = embed.attend(hidden.astype(_dtype(cfg.param_dtype)))
    else:
      logits = Linear(cfg.vocab_size, False, cfg, name="lm_head")(hidden, None, deterministic)
    return logits.astype(jnp.float32), hidden


def init(key: jax.Array, cfg: ModelConfig) -> Params:
  """Random parameters as a plain nested dict (no Flax collections wrapper)."""
  tokens = jnp.zeros((1, 2), jnp.int32)
  variables = Transformer(cfg).init(key, tokens, jnp.zeros((1, 2), jnp.int32), None, None,
                                    True)
  return dict(variables["params"])


def apply(params: Params, cfg: ModelConfig, tokens_BxT: jax.Array, *,
          lora: lora_lib.LoraMix | None = None,
          positions_BxT: jax.Array | None = None,
          segment_ids_BxT: jax.Array | None = None,
          dropout_key: jax.Array | None = None,
          return_aux: bool = False,
          capture: Sequence[str] = ()):
  """Logits `[B, T, vocab]` (float32) for `tokens_BxT`.

  lora: adapters to run unmerged (one adapter for training, a stack of K with mixing
    weights or a router for recycling); None runs the base (or merged) params.
  positions_BxT: position of each token within its sequence (None: 0..T-1).
  segment_ids_BxT: packed rows (`data.pack`): a token attends only to earlier tokens with the
    same segment id, so each packed sequence gets exactly the logits it has alone.
  dropout_key: enables LoRA dropout (training); None means deterministic.
  return_aux: also return {'hidden': final normed states [B,T,D], 'routing': {path: w}}.
  capture: kernel paths whose inputs to return: with it, aux (returned as with return_aux)
    also holds 'captured': {path: the kernel's input x [B, T, d_in]}; the logits are the same.
  """
  if tokens_BxT.ndim != 2:
    raise ValueError(f"tokens must be [batch, time], got shape {tokens_BxT.shape}")
  if lora is not None and lora.stack:
    # Factors at paths this model lacks would be silently ignored (an adapter of a deeper
    # model), and misshapen ones fail deep inside an einsum: name the path instead.
    lora_lib.check_compatible(params, lora.stack)
  if positions_BxT is None:
    positions_BxT = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]), tokens_BxT.shape)
  rngs = {"dropout": dropout_key} if dropout_key is not None else {}
  deterministic = dropout_key is None
  model = Transformer(cfg)
  capture = tuple(capture)
  if capture:
    kernels = _flatten(params)
    for path in capture:
      if getattr(kernels.get(path), "ndim", 0) != 2:
        raise ValueError(f"capture: no kernel at path {path!r} (capture names 2-D kernels)")
  if not return_aux and not capture:
    logits, _ = model.apply({"params": params}, tokens_BxT, positions_BxT, segment_ids_BxT,
                            lora, deterministic, rngs=rngs)
    return logits
  (logits, hidden), state = model.apply(
      {"params": params}, tokens_BxT, positions_BxT, segment_ids_BxT, lora, deterministic,
      rngs=rngs, mutable=["intermediates"] + (["captures"] if capture else []))
  routing = {}
  for path, value in _flatten(state.get("intermediates", {})).items():
    # sow stores a tuple under '<module path>/routing'; report it by the kernel's path.
    routing[path.removesuffix("/routing") + "/kernel"] = value[0]
  aux = {"hidden": hidden, "routing": routing}
  if capture:
    inputs = _flatten(state.get("captures", {}))
    aux["captured"] = {p: inputs[p.removesuffix("/kernel") + "/input"][0] for p in capture}
  return logits, aux


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    key = f"{prefix}/{k}" if prefix else str(k)
    if isinstance(v, dict) or hasattr(v, "items") and not isinstance(v, tuple):
      out.update(_flatten(dict(v), key))
    else:
      out[key] = v
  return out


def num_params(params: Params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
