"""Pre-flight check: from the base weights and the adapters alone, predict what recycling keeps.

No data and no labels: everything is computed from the adapters' factors (and, for the bridge
path, a few base kernels). Grounded in `lora_limits.theory`:

* **Keys** (Proposition 1). A one-fact edit is ΔW = (i_new − i_old) hᵀ/‖h‖² (torch's [out, in]
  layout): its row space *is* the key h it edits. Our kernels are [d_in, d_out] and act as
  x @ W, so the keys an update edits are the dominant *left* singular vectors of our
  ΔW = s·A B (input side), with gains σ and written directions the right singular vectors.
  They come from the factors (QR of A and Bᵀ, SVD of the r×r core: `full_model.update_svd`).
* **Retention**. Adapter k's own action on its keys is U_kᵀ ΔW_k = Σ_k V_kᵀ (row m: what key m
  writes, σ_m v_m). A merge keeps the fact behind key m if the merged update still writes
  σ_m v_m there: with M = U_kᵀ ΔW_merged, per key m the gain g_m = ⟨M_m, σ_m v_m⟩/σ_m² and
  the direction cos_m = cos(M_m, v_m); the key's score is clip(g_m, 0, 1)·max(cos_m, 0) and
  a path's retention is the σ-weighted mean over keys; an adapter's retention the
  ‖ΔW‖²-weighted mean over its paths. The residual M − g·A is split into cross-talk from the
  other adapters (their weighted updates on k's keys) and the method's own residual (cross
  terms of factor averaging, trimming, sign election, rank truncation), both relative to ‖A‖.
  A merge of one adapter with weight 1 has retention 1; a sum of adapters with mutually
  orthogonal keys has retention 1 (Theorem 2's span argument: ΔW_j h = 0 for h ⟂ keys of j).
* **Routers**. Arrow routes input x by |⟨v_j, x⟩| (v_j the top key of adapter j). Feeding each
  key u_m of adapter k (scaled to a typical activation norm) through the router gives the
  update actually applied to it, Σ_j w_j(u_m) ΔW_j, scored like a merge; the routing weights
  give the expected routing entropy and the weight on the adapter's own expert.
* **Bridge path** (Theorem 2). Latent two-hop composition needs what one adapter writes at a
  layer to be read by another adapter's keys at a later layer. In the one-layer key–value
  model no layer follows the edited read-out, so a sum of one-hop edits has no path at all;
  in the transformer, writes reach the residual stream directly (o_proj, down_proj) or
  through a base kernel (v_proj → o_proj, up/gate_proj → down_proj), and keys read it directly
  (q/k/v/gate/up, through the pre-norm scale) or through a base kernel (o_proj ← v_proj,
  down_proj ← up_proj). The strength of a path is the fraction of the writer's σ-weighted
  residual writes that lands in the reader's key space (1: all; a random subspace gives
  about dim/d_model). No later reader ⇒ zero path ⇒ direct composition impossible; chain of
  thought then needs only retention (the explicit bridge of `statements.explicit_bridge`).
* **Capacity** (the multi-fact statement: a rank-r update maps at most r independent keys to
  independent new values). Keys an update holds = its numerical rank; a merge must hold the
  adapters' keys in one update whose rank is limited by the method (svd: its rank; cat/sum:
  Σr; uniform_factors: r; dense methods: min(d_in, d_out)).

Prior-art similarity baselines (method-agnostic) are here too, for the validation study:
task-vector cosine, principal-angle subspace overlap and linear CKA between two updates.
Everything is NumPy float64 in frozen records with `to_dict()`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lora_limits import lora as lora_lib
from lora_limits import tree as tree_lib
from lora_limits.recycle import merge as merge_lib
from lora_limits.recycle import route as route_lib
from lora_limits.theory import full_model
from lora_limits.theory.statements import jsonable

KEY_RTOL = 1e-6  # keys with σ below KEY_RTOL·σ_max carry nothing and are skipped
_PATH = re.compile(r"^(.*?)(\d+)/(attn|mlp)/(q|k|v|o|gate|up|down)_proj/kernel$")


def _plain(x: Any) -> Any:
  if dataclasses.is_dataclass(x) and not isinstance(x, type):
    return _to_dict(x)
  if isinstance(x, (list, tuple)):
    return [_plain(v) for v in x]
  if isinstance(x, dict):
    return {str(k): _plain(v) for k, v in x.items()}
  return jsonable(x)


def _to_dict(record) -> dict[str, Any]:
  return {f.name: _plain(getattr(record, f.name)) for f in dataclasses.fields(record)}


def _f64(x) -> np.ndarray:
  return np.asarray(x, dtype=np.float64)


# ------------------------------------------------------------------------------------ keys


@dataclasses.dataclass(frozen=True, eq=False)
class Keys:
  """The keys one update edits: keys_IxM (orthonormal input directions), sigma_M (gains),
  writes_OxM (orthonormal output directions); ΔW = keys · diag(σ) · writesᵀ."""

  keys_IxM: np.ndarray
  sigma_M: np.ndarray
  writes_OxM: np.ndarray

  @property
  def action_MxO(self) -> np.ndarray:
    """What the update writes on each of its keys: Uᵀ ΔW = diag(σ) Vᵀ."""
    return self.sigma_M[:, None] * self.writes_OxM.T


def keys_of(f: lora_lib.LoraFactors, rtol: float = KEY_RTOL) -> Keys:
  """The update's keys from its factors (never the dense ΔW), dropping σ ≤ rtol·σ_max."""
  if f.a.ndim != 2 or f.b.ndim != 2:
    raise ValueError(f"keys_of expects one adapter's 2-D factors, got a {tuple(f.a.shape)}, "
                     f"b {tuple(f.b.shape)}")
  u, s, v = full_model.update_svd(f)
  keep = s > rtol * s[0] if s.size and s[0] > 0 else np.zeros(s.shape, bool)
  return Keys(u[:, keep], s[keep], v[:, keep])


