"""The recycling study's config sections: typed, frozen, validated before any compute.

The fields have no defaults here: `configs/two_hop.py` writes every value once, and the
other configs (`smoke`, `math`, the sweeps) start from it. `parse(config)` is the only way a
ConfigDict becomes a `RecyclingStudy` (a `schema.ConfigError` names the field).
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Sequence
from typing import Any

import jax

from experiments import schema
from experiments import verdicts
from lora_limits import lora as lora_lib
from lora_limits import tree as tree_lib
from lora_limits.models import transformer
from lora_limits.recycle import recyclers
from lora_limits.tasks import common as task_common
from lora_limits.tasks import math_word, two_hop

TASKS = ("two_hop", "math")
LIBRARIES = {"two": ("hop1", "hop2"), "two_plus_target": ("hop1", "hop2", "target")}
# The controls: the base model, and each adapter alone. `union` (hop1 ∪ hop2 data) is the
# positive control for composition; `all` (hop1 ∪ hop2 ∪ target data) the data-pooling
# upper bound.
ADAPTERS = ("hop1", "hop2", "target", "union", "all")
CONTROLS = ("base",) + ADAPTERS
MAX_DISTRACTORS = 6


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
  """Our own base model's sizes (vocab comes from the tokenizer), or a HF checkpoint.

  n_kv_heads 0: as n_heads. hf_path: a local Hugging Face checkpoint directory ('' trains
  our own base).
  """

  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  d_ff: int
  max_len: int
  tie_embeddings: bool
  hf_path: str

  def __post_init__(self):
    _positive("model", self, ("d_model", "n_layers", "n_heads", "d_ff", "max_len"))
    _non_negative("model", self, ("n_kv_heads",))

  def model_config(self, vocab_size: int) -> transformer.ModelConfig:
    return transformer.ModelConfig(
        vocab_size=vocab_size, d_model=self.d_model, n_layers=self.n_layers,
        n_heads=self.n_heads, n_kv_heads=self.n_kv_heads or None, d_ff=self.d_ff,
        max_len=self.max_len, tie_embeddings=self.tie_embeddings)


@dataclasses.dataclass(frozen=True)
class PretrainSection:
  """batch_size: rows per step; row_len: tokens per packed row (`data.pack`), 0 trains on
  one padded sequence per row; fact_free_eos: whether the EOS closing a fact-free copy text
  ("echo A . A") is a trained target. Those texts teach the copy steps of the chain of
  thought, which continue after the copied name; trained to stop there, the base model
  ends chains of thought early."""

  steps: int
  batch_size: int
  row_len: int
  learning_rate: float
  warmup_steps: int
  weight_decay: float
  save_every: int
  fact_free_eos: bool

  def __post_init__(self):
    _positive("pretrain", self, ("steps", "batch_size"))
    _non_negative("pretrain", self, ("warmup_steps", "save_every", "weight_decay", "row_len"))
    if not self.learning_rate > 0:
      raise ValueError(f"pretrain.learning_rate must be > 0, got {self.learning_rate}")


STATEMENT_LOSSES = ("answer", "text")


@dataclasses.dataclass(frozen=True)
class AdapterSection:
  """Each adapter trains until `stop_accuracy` exact match on its own training data (checked
  every `eval_every` steps from `min_steps` on) or `max_steps`. replay: pretraining texts
  mixed into its data, as a fraction of its own examples (the same sample size for every
  adapter; none names a test entity's fact), so it keeps what the base knew;
  train_ending: whether an answer's ending is a trained target: its closing EOS and a
  statement's closing period (replayed texts keep theirs). Trained on "A 's spouse is" →
  "B ." + EOS, an adapter learns to stop after the fact, which a chain of thought must not
  do; without the ending it learns the fact and leaves what follows to the base model;
  statements: how a statement example ("A 's spouse is" → "B .") is trained: 'answer' (the
  loss on its answer) or 'text' (on every word after the first, as pretraining trains a
  text, so the adapter also learns what is said after its subject); in_context: extra
  copies of each statement example, each trained after another statement of the same
  adapter's data ("B2 lives in C2 . B lives in" → "C"), so the adapter recalls a fact with
  its subject mid-text, where a chain of thought states it (0: none); row_len: packed rows
  (0: unpacked)."""

  rank: int
  alpha: float
  targets: str
  rslora: bool
  dropout: float
  max_steps: int
  batch_size: int
  learning_rate: float
  warmup_steps: int
  stop_accuracy: float
  eval_every: int
  min_steps: int
  replay: float
  row_len: int
  train_ending: bool
  statements: str
  in_context: int

  def __post_init__(self):
    _positive("adapters", self, ("rank", "max_steps", "batch_size", "eval_every"))
    if self.statements not in STATEMENT_LOSSES:
      raise ValueError(f"adapters.statements={self.statements!r} is not one of "
                       f"{list(STATEMENT_LOSSES)}")
    _non_negative("adapters", self, ("warmup_steps", "replay", "row_len", "in_context",
                                     "min_steps"))
    if self.min_steps > self.max_steps:
      raise ValueError(f"adapters.min_steps={self.min_steps} exceeds adapters.max_steps="
                       f"{self.max_steps}")
    if not 0.0 < self.stop_accuracy <= 1.0:
      raise ValueError(f"adapters.stop_accuracy must be in (0, 1], got {self.stop_accuracy}")
    if not self.learning_rate > 0 or not self.alpha > 0:
      raise ValueError("adapters.learning_rate and adapters.alpha must be > 0")
    _ = self.spec  # LoraConfig validates rank, alpha, targets and dropout

  @property
  def spec(self) -> lora_lib.LoraConfig:
    return lora_lib.LoraConfig(rank=self.rank, alpha=self.alpha, targets=self.targets,
                               rslora=self.rslora, dropout=self.dropout)


PROVIDED = frozenset({"shots", "labels", "centroids"})  # resources a recycler may get here


@dataclasses.dataclass(frozen=True)
class RecycleSection:
  """libraries: names of `LIBRARIES`; methods: names in the recycler registry
  (`lora_limits.recycle.recyclers.registry()`); options: {method: {option: value}} over the
  registry entry's defaults; distractors: irrelevant adapters added to every library."""

  libraries: tuple[str, ...]
  methods: tuple[str, ...]
  options: dict
  distractors: int

  def __post_init__(self):
    if not self.libraries:
      raise ValueError("recycle.libraries must not be empty")
    for lib in self.libraries:
      if lib not in LIBRARIES:
        raise ValueError(f"recycle.libraries has {lib!r}; allowed: {list(LIBRARIES)}")
    registry = recyclers.registry()
    for m in self.methods:
      if m not in registry:
        raise ValueError(f"recycle.methods has {m!r}; allowed: {sorted(registry)}")
      missing = sorted(registry[m].needs - PROVIDED)
      if missing:
        raise ValueError(f"recycle.methods has {m!r}, which needs {missing}; this study "
                         f"provides {sorted(PROVIDED)}")
    smallest = min(len(LIBRARIES[lib]) for lib in LIBRARIES)
    for m, opts in self.options.items():
      if m not in registry:
        raise ValueError(f"recycle.options has {m!r}; allowed: {sorted(registry)}")
      if not isinstance(opts, dict):
        raise ValueError(f"recycle.options.{m} must be a mapping of options, got {opts!r}")
      for name, value in opts.items():
        if value is None:
          raise ValueError(f"recycle.options.{m}.{name} is None; leave it out to use the "
                           "method's default")
      try:
        resolved = registry[m].resolve(opts)
      except ValueError as e:
        raise ValueError(f"recycle.options.{m}: {e}") from e
      if resolved.get("top_k", 0) > smallest:
        raise ValueError(f"recycle.options.{m}.top_k must be <= {smallest}, the size of the "
                         f"smallest library; got {resolved['top_k']}")
    if not 0 <= self.distractors <= MAX_DISTRACTORS:
      raise ValueError(f"recycle.distractors must be in [0, {MAX_DISTRACTORS}], got "
                       f"{self.distractors}")

  def options_for(self, method: str) -> dict[str, Any]:
    return dict(self.options.get(method, {}))


@dataclasses.dataclass(frozen=True)
class GatesSection:
  """Thresholds of the gates (see `experiments.verdicts`), printed in the report."""

  base_extraction: float
  base_cot: float
  base_leak: float
  expert: float
  bridge_stated: float
  union_cot: float
  union_cot_goal: float

  def __post_init__(self):
    _ = self.thresholds  # each in [0, 1]

  @property
  def thresholds(self) -> verdicts.GateThresholds:
    return verdicts.GateThresholds(**dataclasses.asdict(self))


@dataclasses.dataclass(frozen=True)
class RecyclingStudy:
  """The whole study. cache_dir '' means <workdir>/cache; world: the task's settings, minus
  seed (set per run from `seeds`)."""

  study: str
  task: str
  seeds: tuple[int, ...]
  cache_dir: str
  world: dict
  model: ModelSection
  pretrain: PretrainSection
  adapters: AdapterSection
  recycle: RecycleSection
  gates: GatesSection
  eval_batch_size: int

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


def check_adapters_fit(cfg: RecyclingStudy) -> None:
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


def world_settings(cfg: RecyclingStudy, seed: int):
  mapping = dict(cfg.world, seed=seed)
  if cfg.task == "two_hop":
    return task_common.settings_from_mapping(two_hop.TwoHopConfig, mapping)
  return task_common.settings_from_mapping(math_word.MathConfig, mapping)


def build_world(cfg: RecyclingStudy, seed: int) -> task_common.World:
  settings = world_settings(cfg, seed)
  return two_hop.build(settings) if cfg.task == "two_hop" else math_word.build(settings)


def vocabulary(cfg: RecyclingStudy) -> list[str]:
  """Every word any seed's world can use (one tokenizer serves all seeds)."""
  settings = world_settings(cfg, 0)
  return (two_hop.vocabulary(settings) if cfg.task == "two_hop"
          else math_word.vocabulary(settings))


def library_names(library: str, distractors: int) -> tuple[str, ...]:
  """The adapters of a library: its own, then `distractors` irrelevant ones."""
  return LIBRARIES[library] + tuple(f"distractor{i}" for i in range(1, distractors + 1))


def parse(config: Any) -> RecyclingStudy:
  """The ConfigDict → a validated RecyclingStudy (ConfigError names the field)."""
  return schema.build(RecyclingStudy, config, "config")
