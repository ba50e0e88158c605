"""Training step speed: our LoRA step vs torch + PEFT, and LoRA vs full fine-tuning.

Same model (our random base exported with `hf.export_checkpoint` and loaded by
transformers), same LoRA (our initial adapter written with `peft.save_adapter`, loaded with
`PeftModel.from_pretrained(..., is_trainable=True)`), same rank and targets (all seven
projections), same batch, same optimizer (AdamW, constant learning rate, β = (0.9, 0.98),
ε = 1e-8, no weight decay, global-norm clip 1.0) and loss (mean next-token NLL over every
position). Ours is `train.make_train_step`, compiled once (`jit(...).lower().compile()`,
the state donated) and called `steps` times per timed repeat; torch runs the usual
zero_grad / forward / backward / clip / step loop (fused AdamW, `torch.get_num_threads()`
threads). The first steps' losses of both sides are recorded to show they train the same
model the same way.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import json
import pathlib
import re
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bench import common
from bench import scoring
from lora_limits import data as data_lib
from lora_limits import lora as lora_lib
from lora_limits import train
from lora_limits.interop import hf
from lora_limits.interop import peft as ipeft
from lora_limits.models import transformer

LEARNING_RATE = 1e-3
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WIDE = transformer.ModelConfig(vocab_size=2000, d_model=256, n_layers=4, n_heads=4, d_ff=688)


@dataclasses.dataclass(frozen=True)
class TrainingSizes:
  """models: (name, config) pairs; steps per timed repeat; check_steps: losses compared."""

  models: tuple[tuple[str, transformer.ModelConfig], ...] = (
      ("default", transformer.ModelConfig()), ("wide", WIDE))
  batch_size: int = 64
  seq_len: int = 32
  rank: int = 8
  alpha: float = 16.0
  steps: int = 5
  repeats: int = 3
  check_steps: int = 3
  torch: bool = True
  profile: bool = True  # a jax.profiler trace of our LoRA and full steps, by kind of op
  seed: int = 0

  def __post_init__(self):
    for name in ("batch_size", "seq_len", "rank", "steps", "repeats", "check_steps"):
      v = getattr(self, name)
      if not isinstance(v, int) or v <= 0:
        raise ValueError(f"TrainingSizes.{name} must be a positive int, got {v!r}")
    if not self.models:
      raise ValueError("TrainingSizes.models must name at least one model")


def make_batch(batch_size: int, seq_len: int, vocab: int, seed: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng([seed, batch_size, seq_len])
  tokens = rng.integers(3, vocab, (batch_size, seq_len + 1)).astype(np.int32)
  rows = {"tokens": tokens, "prompt_len": np.full(batch_size, 1, np.int32),
          "answer_len": np.full(batch_size, seq_len, np.int32)}
  return data_lib.lm_batch(rows, loss_on="all")


def optim_config() -> train.OptimConfig:
  return train.OptimConfig(learning_rate=LEARNING_RATE, warmup_steps=0, schedule="constant",
                           weight_decay=0.0, b1=0.9, b2=0.98, grad_clip=1.0)


class OurTrainer:
  """One compiled train step (full or LoRA) and its state, advanced in place."""

  def __init__(self, params, cfg, adapter, batch, kind: str, seed: int):
    optimizer = train.make_optimizer(optim_config(), 1000)
    step = train.make_train_step(cfg, optimizer, kind=kind, key=jax.random.key(seed))
    trainable = params if kind == "full" else adapter
    self.frozen = None if kind == "full" else params
    # Copies: the state is donated, and the caller's arrays must stay valid.
    trainable = jax.tree.map(jnp.array, trainable)
    self.state = train.TrainState(jnp.zeros((), jnp.int32), trainable,
                                  optimizer.init(trainable))
    self.batch = {k: jnp.asarray(v) for k, v in batch.items()}
    start = time.perf_counter()
    self.compiled = jax.jit(step, donate_argnums=(0,)).lower(
        self.state, self.frozen, self.batch).compile()
    self.compile_s = time.perf_counter() - start
    self.metrics = None

  def steps(self, n: int) -> list[float]:
    losses = []
    for _ in range(n):
      self.state, self.metrics = self.compiled(self.state, self.frozen, self.batch)
      losses.append(self.metrics["loss"])
    jax.block_until_ready(self.state)
    return [float(x) for x in losses]


class TorchTrainer:
  """The transformers model (full) or PEFT model (LoRA) with fused AdamW and the same loss."""

  def __init__(self, base_dir: pathlib.Path, adapter_dir: pathlib.Path | None, batch,
               threads: int | None = None):
    import peft
    import torch
    import transformers
    self.threads = threads  # None: torch's default (torch.get_num_threads())
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    if adapter_dir is not None:
      with warnings.catch_warnings():
        # peft 0.21 reads transformers' deprecated `is_gradient_checkpointing` when wrapping.
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated",
                                FutureWarning)
        model = peft.PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
    self.model = model.train()
    self.params = [p for p in model.parameters() if p.requires_grad]
    self.optimizer = torch.optim.AdamW(self.params, lr=LEARNING_RATE, betas=(0.9, 0.98),
                                       eps=1e-8, weight_decay=0.0, fused=True)
    self.inputs = torch.from_numpy(np.asarray(batch["inputs"], np.int64))
    self.targets = torch.from_numpy(np.asarray(batch["targets"], np.int64))
    self.weights = torch.from_numpy(np.asarray(batch["weights"], np.float32))
    self.num_trainable = sum(p.numel() for p in self.params)

  def steps(self, n: int) -> list[float]:
    with common.torch_threads(self.threads):
      return self._steps(n)

  def _steps(self, n: int) -> list[float]:
    import torch
    losses = []
    for _ in range(n):
      self.optimizer.zero_grad(set_to_none=True)
      logits = self.model(input_ids=self.inputs).logits
      loss = scoring.torch_loss(logits, self.targets, self.weights)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(self.params, 1.0)
      self.optimizer.step()
      losses.append(loss.detach())
    return [float(x) for x in losses]


def _hlo_ops(hlo_text: str) -> dict[str, tuple[str, str]]:
  """{instruction name: (opcode, op_name metadata)} of the ENTRY computation of a compiled HLO
  module (its top-level ops: what the runtime executes and the profiler names)."""
  ops = {}
  entry = False
  for line in hlo_text.splitlines():
    if line.startswith("ENTRY"):
      entry = True
      continue
    if entry and line.startswith("}"):
      break
    if not entry:
      continue
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = \S+ (\w+)\(.*?op_name=\"([^\"]+)\"", line)
    if m:
      ops[m.group(1)] = (m.group(2), m.group(3))
  return ops


def classify(name: str, ops: dict[str, tuple[str, str]]) -> str | None:
  """'matmul' (a dot or a fusion around one), 'layout copy' (copy/transpose fusions) or
  'element-wise and reductions'; None for runtime bookkeeping events."""
  if name not in ops:
    return None
  kind, op_name = ops[name]
  if kind in ("dot", "convolution") or op_name.endswith("dot_general"):
    return "matmul"
  if "copy" in name or "transpose" in name or kind in ("copy", "transpose"):
    return "layout copy"
  return "element-wise and reductions"


def profile_step(trainer: "OurTrainer", steps: int, directory: pathlib.Path) -> dict[str, Any]:
  """Milliseconds per step by kind of XLA op, from a `jax.profiler` trace of `steps` steps,
  and the count of each kind in the compiled program."""
  ops = _hlo_ops(trainer.compiled.as_text())
  directory.mkdir(parents=True, exist_ok=True)
  with jax.profiler.trace(str(directory), create_perfetto_trace=True):
    trainer.steps(steps)
  files = sorted(directory.rglob("*.trace.json.gz"), key=lambda f: f.stat().st_mtime)
  events = json.loads(gzip.decompress(files[-1].read_bytes()))
  events = events["traceEvents"] if isinstance(events, dict) else events
  ms: dict[str, float] = collections.defaultdict(float)
  for e in events:
    kind = classify(e.get("name", ""), ops) if e.get("ph") == "X" else None
    if kind is not None:
      ms[kind] += e.get("dur", 0) / 1e3 / steps
  counts = collections.Counter(k for k in (classify(n, ops) for n in ops) if k is not None)
  return {"ms_per_step": dict(ms), "ops_in_program": dict(counts)}


def run_model(name: str, cfg: transformer.ModelConfig, sizes: TrainingSizes,
              workdir: pathlib.Path, log=print,
              quiet: common.Quiet | None = None) -> dict[str, Any]:
  """Both sides, LoRA and full, on one model, timed side by side."""
  key = jax.random.key(sizes.seed)
  params = transformer.init(jax.random.fold_in(key, 0), cfg)
  spec = lora_lib.LoraConfig(rank=sizes.rank, alpha=sizes.alpha)
  adapter = lora_lib.init(jax.random.fold_in(key, 1), params, spec)
  batch = make_batch(sizes.batch_size, sizes.seq_len, cfg.vocab_size, sizes.seed)
  base_dir, adapter_dir = workdir / f"{name}-base", workdir / f"{name}-adapter"
  hf.export_checkpoint(params, cfg, base_dir, arch="llama")
  ipeft.save_adapter(adapter, adapter_dir, arch="llama", num_layers=cfg.n_layers)
  tokens = sizes.batch_size * sizes.seq_len
  out: dict[str, Any] = {"model": cfg.to_dict(),
                         "num_params": transformer.num_params(params),
                         "lora_params": lora_lib.num_params(adapter), "tokens_per_step": tokens}
  trainers = {f"ours_{kind}": OurTrainer(params, cfg, adapter, batch, kind, sizes.seed)
              for kind in ("lora", "full")}
  if sizes.torch:
    trainers["torch_lora"] = TorchTrainer(base_dir, adapter_dir, batch)
    trainers["torch_full"] = TorchTrainer(base_dir, None, batch)
    trainers["torch_lora_1thread"] = TorchTrainer(base_dir, adapter_dir, batch, threads=1)
  check = {n: t.steps(sizes.check_steps) for n, t in trainers.items()}
  _, timings, rss = common.measure_interleaved(
      {n: (lambda t=t: t.steps(sizes.steps)) for n, t in trainers.items()},
      repeats=sizes.repeats, quiet=quiet)
  for n, trainer in trainers.items():
    kind = n.split("_")[1]  # 'lora' or 'full'
    step_s = timings[n].median_s / sizes.steps
    flops = common.train_step_flops(cfg, sizes.batch_size, sizes.seq_len, kind=kind,
                                    lora_rank=sizes.rank)
    entry = {"step_s": step_s, "tokens_per_s": tokens / step_s,
             "seconds_per_repeat": timings[n].to_dict(), "steps_per_repeat": sizes.steps,
             "rss_growth_bytes": rss[n], "flops_analytic": flops,
             "gflops_per_s_analytic": common.gflops(flops, step_s)}
    if isinstance(trainer, OurTrainer):
      flops_xla = common.xla_flops(trainer.compiled)
      entry.update(compile_s=trainer.compile_s, flops_xla=flops_xla,
                   gflops_per_s_xla=common.gflops(flops_xla, step_s) if flops_xla else None,
                   xla_memory=common.xla_memory(trainer.compiled))
    else:
      import torch
      entry.update(trainable_params=trainer.num_trainable,
                   threads=trainer.threads or torch.get_num_threads())
    out[n] = entry
    log(f"training {name} {n}: {step_s * 1e3:.1f} ms/step, {entry['tokens_per_s']:.0f} "
        f"tokens/s, {entry['gflops_per_s_analytic']:.1f} GFLOP/s (matmul count); other "
        f"processes {timings[n].other_cores:.2f} cores")
  if sizes.profile:
    out["profile"] = {n: profile_step(trainers[n], sizes.steps, workdir / f"trace-{name}-{n}")
                      for n in ("ours_lora", "ours_full")}
    log(f"training {name} profile (ms/step by op kind): " + "; ".join(
        f"{n}: " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(p["ms_per_step"].items()))
        for n, p in out["profile"].items()))
  out["first_losses"] = check
  if sizes.torch:
    out["loss_max_abs_diff"] = {
        kind: float(np.max(np.abs(np.subtract(check[f"ours_{kind}"], check[f"torch_{kind}"]))))
        for kind in ("lora", "full")}
  out["ratios"] = ratios(out)
  return out


def ratios(out: dict[str, Any]) -> dict[str, float]:
  r = {"ours_lora_step/ours_full_step": out["ours_lora"]["step_s"] / out["ours_full"]["step_s"],
       "ideal_lora/full_flops": out["ours_lora"]["flops_analytic"]
       / out["ours_full"]["flops_analytic"]}
  if "torch_lora" in out:
    # torch + PEFT at its faster thread setting (default threads or one thread)
    torch_best = max(out[n]["tokens_per_s"] for n in ("torch_lora", "torch_lora_1thread")
                     if n in out)
    r["ours_lora/torch_lora_tokens_per_s"] = out["ours_lora"]["tokens_per_s"] / torch_best
    r["ours_full/torch_full_tokens_per_s"] = (out["ours_full"]["tokens_per_s"]
                                              / out["torch_full"]["tokens_per_s"])
    r["torch_lora_step/torch_full_step"] = (out["torch_lora"]["step_s"]
                                            / out["torch_full"]["step_s"])
  return r


def run(sizes: TrainingSizes, workdir: pathlib.Path, log=print,
        quiet: common.Quiet | None = None) -> dict[str, Any]:
  models = {name: run_model(name, cfg, sizes, workdir, log, quiet)
            for name, cfg in sizes.models}
  d = dataclasses.asdict(sizes)
  d["models"] = [[name, cfg.to_dict()] for name, cfg in sizes.models]
  return {"sizes": d, "models": models}