def top_keys(f: lora_lib.LoraFactors, k: int) -> np.ndarray:
  """The top-k keys [d_in, k] (k = 1 is Arrow's prototype, up to sign)."""
  if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= f.rank:
    raise ValueError(f"k={k!r} must be an int in [1, rank={f.rank}]")
  u, _, _ = full_model.update_svd(f)
  return u[:, :k]


def _left_apply(keys_IxM: np.ndarray, update: lora_lib.LoraFactors | np.ndarray) -> np.ndarray:
  """keysᵀ ΔW [M, d_out] for factors (s (keysᵀ A) B) or a dense ΔW."""
  if lora_lib.is_factors(update):
    return update.scale * (keys_IxM.T @ _f64(update.a)) @ _f64(update.b)
  return keys_IxM.T @ _f64(update)


# ------------------------------------------------------------------------------- retention


@dataclasses.dataclass(frozen=True, eq=False)
class PathRetention:
  """One adapter at one path under one merge or router (see the module doc).

  retention: σ-weighted mean over keys of clip(gain, 0, 1)·max(cos, 0).
  gain: ⟨M, A⟩/‖A‖² (1: the adapter's writes kept at full strength; 1/K: averaged away).
  crosstalk: ‖other adapters' weighted updates on these keys‖/‖A‖ (linear part).
  method_residual: ‖M − linear reference‖/‖A‖ (cross terms, trimming, truncation, routing).
  energy: ‖ΔW_k‖²_F at this path (the aggregation weight).
  """

  path: str
  n_keys: int
  retention: float
  gain: float
  crosstalk: float
  method_residual: float
  energy: float
  key_retention_M: np.ndarray

  def to_dict(self) -> dict[str, Any]:
    return _to_dict(self)


@dataclasses.dataclass(frozen=True, eq=False)
class AdapterRetention:
  """Predicted retention of one adapter: the energy-weighted mean over its paths, the worst
  path, and the per-path records."""

  adapter: str
  method: str
  retention: float
  worst_path: str
  worst_retention: float
  paths: tuple[PathRetention, ...]

  def to_dict(self) -> dict[str, Any]:
    return _to_dict(self)


def _score_keys(keys: Keys, merged_MxO: np.ndarray) -> tuple[np.ndarray, float]:
  """(per-key scores, overall gain) of a merged action on the keys against the adapter's."""
  own = keys.action_MxO
  s2 = keys.sigma_M ** 2
  dots = np.sum(merged_MxO * own, axis=1)
  gains = dots / s2
  norms = np.linalg.norm(merged_MxO, axis=1)
  cos = np.where(norms > 0, dots / (np.maximum(norms, 1e-300) * keys.sigma_M), 0.0)
  scores = np.clip(gains, 0.0, 1.0) * np.maximum(cos, 0.0)
  return scores, float(np.sum(dots) / np.sum(s2))


def _path_record(path: str, keys: Keys, merged_MxO: np.ndarray, linear_MxO: np.ndarray,
                 others_MxO: np.ndarray) -> PathRetention:
  """linear: the reference Σ_j w_j ΔW_j on the keys; others: its part from j ≠ k."""
  scores, gain = _score_keys(keys, merged_MxO)
  a_norm = float(np.linalg.norm(keys.action_MxO))
  others = others_MxO
  return PathRetention(
      path=path, n_keys=int(keys.sigma_M.size),
      retention=float(np.sum(keys.sigma_M * scores) / np.sum(keys.sigma_M)), gain=gain,
      crosstalk=float(np.linalg.norm(others)) / a_norm,
      method_residual=float(np.linalg.norm(merged_MxO - linear_MxO)) / a_norm,
      energy=a_norm ** 2, key_retention_M=scores)


def _aggregate(name: str, method: str, records: list[PathRetention]) -> AdapterRetention:
  live = [r for r in records if r.n_keys > 0]
  if not live:
    raise ValueError(f"adapter {name!r} is zero at every path: it edits no keys")
  energy = np.array([r.energy for r in live])
  ret = float(np.sum(energy * np.array([r.retention for r in live])) / np.sum(energy))
  worst = min(live, key=lambda r: r.retention)
  return AdapterRetention(adapter=name, method=method, retention=ret, worst_path=worst.path,
                          worst_retention=worst.retention, paths=tuple(records))


def _names(names: Sequence[str] | None, k: int) -> list[str]:
  if names is None:
    return [str(i) for i in range(k)]
  if len(names) != k:
    raise ValueError(f"names has {len(names)} entries for {k} adapters")
  return [str(n) for n in names]


def _empty(path: str) -> PathRetention:
  return PathRetention(path, 0, 1.0, 1.0, 0.0, 0.0, 0.0, np.zeros(0))


