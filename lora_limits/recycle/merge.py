"""Data-free merges of K LoRA adapters into one update, by name.

`merge(adapters, method, weights=None, flavor='default', **options) -> MergeResult`. A
result is either *factors* (an adapter, rank given per method; apply with `lora.merge` or run
it unmerged) or *dense* per-path updates ΔW [d_in, d_out] (apply with `lora.merge_dense`),
whichever the method is exactly expressible in; `MergeResult.apply(params)` does the right
thing and `MergeResult.delta()` always gives the dense updates. `METHODS` / `PEFT_METHODS`
(or `method_info`) say each method's result kind and defaults, so a pipeline can loop over
methods by name.

Conventions. ΔW_k = s_k · A_k B_k with our kernels [d_in, d_out] acting as x @ W (torch and
PEFT store the transpose: lora_A [r, in] = A^T, lora_B [out, r] = B^T). `weights=None` means
uniform 1/K for the averages (`uniform_factors`, `uniform_delta`) and 1 for everything else
(sums; TIES-style methods, `knots` included, already take a disjoint *mean*; `knots` with
inner='linear' is then the plain sum). Negative weights are allowed everywhere. Everything is
written in `jnp` and traceable in the weights, so `score_combinations` can vmap a merge over C
weight vectors; called eagerly, each (method, options, shapes) compiles once.

Two flavours:
- 'default' — the methods as their papers define them on the *updates* ΔW_k (except
  `uniform_factors`, which is factor-wise by definition).
- 'peft' — exactly what PEFT 0.21's `LoraModel.add_weighted_adapter` computes, for parity
  with what users run today. Notably PEFT's `linear`, `ties`, `dare_*` and `magnitude_prune`
  act on the A and B factors *separately*, each weighted by √|w·s| (the sign on A), so the
  merged update carries cross terms (Σ_k √w_k A_k)(Σ_k √w_k B_k) ≠ Σ_k w_k ΔW_k, and TIES's
  trimming and sign election happen on factor entries, not on update entries. PEFT elects
  signs on the *unweighted* tensors and applies the weights afterwards; our default weights
  first (so a negative weight really negates a task). The merged PEFT adapter is meant to have
  scaling 1 (r = alpha = new rank); PEFT 0.21 inherits `use_rslora` from the first adapter and
  then scales by √r instead (huggingface/peft#3449, #3761) — our 'peft' flavour returns the
  intended scaling-1 result, so a single adapter with weight 1 is reproduced for rsLoRA too.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_limits import lora as lora_lib

Adapter = lora_lib.Adapter
Dense = dict[str, jax.Array]

KINDS = ("factors", "dense")
FLAVORS = ("default", "peft")
SIGN_METHODS = ("total", "count")  # PEFT's names: 'total', 'frequency' (= count)
KNOTS_INNER = ("ties", "linear")


@dataclasses.dataclass(frozen=True)
class MergeResult:
  """The outcome of a merge: `adapter` (kind 'factors') or `dense` {path: ΔW} (kind 'dense')."""

  method: str
  kind: str
  adapter: Adapter | None = None
  dense: Dense | None = None

  def delta(self) -> Dense:
    """{path: ΔW [d_in, d_out]} whatever the kind."""
    if self.kind == "factors":
      return lora_lib.delta(self.adapter)
    return dict(self.dense)

  def apply(self, params: Mapping[str, Any]) -> dict[str, Any]:
    """params with the merged update added to each adapted kernel."""
    if self.kind == "factors":
      return lora_lib.merge(params, self.adapter)
    return lora_lib.merge_dense(params, self.dense)


jax.tree_util.register_dataclass(MergeResult, data_fields=["adapter", "dense"],
                                 meta_fields=["method", "kind"])


@dataclasses.dataclass(frozen=True)
class MergeMethod:
  """Registry entry: what a method returns and how it treats weights.

  kind: 'factors' or 'dense'. default_weights: 'uniform' (1/K) or 'ones'.
  mixed_ranks: whether adapters of different ranks are accepted.
  linear: the merged update is linear in the weights (for fixed drop masks / key).
  mixes_outputs: the merged update is exactly Σ_k w'_k ΔW_k (w' = `mix_weights(w, options)`),
    so it can be evaluated on the unmerged mixing path without forming anything.
  random: draws drop masks (needs `key=` or explicit `masks=` unless density = 1).
  options: the keyword options it accepts (with their defaults).
  """

  name: str
  flavor: str
  kind: str
  default_weights: str
  mixed_ranks: bool
  linear: bool
  mixes_outputs: bool
  random: bool
  options: Mapping[str, Any]
  fn: Callable[..., MergeResult]
  doc: str

  def mix_weights(self, weights: jax.Array, options: Mapping[str, Any]) -> jax.Array:
    """The weights of Σ_k w'_k ΔW_k this method equals (only when `mixes_outputs`)."""
    if not self.mixes_outputs:
      raise ValueError(f"merge method {self.name!r} is not a weighted sum of updates")
    return weights * options.get("scale", 1.0)


