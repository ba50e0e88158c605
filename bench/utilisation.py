"""FLOP utilisation: the measured float32 matmul peak vs what the train step and the scorer
achieve.

Peak: jitted `jnp.dot` of square float32 matrices (and NumPy's and torch's for comparison),
sustained over batches of calls, the best batch (a peak is what the hardware can do; the
median is kept too); also the matmul shapes the default model actually runs ([B·T, d] ×
[d, d_ff], ...), which bound what a model this narrow can reach. Achieved: FLOPs per call /
median seconds, each workload timed side by side with a square matmul (its fraction of that
'alongside' rate compares like with like on a shared machine). FLOPs from the analytic
matmul count (`bench.common`) and, where XLA can count them (no while loop in the program),
`compiled.cost_analysis()`.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bench import common
from bench import scoring
from bench import training
from lora_limits import lora as lora_lib
from lora_limits import metrics
from lora_limits.models import transformer


@dataclasses.dataclass(frozen=True)
class UtilisationSizes:
  """square: n of the n×n peak matmuls; scoring points: (examples, C) at K adapters."""

  square: tuple[int, ...] = (512, 1024, 2048)
  model: transformer.ModelConfig = transformer.ModelConfig()
  train_models: tuple[tuple[str, transformer.ModelConfig], ...] = (
      ("default", transformer.ModelConfig()), ("wide", training.WIDE))
  batch_size: int = 64
  seq_len: int = 32
  rank: int = 8
  num_adapters: int = 4
  scoring_points: tuple[tuple[int, int], ...] = ((8, 64), (128, 16))
  train_steps: int = 5
  repeats: int = 5
  torch: bool = True
  seed: int = 0


def _matmul_rate(fn, flops: float, repeats: int, min_s: float = 0.2) -> dict[str, float]:
  """GFLOP/s of `fn` (one matmul) sustained over batches of calls lasting >= min_s: the best
  and the median batch. (Single short calls mis-time: their best can exceed the hardware.)"""
  start = time.perf_counter()
  _block(fn())
  one = max(time.perf_counter() - start, 1e-6)
  calls = int(max(1, min_s // one))

  def batch():
    outs = [fn() for _ in range(calls)]
    if isinstance(outs[0], jax.Array):
      jax.block_until_ready(outs)

  timing = common.measure(batch, repeats=repeats, warmup=1)
  return {"best": common.gflops(flops * calls, timing.min_s),
          "median": common.gflops(flops * calls, timing.median_s), "calls_per_batch": calls}


def _block(x):
  return jax.block_until_ready(x) if isinstance(x, jax.Array) else x


def matmul_peak(sizes: UtilisationSizes, log=print) -> dict[str, Any]:
  """GFLOP/s of float32 matmuls: square n×n (JAX, NumPy, torch) and the model's shapes."""
  out: dict[str, Any] = {"square": {}, "model_shapes": {}}
  dot = jax.jit(jnp.dot)
  for n in sizes.square:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    flops = 2.0 * n ** 3
    entry = {"jax": _matmul_rate(lambda: dot(a, b), flops, sizes.repeats)}
    a_np, b_np = np.array(a), np.array(b)  # writable copies
    entry["numpy"] = _matmul_rate(lambda: a_np @ b_np, flops, sizes.repeats)
    if sizes.torch:
      import torch
      a_t, b_t = torch.from_numpy(a_np), torch.from_numpy(b_np)
      entry["torch"] = _matmul_rate(lambda: a_t @ b_t, flops, sizes.repeats)
    out["square"][str(n)] = entry
    log(f"matmul {n}x{n} float32 (best): "
        + ", ".join(f"{k} {v['best']:.1f}" for k, v in entry.items()) + " GFLOP/s")
  cfg, tokens = sizes.model, sizes.batch_size * sizes.seq_len
  shapes = {"qkvo": (tokens, cfg.d_model, cfg.d_model), "up": (tokens, cfg.d_model, cfg.d_ff),
            "down": (tokens, cfg.d_ff, cfg.d_model),
            "lm_head": (tokens, cfg.d_model, cfg.vocab_size)}
  for name, (m, k, n) in shapes.items():
    a = jax.random.normal(jax.random.key(2), (m, k), jnp.float32)
    b = jax.random.normal(jax.random.key(3), (k, n), jnp.float32)
    out["model_shapes"][f"{name} {m}x{k}x{n}"] = _matmul_rate(
        lambda: dot(a, b), 2.0 * m * k * n, sizes.repeats)
  out["peak_gflops"] = max(e["jax"]["best"] for e in out["square"].values())
  out["dispatch_us"] = dispatch_us()
  log(f"matmul peak (JAX, square, best): {out['peak_gflops']:.1f} GFLOP/s; model shapes: "
      + ", ".join(f"{k} {v['best']:.0f}" for k, v in out["model_shapes"].items())
      + f"; dispatch {out['dispatch_us']:.1f} us")
  return out


