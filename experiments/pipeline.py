"""The paper's study end to end: world → base model → adapters → recycling → evaluation.

One config per study (`configs/two_hop.py`, `configs/math.py`), `study = 'recycling'`. For
each seed: build the world (every familiarity tier at once, sharing one pretraining corpus),
pretrain the base model on it (cached by a hash of world + model + schedule, so studies and
reruns reuse it), train one adapter per training split (`hop1`, `hop2`, `target` (direct and
chain-of-thought questions on entities disjoint from the tests), `union`), each stopping at
`stop_accuracy` exact match on its own training data; recycle the libraries
{hop1, hop2} and {hop1, hop2, target} with every configured method; evaluate everything on
every test split of every tier with greedy exact match and the chance level.

Every result is a tidy record in `results.jsonl`; `experiments.report` turns that file alone
into `report.md` and the figures. Completed stages are never recomputed: pretraining and
adapter training resume from orbax checkpoints in the cache, and each seed's records are
written atomically to `units/` before `results.jsonl` is assembled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from experiments import distributed
from experiments import schema
from lora_limits import data as data_lib
from lora_limits import evaluate as eval_lib
from lora_limits import lora as lora_lib
from lora_limits import tokenizer as tok_lib
from lora_limits import tree as tree_lib
from lora_limits import train as train_lib
from lora_limits.models import transformer
from lora_limits.recycle import lorahub as lorahub_lib
from lora_limits.recycle import merge as merge_lib
from lora_limits.recycle import route as route_lib
from lora_limits.tasks import common as task_common
from lora_limits.tasks import corpus as corpus_lib
from lora_limits.tasks import math_word, two_hop

TASKS = ("two_hop", "math")
LIBRARIES = {"two": ("hop1", "hop2"), "two_plus_target": ("hop1", "hop2", "target")}
MERGE_METHODS = ("uniform_factors", "uniform_delta", "sum", "ties", "dare_ties", "cat", "svd",
                 "knots")
ROUTE_METHODS = ("arrow", "oracle", "lorahub", "similarity")
METHODS = MERGE_METHODS + ROUTE_METHODS
NOT_DATA_FREE = ("lorahub", "similarity", "oracle")
CONTROLS = ("base", "hop1", "hop2", "target", "union")
MAX_DISTRACTORS = 6
RECORD_KEYS = ("task", "tier", "library", "method", "answer_format", "split", "seed")


# ----------------------------------------------------------------------------- settings


def _positive(section: str, obj: Any, names: Sequence[str]) -> None:
  for name in names:
    if getattr(obj, name) <= 0:
      raise ValueError(f"{section}.{name} must be > 0, got {getattr(obj, name)}")


def _non_negative(section: str, obj: Any, names: Sequence[str]) -> None:
  for name in names:
    if getattr(obj, name) < 0:
      raise ValueError(f"{section}.{name} must be >= 0, got {getattr(obj, name)}")




@dataclasses.dataclass(frozen=True)
class ModelSection:
  """Our own base model's sizes (vocab comes from the tokenizer), or a HF checkpoint."""

  d_model: int = 64
  n_layers: int = 2
  n_heads: int = 4
  n_kv_heads: int = 0  # 0: as n_heads
  d_ff: int = 192
  max_len: int = 64
  tie_embeddings: bool = True
  hf_path: str = ""  # a local Hugging Face checkpoint directory; '' trains our own base

  def __post_init__(self):
    for name in ("d_model", "n_layers", "n_heads", "d_ff", "max_len"):
      if getattr(self, name) <= 0:
        raise ValueError(f"model.{name} must be > 0, got {getattr(self, name)}")
    if self.n_kv_heads < 0:
      raise ValueError(f"model.n_kv_heads must be >= 0, got {self.n_kv_heads}")

  def model_config(self, vocab_size: int) -> transformer.ModelConfig:
    return transformer.ModelConfig(
        vocab_size=vocab_size, d_model=self.d_model, n_layers=self.n_layers,
        n_heads=self.n_heads, n_kv_heads=self.n_kv_heads or None, d_ff=self.d_ff,
        max_len=self.max_len, tie_embeddings=self.tie_embeddings)