# ---------------------------------------------------------------------------------------------
# Building blocks (pure jnp; traceable in the weights).


def _deltas(adapters: Sequence[Adapter], path: str) -> jax.Array:
  """ΔW_k for one path, stacked: [K, d_in, d_out] (ranks may differ)."""
  return jnp.stack([f.scale * (f.a @ f.b) for f in (ad[path] for ad in adapters)])


def _dims(adapters: Sequence[Adapter], path: str) -> tuple[int, int]:
  f = adapters[0][path]
  return (f.a.shape[0], f.b.shape[1])


def _keep_top_each(x_Kx: jax.Array, density: float) -> jax.Array:
  """Each x[k] with all but its round_down(density·numel(x[k])) largest-magnitude entries
  zeroed (PEFT's `magnitude_based_pruning`: exactly that many kept, per tensor; of equal
  magnitudes the lower index is kept). One batched top_k for the K tensors, not one each:
  XLA on CPU compiles every sort for ~50 ms, which dominated the trimming merges' compile."""
  if density >= 1.0:
    return x_Kx
  k = int(density * x_Kx[0].size)
  flat = x_Kx.reshape(x_Kx.shape[0], -1)
  if k == 0:
    return jnp.zeros_like(x_Kx)
  _, idx = jax.lax.top_k(jnp.abs(flat), k)  # [K, k]
  mask = jnp.zeros(flat.shape, bool).at[jnp.arange(flat.shape[0])[:, None], idx].set(True)
  return jnp.where(mask, flat, 0).reshape(x_Kx.shape)


def _elect_and_mean(t_KxN: jax.Array, elect_from: jax.Array, sign_method: str) -> jax.Array:
  """TIES: majority sign γ per entry (from `elect_from`; ties go to +), then the mean of the
  entries of `t` whose sign agrees with γ (zeros never agree; an empty set gives 0)."""
  sign = jnp.sign(elect_from)
  if sign_method == "total":
    mass = elect_from.sum(axis=0)
  else:
    mass = sign.sum(axis=0)
  gamma = jnp.where(mass >= 0, 1.0, -1.0).astype(t_KxN.dtype)
  agree = (sign == gamma).astype(t_KxN.dtype)
  return (t_KxN * agree).sum(axis=0) / jnp.maximum(agree.sum(axis=0), 1.0)


def _draw_keep_masks(key, density: float, shapes: dict[str, tuple]) -> dict[str, Any]:
  """Bernoulli(density) keep-masks for every path from one draw of `key` (one random-bits
  computation, cheap to compile); shapes: {path: shape or (shape, shape)}."""
  flat = []
  for p in sorted(shapes):
    parts = shapes[p] if isinstance(shapes[p][0], tuple) else (shapes[p],)
    flat.extend((p, i, s) for i, s in enumerate(parts))
  sizes = [int(np.prod(s)) for _, _, s in flat]
  keep = jax.random.uniform(key, (sum(sizes),)) < density
  out: dict[str, list] = {}
  start = 0
  for (p, _, s), n in zip(flat, sizes):
    out.setdefault(p, []).append(keep[start:start + n].reshape(s))
    start += n
  return {p: (v[0] if len(v) == 1 else tuple(v)) for p, v in out.items()}


def _keep_masks(opts, shapes: dict[str, tuple]):
  """Explicit `masks` if given, else drawn from `key`; None when nothing is dropped."""
  if opts["density"] >= 1.0:
    return None
  if opts.get("masks") is not None:
    return opts["masks"]
  return _draw_keep_masks(opts["key"], opts["density"], shapes)


def _low_rank_svd(a_IxR: jax.Array, b_RxO: jax.Array, rank: int):
  """Rank-`rank` truncated SVD of a @ b from the factors (QR of both, SVD of the small core);
  never forms the [d_in, d_out] product. Returns (a', b') with √σ on both sides, zero-padded
  to exactly `rank` columns if the product has lower rank."""
  qa, ra = jnp.linalg.qr(a_IxR)  # [I, m], [m, R]
  qb, rb = jnp.linalg.qr(b_RxO.T)  # [O, n], [n, R]
  u, s, vt = jnp.linalg.svd(ra @ rb.T, full_matrices=False)  # core [m, n]
  k = min(rank, s.shape[0])
  root = jnp.sqrt(s[:k])
  a = (qa @ u[:, :k]) * root
  b = (root[:, None] * vt[:k]) @ qb.T
  return _pad_rank(a, b, rank)


