"""LoRA as pure pytree transforms over a model's parameters.

An *adapter* is a plain dict keyed by the adapted kernel's path
(`layers/0/attn/q_proj/kernel`), each value a `LoraFactors(a [d_in, r], b [r, d_out],
scale)`. The update it stands for is ΔW = scale · a @ b. `b` starts at zero, so a fresh
adapter leaves the model unchanged. `scale` is static metadata (alpha/r, or alpha/√r for
rsLoRA), so gradients and optimizer state exist only for `a` and `b`.

`LoraMix` is what the model's forward consults to run adapters *unmerged*:
y = x W + Σ_k w_k s_k (x A_k) B_k, with weights shaped [K], [B, K] or [B, T, K] (broadcast),
or produced per token and per layer by a router. One adapter for training is a K = 1 mix.
A `LoraMix` is a pytree (its router, mode and dropout are static), so it passes through
`jax.jit` as an argument.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from lora_limits import tree as tree_lib

DEFAULT_TARGETS = r"attn/(q|k|v|o)_proj/kernel$|mlp/(gate|up|down)_proj/kernel$"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """rank r, alpha, a regex over parameter paths, rsLoRA scaling, dropout on the LoRA input."""

  rank: int = 8
  alpha: float = 16.0
  targets: str = DEFAULT_TARGETS
  rslora: bool = False
  dropout: float = 0.0

  def __post_init__(self):
    if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
      raise ValueError(f"LoraConfig.rank must be a positive int, got {self.rank!r}")
    if not self.alpha > 0:
      raise ValueError(f"LoraConfig.alpha must be > 0, got {self.alpha!r}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
    try:
      re.compile(self.targets)
    except re.error as e:
      raise ValueError(f"LoraConfig.targets={self.targets!r} is not a valid regex: {e}") from e

  @property
  def scale(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


@dataclasses.dataclass(frozen=True)
class LoraFactors:
  """a: [..., d_in, r]; b: [..., r, d_out]; ΔW = scale · a @ b (leading axes: a stack)."""

  a: jax.Array
  b: jax.Array
  scale: float = 1.0

  @property
  def rank(self) -> int:
    return self.a.shape[-1]


jax.tree_util.register_dataclass(LoraFactors, data_fields=["a", "b"], meta_fields=["scale"])

Adapter = dict[str, LoraFactors]


def is_factors(x: Any) -> bool:
  return isinstance(x, LoraFactors)


def target_paths(params: Mapping[str, Any], targets: str) -> list[str]:
  """Sorted paths of the 2-D kernels whose path matches `targets` (re.search)."""
  pattern = re.compile(targets)
  flat = tree_lib.flatten(params)
  return sorted(p for p, x in flat.items() if pattern.search(p) and getattr(x, "ndim", 0) == 2)


def init(key: jax.Array, params: Mapping[str, Any], spec: LoraConfig) -> Adapter:
  """A fresh adapter: a ~ U(±1/√d_in) (as PEFT's Kaiming init), b = 0."""
  paths = target_paths(params, spec.targets)
  if not paths:
    kernels = [p for p, x in tree_lib.flatten(params).items() if getattr(x, "ndim", 0) == 2]
    raise ValueError(
        f"LoraConfig.targets={spec.targets!r} matches no 2-D kernel; available kernels "
        f"include {kernels[:8]}")
  flat = tree_lib.flatten(params)
  adapter: Adapter = {}
  for i, path in enumerate(paths):
    d_in, d_out = flat[path].shape
    if spec.rank > min(d_in, d_out):
      raise ValueError(
          f"LoraConfig.rank={spec.rank} exceeds min(d_in, d_out)={min(d_in, d_out)} at "
          f"{path!r} (shape {d_in}x{d_out})")
    bound = 1.0 / math.sqrt(d_in)
    a = jax.random.uniform(jax.random.fold_in(key, i), (d_in, spec.rank), jnp.float32,
                           -bound, bound).astype(flat[path].dtype)
    b = jnp.zeros((spec.rank, d_out), flat[path].dtype)
    adapter[path] = LoraFactors(a, b, spec.scale)
  return adapter


def check_compatible(params: Mapping[str, Any], adapter: Mapping[str, LoraFactors]):
  """Raise ValueError naming the path if the adapter does not fit the params (path, shape,
  dtype)."""
  flat = tree_lib.flatten(params)
  for path, f in adapter.items():
    if path not in flat:
      raise ValueError(f"adapter path {path!r} is not a parameter of the model")
    kernel = flat[path]
    if kernel.ndim != 2:
      raise ValueError(f"adapter path {path!r} targets a {kernel.ndim}-D parameter")
    d_in, d_out = kernel.shape
    if f.a.shape[-2] != d_in or f.b.shape[-1] != d_out or f.a.shape[-1] != f.b.shape[-2]:
      raise ValueError(
          f"adapter at {path!r} has a {tuple(f.a.shape)} and b {tuple(f.b.shape)}, which do not "
          f"fit the kernel {d_in}x{d_out}")
    if f.a.dtype != kernel.dtype or f.b.dtype != kernel.dtype:
      # The forward would silently cast the factors to the activations' dtype.
      raise ValueError(
          f"adapter at {path!r} has dtype a {f.a.dtype}, b {f.b.dtype}; the kernel is "
          f"{kernel.dtype} (cast the adapter: jax.tree.map(lambda x: x.astype(...), adapter))")


def delta(adapter: Mapping[str, LoraFactors]) -> dict[str, jax.Array]:
  """{path: ΔW = scale · a @ b} (the dense updates; [d_in, d_out] each)."""
  return {p: f.scale * jnp.einsum("...ir,...ro->...io", f.a, f.b) for p, f in adapter.items()}


def merge(params: Mapping[str, Any], adapter: Mapping[str, LoraFactors],
          weight: float = 1.0) -> dict[str, Any]:
  """params with W ← W + weight · scale · a @ b at each adapted path."""
  check_compatible(params, adapter)
  flat = tree_lib.flatten(params)
  updates = {p: (flat[p] + weight * d.astype(flat[p].dtype)) for p, d in delta(adapter).items()}
  return tree_lib.replace(params, updates)


def unmerge(params: Mapping[str, Any], adapter: Mapping[str, LoraFactors]) -> dict[str, Any]:
  """The inverse of `merge` (up to floating-point rounding)."""
  return merge(params, adapter, weight=-1.0)


def merge_dense(params: Mapping[str, Any], deltas: Mapping[str, jax.Array]) -> dict[str, Any]:
  """params with W ← W + ΔW for dense per-path updates (merges not expressible as factors)."""
  flat = tree_lib.flatten(params)
  for path, d in deltas.items():
    if path not in flat or flat[path].shape != d.shape:
      got = flat[path].shape if path in flat else "missing"
      raise ValueError(f"dense update at {path!r} has shape {d.shape}, parameter is {got}")
  return tree_lib.replace(params, {p: flat[p] + d.astype(flat[p].dtype) for p, d in deltas.items()})


def fold_scale(adapter: Mapping[str, LoraFactors]) -> Adapter:
  """The same updates with the scale folded into b (scale 1)."""
  return {p: LoraFactors(f.a, f.b * f.scale, 1.0) for p, f in adapter.items()}


def stack(adapters: Sequence[Mapping[str, LoraFactors]]) -> Adapter:
  """K adapters → one adapter whose factors have a leading K axis.

  All adapters must adapt the same paths. Mixed ranks are zero-padded to the largest
  (exact: padded columns contribute nothing). If the scales differ they are folded into b.
  """
  if not adapters:
    raise ValueError("stack needs at least one adapter")
  paths = sorted(adapters[0])
  for k, ad in enumerate(adapters[1:], start=1):
    if sorted(ad) != paths:
      missing = sorted(set(paths) ^ set(ad))
      raise ValueError(f"adapter {k} adapts other paths than adapter 0: differs at {missing[:4]}")
  out: Adapter = {}
  for path in paths:
    fs = [ad[path] for ad in adapters]
    for k, f in enumerate(fs[1:], start=1):
      if f.a.shape[-2] != fs[0].a.shape[-2] or f.b.shape[-1] != fs[0].b.shape[-1]:
        raise ValueError(
            f"adapter {k} at {path!r} is {f.a.shape[-2]}x{f.b.shape[-1]}, adapter 0 is "
            f"{fs[0].a.shape[-2]}x{fs[0].b.shape[-1]}")
    same_scale = all(f.scale == fs[0].scale for f in fs)
    scale = fs[0].scale if same_scale else 1.0
    r = max(f.rank for f in fs)
    a_s, b_s = [], []
    for f in fs:
      b = f.b if same_scale else f.b * f.scale
      pad = r - f.rank
      a_s.append(jnp.pad(f.a, ((0, 0), (0, pad))))
      b_s.append(jnp.pad(b, ((0, pad), (0, 0))))
    out[path] = LoraFactors(jnp.stack(a_s), jnp.stack(b_s), scale)
  return out


def unstack(stacked: Mapping[str, LoraFactors]) -> list[Adapter]:
  k = next(iter(stacked.values())).a.shape[0]
  return [{p: LoraFactors(f.a[i], f.b[i], f.scale) for p, f in stacked.items()} for i in range(k)]


class Router(Protocol):
  """Produces mixing weights [B, T, K] for one adapted layer from that layer's input."""

  def __call__(self, path: str, x_BxTxD: jax.Array, factors: LoraFactors,
               state: Any) -> jax.Array:
    ...


_MODES = ("outputs", "factors")


@dataclasses.dataclass(frozen=True)
class LoraMix:
  """Adapters the forward runs unmerged, and how their outputs are mixed.

  stack: {path: LoraFactors(a [K, d_in, r], b [K, r, d_out], scale)} (see `stack`).
  weights: [K], [B, K] or [B, T, K]; None with no router means all ones (a plain sum).
  router: static callable (hashable, e.g. a frozen dataclass) returning [B, T, K] per layer;
    router_state is its per-path data (e.g. Arrow prototypes), a pytree.
  mode: 'outputs' mixes the adapters' outputs, Σ_k w_k s (x A_k) B_k; 'factors' mixes the
    factors per token, s (x Σ_k w_k A_k)(Σ_k w_k B_k) (mttl's variant; adds cross terms).
  dropout: rate on the LoRA input x during training.
  """

  stack: Adapter
  weights: jax.Array | None = None
  router_state: Any = None
  router: Router | None = None
  mode: str = "outputs"
  dropout: float = 0.0

  def __post_init__(self):
    if self.mode not in _MODES:
      raise ValueError(f"LoraMix.mode={self.mode!r} is not one of {list(_MODES)}")
    if self.router is not None and self.weights is not None:
      raise ValueError("LoraMix takes either fixed weights or a router, not both")
    if self.stack:
      k = self.num_adapters
      if self.weights is not None and hasattr(self.weights, "shape"):
        if self.weights.ndim not in (1, 2, 3) or self.weights.shape[-1] != k:
          raise ValueError(
              f"LoraMix.weights has shape {tuple(self.weights.shape)}; expected [K], [B, K] "
              f"or [B, T, K] with K={k}")

  @property
  def num_adapters(self) -> int:
    return next(iter(self.stack.values())).a.shape[0]

  @classmethod
  def single(cls, adapter: Mapping[str, LoraFactors], dropout: float = 0.0) -> "LoraMix":
    """One adapter (K = 1, weight 1): the training path."""
    stacked = {p: LoraFactors(f.a[None], f.b[None], f.scale) for p, f in adapter.items()}
    return cls(stack=stacked, dropout=dropout)

  @classmethod
  def of(cls, adapters: Sequence[Mapping[str, LoraFactors]], weights=None, **kwargs) -> "LoraMix":
    return cls(stack=stack(adapters), weights=None if weights is None else jnp.asarray(weights),
               **kwargs)

  def apply_at(self, path: str, x: jax.Array, dropout_key: jax.Array | None = None):
    """(Σ_k w_k s (x A_k) B_k or None if `path` is not adapted, routing weights or None)."""
    f = self.stack.get(path)
    if f is None:
      return None, None
    if dropout_key is not None and self.dropout > 0:
      keep = jax.random.bernoulli(dropout_key, 1.0 - self.dropout, x.shape)
      x = jnp.where(keep, x / (1.0 - self.dropout), 0.0).astype(x.dtype)
    a = f.a.astype(x.dtype)
    b = f.b.astype(x.dtype)
    routing = None
    if self.router is not None:
      w = self.router(path, x, f, None if self.router_state is None else self.router_state[path])
      routing = w
    elif self.weights is not None:
      w = _broadcast_weights(jnp.asarray(self.weights, x.dtype), x.ndim)
    else:
      w = None
    xa = jnp.einsum("...d,kdr->...kr", x, a)
    if self.mode == "outputs":
      if w is not None:
        xa = xa * w[..., None]
      y = jnp.einsum("...kr,kro->...o", xa, b)
    else:
      if w is None:
        w = jnp.ones(xa.shape[:-1], x.dtype)
      w = jnp.broadcast_to(w, xa.shape[:-1])
      xa_mixed = jnp.einsum("...kr,...k->...r", xa, w)
      y = jnp.einsum("...r,...k,kro->...o", xa_mixed, w, b)
    return f.scale * y, routing


def _flatten_mix(mix: LoraMix):
  return (mix.stack, mix.weights, mix.router_state), (mix.router, mix.mode, mix.dropout)


def _unflatten_mix(static, children) -> LoraMix:
  # No __post_init__: transformations rebuild the mix with placeholder leaves.
  mix = object.__new__(LoraMix)
  for name, value in zip(("stack", "weights", "router_state", "router", "mode", "dropout"),
                         tuple(children) + tuple(static)):
    object.__setattr__(mix, name, value)
  return mix


# A pytree: the arrays are leaves (jit arguments), the router, mode and dropout static.
jax.tree_util.register_pytree_node(LoraMix, _flatten_mix, _unflatten_mix)


def _broadcast_weights(w: jax.Array, x_ndim: int) -> jax.Array:
  """[K] → as is; [B, K] → [B, 1, K] (for x [B, T, D]); [B, T, K] → as is."""
  if w.ndim == 2 and x_ndim == 3:
    return w[:, None, :]
  return w


def num_params(adapter: Mapping[str, LoraFactors]) -> int:
  return sum(int(f.a.size + f.b.size) for f in adapter.values())


def to_arrays(adapter: Mapping[str, LoraFactors]) -> tuple[dict[str, Any], dict[str, float]]:
  """({path: {'a', 'b'}} nested by path, {path: scale}) — for serialisation."""
  arrays = tree_lib.unflatten({p: {"a": f.a, "b": f.b} for p, f in adapter.items()})
  return arrays, {p: float(f.scale) for p, f in adapter.items()}


def from_arrays(arrays: Mapping[str, Any], scales: Mapping[str, float]) -> Adapter:
  flat = tree_lib.flatten(arrays)
  out: Adapter = {}
  for path, scale in scales.items():
    if f"{path}/a" not in flat or f"{path}/b" not in flat:
      raise ValueError(f"adapter arrays lack factors for {path!r}")
    out[path] = LoraFactors(flat[f"{path}/a"], flat[f"{path}/b"], float(scale))
  extra = {p.rsplit("/", 1)[0] for p in flat} - set(scales)
  if extra:
    raise ValueError(f"adapter arrays have factors without a scale: {sorted(extra)[:4]}")
  return out
