"""Timing, memory and FLOP-count helpers shared by the benchmark parts.

Timing: one warm-up call (compilation, caches), then `repeats` timed calls, each ending in
`jax.block_until_ready` (the callables passed here must block); the median is reported with
min and max. Memory: XLA's `memory_analysis` of a compiled program where one exists, and the
growth of the process's resident set during a call, sampled every 2 ms on a thread (what
torch and NumPy allocate is invisible to XLA and to tracemalloc). FLOPs: an analytic count of
matrix-multiply FLOPs (a multiply-add is 2) and, where XLA can tell, `cost_analysis()`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib.metadata
import math
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax

from lora_limits import lora as lora_lib
from lora_limits import tree as tree_lib
from lora_limits.models import transformer

REPO = pathlib.Path(__file__).resolve().parents[1]
_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclasses.dataclass(frozen=True)
class Timing:
  """Seconds per call: median, min, max over `repeats` timed calls (after warm-up), the first
  call's seconds (compilation included), and the mean number of cores other processes kept
  busy during the timed calls of its group (None when not observed)."""

  median_s: float
  min_s: float
  max_s: float
  repeats: int
  first_s: float
  other_cores: float | None = None

  def to_dict(self) -> dict[str, float]:
    return dataclasses.asdict(self)


def measure(fn: Callable[[], Any], *, repeats: int = 3, warmup: int = 1) -> Timing:
  """Time `fn()` (which must block until its result is ready)."""
  if repeats < 1 or warmup < 0:
    raise ValueError(f"measure needs repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
  first = None
  for _ in range(warmup):
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start if first is None else first
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return Timing(statistics.median(times), min(times), max(times), repeats,
                first if first is not None else times[0])


@dataclasses.dataclass(frozen=True)
class Quiet:
  """Wait before each timed round until other processes use fewer than `max_cores` cores
  (checked over `check_s`), at most `timeout_s` per round."""

  max_cores: float
  timeout_s: float = 60.0
  check_s: float = 0.3

  def wait(self) -> float:
    """Seconds waited."""
    start = time.perf_counter()
    while other_cpu(self.check_s) >= self.max_cores:
      if time.perf_counter() - start >= self.timeout_s:
        break
      time.sleep(1.0)
    return time.perf_counter() - start


def measure_interleaved(fns: Mapping[str, Callable[[], Any]], *, repeats: int = 3,
                        budget_s: float | None = None, quiet: Quiet | None = None):
  """Time several contenders side by side: one warm-up call each, then rounds that call each
  in turn, so all of them see the same load on a shared machine. The first round runs under
  `RssPeak` (the resident-set growth of each call); every timed call under `OtherCpu`.

  repeats: rounds; with budget_s, fewer when the warm-up calls together took longer than
  budget_s / repeats (at least one). quiet: wait before each round for other processes to
  calm down. Returns ({name: result of the warm-up call}, {name: Timing}, {name: RSS growth
  in bytes}).
  """
  results, first = {}, {}
  for name, fn in fns.items():
    start = time.perf_counter()
    results[name] = fn()
    first[name] = time.perf_counter() - start
  if budget_s is not None:
    repeats = int(max(1, min(repeats, budget_s // max(sum(first.values()), 1e-9))))
  times: dict[str, list[float]] = {name: [] for name in fns}
  others: dict[str, list[float]] = {name: [] for name in fns}  # other processes' CPU s
  rss: dict[str, int] = {}
  for r in range(repeats):
    if quiet is not None:
      quiet.wait()
    for name, fn in fns.items():
      peak = RssPeak() if r == 0 else contextlib.nullcontext()
      with peak, OtherCpu() as cpu:
        start = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - start)
      others[name].append(cpu.other_seconds)
      if r == 0:
        rss[name] = peak.growth_bytes
  # Other processes' CPU seconds per second of all the timed calls together (clock ticks are
  # 10 ms, too coarse to split between short calls): the load every contender saw.
  load = (sum(sum(v) for v in others.values())
          / max(sum(sum(t) for t in times.values()), 1e-9))
  timings = {name: Timing(statistics.median(t), min(t), max(t), len(t), first[name], load)
             for name, t in times.items()}
  return results, timings, rss


@contextlib.contextmanager
def torch_threads(n: int | None):
  """torch.set_num_threads(n) inside the block (None: leave torch's default)."""
  if n is None:
    yield
    return
  import torch
  default = torch.get_num_threads()
  torch.set_num_threads(n)
  try:
    yield
  finally:
    torch.set_num_threads(default)


def rss_bytes() -> int:
  """The current resident set size of this process."""
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * _PAGE


def max_rss_bytes() -> int:
  """The process's peak resident set size so far (getrusage; kilobytes on Linux)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class RssPeak:
  """`with RssPeak() as m: ...` → m.growth_bytes: the peak resident set during the block
  above the resident set at its start (sampled every `interval_s`)."""

  def __init__(self, interval_s: float = 0.002):
    self.interval_s = interval_s
    self.start_bytes = 0
    self.peak_bytes = 0
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def _sample(self):
    while not self._stop.is_set():
      self.peak_bytes = max(self.peak_bytes, rss_bytes())
      self._stop.wait(self.interval_s)

  def __enter__(self) -> "RssPeak":
    self.start_bytes = self.peak_bytes = rss_bytes()
    self._thread = threading.Thread(target=self._sample, daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()
    self._thread.join()
    self.peak_bytes = max(self.peak_bytes, rss_bytes())

  @property
  def growth_bytes(self) -> int:
    return self.peak_bytes - self.start_bytes


def xla_memory(compiled) -> dict[str, int]:
  """Buffer sizes XLA allocates for a compiled program (bytes), and their total."""
  stats = compiled.memory_analysis()
  out = {name: int(getattr(stats, f"{name}_size_in_bytes"))
         for name in ("argument", "output", "temp", "alias", "generated_code")}
  out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
  return out


def xla_flops(compiled) -> float | None:
  """XLA's FLOP count of a compiled program (None when unavailable). A while loop's body is
  counted once, whatever its trip count."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, list):
    analysis = analysis[0] if analysis else {}
  flops = (analysis or {}).get("flops")
  return float(flops) if flops is not None else None


# --- analytic FLOP counts (matrix multiplies only; a multiply-add counts 2) ---------------

def kernel_dims(cfg: transformer.ModelConfig, targets: str) -> tuple[list, list]:
  """([(d_in, d_out)] of every block kernel, [(d_in, d_out)] of those LoRA adapts)."""
  shapes = jax.eval_shape(lambda: transformer.init(jax.random.key(0), cfg))
  flat = tree_lib.flatten(shapes)
  block = sorted(p for p, x in flat.items() if p.startswith("layers/") and len(x.shape) == 2)
  adapted = lora_lib.target_paths(shapes, targets)
  return [tuple(flat[p].shape) for p in block], [tuple(flat[p].shape) for p in adapted]


def forward_flops(cfg: transformer.ModelConfig, batch: int, seq: int, *, lora_k: int = 0,
                  lora_rank: int = 0, targets: str = lora_lib.DEFAULT_TARGETS) -> dict[str, float]:
  """Matmul FLOPs of one forward over [batch, seq] tokens, by part: block kernels, lm head,
  attention (scores and values over the full T×T, as computed), and the unmerged LoRA
  products of `lora_k` adapters of rank `lora_rank` (x A_k, then (·) B_k)."""
  block, adapted = kernel_dims(cfg, targets)
  n = batch * seq
  heads, dh = cfg.n_heads, cfg.resolved_head_dim
  return {
      "kernels": 2.0 * n * sum(i * o for i, o in block),
      "lm_head": 2.0 * n * cfg.d_model * cfg.vocab_size,
      "attention": 4.0 * cfg.n_layers * batch * heads * seq * seq * dh,
      "lora": 2.0 * n * lora_k * lora_rank * sum(i + o for i, o in adapted),
  }


def train_step_flops(cfg: transformer.ModelConfig, batch: int, seq: int, *, kind: str,
                     lora_rank: int = 0, targets: str = lora_lib.DEFAULT_TARGETS) -> float:
  """Matmul FLOPs of one training step: forward + backward. Full fine-tuning: 3× the forward
  (input and weight gradients). LoRA: frozen kernels and the (tied) lm head need only input
  gradients (2×), attention and the LoRA products 3×. Ideal LoRA/full ≈ 2/3 for small r."""
  if kind not in ("full", "lora"):
    raise ValueError(f"kind={kind!r} is not one of ['full', 'lora']")
  f = forward_flops(cfg, batch, seq, lora_k=1 if kind == "lora" else 0, lora_rank=lora_rank,
                    targets=targets)
  if kind == "full":
    return 3.0 * (f["kernels"] + f["lm_head"] + f["attention"])
  return 2.0 * (f["kernels"] + f["lm_head"]) + 3.0 * (f["attention"] + f["lora"])


# --- the machine ----------------------------------------------------------------------------

def _version(name: str) -> str | None:
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return None


def _cpu_model() -> str:
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def _cpu_flags() -> list[str]:
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("flags"):
        flags = set(line.split(":", 1)[1].split())
        return sorted(flags & {"avx2", "fma", "avx512f", "avx512_bf16", "amx_tile"})
  except OSError:
    pass
  return []


def _mem_total() -> int | None:
  try:
    for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
      if line.startswith("MemTotal:"):
        return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def _git_commit() -> str | None:
  try:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                         text=True, timeout=10, check=False)
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip() or None