@dataclasses.dataclass(frozen=True)
class PretrainSection:
  steps: int = 2500
  batch_size: int = 64
  learning_rate: float = 3e-3
  warmup_steps: int = 50
  weight_decay: float = 0.0
  save_every: int = 500

  def __post_init__(self):
    _positive("pretrain", self, ("steps", "batch_size"))
    _non_negative("pretrain", self, ("warmup_steps", "save_every", "weight_decay"))
    if not self.learning_rate > 0:
      raise ValueError(f"pretrain.learning_rate must be > 0, got {self.learning_rate}")


@dataclasses.dataclass(frozen=True)
class AdapterSection:
  """Each adapter trains until `stop_accuracy` exact match on its own training data (checked
  every `eval_every` steps) or `max_steps`."""

  rank: int = 8
  alpha: float = 16.0
  targets: str = lora_lib.DEFAULT_TARGETS
  rslora: bool = False
  dropout: float = 0.0
  max_steps: int = 600
  batch_size: int = 32
  learning_rate: float = 5e-3
  warmup_steps: int = 10
  stop_accuracy: float = 0.95
  eval_every: int = 25

  def __post_init__(self):
    _positive("adapters", self, ("rank", "max_steps", "batch_size", "eval_every"))
    _non_negative("adapters", self, ("warmup_steps",))
    if not 0.0 < self.stop_accuracy <= 1.0:
      raise ValueError(f"adapters.stop_accuracy must be in (0, 1], got {self.stop_accuracy}")
    if not self.learning_rate > 0 or not self.alpha > 0:
      raise ValueError("adapters.learning_rate and adapters.alpha must be > 0")
    lora_lib.LoraSpec(rank=self.rank, alpha=self.alpha, targets=self.targets,
                      rslora=self.rslora, dropout=self.dropout)

  @property
  def spec(self) -> lora_lib.LoraSpec:
    return lora_lib.LoraSpec(rank=self.rank, alpha=self.alpha, targets=self.targets,
                             rslora=self.rslora, dropout=self.dropout)


@dataclasses.dataclass(frozen=True)
class RecycleSection:
  libraries: tuple[str, ...] = tuple(LIBRARIES)
  methods: tuple[str, ...] = METHODS
  ties_density: float = 0.5
  dare_density: float = 0.5
  svd_rank: int = 8
  knots_inner: str = "ties"
  arrow_top_k: int = 1
  arrow_temperature: float = 1.0
  lorahub_generations: int = 20
  lorahub_shots: int = 16
  similarity_top_k: int = 1
  distractors: int = 0  # extra adapters of irrelevant facts added to every library


  def __post_init__(self):
    for lib in self.libraries:
      if lib not in LIBRARIES:
        raise ValueError(f"recycle.libraries has {lib!r}; allowed: {list(LIBRARIES)}")
    for m in self.methods:
      if m not in METHODS:
        raise ValueError(f"recycle.methods has {m!r}; allowed: {list(METHODS)}")
    if not self.libraries:
      raise ValueError("recycle.libraries must not be empty")
    for name in ("ties_density", "dare_density"):
      if not 0.0 < getattr(self, name) <= 1.0:
        raise ValueError(f"recycle.{name} must be in (0, 1], got {getattr(self, name)}")
    _positive("recycle", self, ("svd_rank", "arrow_top_k", "lorahub_generations",
                                "lorahub_shots", "similarity_top_k"))
    if not 0 <= self.distractors <= MAX_DISTRACTORS:
      raise ValueError(f"recycle.distractors must be in [0, {MAX_DISTRACTORS}], got "
                       f"{self.distractors}")
    if self.arrow_top_k > 2 or self.similarity_top_k > 2:
      raise ValueError("recycle.arrow_top_k and similarity_top_k must be <= 2, the size of the "
                       f"smallest library; got {self.arrow_top_k}, {self.similarity_top_k}")
    if not self.arrow_temperature > 0:
      raise ValueError(f"recycle.arrow_temperature must be > 0, got {self.arrow_temperature}")
    if self.knots_inner not in merge_lib.KNOTS_INNER:
      raise ValueError(f"recycle.knots_inner={self.knots_inner!r} is not one of "
                       f"{list(merge_lib.KNOTS_INNER)}")