def dispatch_us(calls: int = 2000) -> float:
  """Microseconds per call of a jitted no-op on a small array (asynchronous dispatch, one
  block at the end): what a Python loop over jitted calls pays per iteration."""
  add = jax.jit(lambda x: x + 1.0)
  x = jnp.ones((4,), jnp.float32)
  add(x).block_until_ready()

  def loop():
    jax.block_until_ready([add(x) for _ in range(calls)])

  return common.measure(loop, repeats=3, warmup=1).median_s / calls * 1e6


def _mix_loss(params, stacked, batch, w_K, *, cfg):
  logits = transformer.apply(params, cfg, batch["inputs"],
                             lora=lora_lib.LoraMix(stack=stacked, weights=w_K))
  return metrics.batch_metrics(logits, batch["targets"], batch["weights"])["loss"]


def _one_combination_flops(fn, *args) -> float | None:
  """XLA's FLOPs for one combination (a program without a while loop, so it counts fully)."""
  return common.xla_flops(jax.jit(fn).lower(*args).compile())


def matmul_probe(n: int, seconds: float = 0.1):
  """(fn, FLOPs per fn call): a batch of jitted n×n float32 matmuls lasting about `seconds`,
  timed alongside a workload so its fraction of peak compares like with like."""
  dot = jax.jit(jnp.dot)
  a = jax.random.normal(jax.random.key(4), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(5), (n, n), jnp.float32)
  dot(a, b).block_until_ready()
  start = time.perf_counter()
  dot(a, b).block_until_ready()
  calls = int(max(1, seconds // max(time.perf_counter() - start, 1e-6)))

  def fn():
    jax.block_until_ready([dot(a, b) for _ in range(calls)])

  return fn, 2.0 * n ** 3 * calls


def _fractions(gflops_per_s: float, peak: float, concurrent: float) -> dict[str, float]:
  return {"fraction_of_peak": gflops_per_s / peak,
          "fraction_of_concurrent_matmul": gflops_per_s / concurrent}


def scoring_utilisation(sizes: UtilisationSizes, workdir: pathlib.Path, peak: float,
                        log=print, quiet: common.Quiet | None = None) -> list[dict[str, Any]]:
  """Achieved GFLOP/s of each JAX scorer at each (examples, C) point, timed side by side
  with a square matmul (the 'concurrent' matmul rate)."""
  k = sizes.num_adapters
  setup = scoring.make_setup(sizes.model, k, sizes.rank, 16.0, sizes.seed, workdir)
  stacked = lora_lib.stack(setup.adapters)
  probe, probe_flops = matmul_probe(min(max(sizes.square), 1024))
  out = []
  for n_examples, c in sizes.scoring_points:
    batch = {key: jnp.asarray(v) for key, v in scoring.make_batch(
        n_examples, sizes.seq_len, setup.cfg.vocab_size, sizes.seed).items()}
    w = scoring.make_weights(c, k, sizes.seed)
    w_j = jnp.asarray(w)
    w_list = list(w_j)
    chunk = scoring.plan_chunk(setup.params, setup.adapters, c, batch, cfg=setup.cfg)
    flops = {route: scoring.flops_per_combination(setup.cfg, n_examples, sizes.seq_len,
                                                  route=route, num_adapters=k, rank=sizes.rank)
             for route in ("mix", "dense")}
    xla = {"mix": _one_combination_flops(functools.partial(_mix_loss, cfg=setup.cfg),
                                         setup.params, stacked, batch, w_j[0]),
           "dense": _one_combination_flops(functools.partial(scoring._dense_loss, cfg=setup.cfg),
                                           setup.params, stacked, batch, w_j[0])}
    runs = {
        "ours": ("mix", lambda: scoring.ours(setup, setup.adapters, batch, w, None)),
        "dense_map": ("dense", lambda: scoring.dense_map(setup, stacked, batch, w_j, chunk)),
        "jax_loop": ("dense", lambda: scoring.jax_loop(setup, stacked, batch, w_list)),
    }
    _, timings, _ = common.measure_interleaved(
        {**{n: fn for n, (_, fn) in runs.items()}, "matmul": probe}, repeats=sizes.repeats,
        quiet=quiet)
    concurrent = common.gflops(probe_flops, timings["matmul"].median_s)
    point: dict[str, Any] = {"examples": n_examples, "num_combinations": c, "num_adapters": k,
                             "chunk": chunk, "concurrent_matmul_gflops_per_s": concurrent,
                             "other_cores": timings["ours"].other_cores,
                             "flops_per_combination_analytic": flops,
                             "flops_per_combination_xla": xla}
    for name, (route, _) in runs.items():
      timing = timings[name]
      rate = common.gflops(c * flops[route], timing.median_s)
      point[name] = {"route": route, "combos_per_s": c / timing.median_s,
                     "gflops_per_s": rate, **_fractions(rate, peak, concurrent),
                     "useful_gflops_per_s": common.gflops(c * flops["dense"], timing.median_s)}
    log(f"utilisation scoring N={n_examples} C={c}: " + ", ".join(
        f"{n} {point[n]['gflops_per_s']:.0f} GFLOP/s ({100 * point[n]['fraction_of_peak']:.0f}%)"
        for n in runs) + f"; concurrent matmul {concurrent:.0f} GFLOP/s; other processes "
        f"{point['other_cores']:.2f} cores")
    out.append(point)
  return out


def train_utilisation(sizes: UtilisationSizes, peak: float, log=print,
                      quiet: common.Quiet | None = None) -> dict[str, Any]:
  """Achieved GFLOP/s of our LoRA and full train steps, timed side by side with a matmul."""
  probe, probe_flops = matmul_probe(min(max(sizes.square), 1024))
  out = {}
  for name, cfg in sizes.train_models:
    key = jax.random.key(sizes.seed)
    params = transformer.init(jax.random.fold_in(key, 0), cfg)
    adapter = lora_lib.init(jax.random.fold_in(key, 1), params,
                            lora_lib.LoraConfig(rank=sizes.rank, alpha=16.0))
    batch = training.make_batch(sizes.batch_size, sizes.seq_len, cfg.vocab_size, sizes.seed)
    out[name] = {}
    trainers = {kind: training.OurTrainer(params, cfg, adapter, batch, kind, sizes.seed)
                for kind in ("lora", "full")}
    _, timings, _ = common.measure_interleaved(
        {**{kind: (lambda t=t: t.steps(sizes.train_steps)) for kind, t in trainers.items()},
         "matmul": probe}, repeats=sizes.repeats, quiet=quiet)
    concurrent = common.gflops(probe_flops, timings["matmul"].median_s)
    for kind, trainer in trainers.items():
      step_s = timings[kind].median_s / sizes.train_steps
      analytic = common.train_step_flops(cfg, sizes.batch_size, sizes.seq_len, kind=kind,
                                         lora_rank=sizes.rank)
      xla = common.xla_flops(trainer.compiled)
      rate = common.gflops(analytic, step_s)
      rate_xla = common.gflops(xla, step_s) if xla else None
      out[name][kind] = {
          "step_s": step_s, "flops_analytic": analytic, "flops_xla": xla,
          "gflops_per_s_analytic": rate, "gflops_per_s_xla": rate_xla,
          "fraction_of_peak_analytic": rate / peak,
          "fraction_of_peak_xla": rate_xla / peak if xla else None,
          "fraction_of_concurrent_matmul_analytic": rate / concurrent,
          "concurrent_matmul_gflops_per_s": concurrent,
          "other_cores": timings[kind].other_cores}
      log(f"utilisation train {name} {kind}: {step_s * 1e3:.1f} ms/step, {rate:.0f} GFLOP/s "
          f"analytic ({100 * rate / peak:.0f}% of peak, {100 * rate / concurrent:.0f}% of the "
          f"concurrent matmul {concurrent:.0f}); other processes "
          f"{timings[kind].other_cores:.2f} cores")
  return out


def run(sizes: UtilisationSizes, workdir: pathlib.Path, log=print,
        quiet: common.Quiet | None = None) -> dict[str, Any]:
  peak = matmul_peak(sizes, log)
  result = {"matmul": peak}
  result["train"] = train_utilisation(sizes, peak["peak_gflops"], log, quiet)
  result["scoring"] = scoring_utilisation(sizes, workdir, peak["peak_gflops"], log, quiet)
  d = dataclasses.asdict(sizes)
  d["model"] = sizes.model.to_dict()
  d["train_models"] = [[n, c.to_dict()] for n, c in sizes.train_models]
  result["sizes"] = d
  return result