def _dense_svd(d_IxO: jax.Array, rank: int):
  """PEFT's truncated SVD of a dense update: ΔW^T = U S Vh → lora_B = U S, lora_A = Vh; in our
  layout a = Vh^T [in, k], b = (U S)^T [k, out]."""
  u, s, vh = jnp.linalg.svd(d_IxO.T, full_matrices=False)
  k = min(rank, s.shape[0])
  return _pad_rank(vh[:k].T, (u[:, :k] * s[:k]).T, rank)


def _pad_rank(a, b, rank):
  pad = rank - a.shape[-1]
  if pad > 0:
    a = jnp.pad(a, ((0, 0), (0, pad)))
    b = jnp.pad(b, ((0, pad), (0, 0)))
  return a, b


def _cat_factors(adapters: Sequence[Adapter], path: str, w: jax.Array) -> lora_lib.LoraFactors:
  """Σ_k w_k ΔW_k exactly as rank-Σr factors: a = [w_k s_k A_k]_k, b = [B_k]_k (scale kept
  when all adapters share it)."""
  fs = [ad[path] for ad in adapters]
  same = all(f.scale == fs[0].scale for f in fs)
  a = jnp.concatenate([w[k] * (1.0 if same else f.scale) * f.a for k, f in enumerate(fs)],
                      axis=-1)
  b = jnp.concatenate([f.b for f in fs], axis=0)
  return lora_lib.LoraFactors(a, b, fs[0].scale if same else 1.0)


# ---------------------------------------------------------------------------------------------
# Default flavour.


def _uniform_factors(adapters, w, paths, opts) -> MergeResult:
  """A = Σ_k w_k A_k and B = Σ_k w_k B_k separately (s_k folded into B if scales differ).

  mttl's "Uniform" (Ostapenko et al. 2024) and LoraHub's combination (Huang et al. 2023). The
  update (Σ w A)(Σ w B) has cross terms A_i B_j; it is not the average of the updates.
  """
  del opts
  stacked = lora_lib.stack(adapters)
  out = {}
  for p in paths:
    f = stacked[p]
    out[p] = lora_lib.LoraFactors(jnp.einsum("k,kir->ir", w, f.a),
                                  jnp.einsum("k,kro->ro", w, f.b), f.scale)
  return MergeResult("uniform_factors", "factors", adapter=out)


def _weighted_sum(name):
  def fn(adapters, w, paths, opts) -> MergeResult:
    w = w * opts.get("scale", 1.0)
    return MergeResult(name, "factors", adapter={p: _cat_factors(adapters, p, w) for p in paths})
  return fn


def _ties(adapters, w, paths, opts) -> MergeResult:
  """TIES (Yadav et al. 2023): trim each ΔW_k to its top `density` fraction by magnitude (per
  tensor, as PEFT/mergekit; the paper trims the whole task vector), weight it, τ_k = w_k ·
  trim(ΔW_k); elect the sign γ from the τ_k by total mass (or by count); disjoint mean over the
  τ_k agreeing with γ. (Trimming before weighting keeps the same entries as trimming w_k ΔW_k,
  and does not depend on w, so a vmap over weights computes it once.)"""
  out = {}
  for p in paths:
    trimmed = _keep_top_each(_deltas(adapters, p), opts["density"])
    t = w[:, None, None] * trimmed
    out[p] = _elect_and_mean(t, t, opts["majority_sign"])
  return MergeResult("ties", "dense", dense=out)


def _dare(name, ties_after):
  def fn(adapters, w, paths, opts) -> MergeResult:
    """DARE (Yu et al. 2024): drop each entry of τ_k = w_k ΔW_k with probability p = 1 −
    density, rescale survivors by 1/density; then sum (dare_linear) or TIES sign election and
    disjoint mean (dare_ties). Masks: `masks={path: keep [K, d_in, d_out]}` or from `key`."""
    density = opts["density"]
    k = len(adapters)
    masks = _keep_masks(opts, {p: (k,) + _dims(adapters, p) for p in paths})
    out = {}
    for p in paths:
      t = w[:, None, None] * _deltas(adapters, p)
      if masks is not None:
        t = jnp.where(masks[p], t / density, 0.0)
      out[p] = _elect_and_mean(t, t, opts["majority_sign"]) if ties_after else t.sum(0)
    return MergeResult(name, "dense", dense=out)
  return fn


