"""Scoring C combinations of K adapters: ours vs a jitted Python loop vs the PEFT + torch loop.

Every contender scores the same weight vectors w_CxK on the same batch with the same metric
(teacher-forced mean NLL over the answer positions of Σ_k w_k ΔW_k applied to the base), on
the same weights: a random base and K random adapters are written through the interop layer
(`hf.export_checkpoint`, `peft.save_adapter`) and read back by both sides
(`hf.load_checkpoint` + `peft.load_adapter`; `from_pretrained` + `PeftModel`).

Contenders:
- `ours`: `score_combinations(..., method='mix')`, one compiled call with its default plan
  (the unmerged mixing route; the chunk from the memory budget and the working-set target);
- `dense_map`: a bench-side prototype, not in the library: one compiled `lax.map` over the
  combinations of "merge W + Σ_k w_k ΔW_k, then forward", with ours' chunk (the route an
  evaluator could take where the forward dominates);
- `jax_loop`: a Python loop dispatching one jitted merge-then-forward call per combination
  (asynchronously; one block at the end: the strongest loop);
- `peft`: per combination `add_weighted_adapter(..., combination_type='cat')` (exactly
  Σ_k w_k ΔW_k), `set_adapter`, a no-grad forward, the loss, `delete_adapter`; timed on
  torch's default threads and on one thread (`peft_1thread`: torch's OpenMP threads stall
  when another process takes a core), and the faster of the two is the PEFT rate.

Timing is interleaved (`common.measure_interleaved`): per (examples, K), ours, the jitted
loop and PEFT score the same `loop_combinations(...)` combinations side by side (the scores
checked for agreement); then per C, ours and dense_map score all C combinations side by side
with the jitted loop on its combinations again. The loops' cost per combination does not
depend on C; PEFT, the slowest, is timed only in the first group.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bench import common
from lora_limits import data as data_lib
from lora_limits import lora as lora_lib
from lora_limits import metrics
from lora_limits.interop import hf
from lora_limits.interop import peft as ipeft
from lora_limits.models import transformer
from lora_limits.recycle import score

CONTENDERS = ("ours", "dense_map", "jax_loop", "peft")
AGREEMENT_ATOL = 1e-4  # max |Δ loss| allowed between contenders (float32, two frameworks)


@dataclasses.dataclass(frozen=True)
class ScoringSizes:
  """The grid: K adapters × C combinations × examples per combination (sequences of seq_len
  tokens). combinations[i] lists the C values run at examples[i]."""

  model: transformer.ModelConfig = transformer.ModelConfig()
  rank: int = 8
  alpha: float = 16.0
  seq_len: int = 32
  num_adapters: tuple[int, ...] = (2, 4, 8)
  examples: tuple[int, ...] = (8, 128)
  combinations: tuple[tuple[int, ...], ...] = ((16, 64, 256, 1024), (16, 64, 256))
  loop_tokens: int = 65536  # the loops are timed on clip(loop_tokens // tokens, 4, 64) combos
  peft: bool = True
  # memory_check: compile-only plans at these C and budgets (bytes)
  memory_combinations: tuple[int, ...] = (16, 256, 4096, 65536)
  memory_budgets: tuple[int, ...] = (score.DEFAULT_MEMORY_BUDGET, 64 * 2**20)
  repeats: int = 3
  budget_s: float = 4.0  # fewer repeats when one call takes longer than budget_s / repeats
  seed: int = 0

  def __post_init__(self):
    if len(self.combinations) != len(self.examples):
      raise ValueError(f"ScoringSizes.combinations has {len(self.combinations)} lists for "
                       f"{len(self.examples)} examples values; one list per examples value")
    for name in ("num_adapters", "examples"):
      values = getattr(self, name)
      if not values or any(not isinstance(v, int) or v <= 0 for v in values):
        raise ValueError(f"ScoringSizes.{name}={values!r} must be positive ints")
    if any(not cs or any(c <= 0 for c in cs) for cs in self.combinations):
      raise ValueError(f"ScoringSizes.combinations={self.combinations!r} must be positive ints")


def loop_combinations(sizes: ScoringSizes, examples: int) -> int:
  return int(np.clip(sizes.loop_tokens // (examples * sizes.seq_len), 4, 64))


def plan_chunk(params, adapters, num_combinations: int, batch, *, cfg) -> int:
  """The chunk score_combinations' default plan takes for this shape."""
  return score.make_plan(params, adapters, num_combinations,
                            tuple(np.shape(batch["inputs"])), cfg=cfg).chunk


# --- identical weights on both sides --------------------------------------------------------