@dataclasses.dataclass(frozen=True)
class StudyConfig:
  study: str
  task: str = "two_hop"
  seeds: tuple[int, ...] = (0, 1, 2)
  cache_dir: str = ""  # '' means <workdir>/cache
  world: dict = dataclasses.field(default_factory=dict)  # the task's settings, minus seed
  model: ModelSection = ModelSection()
  pretrain: PretrainSection = PretrainSection()
  adapters: AdapterSection = AdapterSection()
  recycle: RecycleSection = RecycleSection()
  eval_batch_size: int = 64

  def __post_init__(self):
    if self.task not in TASKS:
      raise ValueError(f"task={self.task!r} is not one of {list(TASKS)}")
    if not self.seeds:
      raise ValueError("seeds must list at least one seed")
    for s in self.seeds:
      if s < 0:
        raise ValueError(f"seeds must be >= 0, got {s}")
    if len(set(self.seeds)) != len(self.seeds):
      raise ValueError(f"seeds repeat: {self.seeds}")
    if "seed" in self.world:
      raise ValueError("world.seed is set per run from `seeds`; remove it from world")
    if self.eval_batch_size <= 0:
      raise ValueError(f"eval_batch_size must be > 0, got {self.eval_batch_size}")
    world_settings(self, 0)  # validates the world section now, before any compute
    check_adapters_fit(self)


def check_adapters_fit(cfg: "StudyConfig") -> None:
  """adapters.targets must match kernels of the base model and adapters.rank fit them.

  Checked on the model's abstract shapes (no compute): our own base with a stand-in
  vocabulary (targets never match the embedding), or the checkpoint's config.json.
  """
  if cfg.model.hf_path:
    from lora_limits.interop import hf
    path = pathlib.Path(cfg.model.hf_path)
    if not (path / "config.json").is_file():
      raise ValueError(f"model.hf_path={cfg.model.hf_path!r} is not a checkpoint directory "
                       "with a config.json")
    model_cfg, _ = hf.config_from_hf(hf.read_config(path)[1], "float32")
  else:
    model_cfg = cfg.model.model_config(vocab_size=max(cfg.model.d_model, 8))
  shapes = jax.eval_shape(lambda: transformer.init(jax.random.key(0), model_cfg))
  paths = lora_lib.target_paths(shapes, cfg.adapters.targets)
  if not paths:
    raise ValueError(f"adapters.targets={cfg.adapters.targets!r} matches no 2-D kernel of the "
                     "base model")
  flat = tree_lib.flatten(shapes)
  limit = min(min(flat[p].shape) for p in paths)
  if cfg.adapters.rank > limit:
    raise ValueError(f"adapters.rank={cfg.adapters.rank} exceeds {limit}, the smallest "
                     "dimension of an adapted kernel")


def world_settings(cfg: StudyConfig, seed: int):
  mapping = dict(cfg.world, seed=seed)
  if cfg.task == "two_hop":
    return task_common.settings_from_mapping(two_hop.TwoHopSettings, mapping)
  return task_common.settings_from_mapping(math_word.MathSettings, mapping)


def build_world(cfg: StudyConfig, seed: int) -> task_common.World:
  settings = world_settings(cfg, seed)
  return two_hop.build(settings) if cfg.task == "two_hop" else math_word.build(settings)


def parse(config: Any) -> StudyConfig:
  """The ConfigDict → a validated StudyConfig (ConfigError names the field)."""
  return schema.build(StudyConfig, config, "config")


# ------------------------------------------------------------------------------ caching