def _magnitude_prune(adapters, w, paths, opts) -> MergeResult:
  """Σ_k w_k · trim(ΔW_k): each update trimmed to its top `density` fraction by magnitude."""
  out = {}
  for p in paths:
    trimmed = _keep_top_each(_deltas(adapters, p), opts["density"])
    out[p] = jnp.einsum("k,kio->io", w, trimmed)
  return MergeResult("magnitude_prune", "dense", dense=out)


def _svd(adapters, w, paths, opts) -> MergeResult:
  """Rank-k re-factorisation of Σ_k w_k ΔW_k (truncated SVD from the concatenated factors:
  QR of both sides and an SVD of the Σr × Σr core; no d_in × d_out matrix). k = `rank`
  (default: the largest input rank). Scale 1."""
  rank = opts["rank"] or max(ad[paths[0]].rank for ad in adapters)
  out = {}
  for p in paths:
    f = _cat_factors(adapters, p, w)
    a, b = _low_rank_svd(f.a * f.scale, f.b, rank)
    out[p] = lora_lib.LoraFactors(a, b, 1.0)
  return MergeResult("svd", "factors", adapter=out)


def _knots(adapters, w, paths, opts) -> MergeResult:
  """KnOTS / Core-Space style (Stoica et al. 2025): one SVD of the row-stacked updates
  [ΔW_1; …; ΔW_K] = [U_1; …; U_K] S V^T gives a shared output basis V and per-task input-side
  coefficients U_k (ΔW_k = U_k S V^T; torch's column concatenation of W_k [out, in]). Merge
  w_k U_k (U_k trimmed before weighting, as in `ties`) by TIES (trim/elect/disjoint mean, `density`, `majority_sign`) or linearly (Σ, which
  reproduces Σ_k w_k ΔW_k exactly), then ΔW = U_merged S V^T. Computed from the factors: QR of
  the concatenated B's, then a thin SVD of the [K·d_in, Σr] block matrix. Scale 1."""
  out = {}
  for p in paths:
    fs = [ad[p] for ad in adapters]
    b_cat = jnp.concatenate([f.b for f in fs], axis=0)  # [R, O]
    qb, rb = jnp.linalg.qr(b_cat.T)  # [O, m], [m, R]
    rbt = rb.T  # [R, m]
    blocks, start = [], 0
    for f in fs:
      blocks.append(f.scale * f.a @ rbt[start:start + f.rank])
      start += f.rank
    u, s, wt = jnp.linalg.svd(jnp.concatenate(blocks, axis=0), full_matrices=False)
    v = qb @ wt.T  # [O, n]
    d_in = fs[0].a.shape[0]
    coeffs = u.reshape(len(fs), d_in, -1)  # U_k: [K, d_in, n]
    if opts["inner"] == "linear":
      merged = jnp.einsum("k,kin->in", w, coeffs)
    else:
      t = w[:, None, None] * _keep_top_each(coeffs, opts["density"])
      merged = _elect_and_mean(t, t, opts["majority_sign"])
    out[p] = lora_lib.LoraFactors(merged * s, v.T, 1.0)
  return MergeResult("knots", "factors", adapter=out)