def retention(adapters: Sequence[Mapping[str, lora_lib.LoraFactors]],
              merged: merge_lib.MergeResult, *, reference_weights=None,
              names: Sequence[str] | None = None) -> list[AdapterRetention]:
  """Predicted retention of each adapter under an already computed merge.

  reference_weights [K]: the weights of the linear reference Σ_j w_j ΔW_j that separates
  cross-talk (other adapters) from the method's own residual; None means 1 each.
  """
  paths = merge_lib.check_adapters(adapters)
  k = len(adapters)
  names = _names(names, k)
  w = np.ones(k) if reference_weights is None else _f64(reference_weights)
  if w.shape != (k,):
    raise ValueError(f"reference_weights has shape {w.shape}; expected ({k},)")
  merged_updates = merged.adapter if merged.kind == "factors" else merged.dense
  missing = sorted(set(paths) - set(merged_updates))
  if missing:
    raise ValueError(f"the merge lacks the adapted paths {missing[:4]}")
  out = []
  for i, adapter in enumerate(adapters):
    records = []
    for p in paths:
      keys = keys_of(adapter[p])
      if keys.sigma_M.size == 0:
        records.append(_empty(p))
        continue
      merged_a = _left_apply(keys.keys_IxM, merged_updates[p])
      acts = [w[j] * _left_apply(keys.keys_IxM, adapters[j][p]) for j in range(k)]
      others = sum((acts[j] for j in range(k) if j != i), np.zeros_like(merged_a))
      records.append(_path_record(p, keys, merged_a, sum(acts), others))
    out.append(_aggregate(names[i], merged.method, records))
  return out


def merge_retention(adapters: Sequence[Mapping[str, lora_lib.LoraFactors]], method: str,
                    weights=None, *, flavor: str = "default",
                    names: Sequence[str] | None = None, **options) -> list[AdapterRetention]:
  """Merge with `merge_lib.merge(adapters, method, weights, flavor=..., **options)` and
  predict each adapter's retention (reference weights: the method's resolved weights)."""
  info = merge_lib.method_info(method, flavor)
  merged = merge_lib.merge(adapters, method, weights, flavor=flavor, **options)
  w = np.asarray(merge_lib.resolve_weights(weights, len(adapters), info.default_weights))
  return retention(adapters, merged, reference_weights=w, names=names)


# -------------------------------------------------------------------------------- routers


@dataclasses.dataclass(frozen=True, eq=False)
class RouterRecord:
  """Arrow over a library. prototype_overlap[path]: |⟨v_i, v_j⟩| [K, K]; routing_entropy
  (nats) and self_weight: σ-weighted means over every adapter's keys fed to the router."""

  top_k: int
  temperature: float
  prototype_overlap: dict[str, np.ndarray]
  routing_entropy: float
  max_entropy: float
  self_weight: dict[str, float]
  retention: tuple[AdapterRetention, ...]

  def to_dict(self) -> dict[str, Any]:
    return _to_dict(self)


def arrow_retention(adapters: Sequence[Mapping[str, lora_lib.LoraFactors]], *,
                    top_k: int = 1, temperature: float = 1.0, input_norm: float | None = None,
                    names: Sequence[str] | None = None) -> RouterRecord:
  """Arrow (`route.arrow_router`, outputs mode) scored on the adapters' own keys.

  Each key u of adapter k, scaled to `input_norm` (default √d_in, the norm of an RMS-normed
  activation), is routed as the model would route a token equal to it; the update applied is
  Σ_j w_j(u) ΔW_j. Retention is then scored as for a merge (reference: the plain sum).
  """
  paths = merge_lib.check_adapters(adapters)
  k = len(adapters)
  names = _names(names, k)
  if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= k:
    raise ValueError(f"top_k={top_k!r} must be an int in [1, K={k}]")
  if not temperature > 0:
    raise ValueError(f"temperature={temperature!r} must be > 0")
  protos = {p: _f64(v) for p, v in route_lib.arrow_prototypes(adapters).items()}
  overlap = {p: np.abs(v @ v.T) for p, v in protos.items()}
  per_adapter: list[list[PathRetention]] = [[] for _ in range(k)]
  ent_num = ent_den = 0.0
  self_num = np.zeros(k)
  self_den = np.zeros(k)
  for p in paths:
    d_in = protos[p].shape[1]
    norm = math.sqrt(d_in) if input_norm is None else float(input_norm)
    for i, adapter in enumerate(adapters):
      keys = keys_of(adapter[p])
      if keys.sigma_M.size == 0:
        per_adapter[i].append(_empty(p))
        continue
      x = norm * keys.keys_IxM.T  # [M, d_in]
      logits = np.abs(x @ protos[p].T) / temperature
      w = np.asarray(route_lib.top_k_softmax(logits.astype(np.float32), top_k), np.float64)
      acts = np.stack([_left_apply(keys.keys_IxM, adapters[j][p]) for j in range(k)])  # KxMxO
      routed = np.einsum("mk,kmo->mo", w, acts)
      others = acts.sum(axis=0) - acts[i]
      per_adapter[i].append(_path_record(p, keys, routed, acts.sum(axis=0), others))
      ent = -np.sum(np.where(w > 0, w * np.log(np.maximum(w, 1e-300)), 0.0), axis=1)
      ent_num += float(np.sum(keys.sigma_M * ent))
      ent_den += float(np.sum(keys.sigma_M))
      self_num[i] += float(np.sum(keys.sigma_M * w[:, i]))
      self_den[i] += float(np.sum(keys.sigma_M))
  rets = tuple(_aggregate(names[i], "arrow", per_adapter[i]) for i in range(k))
  return RouterRecord(
      top_k=top_k, temperature=float(temperature), prototype_overlap=overlap,
      routing_entropy=ent_num / max(ent_den, 1e-300), max_entropy=math.log(top_k),
      self_weight={names[i]: float(self_num[i] / max(self_den[i], 1e-300)) for i in range(k)},
      retention=rets)


