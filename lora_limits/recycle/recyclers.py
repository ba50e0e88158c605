"""One recycling concept: every way to reuse a library of K adapters is a *recycler*.

A recycler takes the adapters and whatever else its registry entry says it needs
(`Resources`: few-shot examples, gold labels, training-data centroids) and returns a
`Recycled` model, which the evaluator runs through one code path:
`recycled.lora_for(queries)` is the `LoraMix` to run with `recycled.params` (None for merged
params; a fixed mix; or, for a per-query router, a mix built from the queries).

`registry()` is the list of methods: every merge in `merge.METHODS` (its own name) and
`merge.PEFT_METHODS` (`peft_<name>`), read at call time so a merge added to either table
is a recycler with no other edit, plus the recyclers added with `register` (Arrow, oracle,
similarity, GenKnowSub, LoraHub, and any new one). A method is data-free iff its entry needs
none of `DATA_NEEDS` (GenKnowSub needs general adapters, not data).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_limits import data as data_lib
from lora_limits import lora as lora_lib
from lora_limits import tokenizer as tok_lib
from lora_limits import validate
from lora_limits.models import transformer
from lora_limits.recycle import lorahub as lorahub_lib
from lora_limits.recycle import merge as merge_lib
from lora_limits.recycle import route as route_lib
from lora_limits.tasks import common as task_common

NEEDS = ("shots", "labels", "centroids", "general")
DATA_NEEDS = ("shots", "labels", "centroids")
PEFT_PREFIX = "peft_"
_NOT_CONFIGURABLE = ("key", "masks")  # merge options that are arrays, set by the recycler

Examples = Sequence[task_common.Example]


@dataclasses.dataclass(frozen=True)
class Resources:
  """What a recycler may use. The base model and the adapters are always there; the rest is
  given to a recycler only when its entry lists it in `needs`.

  params, cfg: the base model. adapters: the library, in order; names: their names.
  seed: the recycler's randomness (`key` is `jax.random.key(seed)`).
  tokenizer: encodes queries for recyclers that read them.
  shots: labelled examples of the target task a few-shot method may draw from ('shots').
  labels: queries → gold adapter indices [B, G] (−1 pads) ('labels').
  centroids: [K, D] mean prompt embedding of each adapter's training data ('centroids').
  general: adapters of general knowledge that GenKnowSub subtracts ('general').
  weights: [K] merge weights for the merges (None: each merge's default).
  """

  params: Any
  cfg: transformer.ModelConfig
  adapters: tuple[lora_lib.Adapter, ...]
  names: tuple[str, ...]
  seed: int
  tokenizer: Any = None
  shots: tuple[task_common.Example, ...] = ()
  labels: Callable[[Examples], np.ndarray] | None = None
  centroids: jax.Array | None = None
  general: tuple[lora_lib.Adapter, ...] = ()
  weights: tuple[float, ...] | None = None

  @property
  def key(self) -> jax.Array:
    return jax.random.key(self.seed)


@dataclasses.dataclass(frozen=True)
class Recycled:
  """A model to evaluate: `params` (the base, or merged params) run with `lora_for(queries)`.

  mix: a fixed `LoraMix` (or None); route: queries → `LoraMix` for per-query routers.
  At most one of them is set. extra: what the method found (e.g. LoraHub's weights).
  adapter: the merged adapter (LoRA factors) when the method makes one, e.g. to export.
  """

  params: Any
  mix: lora_lib.LoraMix | None = None
  route: Callable[[Examples], lora_lib.LoraMix] | None = None
  adapter: lora_lib.Adapter | None = None
  extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.mix is not None and self.route is not None:
      raise ValueError("Recycled takes a fixed mix or a per-query route, not both")

  def lora_for(self, queries: Examples) -> lora_lib.LoraMix | None:
    """The mix to run on `queries` (None: the params alone)."""
    return self.route(queries) if self.route is not None else self.mix


@dataclasses.dataclass(frozen=True)
class Recycler:
  """A registry entry.

  build(resources, options) → Recycled, with `options` complete (defaults filled in).
  needs: the resources beyond the adapters it uses (a subset of `NEEDS`).
  options: the options it accepts, with their defaults.
  check: options → ValueError naming the option if a value is bad (called by `resolve`).
  gives_adapter: its `Recycled.adapter` is set (one merged LoRA adapter, exportable).
  """

  name: str
  build: Callable[[Resources, Mapping[str, Any]], Recycled]
  needs: frozenset[str] = frozenset()
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  check: Callable[[Mapping[str, Any]], None] = lambda options: None
  doc: str = ""
  gives_adapter: bool = False

  def __post_init__(self):
    unknown = sorted(set(self.needs) - set(NEEDS))
    if unknown:
      raise ValueError(f"Recycler {self.name!r}: needs has {unknown}; allowed: {list(NEEDS)}")

  @property
  def data_free(self) -> bool:
    return not self.needs & set(DATA_NEEDS)

  def resolve(self, options: Mapping[str, Any]) -> dict[str, Any]:
    """`options` over the defaults; ValueError for an unknown option or a bad value."""
    unknown = sorted(set(options) - set(self.options))
    if unknown:
      raise ValueError(f"recycler {self.name!r} got unknown option(s) {unknown}; it accepts "
                       f"{sorted(self.options)}")
    out = dict(self.options)
    out.update(options)
    self.check(out)
    return out


_REGISTERED: dict[str, Recycler] = {}


def register(recycler: Recycler) -> Recycler:
  """Adds `recycler` to the registry (ValueError if its name is taken)."""
  if recycler.name in registry():
    raise ValueError(f"a recycler named {recycler.name!r} is already registered")
  _REGISTERED[recycler.name] = recycler
  return recycler


def unregister(name: str) -> None:
  """Removes a recycler added with `register` (merges live in `merge.METHODS`)."""
  if name not in _REGISTERED:
    raise ValueError(f"{name!r} was not added with register; registered: {sorted(_REGISTERED)}")
  del _REGISTERED[name]


def registry() -> dict[str, Recycler]:
  """{name: Recycler}: every merge of both flavours, then the registered recyclers."""
  out = {name: _merge_recycler(name, "default") for name in merge_lib.METHODS}
  out.update({PEFT_PREFIX + name: _merge_recycler(name, "peft")
              for name in merge_lib.PEFT_METHODS})
  out.update(_REGISTERED)
  return out


def get(name: str) -> Recycler:
  table = registry()
  if name not in table:
    raise ValueError(f"recycler {name!r} is not registered; registered: {sorted(table)}")
  return table[name]


def recycle(name: str, resources: Resources, options: Mapping[str, Any] | None = None
            ) -> Recycled:
  """Runs recycler `name` on `resources` (ValueError if a resource it needs is missing)."""
  entry = get(name)
  opts = entry.resolve(options or {})
  for need in entry.needs:
    if need == "shots" and not resources.shots:
      raise ValueError(f"recycler {name!r} needs few-shot examples (Resources.shots)")
    if need in ("labels", "centroids") and getattr(resources, need) is None:
      raise ValueError(f"recycler {name!r} needs Resources.{need}")
    if need == "general" and not resources.general:
      raise ValueError(f"recycler {name!r} needs general adapters (Resources.general)")
  return entry.build(resources, opts)


# --------------------------------------------------------------------------------- merges


def _merge_recycler(name: str, flavor: str) -> Recycler:
  info = merge_lib.method_info(name, flavor)
  options = {k: v for k, v in info.options.items() if k not in _NOT_CONFIGURABLE}

  def build(res: Resources, opts: Mapping[str, Any]) -> Recycled:
    kwargs = dict(opts)
    if info.random:
      kwargs["key"] = res.key
    result = merge_lib.merge(list(res.adapters), name, res.weights, flavor=flavor, **kwargs)
    return Recycled(result.apply(res.params), adapter=result.adapter)

  def check(opts: Mapping[str, Any]) -> None:
    merge_lib.resolve_options(info, dict(opts, key=jax.random.key(0)) if info.random else opts)

  return Recycler(PEFT_PREFIX + name if flavor == "peft" else name, build, frozenset(),
                  options, check, info.doc, gives_adapter=info.kind == "factors")


# ----------------------------------------------------------------------- the routers


def _arrow(res: Resources, opts: Mapping[str, Any]) -> Recycled:
  mix = route_lib.arrow_router(list(res.adapters), top_k=min(opts["top_k"], len(res.adapters)),
                               temperature=opts["temperature"])
  return Recycled(res.params, mix=mix)


def _genknowsub(res: Resources, opts: Mapping[str, Any]) -> Recycled:
  mix = route_lib.genknowsub_router(list(res.adapters), list(res.general),
                                    top_k=min(opts["top_k"], len(res.adapters)),
                                    temperature=opts["temperature"], mode=opts["mode"])
  return Recycled(res.params, mix=mix, extra={"general": len(res.general)})


def _oracle(res: Resources, opts: Mapping[str, Any]) -> Recycled:
  del opts
  adapters = list(res.adapters)
  return Recycled(res.params, route=lambda queries: route_lib.oracle_mix(
      adapters, res.labels(queries)))


def _similarity(res: Resources, opts: Mapping[str, Any]) -> Recycled:
  adapters = list(res.adapters)
  top_k = min(opts["top_k"], len(adapters))

  def route(queries: Examples) -> lora_lib.LoraMix:
    rows = tok_lib.encode_examples(res.tokenizer, queries)
    return route_lib.similarity_mix(res.params, res.cfg, adapters, res.centroids,
                                    rows["tokens"], rows["prompt_len"], top_k=top_k)

  return Recycled(res.params, route=route)


def _lorahub(res: Resources, opts: Mapping[str, Any]) -> Recycled:
  """LoraHub on `shots` examples drawn (seeded) from `Resources.shots`; merged params."""
  pool = res.shots
  rng = np.random.default_rng([res.seed, 7])
  idx = rng.choice(len(pool), size=min(opts["shots"], len(pool)), replace=False)
  rows = tok_lib.encode_examples(res.tokenizer, [pool[i] for i in sorted(idx)])
  batch = {k: jnp.asarray(v) for k, v in data_lib.lm_batch(rows, "answer").items()}
  adapters = list(res.adapters)
  found = lorahub_lib.lorahub_search(
      res.params, adapters, batch, res.key, cfg=res.cfg,
      config=lorahub_lib.LoraHubConfig(generations=opts["generations"]))
  adapter = found.adapter(adapters)
  return Recycled(lora_lib.merge(res.params, adapter), adapter=adapter,
                  extra={"weights": [float(w) for w in found.weights]})


def _check_top_k_temperature(opts: Mapping[str, Any]) -> None:
  validate.integer("top_k", opts["top_k"], 1)
  if "temperature" in opts:
    validate.number("temperature", opts["temperature"], 0, low_open=True)


def _check_genknowsub(opts: Mapping[str, Any]) -> None:
  _check_top_k_temperature(opts)
  if opts["mode"] not in route_lib.GKS_MODES:
    raise ValueError(f"mode={opts['mode']!r} is not one of {list(route_lib.GKS_MODES)}")


def _check_lorahub(opts: Mapping[str, Any]) -> None:
  validate.integer("generations", opts["generations"], 1)
  validate.integer("shots", opts["shots"], 1)


register(Recycler("arrow", _arrow, frozenset(), {"top_k": 1, "temperature": 1.0},
                  _check_top_k_temperature,
                  "Arrow: per token and layer, the top-k adapters by |<v_k, x>| (unmerged)."))
register(Recycler("genknowsub", _genknowsub, frozenset({"general"}),
                  {"top_k": 1, "temperature": 1.0, "mode": "factors"}, _check_genknowsub,
                  "GenKnowSub: Arrow over the task adapters less the mean general adapter."))
register(Recycler("oracle", _oracle, frozenset({"labels"}), {}, doc=(
    "Each query runs with its gold adapter(s): an upper bound for any selector.")))
register(Recycler("similarity", _similarity, frozenset({"centroids"}), {"top_k": 1},
                  _check_top_k_temperature,
                  "Per query, the adapters whose training prompts are most similar."))
register(Recycler("lorahub", _lorahub, frozenset({"shots"}),
                  {"generations": lorahub_lib.LoraHubConfig().generations, "shots": 16},
                  _check_lorahub, "LoraHub: few-shot CMA-ES search of factor-wise weights.",
                  gives_adapter=True))