def _wudi(adapters, w, paths, opts) -> MergeResult:
  """WUDI merging (Cheng et al. 2025, arXiv 2503.08099, "Whoever Started the Interference
  Should End It"): the update that minimises, per linear layer, Σ_k ‖τ_kᵀ(ΔW − τ_k)‖² / ‖τ_k‖²
  over the task vectors τ_k = w_k ΔW_k (w_k = 0 drops task k). The paper reads the rows of
  each torch task vector [out, in] as stand-ins for that task's inputs; in our [d_in, d_out]
  layout they are the columns of τ_k, so the loss is the interference ‖x (ΔW − τ_k)‖ summed
  over those inputs x. The paper approaches the optimum with Adam from ΔW = Σ τ_k; for LoRA
  updates it is exact and closed-form: every τ_k lies in the span Q of the stacked A's
  (QR, d_in × m with m ≤ Σr), the gradient never leaves it, so the limit is
  ΔW = Q (Σ_k c_k h_k h_kᵀ)⁺ Σ_k c_k h_k h_kᵀ h_k with h_k = Qᵀ τ_k [m, d_out] and
  c_k = 1/‖h_k‖² = 1/‖τ_k‖² (computed as a least-squares solve, not through the Gram
  matrix), returned as factors (a = Q, b [m, d_out], scale 1; rank m ≤ Σr).
  Tasks with orthogonal input subspaces merge to their sum; one adapter is reproduced.
  Data-free; mixed ranks allowed; computed in float32."""
  del opts
  out = {}
  for p in paths:
    fs = [ad[p] for ad in adapters]
    a_s = [f.a.astype(jnp.float32) for f in fs]
    q, _ = jnp.linalg.qr(jnp.concatenate(a_s, axis=-1))  # [I, m]
    # Σ c_k h_k h_kᵀ = G Gᵀ with G = [√c_k h_k]_k, and Σ c_k h_k h_kᵀ h_k = G Z with
    # Z = [√c_k h_kᵀ h_k]_k stacked, so b = (G Gᵀ)⁺ G Z = (Gᵀ)⁺ Z: solved on Gᵀ itself,
    # whose condition number is the square root of the Gram matrix's (float32 keeps it exact).
    gt, z = [], []
    for k, f in enumerate(fs):
      h = (f.scale * w[k]) * ((q.T @ a_s[k]) @ f.b.astype(jnp.float32))  # τ_k = Q h
      norm2 = jnp.sum(h * h)
      root_c = jnp.where(norm2 > 0, 1.0 / jnp.sqrt(jnp.where(norm2 > 0, norm2, 1.0)), 0.0)
      gt.append(root_c * h.T)  # [O, m]
      z.append(root_c * (h.T @ h))  # [O, O]
    b = jnp.linalg.pinv(jnp.concatenate(gt, axis=0)) @ jnp.concatenate(z, axis=0)
    out[p] = lora_lib.LoraFactors(q, b, 1.0)
  return MergeResult("wudi", "factors", adapter=out)


# ---------------------------------------------------------------------------------------------
# PEFT flavour (PEFT 0.21, `LoraModel.add_weighted_adapter` + `peft.utils.merge_utils`).


def _peft_factor_weights(adapters, w, path):
  """PEFT weights the factors by √|w_k s_k|, with the sign of w_k s_k on A only."""
  ws = jnp.stack([w[k] * ad[path].scale for k, ad in enumerate(adapters)])
  root = jnp.sqrt(jnp.abs(ws))
  return jnp.where(ws >= 0, root, -root), root


def _peft_combine(kind: str, t_KxN, w_K, opts, masks):
  """merge_utils.{task_arithmetic, ties, dare_linear, dare_ties, magnitude_prune} on a stack."""
  wb = w_K.reshape((-1,) + (1,) * (t_KxN.ndim - 1))
  density = opts["density"]
  if kind in ("ties", "magnitude_prune"):
    t_KxN = _keep_top_each(t_KxN, density)
  elif kind in ("dare_linear", "dare_ties") and density < 1.0:
    t_KxN = jnp.where(masks, t_KxN / density, 0.0)
  if kind in ("ties", "dare_ties"):
    # PEFT elects the sign from the unweighted (pruned) tensors, then weights them.
    return _elect_and_mean(t_KxN * wb, t_KxN, opts["majority_sign"])
  return (t_KxN * wb).sum(0)


def _peft_factorwise(name):
  def fn(adapters, w, paths, opts) -> MergeResult:
    """PEFT `linear`/`ties`/`dare_linear`/`dare_ties`/`magnitude_prune`: the method applied to
    the stacked A's with weights sign·√|w s| and to the stacked B's with √|w s|, separately;
    the new adapter has scaling 1. (For DARE, `masks={path: (keep_a [K,d_in,r], keep_b
    [K,r,d_out])}` or masks drawn from `key`.)"""
    masks = None
    if name.startswith("dare"):
      k = len(adapters)
      masks = _keep_masks(opts, {
          p: ((k, adapters[0][p].a.shape[0], adapters[0][p].rank),
              (k, adapters[0][p].rank, adapters[0][p].b.shape[1])) for p in paths})
    out = {}
    for p in paths:
      wa, wb = _peft_factor_weights(adapters, w, p)
      a_s = jnp.stack([ad[p].a for ad in adapters])
      b_s = jnp.stack([ad[p].b for ad in adapters])
      ma, mb = masks[p] if masks is not None else (None, None)
      out[p] = lora_lib.LoraFactors(_peft_combine(name, a_s, wa, opts, ma),
                                    _peft_combine(name, b_s, wb, opts, mb), 1.0)
    return MergeResult(name, "factors", adapter=out)
  return fn


