"""Routers: per-token (Arrow, GenKnowSub + Arrow), per-query (oracle, similarity) choices
among K adapters.

Every router here returns a `lora.LoraMix` that the model's forward consults, so adapters run
*unmerged* (y = x W + Σ_k w_k s (x A_k) B_k) with weights that are fixed per query ([B, K])
or computed per token and per layer by a static router (`ArrowRouter`); the routing weights
come back in `transformer.apply(..., return_aux=True)[1]['routing']`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_limits import lora as lora_lib
from lora_limits.models import transformer
from lora_limits.recycle import merge as merge_lib

# ---------------------------------------------------------------------------------------------
# Arrow (Ostapenko et al. 2024, "Towards Modular LLMs by Building and Reusing a Library of
# LoRAs").


def arrow_prototypes(adapters: Sequence[Mapping[str, lora_lib.LoraFactors]]
                     ) -> dict[str, jax.Array]:
  """{path: v [K, d_in]}: per adapter, the top singular direction of ΔW_k on the input side.

  Arrow's prototype is the top *right* singular vector of torch's W [out, in], i.e. the input
  direction the update amplifies most. Our kernels are [d_in, d_out] and act as x @ W, so the
  same vector is the top *left* singular vector of our ΔW_k = s A_k B_k. It is computed from
  the factors: B_k^T = Q R (QR, [d_out, r]), then ΔW_k = s (A_k R^T) Q^T and the wanted vector
  is the top left singular vector of the small [d_in, r] matrix A_k R^T — never a d_in × d_out
  matrix. Its sign is arbitrary; Arrow's logits take |⟨v, x⟩|.
  """
  paths = merge_lib.check_adapters(adapters)
  return {p: jnp.stack([_top_input_direction(ad[p].a, ad[p].b) for ad in adapters])
          for p in paths}


@jax.jit
def _top_input_direction(a_IxR: jax.Array, b_RxO: jax.Array) -> jax.Array:
  """Top left singular vector of a @ b via QR of b^T and a thin SVD of the [d_in, r] a R^T
  (the positive scale does not change it)."""
  _, r = jnp.linalg.qr(b_RxO.T)
  u, _, _ = jnp.linalg.svd(a_IxR @ r.T, full_matrices=False)
  return u[:, 0]


def top_k_softmax(logits_NxK: jax.Array, top_k: int) -> jax.Array:
  """Softmax over the `top_k` largest logits of each row; the others get weight 0 (ties go to
  the lower index, as `lax.top_k`)."""
  num = logits_NxK.shape[-1]
  if top_k >= num:
    return jax.nn.softmax(logits_NxK, axis=-1)
  vals, idx = jax.lax.top_k(logits_NxK, top_k)
  probs = jax.nn.softmax(vals, axis=-1)
  return jnp.einsum("...j,...jk->...k", probs, jax.nn.one_hot(idx, num, dtype=probs.dtype))


def arrow_weights(x_BxTxD: jax.Array, prototypes_KxD: jax.Array, *, top_k: int,
                  temperature: float = 1.0, normalize_tokens: bool = False) -> jax.Array:
  """w [B, T, K]: logits |⟨v_k, x_t⟩| / T (x_t optionally unit-normalised), top-k, softmax."""
  x = x_BxTxD.astype(jnp.float32)
  if normalize_tokens:
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  logits = jnp.abs(jnp.einsum("...d,kd->...k", x, prototypes_KxD.astype(jnp.float32)))
  return top_k_softmax(logits / temperature, top_k)


@dataclasses.dataclass(frozen=True)
class ArrowRouter:
  """The per-layer Arrow router (hashable, static); router_state[path] = prototypes [K, d_in]."""

  top_k: int
  temperature: float = 1.0
  normalize_tokens: bool = False

  def __call__(self, path: str, x_BxTxD: jax.Array, factors: lora_lib.LoraFactors,
               prototypes_KxD: jax.Array) -> jax.Array:
    del path, factors
    w = arrow_weights(x_BxTxD, prototypes_KxD, top_k=self.top_k, temperature=self.temperature,
                      normalize_tokens=self.normalize_tokens)
    return w.astype(x_BxTxD.dtype)


def arrow_router(adapters: Sequence[Mapping[str, lora_lib.LoraFactors]], top_k: int | None = None,
                 temperature: float = 1.0, normalize_tokens: bool = False,
                 mode: str = "outputs") -> lora_lib.LoraMix:
  """A LoraMix routed by Arrow: per token and per adapted layer, the top-k adapters by
  |⟨v_k, x⟩| / temperature, softmax-weighted.

  top_k: adapters kept per token (None: all K). mode='outputs' mixes the adapters' outputs
  (Ostapenko et al.); mode='factors' mixes the factors per token, s (x Σ w A)(Σ w B) (the
  mttl implementation's variant, with cross terms).
  """
  k = len(adapters)
  top_k = k if top_k is None else top_k
  if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= k:
    raise ValueError(f"top_k={top_k!r} must be an int in [1, K={k}]")
  if not temperature > 0:
    raise ValueError(f"temperature={temperature!r} must be > 0")
  protos = arrow_prototypes(adapters)
  return lora_lib.LoraMix(stack=lora_lib.stack(adapters), router_state=protos,
                          router=ArrowRouter(top_k, float(temperature), bool(normalize_tokens)),
                          mode=mode)


# ---------------------------------------------------------------------------------------------
# GenKnowSub (Bagherifard et al. 2025, "GenKnowSub: Improving Modularity and Reusability of
# LLMs through General Knowledge Subtraction"; PEFT's `ArrowConfig(use_gks=True)`).

GKS_MODES = ("factors", "delta")


def genknowsub(task_adapters: Sequence[Mapping[str, lora_lib.LoraFactors]],
               general_adapters: Sequence[Mapping[str, lora_lib.LoraFactors]],
               mode: str = "factors") -> list[lora_lib.Adapter]:
  """The task adapters with the mean of the general adapters subtracted ("forgetting via
  negation" of general knowledge, before Arrow routes between them).

  mode='factors' — PEFT's `gen_know_sub`: A_t − mean_g A_g and B_t − mean_g B_g, each factor
  separately, keeping each task adapter's scale (the general adapters' scales are not used;
  every adapter must have the same rank at each path). mode='delta' — the subtraction on the
  updates, ΔW_t − mean_g ΔW_g exactly, as factors of rank r_t + Σ_g r_g (scale 1; any ranks).
  """
  if mode not in GKS_MODES:
    raise ValueError(f"mode={mode!r} is not one of {list(GKS_MODES)}")
  if isinstance(general_adapters, Mapping) or not general_adapters:
    raise ValueError("general_adapters must be a non-empty list of adapters")
  everything = list(task_adapters) + list(general_adapters)
  paths = merge_lib.check_adapters(everything, same_rank=mode == "factors")
  n_gen = len(general_adapters)
  out = []
  for ad in task_adapters:
    new = {}
    for p in paths:
      f, gens = ad[p], [g[p] for g in general_adapters]
      if mode == "factors":
        mean_a = sum(g.a for g in gens) / n_gen
        mean_b = sum(g.b for g in gens) / n_gen
        new[p] = lora_lib.LoraFactors(f.a - mean_a, f.b - mean_b, f.scale)
      else:
        a = jnp.concatenate([f.scale * f.a] + [(-g.scale / n_gen) * g.a for g in gens], axis=-1)
        b = jnp.concatenate([f.b] + [g.b for g in gens], axis=0)
        new[p] = lora_lib.LoraFactors(a, b, 1.0)
    out.append(new)
  return out


def genknowsub_router(task_adapters: Sequence[Mapping[str, lora_lib.LoraFactors]],
                      general_adapters: Sequence[Mapping[str, lora_lib.LoraFactors]],
                      top_k: int | None = None, temperature: float = 1.0,
                      mode: str = "factors") -> lora_lib.LoraMix:
  """Arrow (`arrow_router`) over the GenKnowSub-purified task adapters (`genknowsub`): the
  prototypes and the routed updates both come from the purified adapters, as in PEFT."""
  return arrow_router(genknowsub(task_adapters, general_adapters, mode), top_k=top_k,
                      temperature=temperature)


# ---------------------------------------------------------------------------------------------
# Oracle selection.


def oracle_weights(gold, num_adapters: int, *, normalize: bool = False) -> jax.Array:
  """[B, K] weights from gold adapter indices: [B] (one-hot) or [B, G] (multi-hot; −1 pads).

  normalize: divide each row by its number of gold adapters (an average instead of a sum).
  The oracle is an upper bound for any selector: it knows which adapter holds the answer.
  """
  g = np.asarray(gold)
  if g.ndim == 1:
    g = g[:, None]
  if g.ndim != 2 or not np.issubdtype(g.dtype, np.integer):
    raise ValueError(f"gold must be integer indices shaped [B] or [B, G], got {g.dtype} "
                     f"{np.shape(gold)}")
  if ((g < -1) | (g >= num_adapters)).any():
    raise ValueError(f"gold indices must be in [0, {num_adapters}) (or -1 as padding), got "
                     f"values in [{g.min()}, {g.max()}]")
  hot = np.zeros((g.shape[0], num_adapters), np.float32)
  for j in range(g.shape[1]):
    valid = g[:, j] >= 0
    hot[np.nonzero(valid)[0], g[valid, j]] = 1.0
  if (hot.sum(1) == 0).any():
    raise ValueError(f"gold rows {np.nonzero(hot.sum(1) == 0)[0][:4].tolist()} name no adapter")
  if normalize:
    hot = hot / hot.sum(1, keepdims=True)
  return jnp.asarray(hot)


def oracle_mix(adapters: Sequence[Mapping[str, lora_lib.LoraFactors]], gold, *,
               normalize: bool = False) -> lora_lib.LoraMix:
  """A LoraMix with each query's gold adapter(s): weights [B, K] (see `oracle_weights`)."""
  return lora_lib.LoraMix(stack=lora_lib.stack(adapters),
                          weights=oracle_weights(gold, len(adapters), normalize=normalize))


# ---------------------------------------------------------------------------------------------
# Similarity selection (LoRA-Retriever-like; Zhao et al. 2024).


@functools.partial(jax.jit, static_argnums=1)
def prompt_embeddings(params: Mapping[str, Any], cfg: transformer.ModelConfig,
                      tokens_BxT: jax.Array, prompt_len_B: jax.Array) -> jax.Array:
  """[B, D]: the base model's final normed hidden states, mean-pooled over the prompt tokens."""
  _, aux = transformer.apply(params, cfg, jnp.asarray(tokens_BxT), return_aux=True)
  t = tokens_BxT.shape[1]
  mask = (jnp.arange(t)[None, :] < jnp.asarray(prompt_len_B)[:, None]).astype(jnp.float32)
  pooled = jnp.einsum("btd,bt->bd", aux["hidden"].astype(jnp.float32), mask)
  return pooled / jnp.maximum(mask.sum(1, keepdims=True), 1.0)


def adapter_centroid(params: Mapping[str, Any], cfg: transformer.ModelConfig,
                     data: Mapping[str, np.ndarray], batch_size: int = 64) -> jax.Array:
  """[D]: the mean prompt embedding of an adapter's *training* data.

  Computed when the adapter is trained and stored with it. Similarity routing is therefore
  not data-free: it needs (a summary of) each adapter's training inputs.
  """
  n = int(data["tokens"].shape[0])
  if n == 0 or batch_size <= 0:
    raise ValueError(f"adapter_centroid needs rows and batch_size > 0 (got {n}, {batch_size})")
  total = jnp.zeros((cfg.d_model,), jnp.float32)
  for start in range(0, n, batch_size):
    rows = slice(start, min(start + batch_size, n))
    total = total + prompt_embeddings(params, cfg, data["tokens"][rows], data["prompt_len"][rows]).sum(0)
  return total / n


def similarity_weights(query_BxD: jax.Array, centroids_KxD: jax.Array, *, top_k: int = 1,
                       temperature: float = 0.1) -> jax.Array:
  """[B, K]: cosine similarity of each query with each centroid, / temperature, top-k, softmax
  (top_k=1 picks the single most similar adapter)."""
  k = centroids_KxD.shape[0]
  if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= k:
    raise ValueError(f"top_k={top_k!r} must be an int in [1, K={k}]")
  if not temperature > 0:
    raise ValueError(f"temperature={temperature!r} must be > 0")
  if query_BxD.shape[-1] != centroids_KxD.shape[-1]:
    raise ValueError(f"query dim {query_BxD.shape[-1]} != centroid dim {centroids_KxD.shape[-1]}")

  def unit(x):
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

  cos = unit(query_BxD.astype(jnp.float32)) @ unit(centroids_KxD.astype(jnp.float32)).T
  return top_k_softmax(cos / temperature, top_k)


def similarity_mix(params: Mapping[str, Any], cfg: transformer.ModelConfig,
                   adapters: Sequence[Mapping[str, lora_lib.LoraFactors]],
                   centroids_KxD: jax.Array, tokens_BxT, prompt_len_B, *, top_k: int = 1,
                   temperature: float = 0.1) -> lora_lib.LoraMix:
  """A LoraMix whose [B, K] weights come from each query's similarity to the adapters'
  training-data centroids (see `adapter_centroid`)."""
  if centroids_KxD.shape[0] != len(adapters):
    raise ValueError(f"{centroids_KxD.shape[0]} centroids for {len(adapters)} adapters")
  query = prompt_embeddings(params, cfg, jnp.asarray(tokens_BxT), jnp.asarray(prompt_len_B))
  w = similarity_weights(query, centroids_KxD, top_k=top_k, temperature=temperature)
  return lora_lib.LoraMix(stack=lora_lib.stack(adapters), weights=w)
