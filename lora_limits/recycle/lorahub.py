"""LoraHub (Huang et al. 2023): a few-shot, gradient-free search of combination weights.

The combination is LoraHub's own: A = Σ_k w_k A_k, B = Σ_k w_k B_k (`merge` method
`uniform_factors`). The objective on a few labelled examples is the teacher-forced loss plus
an L1 penalty `l1 · mean_k |w_k|`, with w bounded to ±`bound` (LoraHub: ±1.5, 0.05, 40 steps
of nevergrad from w = 0). We search with CMA-ES from `evosax` (0.3.2 works with JAX 0.10):
each generation's whole population is scored by `score_combinations` in one compiled call.
Bounds: a candidate is scored at its clipped value and pays `bound_penalty · ‖w − clip(w)‖²`
on top, so the search distribution is pushed back inside the box without distorting the
samples CMA-ES learns from. Deterministic given the key.
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

from lora_limits import lora as lora_lib
from lora_limits.models import transformer
from lora_limits.recycle import score as score_lib
from lora_limits.recycle import merge as merge_lib


@dataclasses.dataclass(frozen=True)
class LoraHubConfig:
  """generations: CMA-ES generations; population_size None: CMA-ES's 4 + ⌊3 ln K⌋."""

  generations: int = 40
  population_size: int | None = None
  bound: float = 1.5
  l1: float = 0.05
  std_init: float = 0.5
  bound_penalty: float = 1.0

  def __post_init__(self):
    if isinstance(self.generations, bool) or not isinstance(self.generations, int) or (
        self.generations <= 0):
      raise ValueError(f"LoraHubConfig.generations must be a positive int, got "
                       f"{self.generations!r}")
    if self.population_size is not None and (
        not isinstance(self.population_size, int) or self.population_size < 2):
      raise ValueError(f"LoraHubConfig.population_size must be an int >= 2 or None, got "
                       f"{self.population_size!r}")
    for name in ("bound", "std_init"):
      if not getattr(self, name) > 0:
        raise ValueError(f"LoraHubConfig.{name} must be > 0, got {getattr(self, name)!r}")
    for name in ("l1", "bound_penalty"):
      if not getattr(self, name) >= 0:
        raise ValueError(f"LoraHubConfig.{name} must be >= 0, got {getattr(self, name)!r}")


@dataclasses.dataclass(frozen=True)
class LoraHubResult:
  """The best weights found (within bounds), their objective and loss, per-generation log."""

  weights: np.ndarray  # [K]
  fitness: float
  loss: float
  history: list[dict[str, float]]

  def adapter(self, adapters: Sequence[Mapping[str, lora_lib.LoraFactors]]) -> lora_lib.Adapter:
    """LoraHub's merged adapter: A = Σ w A_k, B = Σ w B_k."""
    return merge_lib.merge(adapters, "uniform_factors", self.weights).adapter


def default_population_size(num_adapters: int) -> int:
  return 4 + int(math.floor(3 * math.log(num_adapters))) if num_adapters > 1 else 4


@functools.cache
def _cma_es(population_size: int, num_adapters: int):
  """One strategy object per shape: evosax jits ask/tell with the object as a static
  argument, so reusing it reuses their compilations. (Imported here: importing evosax runs
  JAX operations, which would start the backend before `experiments.run` can configure it
  or call `jax.distributed.initialize`.)"""
  from evosax.algorithms import CMA_ES
  return CMA_ES(population_size=population_size,
                solution=jnp.zeros((num_adapters,), jnp.float32))


def lorahub_search(params: Mapping[str, Any], adapters: Sequence[Mapping[str, lora_lib.LoraFactors]],
                   batch: Mapping[str, Any], key: jax.Array, *, cfg: transformer.ModelConfig,
                   config: LoraHubConfig = LoraHubConfig(), chunk_size: int | None = None,
                   memory_budget_bytes: int = score_lib.DEFAULT_MEMORY_BUDGET,
                   mesh=None) -> LoraHubResult:
  """Search LoraHub weights on the few-shot `batch` (lm_batch format), starting from w = 0."""
  merge_lib.check_adapters(adapters, same_rank=True)
  k = len(adapters)
  pop = config.population_size or default_population_size(k)
  es = _cma_es(pop, k)
  es_params = es.default_params.replace(std_init=jnp.asarray(config.std_init, jnp.float32))
  state = es.init(jax.random.fold_in(key, 0), jnp.zeros((k,), jnp.float32), es_params)
  best_w, best_fit, best_loss = np.zeros(k, np.float32), math.inf, math.nan
  history = []
  for g in range(config.generations):
    gen_key = jax.random.fold_in(key, g + 1)
    population, state = es.ask(jax.random.fold_in(gen_key, 0), state, es_params)
    clipped = jnp.clip(population, -config.bound, config.bound)
    loss = score_lib.score_combinations(
        params, adapters, clipped, batch, cfg=cfg, method="uniform_factors", metric="loss",
        chunk_size=chunk_size, memory_budget_bytes=memory_budget_bytes, mesh=mesh)
    outside = jnp.sum(jnp.square(population - clipped), axis=-1)
    fitness = loss + config.l1 * jnp.mean(jnp.abs(clipped), axis=-1) + (
        config.bound_penalty * outside)
    fitness = jnp.where(jnp.isfinite(fitness), fitness, jnp.finfo(jnp.float32).max)
    state, _ = es.tell(jax.random.fold_in(gen_key, 1), population, fitness, state, es_params)
    fit_h, loss_h, clip_h = (np.asarray(x) for x in jax.device_get((fitness, loss, clipped)))
    i = int(np.argmin(fit_h))
    if fit_h[i] < best_fit:
      best_fit, best_loss, best_w = float(fit_h[i]), float(loss_h[i]), clip_h[i].copy()
    history.append({"generation": g, "best_fitness": best_fit,
                    "generation_best_fitness": float(fit_h[i]),
                    "generation_mean_loss": float(np.mean(loss_h))})
  return LoraHubResult(best_w, best_fit, best_loss, history)