def _peft_svd(name):
  inner = name.removesuffix("_svd") if name != "svd" else "linear"

  def fn(adapters, w, paths, opts) -> MergeResult:
    """PEFT `svd`/`*_svd`: the method on the dense updates ΔW_k = s_k A_k B_k (weights after
    sign election, as PEFT), then a truncated SVD to `svd_rank` (default: the largest input
    rank) with σ on the output side, optionally clamped to the `svd_clamp` quantile."""
    rank = opts["svd_rank"] or max(ad[paths[0]].rank for ad in adapters)
    masks = None
    if inner.startswith("dare"):
      masks = _keep_masks(opts, {p: (len(adapters),) + _dims(adapters, p) for p in paths})
    out = {}
    for p in paths:
      t = _deltas(adapters, p)
      merged = _peft_combine(inner, t, w, opts, None if masks is None else masks[p])
      a, b = _dense_svd(merged, rank)
      if opts["svd_clamp"] is not None:
        hi = jnp.quantile(jnp.concatenate([b.reshape(-1), a.reshape(-1)]), opts["svd_clamp"])
        a, b = jnp.clip(a, -hi, hi), jnp.clip(b, -hi, hi)
      out[p] = lora_lib.LoraFactors(a, b, 1.0)
    return MergeResult(name, "factors", adapter=out)
  return fn


def _peft_cat(adapters, w, paths, opts) -> MergeResult:
  """PEFT `cat`: lora_A rows w_k s_k A_k, lora_B columns B_k; exactly Σ_k w_k ΔW_k."""
  del opts
  out = {}
  for p in paths:
    fs = [ad[p] for ad in adapters]
    a = jnp.concatenate([w[k] * f.scale * f.a for k, f in enumerate(fs)], axis=-1)
    out[p] = lora_lib.LoraFactors(a, jnp.concatenate([f.b for f in fs], axis=0), 1.0)
  return MergeResult("cat", "factors", adapter=out)


# ---------------------------------------------------------------------------------------------
# Registry.

_TIES_OPTS = {"density": 1.0, "majority_sign": "total"}
_DARE_OPTS = {"density": 1.0, "majority_sign": "total", "key": None, "masks": None}
_PEFT_OPTS = {"density": 1.0, "majority_sign": "total", "key": None, "masks": None}
_PEFT_SVD_OPTS = dict(_PEFT_OPTS, svd_rank=None, svd_clamp=None)


def _entry(name, flavor, fn, kind, default_weights="ones", *, mixed_ranks=True, linear=False,
           mixes_outputs=False, random=False, options=None) -> MergeMethod:
  return MergeMethod(name, flavor, kind, default_weights, mixed_ranks, linear, mixes_outputs,
                     random, dict(options or {}), fn, (fn.__doc__ or "").strip())


METHODS: dict[str, MergeMethod] = {
    "uniform_factors": _entry("uniform_factors", "default", _uniform_factors, "factors",
                              "uniform", mixed_ranks=False),
    "uniform_delta": _entry("uniform_delta", "default", _weighted_sum("uniform_delta"),
                            "factors", "uniform", linear=True, mixes_outputs=True),
    "sum": _entry("sum", "default", _weighted_sum("sum"), "factors", linear=True,
                  mixes_outputs=True, options={"scale": 1.0}),
    "task_arithmetic": _entry("task_arithmetic", "default", _weighted_sum("task_arithmetic"),
                              "factors", linear=True, mixes_outputs=True,
                              options={"scale": 1.0}),
    "cat": _entry("cat", "default", _weighted_sum("cat"), "factors", linear=True,
                  mixes_outputs=True),
    "ties": _entry("ties", "default", _ties, "dense", options=_TIES_OPTS),
    "dare_linear": _entry("dare_linear", "default", _dare("dare_linear", False), "dense",
                          linear=True, random=True, options=_DARE_OPTS),
    "dare_ties": _entry("dare_ties", "default", _dare("dare_ties", True), "dense", random=True,
                        options=_DARE_OPTS),
    "magnitude_prune": _entry("magnitude_prune", "default", _magnitude_prune, "dense",
                              linear=True, options={"density": 1.0}),
    "svd": _entry("svd", "default", _svd, "factors", options={"rank": None}),
    "knots": _entry("knots", "default", _knots, "factors",
                    options={"inner": "ties", "density": 1.0, "majority_sign": "total"}),
    "wudi": _entry("wudi", "default", _wudi, "factors"),
}