def random_adapter(key: jax.Array, params, spec: lora_lib.LoraConfig, b_std: float = 0.05):
  """A LoRA adapter with PEFT's init for a and b ~ N(0, b_std) (a trained-looking update)."""
  adapter = lora_lib.init(jax.random.fold_in(key, 0), params, spec)
  return {p: lora_lib.LoraFactors(
      f.a, b_std * jax.random.normal(jax.random.fold_in(key, i + 1), f.b.shape, f.b.dtype),
      f.scale) for i, (p, f) in enumerate(sorted(adapter.items()))}


@dataclasses.dataclass
class Setup:
  cfg: transformer.ModelConfig
  params: Any  # ours, read back from the exported checkpoint
  adapters: list  # ours, read back from the PEFT directories
  base_dir: pathlib.Path
  adapter_dirs: list[pathlib.Path]


def make_setup(cfg: transformer.ModelConfig, num_adapters: int, rank: int, alpha: float,
               seed: int, directory: pathlib.Path) -> Setup:
  """Random base + adapters written through the interop layer and read back."""
  key = jax.random.key(seed)
  params = transformer.init(jax.random.fold_in(key, 0), cfg)
  spec = lora_lib.LoraConfig(rank=rank, alpha=alpha)
  base_dir = directory / "base"
  hf.export_checkpoint(params, cfg, base_dir, arch="llama")
  dirs = []
  for k in range(num_adapters):
    adapter = random_adapter(jax.random.fold_in(key, 1 + k), params, spec)
    dirs.append(directory / f"adapter{k}")
    ipeft.save_adapter(adapter, dirs[-1], arch="llama", num_layers=cfg.n_layers)
  cfg_back, params_back, _ = hf.load_checkpoint(base_dir, tokenizer=False)
  adapters = [ipeft.load_adapter(d, params_back) for d in dirs]
  return Setup(cfg_back, params_back, adapters, base_dir, dirs)


def make_batch(examples: int, seq_len: int, vocab: int, seed: int) -> dict[str, np.ndarray]:
  """Random question/answer rows (prompt half, answer half + EOS) → lm_batch [N, seq_len]."""
  rng = np.random.default_rng([seed, examples])
  tokens = rng.integers(3, vocab, (examples, seq_len + 1)).astype(np.int32)
  prompt = seq_len // 2
  rows = {"tokens": tokens, "prompt_len": np.full(examples, prompt, np.int32),
          "answer_len": np.full(examples, seq_len + 1 - prompt, np.int32)}
  return data_lib.lm_batch(rows, loss_on="answer")


def make_weights(num_combinations: int, num_adapters: int, seed: int) -> np.ndarray:
  rng = np.random.default_rng([seed, num_combinations, num_adapters])
  return rng.uniform(-0.5, 1.5, (num_combinations, num_adapters)).astype(np.float32)


# --- JAX contenders -------------------------------------------------------------------------

def _dense_loss(params, stacked, batch, w_K, *, cfg):
  """Loss of one combination: W + Σ_k w_k s_k A_k B_k at every adapted kernel, then forward."""
  deltas = {p: f.scale * jnp.einsum("k,kir,kro->io", w_K, f.a, f.b) for p, f in stacked.items()}
  logits = transformer.apply(lora_lib.merge_dense(params, deltas), cfg, batch["inputs"])
  return metrics.batch_metrics(logits, batch["targets"], batch["weights"])["loss"]


@functools.cache
def _jitted_one(cfg: transformer.ModelConfig):
  return jax.jit(functools.partial(_dense_loss, cfg=cfg))


@functools.cache
def _jitted_map(cfg: transformer.ModelConfig, chunk: int):
  def run(params, stacked, batch, w_CxK):
    one = functools.partial(_dense_loss, params, stacked, batch, cfg=cfg)
    return jax.lax.map(one, w_CxK, batch_size=chunk)
  return jax.jit(run)


def jax_loop(setup: Setup, stacked, batch, weights: list) -> np.ndarray:
  """weights: one device array [K] per combination (sliced beforehand, outside the loop)."""
  one = _jitted_one(setup.cfg)
  outs = [one(setup.params, stacked, batch, w) for w in weights]
  return np.asarray(jax.block_until_ready(jnp.stack(outs)))


def dense_map(setup: Setup, stacked, batch, weights_CxK, chunk: int) -> np.ndarray:
  out = _jitted_map(setup.cfg, chunk)(setup.params, stacked, batch, weights_CxK)
  return np.asarray(jax.block_until_ready(out))