def _digest(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclasses.dataclass
class Base:
  cfg: transformer.ModelConfig
  params: Any
  tokenizer: Any
  key: str
  info: dict


def _progress(directory: pathlib.Path, label: str, total: int):
  """A progress line per training run, and `metrics.live.jsonl` to watch while it trains.

  The live file is appended to step by step (a resumed run appends the redone steps again);
  `metrics.jsonl` is written whole at the end from the history, which a resumed run
  restores from its checkpoint, and the live file is then removed.
  """
  progress = common.Progress(label, total, every=2.0)
  live = directory / "metrics.live.jsonl"

  def on_metrics(step: int, metrics: Mapping[str, float]) -> None:
    if common.is_writer():
      with open(live, "a", encoding="utf-8") as f:
        f.write(json.dumps(dict(metrics, step=step), sort_keys=True) + "\n")
    progress.update(step, f"loss {metrics['loss']:.3f} exact {metrics['exact_match']:.2f}")

  return on_metrics, progress


def _write_history(directory: pathlib.Path, history) -> None:
  common.write_jsonl(directory / "metrics.jsonl", history)
  (directory / "metrics.live.jsonl").unlink(missing_ok=True)


def pretrained_base(cfg: StudyConfig, world: task_common.World, tokenizer, cache: pathlib.Path,
                    seed: int) -> Base:
  """Our base model pretrained on the world's corpus (cached), or the HF checkpoint."""
  if cfg.model.hf_path:
    from lora_limits.interop import hf  # torch-free, but keep the import where it is used
    model_cfg, params, hf_tok = hf.load_checkpoint(cfg.model.hf_path)
    return Base(model_cfg, params, hf_tok, _digest({"hf": cfg.model.hf_path}),
                {"hf_path": cfg.model.hf_path})
  model_cfg = cfg.model.model_config(len(tokenizer))
  key = _digest({"world": task_common.content_hash(world), "model": model_cfg.to_dict(),
                 "pretrain": schema.to_dict(cfg.pretrain), "seed": seed,
                 "vocab": tok_lib.vocab_ids(tokenizer)})
  directory = cache / "base" / key
  info_path = directory / "base.json"
  corpus_data = tok_lib.encode_corpus(tokenizer, world.corpus)
  p = cfg.pretrain
  loop = train_lib.LoopConfig(steps=p.steps, batch_size=p.batch_size, seed=seed, loss_on="all",
                              save_every=p.save_every)
  optim = train_lib.OptimConfig(learning_rate=p.learning_rate, warmup_steps=p.warmup_steps,
                                weight_decay=p.weight_decay)
  directory.mkdir(parents=True, exist_ok=True)
  on_metrics, progress = _progress(directory, f"pretrain seed {seed}", p.steps)
  start = time.time()
  with distributed.exclusive(directory):  # shards of a sweep may share this base
    params, history = train_lib.pretrain(
        model_cfg, corpus_data, optim=optim, loop=loop, checkpoint_dir=str(directory / "ckpt"),
        record={"model": model_cfg.to_dict()}, on_metrics=on_metrics,
        mesh=distributed.training_mesh())
    _write_history(directory, history)
  if info_path.exists():
    info = json.loads(info_path.read_text())
  else:
    progress.close()
    recall = _exact(params, model_cfg, tokenizer, world.recall, cfg.eval_batch_size)
    info = {"key": key, "steps": p.steps, "final_loss": history[-1]["loss"],
            "recall_exact_match": recall, "recall_n": len(world.recall),
            "num_params": transformer.num_params(params),
            "train_seconds": round(time.time() - start, 1)}
    common.write_json(info_path, info)
  common.log(f"base seed {seed}: {info['num_params']:,} params, recall exact match "
             f"{info['recall_exact_match']:.3f} on {info['recall_n']} corpus facts")
  return Base(model_cfg, params, tokenizer, key, info)


def _exact(params, model_cfg, tokenizer, examples, batch_size, lora=None) -> float:
  rows = tok_lib.encode_examples(tokenizer, examples)
  out = eval_lib.teacher_forced(params, model_cfg, rows, lora=lora, batch_size=batch_size,
                                pad_id=tokenizer.pad_token_id)
  return float(np.mean(out["exact"]))


def library_names(library: str, distractors: int) -> tuple[str, ...]:
  """The adapters of a library: its own, then `distractors` irrelevant ones."""
  return LIBRARIES[library] + tuple(f"distractor{i}" for i in range(1, distractors + 1))


def adapter_examples(world: task_common.World, name: str,
                     distractors: int = 0) -> list[task_common.Example]:
  """Training examples of adapter `name`, pooled over every tier of the world.

  distractor<i>: the i-th of `distractors` disjoint slices of facts the corpus states about
  filler entities (two-hop) or counting (math) — knowledge no test question needs, so such an
  adapter can only interfere.
  """
  if name.startswith("distractor"):
    i = int(name.removeprefix("distractor"))
    if not 1 <= i <= distractors:
      raise ValueError(f"adapter {name!r} does not exist with distractors={distractors}")
    pool = [e for e in world.recall
            if (e.meta.get("group") == "filler" and e.meta.get("hop"))  # two-hop fillers
            or e.meta.get("source") == "counting"]  # math: "after 3 comes 4 ."
    if len(pool) < distractors:
      raise ValueError(f"recycle.distractors={distractors} exceeds the {len(pool)} irrelevant "
                       "facts the world has for them")
    return pool[i - 1::distractors]
  splits = {"target": ("target", "target_cot")}.get(name, (name,))
  return [e for group in world.groups for s in splits for e in world.splits[group][s]]


def trained_adapter(cfg: StudyConfig, base: Base, world: task_common.World, name: str,
                    cache: pathlib.Path, seed: int) -> tuple[lora_lib.Adapter, dict]:
  """Adapter `name` trained on its split (cached), with its own training accuracy."""
  examples = adapter_examples(world, name, cfg.recycle.distractors)
  a = cfg.adapters
  key = _digest({"base": base.key, "adapter": name, "seed": seed,
                 "examples": [e.to_dict() for e in examples], "settings": schema.to_dict(a)})
  directory = cache / "adapters" / f"{name}-{key}"
  info_path = directory / "adapter.json"
  rows = tok_lib.encode_examples(base.tokenizer, examples)
  loop = train_lib.LoopConfig(steps=a.max_steps, batch_size=a.batch_size,
                              seed=seed * 1000 + _adapter_index(name),
                              loss_on="answer", eval_every=a.eval_every)
  optim = train_lib.OptimConfig(learning_rate=a.learning_rate, warmup_steps=a.warmup_steps)

  def reached(step: int, adapter) -> bool:
    out = eval_lib.teacher_forced(base.params, base.cfg, rows,
                                  lora=lora_lib.LoraMix.single(adapter),
                                  batch_size=cfg.eval_batch_size,
                                  pad_id=base.tokenizer.pad_token_id)
    return float(np.mean(out["exact"])) >= a.stop_accuracy

  directory.mkdir(parents=True, exist_ok=True)
  on_metrics, progress = _progress(directory, f"adapter {name} seed {seed}", a.max_steps)
  with distributed.exclusive(directory):
    adapter, history, stopped = train_lib.train_lora(
        base.params, base.cfg, a.spec, rows, optim=optim, loop=loop,
        checkpoint_dir=str(directory / "ckpt"), record={"adapter": name},
        on_metrics=on_metrics, stop_fn=reached, mesh=distributed.training_mesh())
    _write_history(directory, history)
  if info_path.exists():
    info = json.loads(info_path.read_text())
  else:
    progress.close(stopped or a.max_steps)
    train_acc = _exact(base.params, base.cfg, base.tokenizer, examples, cfg.eval_batch_size,
                       lora_lib.LoraMix.single(adapter))
    info = {"adapter": name, "steps": stopped or a.max_steps, "stopped_early": stopped is not None,
            "train_exact_match": train_acc, "n_train": len(examples),
            "criterion": f"exact match >= {a.stop_accuracy} on its training data, checked "
                         f"every {a.eval_every} steps, at most {a.max_steps} steps"}
    common.write_json(info_path, info)
  common.log(f"adapter {name} seed {seed}: {info['steps']} steps, train exact match "
             f"{info['train_exact_match']:.3f} (n={info['n_train']})")
  return adapter, info


def _adapter_index(name: str) -> int:
  """A stable small integer per adapter name (it keys the adapter's init and data order)."""
  fixed = ("hop1", "hop2", "target", "union")
  return fixed.index(name) if name in fixed else 10 + int(name.removeprefix("distractor"))


# --------------------------------------------------------------------------- recycling


@dataclasses.dataclass
class Model:
  """One evaluated model: merged params (lora None), or base params + a mix per split."""

  library: str
  method: str
  params: Any
  lora: Any = None  # a LoraMix, or a callable (examples, split) -> LoraMix for per-query mixes
  data_free: bool = True
  extra: dict = dataclasses.field(default_factory=dict)


def merge_options(cfg: RecycleSection, method: str, seed: int) -> dict[str, Any]:
  if method == "ties":
    return {"density": cfg.ties_density}
  if method == "dare_ties":
    return {"density": cfg.dare_density, "key": jax.random.key(seed)}
  if method == "svd":
    return {"rank": cfg.svd_rank}
  if method == "knots":
    return {"inner": cfg.knots_inner, "density": cfg.ties_density}
  return {}


def gold_adapters(example: task_common.Example, names: Sequence[str]) -> list[int]:
  """Oracle: one-hop questions → the adapter of that hop; composed questions → every adapter
  in the library (each holds a needed fact, or — target — the composed task itself)."""
  hop = example.meta.get("hop")
  if hop is not None and f"hop{hop}" in names:
    return [names.index(f"hop{hop}")]
  return [i for i, n in enumerate(names) if not n.startswith("distractor")]


def recycled_models(cfg: StudyConfig, base: Base, world: task_common.World,
                    adapters: Mapping[str, lora_lib.Adapter], library: str, seed: int,
                    centroids: Mapping[str, jax.Array]) -> list[Model]:
  names = library_names(library, cfg.recycle.distractors)
  lib = [adapters[n] for n in names]
  r = cfg.recycle
  out = []
  for method in r.methods:
    if method in MERGE_METHODS:
      result = merge_lib.merge(lib, method, **merge_options(r, method, seed))
      out.append(Model(library, method, result.apply(base.params)))
    elif method == "arrow":
      mix = route_lib.arrow_router(lib, top_k=min(r.arrow_top_k, len(lib)),
                                   temperature=r.arrow_temperature)
      out.append(Model(library, method, base.params, mix))
    elif method == "oracle":
      def oracle(examples, split, lib=lib, names=names):
        gold = [gold_adapters(e, names) for e in examples]
        width = max(len(g) for g in gold)
        padded = np.array([g + [-1] * (width - len(g)) for g in gold], np.int32)
        return route_lib.oracle_mix(lib, padded)
      out.append(Model(library, method, base.params, oracle, data_free=False))
    elif method == "similarity":
      cents = jnp.stack([centroids[n] for n in names])

      def similar(examples, split, lib=lib, cents=cents):
        rows = tok_lib.encode_examples(base.tokenizer, examples)
        return route_lib.similarity_mix(base.params, base.cfg, lib, cents, rows["tokens"],
                                        rows["prompt_len"], top_k=min(r.similarity_top_k,
                                                                      len(lib)))
      out.append(Model(library, method, base.params, similar, data_free=False))
    elif method == "lorahub":
      shots = _lorahub_shots(world, r.lorahub_shots, seed)
      rows = tok_lib.encode_examples(base.tokenizer, shots)
      batch = {k: jnp.asarray(v) for k, v in data_lib.lm_batch(rows, "answer").items()}
      found = lorahub_lib.lorahub_search(
          base.params, lib, batch, jax.random.key(seed), cfg=base.cfg,
          config=lorahub_lib.LoraHubConfig(generations=r.lorahub_generations))
      merged = lora_lib.merge(base.params, found.adapter(lib))
      out.append(Model(library, method, merged, data_free=False,
                       extra={"weights": [float(w) for w in found.weights]}))
  return out


def _lorahub_shots(world: task_common.World, shots: int, seed: int) -> list[task_common.Example]:
  """Few-shot examples of the composed task (from the `target` splits, never the tests)."""
  pool = [e for g in world.groups for s in ("target", "target_cot") for e in world.splits[g][s]]
  rng = np.random.default_rng([seed, 7])
  idx = rng.choice(len(pool), size=min(shots, len(pool)), replace=False)
  return [pool[i] for i in sorted(idx)]


# --------------------------------------------------------------------------- evaluation


BRIDGE_SPLIT = "test_two_hop_bridge"


def bridge_stated(examples: Sequence[task_common.Example]) -> tuple[task_common.Example, ...]:
  """Chain-of-thought test questions with the whole chain but the final answer given.

  "where does the spouse of A live ? explain" + "A 's spouse is B . B lives in" → "C": the
  bridge B is stated, so answering needs only the last hop, keyed on B in context. The
  positive control for composition (Theorem 2's explicit-bridge case, in the full model).
  """
  out = []
  for e in examples:
    final = e.meta["final"]
    given = e.answer[:len(e.answer) - len(final)].strip()
    meta = dict(e.meta, split=BRIDGE_SPLIT, format="direct")
    for key in ("bridges", "bridge_steps", "bridge_at", "bridge"):
      meta.pop(key, None)
    out.append(task_common.Example(f"{e.prompt} {given}", final, meta))
  return tuple(out)


def test_sets(world: task_common.World) -> dict[str, dict[str, tuple[task_common.Example, ...]]]:
  """{split: {group: examples}}: the world's test splits plus the bridge-stated control."""
  out = {split: {g: tuple(world.splits[g][split]) for g in world.groups}
         for split in task_common.test_splits(world.k)}
  out[BRIDGE_SPLIT] = {g: bridge_stated(world.splits[g]["test_two_hop_cot"])
                       for g in world.groups}
  return out


def evaluate_model(model: Model, base: Base, world: task_common.World, task: str, seed: int,
                   batch_size: int) -> list[dict[str, Any]]:
  """Records for every tier × test split (tiers decoded together, split apart afterwards)."""
  records = []
  for split, by_group in test_sets(world).items():
    examples = [e for g in world.groups for e in by_group[g]]
    lora = model.lora(examples, split) if callable(model.lora) else model.lora
    texts = eval_lib.generate(model.params, base.cfg, base.tokenizer, examples, lora=lora,
                              batch_size=batch_size)
    start = 0
    for group in world.groups:
      group_ex = by_group[group]
      chance = world.chance[group][split if split != BRIDGE_SPLIT else "test_two_hop_cot"]
      res = eval_lib.score_split(split, texts[start:start + len(group_ex)], group_ex,
                                 chance=chance)
      start += len(group_ex)
      fmt = "cot" if split.endswith("_cot") else "direct"
      rec = {"task": task, "tier": group, "library": model.library, "method": model.method,
             "answer_format": fmt, "split": split, "seed": seed, "accuracy": res.accuracy,
             "n": res.n, "chance": res.chance, "data_free": model.data_free}
      if res.bridge_accuracy is not None:
        rec["bridge_accuracy"] = res.bridge_accuracy
      if model.extra:
        rec["extra"] = model.extra
      records.append(rec)
  return records


def run_seed(cfg: StudyConfig, seed: int, cache: pathlib.Path, tokenizer,
             timings: dict[str, float] | None = None) -> list[dict]:
  with common.stage(f"seed {seed}: world", timings):
    world = build_world(cfg, seed)
    corpus_lib.check_no_leak(world)
  with common.stage(f"seed {seed}: base model", timings):
    base = pretrained_base(cfg, world, tokenizer, cache, seed)
  adapters, infos = {}, {}
  with common.stage(f"seed {seed}: adapters", timings):
    names = ("hop1", "hop2", "target", "union") + library_names(
        "two", cfg.recycle.distractors)[2:]
    for name in names:
      adapters[name], infos[name] = trained_adapter(cfg, base, world, name, cache, seed)
  centroids = {}
  if "similarity" in cfg.recycle.methods:
    for name in sorted(set(adapters) - {"union"}):
      rows = tok_lib.encode_examples(
          base.tokenizer, adapter_examples(world, name, cfg.recycle.distractors))
      centroids[name] = route_lib.adapter_centroid(base.params, base.cfg, rows)
  models = [Model("none", "base", base.params)]
  models += [Model("single", n, base.params, lora_lib.LoraMix.single(adapters[n]))
             for n in CONTROLS[1:]]
  with common.stage(f"seed {seed}: recycling", timings):
    for library in cfg.recycle.libraries:
      models += recycled_models(cfg, base, world, adapters, library, seed, centroids)
  records = []
  common.log(f"seed {seed}: {len(models)} models to evaluate")
  with common.stage(f"seed {seed}: evaluation", timings):
    progress = common.Progress(f"evaluate seed {seed}", len(models), every=5.0)
    for i, model in enumerate(models):
      records += evaluate_model(model, base, world, cfg.task, seed, cfg.eval_batch_size)
      progress.update(i + 1, f"{model.library}/{model.method}")
  for rec in records:
    rec["base_recall"] = base.info.get("recall_exact_match")
  for name, info in infos.items():
    records.append({"task": cfg.task, "tier": "all", "library": "single", "method": name,
                    "answer_format": "direct", "split": f"train_{name}", "seed": seed,
                    "accuracy": info["train_exact_match"], "n": info["n_train"],
                    "chance": None, "data_free": True, "steps": info["steps"]})
  return records


def _unit_meta(unit: pathlib.Path) -> pathlib.Path:
  return unit.with_name(unit.name + ".meta.json")


def write_unit(unit: pathlib.Path, records: Sequence[Mapping[str, Any]]) -> None:
  """One seed's records, then (only once they are on disk) their count and SHA-256."""
  if not common.is_writer():
    return
  common.write_jsonl(unit, records)
  digest = hashlib.sha256(unit.read_bytes()).hexdigest()
  common.write_json(_unit_meta(unit), {"records": len(records), "sha256": digest})


def read_unit(unit: pathlib.Path) -> list[dict[str, Any]] | None:
  """A finished seed's records; None if the seed never finished (no unit, or no meta yet:
  the run died between the two writes). A unit that disagrees with its meta is refused."""
  meta_path = _unit_meta(unit)
  if not unit.exists() or not meta_path.exists():
    return None
  try:
    meta = json.loads(meta_path.read_text())
    expected, count = meta["sha256"], meta["records"]
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{meta_path} is damaged ({e}); delete it and {unit.name} to rerun "
                     "that seed") from e
  if hashlib.sha256(unit.read_bytes()).hexdigest() != expected:
    raise ValueError(f"{unit} does not match its SHA-256 in {meta_path.name} (truncated or "
                     "edited); delete both to rerun that seed")
  records = common.read_jsonl(unit)
  if len(records) != count:
    raise ValueError(f"{unit} holds {len(records)} records, {meta_path.name} says {count}")
  return records