PEFT_METHODS: dict[str, MergeMethod] = {
    "linear": _entry("linear", "peft", _peft_factorwise("linear"), "factors",
                     mixed_ranks=False, options=_PEFT_OPTS),
    "ties": _entry("ties", "peft", _peft_factorwise("ties"), "factors", mixed_ranks=False,
                   options=_PEFT_OPTS),
    "dare_linear": _entry("dare_linear", "peft", _peft_factorwise("dare_linear"), "factors",
                          mixed_ranks=False, random=True, options=_PEFT_OPTS),
    "dare_ties": _entry("dare_ties", "peft", _peft_factorwise("dare_ties"), "factors",
                        mixed_ranks=False, random=True, options=_PEFT_OPTS),
    "magnitude_prune": _entry("magnitude_prune", "peft", _peft_factorwise("magnitude_prune"),
                              "factors", mixed_ranks=False, options=_PEFT_OPTS),
    "cat": _entry("cat", "peft", _peft_cat, "factors", linear=True, mixes_outputs=True),
    "svd": _entry("svd", "peft", _peft_svd("svd"), "factors", options=_PEFT_SVD_OPTS),
    "ties_svd": _entry("ties_svd", "peft", _peft_svd("ties_svd"), "factors",
                       options=_PEFT_SVD_OPTS),
    "dare_linear_svd": _entry("dare_linear_svd", "peft", _peft_svd("dare_linear_svd"),
                              "factors", random=True, options=_PEFT_SVD_OPTS),
    "dare_ties_svd": _entry("dare_ties_svd", "peft", _peft_svd("dare_ties_svd"), "factors",
                            random=True, options=_PEFT_SVD_OPTS),
    "magnitude_prune_svd": _entry("magnitude_prune_svd", "peft",
                                  _peft_svd("magnitude_prune_svd"), "factors",
                                  options=_PEFT_SVD_OPTS),
}

_REGISTRIES = {"default": METHODS, "peft": PEFT_METHODS}


def method_info(method: str, flavor: str = "default") -> MergeMethod:
  """The registry entry of `method` in `flavor` (ValueError listing the valid names)."""
  if flavor not in _REGISTRIES:
    raise ValueError(f"flavor={flavor!r} is not one of {list(FLAVORS)}")
  registry = _REGISTRIES[flavor]
  if method not in registry:
    raise ValueError(f"method={method!r} is not a {flavor!r} merge method; valid methods: "
                     f"{sorted(registry)}")
  return registry[method]


# ---------------------------------------------------------------------------------------------
# Validation and the public entry point.


def check_adapters(adapters: Sequence[Mapping[str, lora_lib.LoraFactors]], *,
                   same_rank: bool = False) -> list[str]:
  """Sorted common paths; ValueError if the adapters target different paths or shapes (or,
  with `same_rank`, have different ranks at a path)."""
  if isinstance(adapters, Mapping) or not isinstance(adapters, Sequence) or not adapters:
    raise ValueError("adapters must be a non-empty list of adapters ({path: LoraFactors})")
  for k, ad in enumerate(adapters):
    if not isinstance(ad, Mapping) or not ad:
      raise ValueError(f"adapters[{k}] must be a non-empty {{path: LoraFactors}} dict")
    for p, f in ad.items():
      if not lora_lib.is_factors(f) or f.a.ndim != 2 or f.b.ndim != 2 or (
          f.a.shape[1] != f.b.shape[0]):
        raise ValueError(f"adapters[{k}][{p!r}] must be LoraFactors with a [d_in, r] and "
                         f"b [r, d_out]")
  paths = sorted(adapters[0])
  for k, ad in enumerate(adapters[1:], start=1):
    if sorted(ad) != paths:
      diff = sorted(set(paths) ^ set(ad))
      raise ValueError(f"adapters[{k}] targets other paths than adapters[0]; they differ at "
                       f"{diff[:4]}")
  for p in paths:
    f0 = adapters[0][p]
    for k, ad in enumerate(adapters[1:], start=1):
      f = ad[p]
      if (f.a.shape[0], f.b.shape[1]) != (f0.a.shape[0], f0.b.shape[1]):
        raise ValueError(f"adapters[{k}] at {p!r} is {f.a.shape[0]}x{f.b.shape[1]}, "
                         f"adapters[0] is {f0.a.shape[0]}x{f0.b.shape[1]}")
      if same_rank and f.rank != f0.rank:
        raise ValueError(f"adapters[{k}] at {p!r} has rank {f.rank}, adapters[0] has rank "
                         f"{f0.rank}; this method needs equal ranks")
  return paths


def resolve_weights(weights, num_adapters: int, default: str = "ones") -> jax.Array:
  """weights as a float [K] array; None → 1/K ('uniform') or ones ('ones')."""
  if weights is None:
    value = 1.0 / num_adapters if default == "uniform" else 1.0
    return jnp.full((num_adapters,), value, jnp.float32)
  shape = np.shape(weights)
  if shape != (num_adapters,):
    raise ValueError(f"weights has shape {shape}; expected one weight per adapter, "
                     f"shape ({num_adapters},)")
  return jnp.asarray(weights, jnp.float32)


