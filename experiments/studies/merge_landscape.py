"""Study 'merge_landscape': how merged adapters score across a grid of combination weights.

A tiny base model is pretrained on the format of key→value facts ("entity relation_0 →
value"); K adapters are then trained with LoRA, each on its own relation r_1 … r_K over the
same entities (disjoint facts). Every weight vector of a grid — a square over [low, high]²
for K = 2 (negative weights included) or the probability simplex for K = 2 or 3 — is scored
on every adapter's facts, for each merge method, with one `score_combinations` call per
(method, task). Writes to the workdir:
  config.json       the resolved, typed config
  landscape.json    the grid [C, K] and, per method and task, every metric [C]; single-
                    adapter and train-time checks; timings
  landscape_<metric>.png  heat maps (methods × tasks)
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time

import jax
import numpy as np

from experiments import common as exp_common
from experiments import schema
from lora_limits import data as data_lib
from lora_limits import lora as lora_lib
from lora_limits import train as train_lib
from lora_limits.models import transformer
from lora_limits.recycle import score as score_lib
from lora_limits.recycle import merge as merge_lib

PAD, EOS = 0, 1
_GRIDS = ("square", "simplex")


@dataclasses.dataclass(frozen=True)
class WorldSection:
  """n_entities entity tokens; each relation maps every entity to a random entity."""

  n_entities: int

  def __post_init__(self):
    if isinstance(self.n_entities, bool) or not isinstance(self.n_entities, int) or (
        self.n_entities < 2):
      raise ValueError(f"world.n_entities must be an int >= 2, got {self.n_entities!r}")


@dataclasses.dataclass(frozen=True)
class ModelSection:
  d_model: int
  n_layers: int
  n_heads: int
  d_ff: int

  def __post_init__(self):
    for name in ("d_model", "n_layers", "n_heads", "d_ff"):
      v = getattr(self, name)
      if v <= 0:
        raise ValueError(f"model.{name} must be > 0, got {v!r}")
    if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
      raise ValueError(f"model.d_model={self.d_model} must be a multiple of model.n_heads="
                       f"{self.n_heads} with an even head size (rotary positions)")


@dataclasses.dataclass(frozen=True)
class TrainSection:
  pretrain_steps: int
  lora_steps: int
  batch_size: int
  learning_rate: float
  lora_learning_rate: float
  rank: int
  alpha: float

  def __post_init__(self):
    for name in ("lora_steps", "batch_size", "rank"):
      v = getattr(self, name)
      if v <= 0:
        raise ValueError(f"train.{name} must be > 0, got {v!r}")
    if self.pretrain_steps < 0:
      raise ValueError(f"train.pretrain_steps must be >= 0, got {self.pretrain_steps!r}")
    for name in ("learning_rate", "lora_learning_rate", "alpha"):
      if not getattr(self, name) > 0:
        raise ValueError(f"train.{name} must be > 0, got {getattr(self, name)!r}")


@dataclasses.dataclass(frozen=True)
class GridSection:
  """square: steps × steps points over [low, high]² (K = 2); simplex: coordinates i/steps."""

  kind: str
  steps: int
  low: float
  high: float

  def __post_init__(self):
    if self.kind not in _GRIDS:
      raise ValueError(f"grid.kind={self.kind!r} is not one of {list(_GRIDS)}")
    if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 2:
      raise ValueError(f"grid.steps must be an int >= 2, got {self.steps!r}")
    if not self.low < self.high:
      raise ValueError(f"grid.low={self.low} must be < grid.high={self.high}")


@dataclasses.dataclass(frozen=True)
class LandscapeStudy:
  study: str
  seed: int
  num_adapters: int
  methods: tuple[str, ...]
  ties_density: float
  metrics: tuple[str, ...]
  chunk_size: int  # 0: the largest within memory_budget_gb
  memory_budget_gb: float
  world: WorldSection
  model: ModelSection
  train: TrainSection
  grid: GridSection

  def __post_init__(self):
    if self.study != "merge_landscape":
      raise ValueError(f"config.study must be 'merge_landscape', got {self.study!r}")
    if self.num_adapters not in (2, 3):
      raise ValueError(f"config.num_adapters must be 2 or 3, got {self.num_adapters!r}")
    if self.grid.kind == "square" and self.num_adapters != 2:
      raise ValueError("grid.kind='square' needs num_adapters=2; use grid.kind='simplex' for 3")
    valid = ["mix"] + merge_lib.available("default")
    for m in self.methods:
      if m not in valid:
        raise ValueError(f"config.methods has {m!r}; allowed: {valid}")
    if not self.methods:
      raise ValueError("config.methods must name at least one method")
    if not self.metrics:
      raise ValueError(f"config.metrics must name at least one of {list(score_lib.METRICS)}")
    if self.train.rank > min(self.model.d_model, self.model.d_ff):
      raise ValueError(f"train.rank={self.train.rank} exceeds the smallest adapted kernel "
                       f"dimension min(model.d_model, model.d_ff)="
                       f"{min(self.model.d_model, self.model.d_ff)}")
    for m in self.metrics:
      if m not in score_lib.METRICS:
        raise ValueError(f"config.metrics has {m!r}; allowed: {list(score_lib.METRICS)}")
    if not 0.0 < self.ties_density <= 1.0:
      raise ValueError(f"config.ties_density must be in (0, 1], got {self.ties_density!r}")
    if self.chunk_size < 0 or not self.memory_budget_gb > 0:
      raise ValueError("config.chunk_size must be >= 0 and config.memory_budget_gb > 0")
    if self.seed < 0:
      raise ValueError(f"config.seed must be >= 0, got {self.seed!r}")


# ---------------------------------------------------------------------------------------------
# World and training.


def make_world(study: LandscapeStudy) -> dict:
  """Token ids: 0 pad, 1 EOS, 2 … 2+K relations r_0 … r_K, then entities. Relation r_k maps
  entity i to a random entity (seeded). Returns encoded datasets: 'pretrain' (r_0 facts),
  'task_k' (r_k facts, k = 1 … K)."""
  n, k = study.world.n_entities, study.num_adapters
  first_entity = 2 + k + 1
  rng = np.random.default_rng(study.seed)
  out = {"vocab_size": first_entity + n}
  for rel in range(k + 1):
    values = rng.integers(0, n, n)
    pairs = [([first_entity + i, 2 + rel], [first_entity + int(values[i])]) for i in range(n)]
    out["pretrain" if rel == 0 else f"task_{rel}"] = data_lib.encode(
        pairs, eos_id=EOS, pad_id=PAD, max_len=4)
  return out


def model_config(study: LandscapeStudy, vocab_size: int) -> transformer.ModelConfig:
  m = study.model
  return transformer.ModelConfig(vocab_size=vocab_size, d_model=m.d_model, n_layers=m.n_layers,
                                 n_heads=m.n_heads, d_ff=m.d_ff, max_len=8)


def train_models(study: LandscapeStudy, world: dict, cfg: transformer.ModelConfig):
  """(base params, [adapter_1 … adapter_K], training summary)."""
  t = study.train
  summary = {}
  if t.pretrain_steps > 0:
    params, hist = train_lib.pretrain(
        cfg, world["pretrain"], optim=train_lib.OptimConfig(learning_rate=t.learning_rate),
        loop=train_lib.LoopConfig(steps=t.pretrain_steps, batch_size=t.batch_size,
                                  seed=study.seed, loss_on="all"))
    summary["pretrain_final_loss"] = hist[-1]["loss"]
  else:
    params = transformer.init(jax.random.key(study.seed), cfg)
  spec = lora_lib.LoraConfig(rank=t.rank, alpha=t.alpha)
  adapters = []
  for k in range(1, study.num_adapters + 1):
    adapter, hist, _ = train_lib.train_lora(
        params, cfg, spec, world[f"task_{k}"],
        optim=train_lib.OptimConfig(learning_rate=t.lora_learning_rate),
        loop=train_lib.LoopConfig(steps=t.lora_steps, batch_size=t.batch_size,
                                  seed=study.seed + k, loss_on="answer"))
    summary[f"adapter_{k}_final_loss"] = hist[-1]["loss"]
    adapters.append(adapter)
  return params, adapters, summary


def weight_grid(study: LandscapeStudy) -> np.ndarray:
  g = study.grid
  if g.kind == "square":
    axis = np.linspace(g.low, g.high, g.steps, dtype=np.float32)
    w1, w2 = np.meshgrid(axis, axis, indexing="ij")
    return np.stack([w1.ravel(), w2.ravel()], axis=1)
  return score_lib.simplex_grid(study.num_adapters, g.steps - 1)


def score_landscape(study: LandscapeStudy, params, adapters, world, grid_CxK, *, cfg) -> dict:
  """{method: {task: {metric: [C]}}}, one score_combinations call per (method, task)."""
  out = {}
  for method in study.methods:
    options = {"density": study.ties_density} if method in ("ties", "knots") else {}
    out[method] = {}
    for k in range(1, study.num_adapters + 1):
      batch = data_lib.lm_batch(world[f"task_{k}"], loss_on="answer")
      scores = score_lib.score_combinations(
          params, adapters, grid_CxK, batch, cfg=cfg, method=method, metric=study.metrics,
          options=options, chunk_size=study.chunk_size or None,
          memory_budget_bytes=int(study.memory_budget_gb * 2**30))
      out[method][f"task_{k}"] = {m: np.asarray(v).round(5).tolist() for m, v in scores.items()}
  return out


def single_adapter_checks(study, scores, grid_CxK) -> dict:
  """Exact match of each task at the one-hot weights e_k (the adapter alone), method 'mix'."""
  if "mix" not in scores or "exact_match" not in study.metrics:
    return {}
  out = {}
  for k in range(1, study.num_adapters + 1):
    target = np.eye(study.num_adapters, dtype=np.float32)[k - 1]
    hit = np.nonzero(np.all(np.isclose(grid_CxK, target), axis=1))[0]
    if hit.size:
      out[f"task_{k}_exact_match_of_adapter_{k}_alone"] = scores["mix"][f"task_{k}"][
          "exact_match"][int(hit[0])]
  return out


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib Agg; only this shell module imports matplotlib).


def plot_landscape(study: LandscapeStudy, grid_CxK: np.ndarray, scores: dict, metric: str,
                   path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  methods, k = list(scores), study.num_adapters
  fig, axes = plt.subplots(len(methods), k, figsize=(3.6 * k, 3.2 * len(methods)),
                           squeeze=False)
  vmin, vmax = (0.0, 1.0) if metric != "loss" else (None, None)
  for i, method in enumerate(methods):
    for j in range(k):
      ax = axes[i][j]
      values = np.asarray(scores[method][f"task_{j + 1}"][metric])
      if study.grid.kind == "square":
        s = study.grid.steps
        im = ax.imshow(values.reshape(s, s).T, origin="lower", vmin=vmin, vmax=vmax,
                       extent=(study.grid.low, study.grid.high, study.grid.low, study.grid.high),
                       cmap="viridis", aspect="auto")
        ax.set_xlabel("w_1")
        ax.set_ylabel("w_2")
        ax.plot([0, 1, 1], [1, 0, 1], "w+", ms=8)
      else:
        # Barycentric → 2-D: vertices e_1 (0, 0), e_2 (1, 0), e_3 (0.5, √3/2).
        corners = np.array([[0, 0], [1, 0], [0.5, np.sqrt(3) / 2]])[:k]
        xy = grid_CxK @ corners if k == 3 else np.stack([grid_CxK[:, 1], np.zeros(len(values))],
                                                         1)
        im = ax.scatter(xy[:, 0], xy[:, 1], c=values, vmin=vmin, vmax=vmax, cmap="viridis",
                        s=40)
        for c, name in zip(corners, [f"adapter {n + 1}" for n in range(k)]):
          ax.annotate(name, c, fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
      ax.set_title(f"{method}: task {j + 1} {metric}", fontsize=9)
      fig.colorbar(im, ax=ax, fraction=0.046)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(config, workdir: pathlib.Path) -> None:
  study = schema.build(LandscapeStudy, config, "config")
  workdir = pathlib.Path(workdir)
  exp_common.write_json(workdir / "config.json", schema.to_dict(study))
  start = time.time()
  world = make_world(study)
  cfg = model_config(study, world["vocab_size"])
  with exp_common.stage("train"):
    params, adapters, train_summary = train_models(study, world, cfg)
  grid = weight_grid(study)
  with exp_common.stage(f"score {len(grid)} combinations x {len(study.methods)} methods"):
    t0 = time.time()
    scores = score_landscape(study, params, adapters, world, grid, cfg=cfg)
    score_seconds = time.time() - t0
  with exp_common.stage("plots"):
    for metric in study.metrics:
      plot_landscape(study, grid, scores, metric, workdir / f"landscape_{metric}.png")
  checks = single_adapter_checks(study, scores, grid)
  out = {"config": schema.to_dict(study), "grid": grid.round(5).tolist(), "scores": scores,
         "train": train_summary, "single_adapter": checks,
         "score_seconds": round(score_seconds, 2), "seconds": round(time.time() - start, 2)}
  exp_common.write_json(workdir / "landscape.json", out)
  print(json.dumps({"single_adapter": checks, "train": train_summary,
                    "combinations": len(grid), "score_seconds": out["score_seconds"]}, indent=2))