def _busy_and_own_ticks() -> tuple[int, int]:
  """(busy clock ticks of the whole machine, ticks of this process and its waited-for
  children), from /proc/stat and /proc/self/stat."""
  with open("/proc/stat") as f:
    fields = [int(x) for x in f.readline().split()[1:]]
  idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
  busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal
  with open("/proc/self/stat") as f:
    stat = f.read().rsplit(")", 1)[1].split()
  own = sum(int(x) for x in stat[11:15])  # utime stime cutime cstime
  return busy, own


class OtherCpu:
  """`with OtherCpu() as m: ...` → m.cores: the mean number of cores that *other* processes
  kept busy during the block (machine busy time minus this process's, per wall second)."""

  def __init__(self):
    self.cores = float("nan")

  def __enter__(self) -> "OtherCpu":
    self._start = (time.perf_counter(), *_busy_and_own_ticks())
    return self

  def __exit__(self, *exc) -> None:
    t0, busy0, own0 = self._start
    busy1, own1 = _busy_and_own_ticks()
    self.seconds = time.perf_counter() - t0
    self.other_seconds = max(0.0, ((busy1 - busy0) - (own1 - own0)) / os.sysconf("SC_CLK_TCK"))
    # Clock ticks are 10 ms: over a few ticks the rate says nothing.
    self.cores = self.other_seconds / self.seconds if self.seconds >= 0.2 else float("nan")