def resolve_options(info: MergeMethod, options: Mapping[str, Any]) -> dict[str, Any]:
  """The method's options with defaults filled in; ValueError for unknown or bad values."""
  unknown = sorted(set(options) - set(info.options))
  if unknown:
    raise ValueError(f"merge method {info.name!r} ({info.flavor}) got unknown options "
                     f"{unknown}; it accepts {sorted(info.options)}")
  opts = dict(info.options)
  opts.update(options)
  if "density" in opts:
    d = opts["density"]
    if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 < d <= 1.0:
      raise ValueError(f"density={d!r} must be a number in (0, 1]")
    opts["density"] = float(d)
  if "majority_sign" in opts:
    if opts["majority_sign"] == "frequency":  # PEFT's name for the count
      opts["majority_sign"] = "count"
    if opts["majority_sign"] not in SIGN_METHODS:
      raise ValueError(f"majority_sign={opts['majority_sign']!r} is not one of "
                       f"{list(SIGN_METHODS) + ['frequency']}")
  if "inner" in opts and opts["inner"] not in KNOTS_INNER:
    raise ValueError(f"inner={opts['inner']!r} is not one of {list(KNOTS_INNER)}")
  for name in ("rank", "svd_rank"):
    r = opts.get(name)
    if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r <= 0):
      raise ValueError(f"{name}={r!r} must be a positive int (or None)")
  clamp = opts.get("svd_clamp")
  if clamp is not None and not 0.0 < clamp <= 1.0:
    raise ValueError(f"svd_clamp={clamp!r} must be a quantile in (0, 1]")
  if info.random and opts["density"] < 1.0 and opts["key"] is None and opts["masks"] is None:
    raise ValueError(f"merge method {info.name!r} with density={opts['density']} drops "
                     "entries at random: pass key=jax.random.key(...) or explicit masks=")
  return opts


def merge(adapters: Sequence[Mapping[str, lora_lib.LoraFactors]], method: str,
          weights=None, *, flavor: str = "default", **options) -> MergeResult:
  """Merge K adapters by `method` (see `METHODS`, `PEFT_METHODS` and the module docstring).

  weights: [K] (negative allowed); None is the method's default (1/K for averages, else 1).
  flavor: 'default' (the methods' own definitions) or 'peft' (PEFT 0.21's semantics).
  options: per method, e.g. density, majority_sign ('total' | 'count'), key / masks (DARE),
    rank (svd), svd_rank / svd_clamp (PEFT *svd), inner ('ties' | 'linear', knots),
    scale (λ of sum / task_arithmetic).
  """
  info = method_info(method, flavor)
  paths = check_adapters(adapters, same_rank=not info.mixed_ranks)
  w = resolve_weights(weights, len(adapters), info.default_weights)
  opts = resolve_options(info, options)
  if len(adapters) == 1 and flavor == "peft":
    # PEFT switches to 'linear' for a single adapter.
    info = PEFT_METHODS["linear"]
    opts = resolve_options(info, {})
  rank = opts.get("rank") or opts.get("svd_rank")
  if rank is not None:
    for p in paths:
      d_in, d_out = adapters[0][p].a.shape[0], adapters[0][p].b.shape[1]
      if rank > min(d_in, d_out):
        raise ValueError(f"rank={rank} exceeds min(d_in, d_out)={min(d_in, d_out)} at {p!r}")
  if opts.get("masks") is not None:
    missing = sorted(set(paths) - set(opts["masks"]))
    if missing:
      raise ValueError(f"masks lack the paths {missing[:4]}")
  dynamic = {k: opts.pop(k) for k in _DYNAMIC_OPTIONS if k in opts}
  return _run(list(adapters), w, dynamic, method=info.name, flavor=info.flavor,
              static=tuple(sorted(opts.items())))


_DYNAMIC_OPTIONS = ("key", "masks", "scale")


@functools.partial(jax.jit, static_argnames=("method", "flavor", "static"))
def _run(adapters, w, dynamic, *, method, flavor, static):
  """One compiled merge per (method, options, shapes); inlined when called under a trace."""
  info = _REGISTRIES[flavor][method]
  return info.fn(adapters, w, sorted(adapters[0]), {**dict(static), **dynamic})


def available(flavor: str = "default") -> list[str]:
  if flavor not in _REGISTRIES:
    raise ValueError(f"flavor={flavor!r} is not one of {list(FLAVORS)}")
  return sorted(_REGISTRIES[flavor])

