"""How our scorer's time and memory grow with C, K, rank, examples, model width and chunk.

One sweep per dimension around a base point (default model, K = 4 rank-8 adapters, C = 64,
8 examples of 32 tokens). Each point: `score_combinations` with its default plan, timed as in
the scoring part; the chunk sweep fixes `chunk_size` instead, at two (examples, C) points, to
check the plan's choice of chunk. Memory is XLA's `memory_analysis` of the compiled plan
(arguments + temps) and the resident-set growth during the timed calls. `plot` draws it.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax
import jax.numpy as jnp

from bench import common
from bench import scoring
from lora_limits import lora as lora_lib
from lora_limits.models import transformer
from lora_limits.recycle import score

DIMENSIONS = ("num_combinations", "num_adapters", "rank", "examples", "d_model", "chunk")


@dataclasses.dataclass(frozen=True)
class ScalingSizes:
  num_combinations: tuple[int, ...] = (16, 64, 256, 1024, 4096)
  num_adapters: tuple[int, ...] = (1, 2, 4, 8, 16)
  rank: tuple[int, ...] = (4, 8, 16, 32, 64)
  examples: tuple[int, ...] = (8, 32, 128)
  d_model: tuple[int, ...] = (64, 128, 256, 512)
  chunk: tuple[int, ...] = (1, 2, 4, 8, 16, 64)
  chunk_points: tuple[tuple[int, int], ...] = ((8, 64), (128, 32))  # (examples, C)
  base: tuple[tuple[str, int], ...] = (("num_combinations", 64), ("num_adapters", 4),
                                       ("rank", 8), ("examples", 8), ("d_model", 128))
  model: transformer.ModelConfig = transformer.ModelConfig()
  seq_len: int = 32
  repeats: int = 3
  budget_s: float = 3.0
  seed: int = 0


def _model_for(base: transformer.ModelConfig, d_model: int) -> transformer.ModelConfig:
  """The base model at another width (d_ff scaled with d_model; 4 heads)."""
  ratio = base.d_ff / base.d_model
  return dataclasses.replace(base, d_model=d_model, d_ff=int(round(ratio * d_model)))


def _point(sizes: ScalingSizes, cache: dict, quiet: common.Quiet | None, *,
           num_combinations: int, num_adapters: int, rank: int, examples: int, d_model: int,
           chunk: int | None) -> dict[str, Any]:
  key = (num_adapters, rank, d_model)
  if key not in cache:
    cfg = _model_for(sizes.model, d_model)
    k0 = jax.random.key(sizes.seed)
    params = transformer.init(jax.random.fold_in(k0, 0), cfg)
    spec = lora_lib.LoraConfig(rank=rank, alpha=2.0 * rank)
    adapters = [scoring.random_adapter(jax.random.fold_in(k0, 1 + k), params, spec)
                for k in range(num_adapters)]
    cache.clear()  # one model at a time
    cache[key] = (cfg, params, adapters)
  cfg, params, adapters = cache[key]
  batch = {k: jnp.asarray(v) for k, v in scoring.make_batch(
      examples, sizes.seq_len, cfg.vocab_size, sizes.seed).items()}
  w = scoring.make_weights(num_combinations, num_adapters, sizes.seed)

  def call():
    return jax.block_until_ready(score.score_combinations(
        params, adapters, w, batch, cfg=cfg, metric="loss", chunk_size=chunk))

  _, timings, rss = common.measure_interleaved({"ours": call}, repeats=sizes.repeats,
                                               budget_s=sizes.budget_s, quiet=quiet)
  timing, rss = timings["ours"], rss["ours"]
  stats, plan = score.memory_analysis(params, adapters, w, batch, cfg=cfg,
                                         chunk_size=chunk)
  return {"num_combinations": num_combinations, "num_adapters": num_adapters, "rank": rank,
          "examples": examples, "d_model": d_model, "chunk": plan.chunk,
          "chunk_setting": "default plan" if chunk is None else "fixed",
          "plan_chunk": scoring.plan_chunk(params, adapters, num_combinations, batch, cfg=cfg),
          "seconds": timing.to_dict(), "combos_per_s": num_combinations / timing.median_s,
          "xla_argument_bytes": int(stats.argument_size_in_bytes),
          "xla_temp_bytes": int(stats.temp_size_in_bytes), "rss_growth_bytes": rss,
          "other_cores": timing.other_cores}


def run(sizes: ScalingSizes, log=print, quiet: common.Quiet | None = None) -> dict[str, Any]:
  base = dict(sizes.base)
  cache: dict = {}
  sweeps: dict[str, list[dict[str, Any]]] = {}
  for dim in DIMENSIONS:
    runs = []  # (point arguments, chunk)
    if dim == "chunk":
      for examples, c in sizes.chunk_points:
        args = dict(base, examples=examples, num_combinations=c)
        runs += [(args, chunk) for chunk in sizes.chunk if chunk <= c]
    else:
      runs += [(dict(base, **{dim: value}), None) for value in getattr(sizes, dim)]
    points = []
    for args, chunk in runs:
      p = _point(sizes, cache, quiet, chunk=chunk, **args)
      points.append(p)
      value = p["chunk"] if dim == "chunk" else p[dim]
      log(f"scaling {dim}={value} (N={p['examples']}, C={p['num_combinations']}, "
          f"{p['chunk_setting']}, chunk {p['chunk']}): {p['seconds']['median_s'] * 1e3:.1f} ms, "
          f"{p['combos_per_s']:.1f} combos/s, XLA temp {p['xla_temp_bytes'] / 2**20:.1f} MiB")
    sweeps[dim] = points
  d = dataclasses.asdict(sizes)
  d["model"] = sizes.model.to_dict()
  return {"sizes": d, "sweeps": sweeps}


def plot(result: dict[str, Any], path: pathlib.Path) -> None:
  """Time per call and XLA memory against each swept dimension (log-log), one panel each."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  sweeps = result["sweeps"]
  fig, axes = plt.subplots(2, 3, figsize=(13, 7.5))
  labels = {"num_combinations": "C (combinations)", "num_adapters": "K (adapters)",
            "rank": "rank r", "examples": "examples per combination",
            "d_model": "model width d", "chunk": "chunk (combinations per vmap)"}
  for ax, dim in zip(axes.flat, DIMENSIONS):
    points = sweeps.get(dim, [])
    mem_ax = ax.twinx()
    if dim == "chunk":
      groups = [(f"{n} examples", "o-" if i == 0 else "s--",
                 [p for p in points if p["examples"] == n])
                for i, n in enumerate(sorted({p["examples"] for p in points}))]
    else:
      groups = [("default plan", "o-", points)]
    for name, style, pts in groups:
      if not pts:
        continue
      x = [p[dim] for p in pts]
      y = [p["seconds"]["median_s"] / (p["num_combinations"] if dim == "chunk" else 1)
           for p in pts]
      ax.plot(x, y, style, color="C0", label=f"time ({name})")
      mem_ax.plot(x, [(p["xla_temp_bytes"] + p["xla_argument_bytes"]) / 2**20 for p in pts],
                  style, color="C3", alpha=0.7, label=f"XLA memory ({name})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    mem_ax.set_ylim(bottom=0)
    ax.set_xlabel(labels[dim])
    ax.set_ylabel("seconds per combination" if dim == "chunk" else "seconds per call",
                  color="C0")
    mem_ax.set_ylabel("MiB (arguments + temps)", color="C3")
    lines = ax.get_legend_handles_labels()
    more = mem_ax.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="best", framealpha=0.6)
  base = ", ".join(f"{k}={v}" for k, v in dict(result["sizes"]["base"]).items())
  fig.suptitle(f"score_combinations: time and memory vs one dimension at a time ({base})",
               fontsize=10)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)

