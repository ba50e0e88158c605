"""Score C combinations of K adapters in one compiled call.

`score_combinations(params, adapters, weights_CxK, batch, cfg=..., method=..., metric=...)`
evaluates every weight vector of `weights_CxK` on the same teacher-forced batch
(`lora_limits.data.lm_batch` format) inside one `jax.jit`: the C axis is `lax.map`-ped in
chunks of `chunk` combinations, each chunk vmapped, and split over devices with
`jax.shard_map` when a mesh of several devices is passed. C is padded to a multiple of
devices × chunk (with copies of the last row) and the padding is stripped.

How a combination is evaluated depends on the method (the choice is the cheapest exact one):
- 'mix' and the merges that are exactly Σ_k w_k ΔW_k (`sum`, `task_arithmetic`,
  `uniform_delta`, `cat`; PEFT `cat`): the unmerged mixing path, y = xW + Σ_k w_k s (x A_k) B_k
  with `LoraMix(weights=[K])`. No copy of any weight is formed; the cost per combination is
  the forward plus K small LoRA products per adapted layer.
- merges whose result is factors (`uniform_factors` — LoraHub's combination —, `svd`, `knots`,
  PEFT's factor-wise methods): the merged factors of each combination are computed inside the
  map (cheap: r × d) and run unmerged as a single adapter.
- merges whose result is dense (`ties`, `dare_*`, `magnitude_prune`): W + ΔW per combination,
  so a chunk holds `chunk` copies of the adapted kernels; the memory budget accounts for it.

The chunk size comes from an analytic estimate of one combination's buffers (`estimate_bytes`):
the largest chunk that fits `memory_budget_bytes` (default 4 GiB; a budget that cannot hold even
one combination is a ValueError saying what would fit), and no larger than `chunk_target_bytes`
(default 64 MiB) of estimated working set, because wider vmaps are *slower* on a CPU once they
spill the caches (BENCHMARKS.md, "Chunk size", from `make bench`). On accelerators raise the
target (or pass None). `memory_analysis` reports what XLA actually allocates for the chosen
plan.

Metrics, teacher-forced over the weighted target positions: 'loss' (mean token NLL),
'token_accuracy', 'exact_match' (a row counts when the argmax equals the target at every
weighted position — the same as greedy decoding's exact match of the answer).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from lora_limits import lora as lora_lib
from lora_limits import metrics as metrics_lib
from lora_limits.models import transformer
from lora_limits.recycle import merge as merge_lib

METRICS = metrics_lib.BATCH_METRICS
DEFAULT_MEMORY_BUDGET = 4 * 2**30
DEFAULT_CHUNK_TARGET = 64 * 2**20
_ROUTES = ("mix", "factors", "dense")


@dataclasses.dataclass(frozen=True)
class ScorePlan:
  """Everything static about one compiled scorer (hashable: it keys the jit cache)."""

  cfg: transformer.ModelConfig
  route: str  # 'mix' | 'factors' | 'dense'
  method: str
  flavor: str
  options: tuple[tuple[str, Any], ...]
  metrics: tuple[str, ...]
  chunk: int
  num_devices: int
  mesh: Mesh | None
  padded: int  # C after padding


def _score_one(params, adapters, batch, key, w_K, plan: ScorePlan):
  """Metrics of one weight vector (traced; vmapped by lax.map)."""
  cfg = plan.cfg
  opts = dict(plan.options)
  if plan.route == "mix":
    if plan.method != "mix":
      w_K = merge_lib.method_info(plan.method, plan.flavor).mix_weights(w_K, opts)
    mix = lora_lib.LoraMix(stack=adapters, weights=w_K)
    logits = transformer.apply(params, cfg, batch["inputs"], lora=mix)
  else:
    if key is not None:
      opts["key"] = key
    result = merge_lib.merge(adapters, plan.method, w_K, flavor=plan.flavor, **opts)
    if result.kind == "factors":
      logits = transformer.apply(params, cfg, batch["inputs"],
                                 lora=lora_lib.LoraMix.single(result.adapter))
    else:
      logits = transformer.apply(lora_lib.merge_dense(params, result.dense), cfg,
                                 batch["inputs"])
  m = metrics_lib.batch_metrics(logits, batch["targets"], batch["weights"])
  return {name: m[name] for name in plan.metrics}


def _score_all(params, adapters, batch, key, weights_PxK, plan: ScorePlan):
  """All padded combinations: lax.map in chunks; shard_map over devices if several."""

  def run(params, adapters, batch, key, w_NxK):
    one = functools.partial(_score_one, params, adapters, batch, key, plan=plan)
    return jax.lax.map(one, w_NxK, batch_size=plan.chunk)

  if plan.num_devices > 1:
    axis = plan.mesh.axis_names[0]
    run = jax.shard_map(run, mesh=plan.mesh, in_specs=(P(), P(), P(), P(), P(axis)),
                        out_specs=P(axis))
  return run(params, adapters, batch, key, weights_PxK)


@functools.cache
def _compiled():
  """The jitted scorer (one compile per ScorePlan and argument shapes)."""
  return jax.jit(_score_all, static_argnames=("plan",))


def _nbytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)
             if hasattr(x, "shape"))


def estimate_bytes(cfg: transformer.ModelConfig, batch_shape: tuple[int, int], route: str,
                   adapters: Sequence[Mapping[str, lora_lib.LoraFactors]]) -> int:
  """A conservative analytic estimate of the buffers one combination needs (float32).

  logits (×3: logits, log-softmax, comparisons); two layers' activations at a time (the
  forward frees a layer's buffers before the next); attention scores; per adapted kernel the
  K LoRA intermediates (mix) or the merged factors (factors) or K + 3 dense d_in × d_out
  buffers (dense: the stacked ΔW_k, masks, the merged update and the new kernel).
  """
  b, t = batch_shape
  n = b * t
  k = len(adapters)
  act = 3 * n * cfg.vocab_size + 2 * (
      n * (8 * cfg.d_model + 4 * cfg.d_ff) + 2 * b * cfg.n_heads * t * t)
  paths = sorted(adapters[0])
  r = sum(ad[p].rank for ad in adapters for p in paths[:1])
  per_path = 0
  for p in paths:
    d_in, d_out = adapters[0][p].a.shape[0], adapters[0][p].b.shape[1]
    if route == "mix":
      per_path += 2 * n * r
    elif route == "factors":
      per_path += 3 * (d_in + d_out) * r + k * d_in * r + 2 * n * r
    else:
      per_path += (k + 3) * d_in * d_out
  return 4 * (act + per_path)


def _route_for(method: str, flavor: str) -> str:
  if method == "mix":
    return "mix"
  info = merge_lib.method_info(method, flavor)
  if info.mixes_outputs:
    return "mix"
  return info.kind


def _static_options(options: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
  items = []
  for name, value in sorted(options.items()):
    if name in ("key", "masks"):
      raise ValueError(f"score_combinations takes the DARE key as key=, not in options; "
                       f"explicit {name!r} are not supported here")
    try:
      hash(value)
    except TypeError as e:
      raise ValueError(f"option {name}={value!r} must be hashable (a static setting)") from e
    items.append((name, value))
  return tuple(items)


def make_plan(params, adapters: Sequence[Mapping[str, lora_lib.LoraFactors]], num_combinations: int,
              batch_shape: tuple[int, int], *, cfg: transformer.ModelConfig, method: str = "mix",
              flavor: str = "default", metrics: tuple[str, ...] = ("loss",),
              options: Mapping[str, Any] | None = None, chunk_size: int | None = None,
              memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
              chunk_target_bytes: int | None = DEFAULT_CHUNK_TARGET,
              mesh: Mesh | None = None, key: jax.Array | None = None) -> ScorePlan:
  """The static plan `score_combinations` compiles: route, chunk, devices, padded C."""
  options = dict(options or {})
  route = _route_for(method, flavor)
  if method != "mix":
    info = merge_lib.method_info(method, flavor)
    merge_lib.check_adapters(adapters, same_rank=not info.mixed_ranks)
    merge_lib.resolve_options(info, dict(options, key=key) if info.random else options)
  elif options:
    raise ValueError(f"method='mix' takes no options, got {sorted(options)}")
  bad = [m for m in metrics if m not in METRICS]
  if bad or not metrics:
    raise ValueError(f"metric {bad or metrics!r} is not one of {list(METRICS)}")
  num_devices = 1
  if mesh is not None:
    if len(mesh.axis_names) != 1:
      raise ValueError(f"mesh must have one axis (the combination axis), got {mesh.axis_names}")
    num_devices = int(mesh.size)
  per_device = math.ceil(num_combinations / num_devices)
  if chunk_size is None:
    fixed = _nbytes(params) + _nbytes(adapters)
    per = estimate_bytes(cfg, batch_shape, route, adapters)
    if memory_budget_bytes < fixed + per:
      mib = 2**20
      raise ValueError(
          f"memory_budget_bytes={memory_budget_bytes} ({memory_budget_bytes / mib:.1f} MiB) cannot "
          f"hold one combination: parameters and adapters take {fixed / mib:.1f} MiB and one "
          f"combination of route {route!r} on a {batch_shape[0]}x{batch_shape[1]} batch about "
          f"{per / mib:.1f} MiB more; raise the budget, score fewer or shorter sequences per "
          "call, or pass chunk_size=1 to run one at a time regardless")
    chunk = (memory_budget_bytes - fixed) // per
    if chunk_target_bytes is not None:
      chunk = min(chunk, chunk_target_bytes // per)
    chunk = int(max(1, min(per_device, chunk)))
  else:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
      raise ValueError(f"chunk_size={chunk_size!r} must be a positive int (or None)")
    chunk = min(chunk_size, per_device)
  step = num_devices * chunk
  padded = math.ceil(num_combinations / step) * step
  return ScorePlan(cfg, route, method, flavor, _static_options(options), tuple(metrics), chunk,
                   num_devices, mesh if num_devices > 1 else None, padded)


def _prepare(params, adapters, weights_CxK, batch, key, plan: ScorePlan):
  w = jnp.asarray(weights_CxK, jnp.float32)
  c = w.shape[0]
  if plan.padded > c:
    w = jnp.concatenate([w, jnp.broadcast_to(w[-1:], (plan.padded - c, w.shape[1]))])
  arg_adapters = lora_lib.stack(adapters) if plan.route == "mix" else list(adapters)
  arg_batch = {k: jnp.asarray(batch[k]) for k in ("inputs", "targets", "weights")}
  return (params, arg_adapters, arg_batch, key, w), c


def _check_inputs(params, adapters, weights_CxK, batch):
  if isinstance(adapters, Mapping) or not adapters:
    raise ValueError("adapters must be a non-empty list of adapters")
  merge_lib.check_adapters(adapters)
  for ad in adapters:
    lora_lib.check_compatible(params, ad)
  shape = np.shape(weights_CxK)
  if len(shape) != 2 or shape[1] != len(adapters) or shape[0] == 0:
    raise ValueError(f"weights_CxK has shape {shape}; expected [C, K] with C >= 1 and "
                     f"K={len(adapters)}")
  missing = {"inputs", "targets", "weights"} - set(batch)
  if missing:
    raise ValueError(f"batch lacks {sorted(missing)} (use lora_limits.data.lm_batch)")
  if np.shape(batch["inputs"]) != np.shape(batch["targets"]):
    raise ValueError(f"batch inputs {np.shape(batch['inputs'])} and targets "
                     f"{np.shape(batch['targets'])} differ in shape")


def score_combinations(params, adapters: Sequence[Mapping[str, lora_lib.LoraFactors]],
                       weights_CxK, batch: Mapping[str, Any], *, cfg: transformer.ModelConfig,
                       method: str = "mix", metric: str | Sequence[str] = "loss",
                       flavor: str = "default", options: Mapping[str, Any] | None = None,
                       key: jax.Array | None = None, chunk_size: int | None = None,
                       memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
                       chunk_target_bytes: int | None = DEFAULT_CHUNK_TARGET,
                       mesh: Mesh | None = None):
  """Scores of C weight vectors over K adapters on one batch, in one jitted call.

  method: 'mix' (Σ_k w_k ΔW_k on the unmerged path) or any merge method of `flavor` (see
    `merge.METHODS` / `merge.PEFT_METHODS`); options: that method's static options (density,
    rank, ...); key: the drop key of the DARE methods (the same masks for every combination).
  metric: a name from METRICS → scores [C]; a sequence of names → {name: [C]}.
  chunk_size: combinations vmapped together (None: the largest within memory_budget_bytes
    and chunk_target_bytes of estimated buffers).
  mesh: a one-axis mesh; with several devices the C axis is split over them.
  """
  _check_inputs(params, adapters, weights_CxK, batch)
  names = (metric,) if isinstance(metric, str) else tuple(metric)
  plan = make_plan(params, adapters, int(np.shape(weights_CxK)[0]),
                   tuple(np.shape(batch["inputs"])), cfg=cfg, method=method, flavor=flavor,
                   metrics=names, options=options, chunk_size=chunk_size,
                   memory_budget_bytes=memory_budget_bytes,
                   chunk_target_bytes=chunk_target_bytes, mesh=mesh, key=key)
  args, c = _prepare(params, adapters, weights_CxK, batch, key, plan)
  out = _compiled()(*args, plan=plan)
  out = {name: v[:c] for name, v in out.items()}
  return out[metric] if isinstance(metric, str) else out


def memory_analysis(params, adapters, weights_CxK, batch, **kwargs):
  """XLA's memory statistics for the plan `score_combinations(**kwargs)` would compile
  (`CompiledMemoryStats`: temp_size_in_bytes, argument_size_in_bytes, ...), and the plan."""
  _check_inputs(params, adapters, weights_CxK, batch)
  metric = kwargs.pop("metric", "loss")
  key = kwargs.pop("key", None)
  names = (metric,) if isinstance(metric, str) else tuple(metric)
  plan = make_plan(params, adapters, int(np.shape(weights_CxK)[0]),
                   tuple(np.shape(batch["inputs"])), metrics=names, key=key, **kwargs)
  args, _ = _prepare(params, adapters, weights_CxK, batch, key, plan)
  compiled = jax.jit(_score_all, static_argnames=("plan",)).lower(*args, plan=plan).compile()
  return compiled.memory_analysis(), plan


def simplex_grid(num_adapters: int, steps: int) -> np.ndarray:
  """All weight vectors on the K-simplex with coordinates in {0, 1/steps, …, 1}: [C, K]."""
  if num_adapters < 1 or steps < 1:
    raise ValueError(f"simplex_grid needs num_adapters >= 1 and steps >= 1, got "
                     f"{num_adapters}, {steps}")

  def rec(k, left):
    if k == 1:
      return [[left]]
    return [[i] + rest for i in range(left + 1) for rest in rec(k - 1, left - i)]

  return np.asarray(rec(num_adapters, steps), np.float32) / steps