# ---------------------------------------------------------------------------- bridge path


@dataclasses.dataclass(frozen=True)
class Site:
  """Where an adapted kernel sits: block (layer, 0 attention | 1 MLP) and projection."""

  prefix: str
  layer: int
  block: str
  proj: str

  @property
  def order(self) -> tuple[int, int]:
    return (self.layer, 0 if self.block == "attn" else 1)


def site(path: str) -> Site | None:
  """The site of `layers/<l>/(attn|mlp)/<proj>_proj/kernel`; None for any other path."""
  m = _PATH.match(path)
  if m is None:
    return None
  return Site(m.group(1), int(m.group(2)), m.group(3), m.group(4))


def _kernel(flat: Mapping[str, Any], s: Site, proj: str) -> np.ndarray | None:
  x = flat.get(f"{s.prefix}{s.layer}/{s.block}/{proj}_proj/kernel")
  return None if x is None else _f64(x)


def _norm_scale(flat: Mapping[str, Any], s: Site, d: int) -> np.ndarray:
  x = flat.get(f"{s.prefix}{s.layer}/{s.block}_norm/scale")
  return np.ones(d) if x is None else _f64(x)


def _expand_kv(v_DxKV: np.ndarray, width: int, head_dim: int | None) -> np.ndarray:
  """v_proj's output columns repeated per query head (grouped-query attention), so that they
  index o_proj's input [H·dh]; identity when the widths agree."""
  kv = v_DxKV.shape[1]
  if kv == width:
    return v_DxKV
  if head_dim is None or kv % head_dim or width % kv:
    raise ValueError(f"v_proj writes {kv} features and o_proj reads {width}: pass head_dim "
                     f"(got {head_dim!r}) that divides {kv} to map grouped-query heads")
  d, groups = v_DxKV.shape[0], width // kv
  v = v_DxKV.reshape(d, kv // head_dim, 1, head_dim)
  return np.broadcast_to(v, (d, kv // head_dim, groups, head_dim)).reshape(d, width)


def residual_writes(flat: Mapping[str, Any], path: str, keys: Keys,
                    head_dim: int | None = None) -> np.ndarray | None:
  """The update's σ-weighted writes mapped into the residual stream [d_model, M], or None if
  it writes none there (q/k change the attention pattern, not the stream's content)."""
  s = site(path)
  if s is None or s.proj in ("q", "k"):
    return None
  w = keys.writes_OxM * keys.sigma_M  # [d_out, M]
  if s.proj in ("o", "down"):
    return w
  if s.proj == "v":
    o = _kernel(flat, s, "o")
    if o is None:
      return None
    return o.T @ _expand_kv(np.eye(w.shape[0]), o.shape[0], head_dim).T @ w
  down = _kernel(flat, s, "down")
  return None if down is None else down.T @ w


def residual_reads(flat: Mapping[str, Any], path: str, keys: Keys,
                   head_dim: int | None = None) -> np.ndarray | None:
  """An orthonormal basis of the residual-stream directions the update's keys read
  [d_model, n], or None: q/k/v/gate/up read the normed stream through the pre-norm scale γ
  (⟨γ⊙n(x), u⟩ = ⟨n(x), γ⊙u⟩); o_proj reads v_proj's output, down_proj up_proj's (linearised)."""
  s = site(path)
  if s is None:
    return None
  u = keys.keys_IxM
  if s.proj == "o":
    v = _kernel(flat, s, "v")
    if v is None:
      return None
    u = _expand_kv(v, u.shape[0], head_dim) @ u
  elif s.proj == "down":
    up = _kernel(flat, s, "up")
    if up is None:
      return None
    u = up @ u
  u = _norm_scale(flat, s, u.shape[0])[:, None] * u
  q, r = np.linalg.qr(u)
  keep = np.abs(np.diag(r)) > 1e-10 * max(np.max(np.abs(np.diag(r))), 1e-300)
  return q[:, keep]


@dataclasses.dataclass(frozen=True, eq=False)
class BridgeRecord:
  """Writer → reader path. strength: max over (writer path, later reader path) of the
  fraction ‖P_read Y‖²/‖Y‖² of the writer's σ-weighted residual writes Y that the reader's
  keys read; random_baseline: dim(read)/d_model for that pair; pairs: number of
  (writer, later reader) pairs — 0 means no path at all (Theorem 2's one-layer case)."""

  writer: str
  reader: str
  pairs: int
  strength: float
  random_baseline: float
  best_pair: tuple[str, str] | None
  exists: bool

  def to_dict(self) -> dict[str, Any]:
    return _to_dict(self)


def bridge_path(params: Mapping[str, Any], writer: Mapping[str, lora_lib.LoraFactors],
                reader: Mapping[str, lora_lib.LoraFactors], *, names: tuple[str, str] = ("0", "1"),
                margin: float = 2.0, head_dim: int | None = None) -> BridgeRecord:
  """Can what `writer` writes be read by `reader`'s keys at a strictly later block?

  exists: some pair's strength exceeds `margin` × its random baseline (with no later reader
  the path is structurally zero). head_dim is needed only for grouped-query attention.
  """
  if not margin >= 1.0:
    raise ValueError(f"margin={margin!r} must be >= 1")
  flat = tree_lib.flatten(params)
  writes = {}
  for p, f in writer.items():
    s = site(p)
    keys = keys_of(f)
    y = residual_writes(flat, p, keys, head_dim) if s is not None and keys.sigma_M.size else None
    if y is not None and np.any(y):
      writes[p] = (s, y)
  reads = {}
  for p, f in reader.items():
    s = site(p)
    keys = keys_of(f)
    q = residual_reads(flat, p, keys, head_dim) if s is not None and keys.sigma_M.size else None
    if q is not None and q.size:
      reads[p] = (s, q)
  best, best_pair, best_base, pairs, exists = 0.0, None, 0.0, 0, False
  for pw, (sw, y) in sorted(writes.items()):
    for pr, (sr, q) in sorted(reads.items()):
      if sr.prefix != sw.prefix or sr.order <= sw.order or q.shape[0] != y.shape[0]:
        continue
      pairs += 1
      frac = float(np.sum((q.T @ y) ** 2) / np.sum(y ** 2))
      base = q.shape[1] / q.shape[0]
      if frac > margin * base:
        exists = True
      if frac > best:
        best, best_pair, best_base = frac, (pw, pr), base
  return BridgeRecord(writer=names[0], reader=names[1], pairs=pairs, strength=best,
                      random_baseline=best_base, best_pair=best_pair, exists=exists)


# ------------------------------------------------------------------------------- capacity


@dataclasses.dataclass(frozen=True, eq=False)
class CapacityRecord:
  """Keys to hold vs rank available at one path. adapter_keys: numerical rank of each ΔW_k
  (σ > rtol·σ_max); adapter_saturated: numerical rank = nominal rank (the adapter uses all r
  directions: more facts would need more rank); merged_rank_limit: what the method can hold;
  merged_effective_rank: the merge's numerical rank; ratio: min(1, limit / Σ keys)."""

  path: str
  adapter_keys: dict[str, int]
  adapter_saturated: dict[str, bool]
  keys_needed: int
  merged_rank_limit: int
  merged_effective_rank: int
  ratio: float

  def to_dict(self) -> dict[str, Any]:
    return _to_dict(self)


def _rank(s: np.ndarray, rtol: float) -> int:
  return int(np.sum(s > rtol * s[0])) if s.size and s[0] > 0 else 0


def capacity(adapters: Sequence[Mapping[str, lora_lib.LoraFactors]],
             merged: merge_lib.MergeResult | None = None, *, rtol: float = 1e-2,
             names: Sequence[str] | None = None) -> list[CapacityRecord]:
  """Per path: the keys the adapters hold against the rank the merge can give them."""
  paths = merge_lib.check_adapters(adapters)
  names = _names(names, len(adapters))
  out = []
  for p in paths:
    fs = [ad[p] for ad in adapters]
    keys = {n: _rank(full_model.update_svd(f)[1], rtol) for n, f in zip(names, fs)}
    sat = {n: keys[n] >= f.rank for n, f in zip(names, fs)}
    need = sum(keys.values())
    d_in, d_out = fs[0].a.shape[0], fs[0].b.shape[1]
    if merged is None:
      limit = min(d_in, d_out, sum(f.rank for f in fs))
      eff = limit
    elif merged.kind == "factors":
      f = merged.adapter[p]
      limit = min(d_in, d_out, f.rank)
      eff = _rank(full_model.update_svd(f)[1], rtol)
    else:
      limit = min(d_in, d_out)
      eff = _rank(np.linalg.svd(_f64(merged.dense[p]), compute_uv=False), rtol)
    out.append(CapacityRecord(path=p, adapter_keys=keys, adapter_saturated=sat,
                              keys_needed=need, merged_rank_limit=int(limit),
                              merged_effective_rank=int(eff),
                              ratio=min(1.0, limit / need) if need else 1.0))
  return out


# -------------------------------------------------------------------- prior-art baselines


def _pair_paths(adapter_i, adapter_j) -> list[str]:
  paths = sorted(set(adapter_i) & set(adapter_j))
  if not paths:
    raise ValueError("the two adapters share no path")
  return paths


def _gram_products(f: lora_lib.LoraFactors, g: lora_lib.LoraFactors):
  """⟨ΔW_f, ΔW_g⟩_F from the factors: s_f s_g tr((A_fᵀ A_g)(B_g B_fᵀ))."""
  return f.scale * g.scale * float(np.sum((_f64(f.a).T @ _f64(g.a)) * (_f64(f.b) @ _f64(g.b).T)))


def task_vector_cosine(adapter_i, adapter_j) -> float:
  """Cosine between the two task vectors (all ΔW's flattened and concatenated)."""
  paths = _pair_paths(adapter_i, adapter_j)
  ij = sum(_gram_products(adapter_i[p], adapter_j[p]) for p in paths)
  ii = sum(_gram_products(adapter_i[p], adapter_i[p]) for p in paths)
  jj = sum(_gram_products(adapter_j[p], adapter_j[p]) for p in paths)
  return float(ij / math.sqrt(max(ii * jj, 1e-300)))


def subspace_overlap(adapter_i, adapter_j) -> float:
  """Mean cos² of the principal angles between the two read (key) spaces, averaged over
  paths (`full_model.subspace_angles`, dim = the smaller numerical rank)."""
  paths = _pair_paths(adapter_i, adapter_j)
  vals = [full_model.subspace_angles(p, adapter_i[p], adapter_j[p]).read_overlap for p in paths
          if np.any(_f64(adapter_i[p].b)) and np.any(_f64(adapter_j[p].b))]
  return float(np.mean(vals)) if vals else 0.0


def cka(adapter_i, adapter_j) -> float:
  """Linear CKA between the updates as linear maps on the input space, averaged over paths:
  ‖ΔW_iᵀ ΔW_j‖²_F / (‖ΔW_iᵀ ΔW_i‖_F ‖ΔW_jᵀ ΔW_j‖_F) (Kornblith et al. 2019's form with the
  updates' rows as features; 1 for the same map up to rotation/scale)."""
  paths = _pair_paths(adapter_i, adapter_j)
  vals = []
  for p in paths:
    f, g = adapter_i[p], adapter_j[p]
    ua, sa, va = full_model.update_svd(f)
    ub, sb, vb = full_model.update_svd(g)
    if not (sa.size and sa[0] > 0 and sb.size and sb[0] > 0):
      continue
    # ΔW = U S Vᵀ: ‖ΔW_iᵀ ΔW_j‖ = ‖S_i U_iᵀ U_j S_j‖ (V's orthonormal), ‖ΔWᵀΔW‖ = ‖S²‖
    cross = (sa[:, None] * (ua.T @ ub)) * sb[None, :]
    vals.append(float(np.sum(cross ** 2) / (np.linalg.norm(sa ** 2) * np.linalg.norm(sb ** 2))))
  return float(np.mean(vals)) if vals else 0.0


def baselines(adapters: Sequence[Mapping[str, lora_lib.LoraFactors]],
              names: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
  """Per adapter, its largest similarity to any other adapter of the library, by each
  prior-art measure (|task-vector cosine|, subspace overlap, CKA). Higher = more interference
  expected; these do not depend on the merge method."""
  names = _names(names, len(adapters))
  out = {}
  for i, ai in enumerate(adapters):
    others = [aj for j, aj in enumerate(adapters) if j != i]
    out[names[i]] = {
        "task_vector_cosine": max((abs(task_vector_cosine(ai, aj)) for aj in others),
                                  default=0.0),
        "subspace_overlap": max((subspace_overlap(ai, aj) for aj in others), default=0.0),
        "cka": max((cka(ai, aj) for aj in others), default=0.0)}
  return out


# ------------------------------------------------------------------------------ statistics


def rankdata(x) -> np.ndarray:
  """Ranks 1..n with ties given their average rank."""
  x = _f64(x)
  order = np.argsort(x, kind="mergesort")
  ranks = np.empty(x.size)
  sx = x[order]
  i = 0
  while i < x.size:
    j = i
    while j + 1 < x.size and sx[j + 1] == sx[i]:
      j += 1
    ranks[order[i:j + 1]] = 0.5 * (i + j) + 1.0
    i = j + 1
  return ranks


def spearman(x, y) -> float:
  """Spearman's ρ (Pearson correlation of the average ranks); nan if either side is
  constant."""
  x, y = _f64(x), _f64(y)
  if x.shape != y.shape or x.ndim != 1:
    raise ValueError(f"spearman needs two 1-D arrays of one length, got {x.shape}, {y.shape}")
  rx, ry = rankdata(x), rankdata(y)
  rx -= rx.mean()
  ry -= ry.mean()
  den = math.sqrt(float(np.sum(rx * rx) * np.sum(ry * ry)))
  return float(np.sum(rx * ry) / den) if den > 0 else float("nan")


def bootstrap_spearman(x, y, *, seed: int, n_boot: int = 2000,
                       level: float = 0.95) -> tuple[float, float, float]:
  """(ρ, low, high): a percentile bootstrap interval over settings (resampled with
  replacement; resamples with a constant side are skipped)."""
  x, y = _f64(x), _f64(y)
  rho = spearman(x, y)
  rng = np.random.default_rng(seed)
  vals = []
  for _ in range(n_boot):
    idx = rng.integers(0, x.size, x.size)
    r = spearman(x[idx], y[idx])
    if math.isfinite(r):
      vals.append(r)
  if not vals:
    return rho, float("nan"), float("nan")
  lo, hi = np.quantile(vals, [(1 - level) / 2, (1 + level) / 2])
  return rho, float(lo), float(hi)


# ------------------------------------------------------------------ a library's pre-flight


@dataclasses.dataclass(frozen=True)
class MethodConfig:
  """One recycling method to check: `method` is a merge method of `flavor` (options passed to
  `merge_lib.merge`) or 'arrow' (options: top_k, temperature, input_norm)."""

  name: str
  method: str
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  weights: tuple[float, ...] | None = None
  flavor: str = "default"


def _cause(p: PathRetention) -> str:
  """The largest of the three losses at the worst path, in words."""
  losses = {"lost gain": max(0.0, 1.0 - p.gain), "cross-talk from the other adapters":
            p.crosstalk, "the method's own residual (cross terms, trimming, truncation or "
            "routing)": p.method_residual}
  return max(losses, key=losses.get)


def check_library(params: Mapping[str, Any], adapters: Mapping[str, Mapping[str, lora_lib.LoraFactors]],
                  methods: Sequence[MethodConfig], *, erase_below: float = 0.5,
                  head_dim: int | None = None, merges: Mapping[str, merge_lib.MergeResult] | None = None,
                  activation: str = "silu") -> dict[str, Any]:
  """The whole pre-flight of one library: retention per adapter per method (with capacity
  for merges, routing statistics for Arrow), the bridge path between every ordered pair of
  adapters, the prior-art similarities, and verdicts in words. JSON-ready.

  merges: already computed MergeResults by method name (else computed here).
  """
  if not adapters:
    raise ValueError("adapters must name at least one adapter")
  if not 0.0 < erase_below < 1.0:
    raise ValueError(f"erase_below={erase_below!r} must be in (0, 1)")
  names = list(adapters)
  lib = [adapters[n] for n in names]
  out: dict[str, Any] = {"adapters": names, "methods": {}, "verdicts": []}
  paths = merge_lib.check_adapters(lib)
  try:
    probes = embedding_probes(params, paths, activation=activation, head_dim=head_dim)
  except ValueError:
    probes = None  # no embedding or non-transformer paths: key retention only
  verdicts = out["verdicts"]
  for spec in methods:
    entry: dict[str, Any] = {"method": spec.method, "options": jsonable(
        {k: v for k, v in spec.options.items() if k not in ("key", "masks")})}
    if spec.method == "arrow":
      opts = dict(spec.options)
      top_k = min(int(opts.pop("top_k", 1)), len(lib))
      rec = arrow_retention(lib, top_k=top_k, names=names, **opts)
      rets = rec.retention
      probe = (None if probes is None else probe_retention(
          lib, None, probes, arrow_top_k=top_k,
          arrow_temperature=float(opts.get("temperature", 1.0)), names=names))
      entry["router"] = {"routing_entropy": rec.routing_entropy,
                         "max_entropy": rec.max_entropy, "self_weight": rec.self_weight,
                         "prototype_overlap_max": float(max(
                             (np.max(v - np.eye(len(lib))) for v in
                              rec.prototype_overlap.values()), default=0.0))}
    else:
      info = merge_lib.method_info(spec.method, spec.flavor)
      merged = (merges or {}).get(spec.name) or merge_lib.merge(
          lib, spec.method, spec.weights, flavor=spec.flavor, **spec.options)
      w = np.asarray(merge_lib.resolve_weights(spec.weights, len(lib), info.default_weights))
      rets = retention(lib, merged, reference_weights=w, names=names)
      probe = None if probes is None else probe_retention(lib, merged, probes, names=names)
      caps = capacity(lib, merged, names=names)
      entry["capacity"] = {"min_ratio": min(c.ratio for c in caps),
                           "keys_needed": sum(c.keys_needed for c in caps),
                           "rank_limit": sum(c.merged_rank_limit for c in caps)}
    entry["retention"] = {r.adapter: r.retention for r in rets}
    if probe is not None:
      entry["probe_retention"] = {r.adapter: r.retention for r in probe}
    entry["detail"] = {r.adapter: {
        "worst_path": r.worst_path, "worst_retention": r.worst_retention,
        "gain": float(np.mean([p.gain for p in r.paths if p.n_keys])),
        "crosstalk": float(np.mean([p.crosstalk for p in r.paths if p.n_keys])),
        "method_residual": float(np.mean([p.method_residual for p in r.paths if p.n_keys]))}
        for r in rets}
    for r in rets:
      if r.retention < erase_below:
        worst = next(p for p in r.paths if p.path == r.worst_path)
        verdicts.append(f"{spec.name} erases {r.adapter}: predicted retention {r.retention:.2f}"
                        f" (worst at {r.worst_path}: {r.worst_retention:.2f}, mostly "
                        f"{_cause(worst)})")
    if all(r.retention >= erase_below for r in rets):
      verdicts.append(f"{spec.name} keeps every adapter (lowest predicted retention "
                      f"{min(r.retention for r in rets):.2f})")
    out["methods"][spec.name] = entry
  bridges = []
  for wi, w_name in enumerate(names):
    for ri, r_name in enumerate(names):
      if wi == ri:
        continue
      b = bridge_path(params, adapters[w_name], adapters[r_name], names=(w_name, r_name),
                      head_dim=head_dim)
      bridges.append(b.to_dict())
      if b.pairs == 0:
        verdicts.append(f"no bridge path {w_name} -> {r_name} (no later adapted layer reads "
                        "what it writes): direct two-hop composition through these adapters "
                        "is impossible; chain-of-thought composition needs only retention")
      elif not b.exists:
        verdicts.append(f"no bridge path above chance {w_name} -> {r_name} (strength "
                        f"{b.strength:.2f}, within 2x of a random subspace's "
                        f"{b.random_baseline:.2f}): direct two-hop composition unlikely; "
                        "chain-of-thought composition needs only retention")
      else:
        verdicts.append(f"bridge path {w_name} -> {r_name}: {b.best_pair[0]} -> "
                        f"{b.best_pair[1]}, strength {b.strength:.2f} (random "
                        f"{b.random_baseline:.2f}); latent composition is possible, not "
                        "guaranteed")
  out["bridge"] = bridges
  caps = capacity(lib, None, names=names)
  out["capacity"] = {n: {"keys": sum(c.adapter_keys[n] for c in caps),
                         "saturated_paths": sum(c.adapter_saturated[n] for c in caps),
                         "paths": len(caps)} for n in names}
  out["baselines"] = baselines(lib, names=names)
  return out


# ------------------------------------------------- retention on the base model's own inputs

_ACTIVATIONS = {"silu": lambda x: x / (1.0 + np.exp(-x)), "relu": lambda x: np.maximum(x, 0.0),
                "gelu": lambda x: 0.5 * x * (1.0 + np.tanh(0.7978845608 * (x + 0.044715 * x ** 3))),
                "gelu_tanh": lambda x: 0.5 * x * (1.0 + np.tanh(0.7978845608 * (x + 0.044715 * x ** 3)))}


def embedding_probes(params: Mapping[str, Any], paths: Sequence[str], *, activation: str = "silu",
                     head_dim: int | None = None, max_rows: int = 512) -> dict[str, np.ndarray]:
  """Data-free stand-ins for each adapted kernel's inputs, from the base weights alone: the
  token embeddings (the residual stream at layer 0, and its largest part in small models),
  RMS-normalised and scaled by the block's pre-norm γ; through v_proj for o_proj and through
  the gated MLP for down_proj. {path: X [n, d_in]} (the first `max_rows` tokens)."""
  if activation not in _ACTIVATIONS:
    raise ValueError(f"activation={activation!r} is not one of {sorted(_ACTIVATIONS)}")
  flat = tree_lib.flatten(params)
  emb = next((flat[p] for p in ("embed/embedding", "embed/tokens") if p in flat), None)
  if emb is None:
    raise ValueError("params have no embed/embedding to draw probes from")
  e = _f64(emb)[:max_rows]
  normed = e / np.sqrt(np.mean(e * e, axis=1, keepdims=True) + 1e-6)
  out = {}
  for p in paths:
    s = site(p)
    if s is None:
      raise ValueError(f"embedding_probes: {p!r} is not a layers/<l>/(attn|mlp)/<proj> kernel")
    x = normed * _norm_scale(flat, s, normed.shape[1])[None, :]
    if s.proj == "o":
      v = _kernel(flat, s, "v")
      width = _f64(flat[p]).shape[0]
      x = x @ _expand_kv(v, width, head_dim)
    elif s.proj == "down":
      up, gate = _kernel(flat, s, "up"), _kernel(flat, s, "gate")
      x = (_ACTIVATIONS[activation](x @ gate) * (x @ up) if gate is not None
           else _ACTIVATIONS[activation](x @ up))
    out[p] = x
  return out


def _probe_record(path: str, own_NxO: np.ndarray, merged_NxO: np.ndarray) -> PathRetention:
  w = np.linalg.norm(own_NxO, axis=1)
  live = w > 1e-12 * max(float(w.max()), 1e-300)
  own, merged, w = own_NxO[live], merged_NxO[live], w[live]
  dots = np.sum(own * merged, axis=1)
  gains = dots / w ** 2
  mn = np.linalg.norm(merged, axis=1)
  cos = np.where(mn > 0, dots / (np.maximum(mn, 1e-300) * w), 0.0)
  scores = np.clip(gains, 0.0, 1.0) * np.maximum(cos, 0.0)
  err = float(np.linalg.norm(merged - own)) / max(float(np.linalg.norm(own)), 1e-300)
  return PathRetention(path=path, n_keys=int(w.size),
                       retention=float(np.sum(w * scores) / max(np.sum(w), 1e-300)),
                       gain=float(np.sum(dots) / max(np.sum(w ** 2), 1e-300)), crosstalk=err,
                       method_residual=err, energy=float(np.sum(w ** 2)), key_retention_M=scores)


def probe_retention(adapters: Sequence[Mapping[str, lora_lib.LoraFactors]],
                    merged: merge_lib.MergeResult | None, probes: Mapping[str, np.ndarray], *,
                    arrow_top_k: int | None = None, arrow_temperature: float = 1.0,
                    names: Sequence[str] | None = None) -> list[AdapterRetention]:
  """Retention scored on probe inputs (e.g. `embedding_probes`) instead of the adapters' own
  keys: each probe row is weighted by how strongly adapter k responds to it, ‖x ΔW_k‖, and
  scored by clip(gain, 0, 1)·max(cos, 0) of the recycled response x ΔW_merged against x ΔW_k.
  Unlike `retention`, the other adapters' updates act on the whole probe, not only on k's
  keys, so overlapping inputs count as interference. merged=None with arrow_top_k routes each
  probe by Arrow instead (crosstalk/method_residual both hold the relative error here)."""
  paths = merge_lib.check_adapters(adapters)
  k = len(adapters)
  names = _names(names, k)
  missing = sorted(set(paths) - set(probes))
  if missing:
    raise ValueError(f"probes lack the adapted paths {missing[:4]}")
  if merged is None and arrow_top_k is None:
    raise ValueError("probe_retention needs a merge or arrow_top_k")
  protos = ({p: _f64(v) for p, v in route_lib.arrow_prototypes(adapters).items()}
            if merged is None else None)
  updates = None if merged is None else (merged.adapter if merged.kind == "factors"
                                         else merged.dense)
  out = []
  for i in range(k):
    records = []
    for p in paths:
      x = _f64(probes[p])
      acts = [x @ _f64(lora_lib.delta({p: ad[p]})[p]) for ad in adapters]
      if updates is not None:
        u = updates[p]
        merged_x = (u.scale * (x @ _f64(u.a)) @ _f64(u.b) if lora_lib.is_factors(u)
                    else x @ _f64(u))
      else:
        logits = np.abs(x @ protos[p].T) / arrow_temperature
        w = np.asarray(route_lib.top_k_softmax(logits.astype(np.float32), arrow_top_k),
                       np.float64)
        merged_x = np.einsum("nk,kno->no", w, np.stack(acts))
      records.append(_probe_record(p, acts[i], merged_x))
    out.append(_aggregate(names[i], "arrow" if merged is None else merged.method, records))
  return out