def ours(setup: Setup, adapters, batch, weights_CxK, chunk: int | None) -> np.ndarray:
  out = score.score_combinations(setup.params, adapters, weights_CxK, batch, cfg=setup.cfg,
                                    method="mix", metric="loss", chunk_size=chunk)
  return np.asarray(jax.block_until_ready(out))


# --- PEFT + torch -----------------------------------------------------------------------------

def peft_model(setup: Setup):
  """The exported base under PEFT with the K adapters loaded as a0..a{K-1} (eval mode)."""
  import peft
  import transformers
  base = transformers.AutoModelForCausalLM.from_pretrained(setup.base_dir).eval()
  with warnings.catch_warnings():
    # peft 0.21 reads transformers' deprecated `is_gradient_checkpointing` when wrapping.
    warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
    model = peft.PeftModel.from_pretrained(base, setup.adapter_dirs[0], adapter_name="a0")
  for k, d in enumerate(setup.adapter_dirs[1:], start=1):
    model.load_adapter(d, adapter_name=f"a{k}")
  return model.eval()


def torch_loss(logits, targets, weights):
  import torch
  logp = torch.log_softmax(logits.float(), dim=-1)
  nll = -torch.gather(logp, -1, targets[..., None])[..., 0]
  return (nll * weights).sum() / torch.clamp(weights.sum(), min=1.0)


def peft_loop(model, num_adapters: int, batch, weights_CxK,
              threads: int | None = None) -> np.ndarray:
  """PEFT's scores of every combination (torch on `threads` threads; None: its default)."""
  with common.torch_threads(threads):
    return _peft_loop(model, num_adapters, batch, weights_CxK)


def _peft_loop(model, num_adapters: int, batch, weights_CxK) -> np.ndarray:
  import torch
  names = [f"a{k}" for k in range(num_adapters)]
  inputs = torch.from_numpy(np.asarray(batch["inputs"], np.int64))
  targets = torch.from_numpy(np.asarray(batch["targets"], np.int64))
  weights = torch.from_numpy(np.asarray(batch["weights"], np.float32))
  out = []
  with torch.no_grad():
    for w in np.asarray(weights_CxK):
      model.add_weighted_adapter(names, [float(x) for x in w], "combo", combination_type="cat")
      model.set_adapter("combo")
      logits = model(input_ids=inputs).logits
      out.append(float(torch_loss(logits, targets, weights)))
      model.set_adapter("a0")  # deleting the active adapter would warn
      model.delete_adapter("combo")
  return np.asarray(out, np.float32)


def peft_phases(model, num_adapters: int, batch, weights_CxK) -> dict[str, float]:
  """Seconds per combination that the PEFT loop spends building the 'cat' adapter
  (add_weighted_adapter + set_adapter), in the forward + loss, and deleting it."""
  import torch
  names = [f"a{k}" for k in range(num_adapters)]
  inputs = torch.from_numpy(np.asarray(batch["inputs"], np.int64))
  targets = torch.from_numpy(np.asarray(batch["targets"], np.int64))
  weights = torch.from_numpy(np.asarray(batch["weights"], np.float32))
  spent = {"build_s": 0.0, "forward_s": 0.0, "delete_s": 0.0}
  with torch.no_grad():
    for w in np.asarray(weights_CxK):
      t0 = time.perf_counter()
      model.add_weighted_adapter(names, [float(x) for x in w], "combo", combination_type="cat")
      model.set_adapter("combo")
      t1 = time.perf_counter()
      float(torch_loss(model(input_ids=inputs).logits, targets, weights))
      t2 = time.perf_counter()
      model.set_adapter("a0")
      model.delete_adapter("combo")
      t3 = time.perf_counter()
      spent["build_s"] += t1 - t0
      spent["forward_s"] += t2 - t1
      spent["delete_s"] += t3 - t2
  return {k: v / len(weights_CxK) for k, v in spent.items()}


# --- the grid -----------------------------------------------------------------------------------

def _entry(timing: common.Timing, combos: int, rss_growth: int, **extra) -> dict[str, Any]:
  return dict(combos=combos, combos_per_s=combos / timing.median_s, seconds=timing.to_dict(),
              rss_growth_bytes=rss_growth, **extra)