def unit_path(workdir: pathlib.Path, task: str, seed: int) -> pathlib.Path:
  return workdir / "units" / f"{task}-seed{seed}.jsonl"


def run(cfg: StudyConfig, workdir: pathlib.Path,
        seeds: Sequence[int] | None = None) -> pathlib.Path | None:
  """The study's `seeds` (default: this job's shard of `cfg.seeds`, i.e. all of them unless
  `experiments.run` got --num_shards); returns the path of `results.jsonl` once every seed
  of the study has its unit, else None (other shards have yet to finish theirs)."""
  start = time.time()
  cache = pathlib.Path(cfg.cache_dir) if cfg.cache_dir else workdir / "cache"
  common.write_json(workdir / "config.json", schema.to_dict(cfg))
  vocab_world = world_settings(cfg, 0)
  vocabulary = (two_hop.vocabulary(vocab_world) if cfg.task == "two_hop"
                else math_word.vocabulary(vocab_world))
  tokenizer = tok_lib.build([" ".join(vocabulary)])
  if common.is_writer():
    tokenizer.save_pretrained(str(workdir / "tokenizer"))
  timings: dict[str, float] = {}
  todo = []
  for seed in distributed.mine(cfg.seeds) if seeds is None else seeds:
    unit = unit_path(workdir, cfg.task, seed)
    if read_unit(unit) is not None:
      common.log(f"seed {seed}: results already in {unit}; skipping")
    else:
      todo.append(seed)
  distributed.agree(f"units of {workdir} checked")  # before any process writes one
  for seed in todo:
    records = run_seed(cfg, seed, cache, tokenizer, timings)
    write_unit(unit_path(workdir, cfg.task, seed), records)
  results = assemble(workdir, cfg.task, cfg.seeds)
  timings["total"] = round(time.time() - start, 2)
  common.write_json(workdir / "timings.json", timings)
  return results


def assemble(workdir: pathlib.Path, task: str, seeds: Sequence[int]) -> pathlib.Path | None:
  """`results.jsonl` from the units of every seed, in `seeds` order; None (nothing written)
  while a seed has no finished unit (another shard's), and on processes that do not write."""
  if not common.is_writer():
    return None
  records, missing = [], []
  for seed in seeds:
    done = read_unit(unit_path(workdir, task, seed))
    if done is None:
      missing.append(seed)
    else:
      records += done
  if missing:
    common.log(f"seeds {missing} have no finished unit in {workdir / 'units'} yet (other "
               "shards run them); results.jsonl is assembled when the last shard finishes, "
               f"or by `python -m experiments.report {workdir}`")
    return None
  results = workdir / "results.jsonl"
  common.write_jsonl(results, records)
  common.log(f"{len(records)} records in {results}")
  return results
