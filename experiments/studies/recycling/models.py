"""The models the study evaluates: the controls and every configured recycler per library.

Each is a `Model` (its library and method name, and a `recyclers.Recycled`), so the
evaluator runs all of them the same way. The methods come from the recycler registry
(`lora_limits.recycle.recyclers`); what a method may use (few-shot examples, gold labels,
training-data centroids) is given to it when its registry entry asks for it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from experiments.studies.recycling import config as config_lib
from experiments.studies.recycling import stages
from lora_limits import lora as lora_lib
from lora_limits import tokenizer as tok_lib
from lora_limits.recycle import recyclers
from lora_limits.recycle import route as route_lib
from lora_limits.tasks import common as task_common


@dataclasses.dataclass(frozen=True)
class Model:
  """One evaluated model: where its records go (library, method) and what runs."""

  library: str
  method: str
  recycled: recyclers.Recycled
  data_free: bool = True


def controls(base: stages.Base, adapters: Mapping[str, lora_lib.Adapter]) -> list[Model]:
  """The base model alone, and each trained adapter alone."""
  out = [Model("none", "base", recyclers.Recycled(base.params))]
  out += [Model("single", n, recyclers.Recycled(base.params,
                                                mix=lora_lib.LoraMix.single(adapters[n])))
          for n in config_lib.CONTROLS[1:]]
  return out


def gold_adapters(example: task_common.Example, names: Sequence[str]) -> list[int]:
  """Oracle: one-hop questions → the adapter of that hop; composed questions → every adapter
  in the library (each holds a needed fact, or — target — the composed task itself)."""
  hop = example.meta.get("hop")
  if hop is not None and f"hop{hop}" in names:
    return [names.index(f"hop{hop}")]
  return [i for i, n in enumerate(names) if not n.startswith("distractor")]


def _labels(names: Sequence[str]):
  def labels(examples: Sequence[task_common.Example]) -> np.ndarray:
    gold = [gold_adapters(e, names) for e in examples]
    width = max(len(g) for g in gold)
    return np.array([g + [-1] * (width - len(g)) for g in gold], np.int32)
  return labels


def few_shot_pool(world: task_common.World) -> tuple[task_common.Example, ...]:
  """Labelled examples of the composed task a few-shot method may use: the `target` splits
  (direct and chain-of-thought), never the tests."""
  return tuple(e for g in world.groups for s in ("target", "target_cot")
               for e in world.splits[g].get(s, ()))


def needs(cfg: config_lib.RecyclingStudy) -> frozenset[str]:
  """Every resource the configured methods need."""
  registry = recyclers.registry()
  return frozenset().union(*(registry[m].needs for m in cfg.recycle.methods))


def centroids(cfg: config_lib.RecyclingStudy, base: stages.Base, world: task_common.World,
              adapter_names: Sequence[str]) -> dict[str, jax.Array]:
  """Each adapter's training-data centroid, if a configured method needs them."""
  if "centroids" not in needs(cfg):
    return {}
  out = {}
  for name in sorted(set(adapter_names) - {"union"}):
    rows = tok_lib.encode_examples(
        base.tokenizer, stages.adapter_examples(world, name, cfg.recycle.distractors))
    out[name] = route_lib.adapter_centroid(base.params, base.cfg, rows)
  return out


def recycled_models(cfg: config_lib.RecyclingStudy, base: stages.Base, world: task_common.World,
                    adapters: Mapping[str, lora_lib.Adapter], library: str, seed: int,
                    cents: Mapping[str, jax.Array]) -> list[Model]:
  """Every configured method on one library, in config order."""
  names = config_lib.library_names(library, cfg.recycle.distractors)
  resources = recyclers.Resources(
      params=base.params, cfg=base.cfg, adapters=tuple(adapters[n] for n in names),
      names=names, seed=seed, tokenizer=base.tokenizer, shots=few_shot_pool(world),
      labels=_labels(names),
      centroids=jnp.stack([cents[n] for n in names]) if cents else None)
  registry = recyclers.registry()
  out = []
  for method in cfg.recycle.methods:
    recycled = recyclers.recycle(method, resources, cfg.recycle.options_for(method))
    out.append(Model(library, method, recycled, registry[method].data_free))
  return out