def ours_memory(setup: Setup, adapters, batch, weights_CxK, chunk: int | None) -> dict[str, Any]:
  """XLA's buffer sizes for the plan score_combinations compiles (compiles it once more)."""
  stats, plan = score.memory_analysis(setup.params, adapters, weights_CxK, batch,
                                         cfg=setup.cfg, method="mix", chunk_size=chunk)
  return {"chunk": plan.chunk, "padded": plan.padded,
          "xla_temp_bytes": int(stats.temp_size_in_bytes),
          "xla_argument_bytes": int(stats.argument_size_in_bytes),
          "estimate_bytes_per_combination": score.estimate_bytes(
              setup.cfg, tuple(np.shape(batch["inputs"])), plan.route, adapters)}


def run(sizes: ScoringSizes, workdir: pathlib.Path, log=print,
        quiet: common.Quiet | None = None) -> dict[str, Any]:
  """Every cell of the grid. Returns {'loops': per (examples, K): the loops' rates and the
  agreement of all contenders on the loops' combinations; 'cells': per (examples, K, C):
  the one-call variants' rates, memory and ratios}."""
  k_max = max(sizes.num_adapters)
  budget = {"repeats": sizes.repeats, "budget_s": sizes.budget_s, "quiet": quiet}
  setup = make_setup(sizes.model, k_max, sizes.rank, sizes.alpha, sizes.seed, workdir)
  torch_model = peft_model(setup) if sizes.peft else None
  loops, cells = [], []
  for n_examples, cs in zip(sizes.examples, sizes.combinations):
    batch_np = make_batch(n_examples, sizes.seq_len, setup.cfg.vocab_size, sizes.seed)
    batch = {k: jnp.asarray(v) for k, v in batch_np.items()}
    for k in sizes.num_adapters:
      adapters = setup.adapters[:k]
      stacked = lora_lib.stack(adapters)
      n_loop = loop_combinations(sizes, n_examples)
      w_loop = make_weights(n_loop, k, sizes.seed)
      w_loop_j = list(jnp.asarray(w_loop))
      loop: dict[str, Any] = {"examples": n_examples, "num_adapters": k, "combos": n_loop}
      fns = {"ours": lambda: ours(setup, adapters, batch, w_loop, None),
             "jax_loop": lambda: jax_loop(setup, stacked, batch, w_loop_j)}
      if torch_model is not None:
        fns["peft"] = lambda: peft_loop(torch_model, k, batch_np, w_loop)
        fns["peft_1thread"] = lambda: peft_loop(torch_model, k, batch_np, w_loop, threads=1)
      scores, timings, rss = common.measure_interleaved(fns, **budget)
      for name in fns:
        loop[name] = _entry(timings[name], n_loop, rss[name])
      loop["agreement"] = agreement(scores)
      if torch_model is not None:
        loop["peft_phases"] = peft_phases(torch_model, k, batch_np, w_loop)
      # What score_combinations redoes on every call before its compiled program runs.
      loop["stack_adapters_s"] = common.measure(
          lambda: jax.block_until_ready(lora_lib.stack(adapters)), repeats=5).median_s
      loop["scores"] = {name: v.tolist() for name, v in scores.items()}
      log(f"scoring N={n_examples} K={k} on {n_loop} combinations: " + ", ".join(
          f"{n} {loop[n]['combos_per_s']:.1f}" for n in fns)
          + f" combos/s; max |d loss| vs ours {loop['agreement']['max_abs_diff']:.1e}; other "
          f"processes {timings['ours'].other_cores:.2f} cores")
      loops.append(loop)
      for c in cs:
        w = make_weights(c, k, sizes.seed)
        w_j = jnp.asarray(w)
        chunk = plan_chunk(setup.params, adapters, c, batch, cfg=setup.cfg)
        cell: dict[str, Any] = {"examples": n_examples, "num_adapters": k,
                                "num_combinations": c}
        fns = {"ours": lambda: ours(setup, adapters, batch, w, None),
               "dense_map": lambda: dense_map(setup, stacked, batch, w_j, chunk),
               "jax_loop": lambda: jax_loop(setup, stacked, batch, w_loop_j)}
        scores, timings, rss = common.measure_interleaved(fns, **budget)
        cell["ours"] = _entry(timings["ours"], c, rss["ours"],
                              **ours_memory(setup, adapters, batch, w, None))
        cell["dense_map"] = _entry(timings["dense_map"], c, rss["dense_map"], chunk=chunk)
        cell["jax_loop"] = _entry(timings["jax_loop"], n_loop, rss["jax_loop"])
        if "peft" in loop:
          best = max(("peft", "peft_1thread"), key=lambda n: loop[n]["combos_per_s"])
          cell["peft"] = {"combos_per_s": loop[best]["combos_per_s"], "combos": n_loop,
                          "variant": best,
                          "timed_with": "the loops' measurement of this (examples, K)"}
        cell["agreement"] = agreement({"ours": scores["ours"], "dense_map": scores["dense_map"]})
        cell["ratios"] = ratios(cell)
        log(f"scoring N={n_examples} K={k} C={c}: " + ", ".join(
            f"{n} {cell[n]['combos_per_s']:.1f}" for n in CONTENDERS if n in cell)
            + f" combos/s (chunk {chunk}; other processes "
            f"{timings['ours'].other_cores:.2f} cores)")
        cells.append(cell)
  return {"sizes": _sizes_dict(sizes), "agreement_atol": AGREEMENT_ATOL, "loops": loops,
          "cells": cells}