def other_cpu(seconds: float = 3.0) -> float:
  """Cores other processes are using now (mean over `seconds`)."""
  with OtherCpu() as m:
    time.sleep(seconds)
  return m.cores


def wait_for_quiet(max_cores: float, timeout_s: float, log=print) -> dict[str, Any]:
  """Wait until other processes use fewer than `max_cores` cores (checked over 5 s every
  ~20 s), at most `timeout_s`. Returns what was seen and whether it timed out."""
  start = time.time()
  while True:
    cores = other_cpu(5.0)
    waited = time.time() - start
    if cores < max_cores:
      return {"other_cores": cores, "waited_s": waited, "timed_out": False}
    if waited >= timeout_s:
      log(f"other processes still use {cores:.2f} cores after {waited:.0f}s; going ahead")
      return {"other_cores": cores, "waited_s": waited, "timed_out": True}
    log(f"waiting for a quieter machine: other processes use {cores:.2f} cores "
        f"(want < {max_cores})")
    time.sleep(15.0)


def load_average() -> list[float]:
  return [round(x, 2) for x in os.getloadavg()]


def machine_info() -> dict[str, Any]:
  """Cores, CPU model, memory, load, library versions, date: what every figure carries."""
  try:
    import torch
    torch_threads = torch.get_num_threads()
  except ImportError:
    torch_threads = None
  return {
      "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
      "cpu_model": _cpu_model(),
      "cpu_flags": _cpu_flags(),
      "cores": os.cpu_count(),
      "cores_usable": len(os.sched_getaffinity(0)),
      "memory_bytes": _mem_total(),
      "load_average_1_5_15": load_average(),
      "python": platform.python_version(),
      "versions": {name: _version(name) for name in
                   ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "peft", "transformers")},
      "jax_devices": [str(d) for d in jax.devices()],
      "torch_threads": torch_threads,
      "git_commit": _git_commit(),
  }


def gflops(flops: float, seconds: float) -> float:
  return flops / seconds / 1e9 if seconds > 0 else float("nan")


def round_floats(tree: Any, digits: int = 4) -> Any:
  """Floats rounded to `digits` significant digits (for readable JSON)."""
  if isinstance(tree, float):
    return float(f"{tree:.{digits}g}") if math.isfinite(tree) else None
  if isinstance(tree, Mapping):
    return {k: round_floats(v, digits) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [round_floats(v, digits) for v in tree]
  return tree