def agreement(scores: dict[str, np.ndarray]) -> dict[str, Any]:
  """Max |Δ score| of each contender against 'ours' on the same combinations, the spread of
  ours (so the check means something), and whether all agree within AGREEMENT_ATOL."""
  ref = np.asarray(scores["ours"])
  diffs = {name: float(np.max(np.abs(np.asarray(v) - ref)))
           for name, v in scores.items() if name != "ours"}
  worst = max(diffs.values()) if diffs else 0.0
  return {"max_abs_diff_by_contender": diffs, "max_abs_diff": worst,
          "score_spread": float(np.ptp(ref)), "agree": bool(worst <= AGREEMENT_ATOL)}


def ratios(cell: dict[str, Any]) -> dict[str, float]:
  """Combos/s of each one-call variant over each loop."""
  out = {}
  for mine in ("ours", "dense_map"):
    for other in ("jax_loop", "peft"):
      if other in cell:
        out[f"{mine}/{other}"] = cell[mine]["combos_per_s"] / cell[other]["combos_per_s"]
  return out


def _sizes_dict(sizes: ScoringSizes) -> dict[str, Any]:
  d = dataclasses.asdict(sizes)
  d["model"] = sizes.model.to_dict()
  return d


def memory_check(sizes: ScoringSizes, workdir: pathlib.Path, *, num_adapters: int = 4,
                 log=print) -> list[dict[str, Any]]:
  """Compile-only: XLA's buffers for the default plan at each C and memory budget (the
  evaluator must stay within the budget whatever C is, or refuse to plan)."""
  setup = make_setup(sizes.model, num_adapters, sizes.rank, sizes.alpha, sizes.seed, workdir)
  out = []
  for n_examples in sizes.examples:
    batch = make_batch(n_examples, sizes.seq_len, setup.cfg.vocab_size, sizes.seed)
    for budget in sizes.memory_budgets:
      for c in sizes.memory_combinations:
        w = make_weights(c, num_adapters, sizes.seed)
        entry = {"examples": n_examples, "num_combinations": c, "budget_bytes": int(budget)}
        try:
          stats, plan = score.memory_analysis(setup.params, setup.adapters, w, batch,
                                                 cfg=setup.cfg, memory_budget_bytes=int(budget))
        except ValueError as e:  # the plan refuses a budget one combination cannot fit
          entry.update(refused=str(e), within_budget=True)
          log(f"memory N={n_examples} budget={budget / 2**20:.0f} MiB C={c}: refused ({e})")
          out.append(entry)
          continue
        total = int(stats.temp_size_in_bytes + stats.argument_size_in_bytes
                    + stats.output_size_in_bytes - stats.alias_size_in_bytes)
        entry.update(chunk=plan.chunk, xla_total_bytes=total,
                     xla_temp_bytes=int(stats.temp_size_in_bytes),
                     within_budget=bool(total <= budget))
        out.append(entry)
        log(f"memory N={n_examples} budget={budget / 2**20:.0f} MiB C={c}: chunk {plan.chunk}, "
            f"XLA {total / 2**20:.1f} MiB")
  return out


def flops_per_combination(cfg: transformer.ModelConfig, examples: int, seq_len: int, *,
                          route: str, num_adapters: int, rank: int) -> float:
  """Analytic matmul FLOPs to score one combination: the forward over examples × seq_len
  tokens, plus the K LoRA products per adapted kernel (route 'mix') or the merge
  Σ_k w_k s A_k B_k of every adapted kernel (route 'dense')."""
  if route == "mix":
    f = common.forward_flops(cfg, examples, seq_len, lora_k=num_adapters, lora_rank=rank)
    return float(sum(f.values()))
  f = common.forward_flops(cfg, examples, seq_len)
  _, adapted = common.kernel_dims(cfg, lora_lib.DEFAULT_TARGETS)
  return float(sum(f.values()) + 2.0 * num_adapters * rank * sum(i * o for i, o in adapted))
