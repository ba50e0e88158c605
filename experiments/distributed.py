"""Beyond one process: JAX's multi-controller runtime, shards of a study, and who writes.

Two independent ways to use more machines, which combine:

- **Processes of one job** (`--coordinator_address/--num_processes/--process_id`, or a
  cluster `jax.distributed.initialize()` detects): every process runs the same study in
  lockstep; training is data parallel over all processes' devices (each feeds its own rows
  of every batch), orbax saves and restores checkpoints from all of them, and only process 0
  writes results, reports, logs and progress. Evaluation runs on each process's local copy
  of the (replicated) trained parameters.
- **Shards** (`--shard_index/--num_shards`, or a SLURM array job's task index and count):
  independent jobs that each run only their share of a study's units (the seeds of a study,
  the (value, seed) points of a sweep) into one shared workdir; whichever finishes last
  assembles `results.jsonl`, and `python -m experiments.studies.recycling.report W` assembles it from the
  per-unit files at any time.

Shard selection is a flag of `experiments.run`, not a config field, so no study's config
schema changes and the same config file serves every array task.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import pathlib
from collections.abc import Iterator, Mapping, Sequence
from typing import TypeVar

T = TypeVar("T")
SHARDED_STUDIES = ("recycling", "sweep")  # the studies whose units `mine` selects
DISTRIBUTED_MODES = ("auto", "on", "off")
INIT_TIMEOUT_S = 300


# --------------------------------------------------------------------- several processes


@dataclasses.dataclass(frozen=True)
class ProcessConfig:
  """How this process joins a multi-controller JAX job (flags of `experiments.run`)."""

  mode: str = "auto"  # auto: initialize if flags or the environment name a job; on; off
  coordinator_address: str = ""  # host:port of process 0
  num_processes: int = 0  # 0: from the environment
  process_id: int = -1  # -1: from the environment

  def __post_init__(self):
    if self.mode not in DISTRIBUTED_MODES:
      raise ValueError(f"--distributed={self.mode!r} is not one of {list(DISTRIBUTED_MODES)}")
    if self.num_processes < 0:
      raise ValueError(f"--num_processes must be >= 1 (0: from the environment), got "
                       f"{self.num_processes}")
    if self.process_id < -1 or (self.num_processes and self.process_id >= self.num_processes):
      raise ValueError(f"--process_id={self.process_id} must be in [0, --num_processes="
                       f"{self.num_processes})")
    if self.mode == "off" and self.explicit:
      raise ValueError("--distributed=off contradicts --coordinator_address/--num_processes/"
                       "--process_id")

  @property
  def explicit(self) -> bool:
    return bool(self.coordinator_address) or self.num_processes > 0 or self.process_id >= 0


def _count(env: Mapping[str, str], name: str) -> int:
  try:
    return int(env.get(name, "1").split("(")[0])
  except ValueError:
    return 1


def cluster_job(env: Mapping[str, str]) -> str | None:
  """The multi-process job the environment describes, in words (None: one process).

  Only environments `jax.distributed.initialize()` reads without arguments: its own variable
  (JAX_COORDINATOR_ADDRESS), a SLURM step of several tasks (srun), Open MPI / mpirun, and
  multi-host TPU slices that name their workers. (A GCE TPU pod VM that names its workers
  only in its metadata server is not seen from the environment: pass --distributed=on.)"""
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return "JAX_COORDINATOR_ADDRESS"
  # srun's step: SLURM_STEP_NUM_TASKS (the batch script itself is a step of one task, even
  # under --ntasks=4, whose SLURM_NTASKS says 4).
  tasks = _count(env, "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS")
  if "SLURM_JOB_ID" in env and "SLURM_PROCID" in env and tasks > 1:
    return f"SLURM step of {tasks} tasks"
  if "OMPI_MCA_orte_hnp_uri" in env and _count(env, "OMPI_COMM_WORLD_SIZE") > 1:
    return f"Open MPI job of {_count(env, 'OMPI_COMM_WORLD_SIZE')} processes"
  for name in ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES"):
    hosts = [h for h in env.get(name, "").split(",") if h.strip()]
    if len(hosts) > 1:
      return f"TPU slice of {len(hosts)} hosts ({name})"
  if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "multi-slice TPU (MEGASCALE_COORDINATOR_ADDRESS)"
  return None


def wants_initialize(settings: ProcessConfig, env: Mapping[str, str]) -> bool:
  """Whether to call `jax.distributed.initialize` (pure: flags and environment only)."""
  if settings.mode == "off":
    return False
  return settings.mode == "on" or settings.explicit or cluster_job(env) is not None


def initialize(settings: ProcessConfig, env: Mapping[str, str] | None = None) -> bool:
  """Join the multi-controller job if there is one; call before any other JAX operation.

  Returns whether `jax.distributed.initialize` was called. Unset flags are left to JAX's
  own cluster detection (SLURM, Open MPI, TPU pods, JAX_COORDINATOR_ADDRESS). CPU
  collectives use gloo (the CPU backend needs one for cross-process computations)."""
  env = os.environ if env is None else env
  if not wants_initialize(settings, env):
    return False
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=settings.coordinator_address or None,
      num_processes=settings.num_processes or None,
      process_id=settings.process_id if settings.process_id >= 0 else None,
      initialization_timeout=INIT_TIMEOUT_S)
  return True


def training_mesh():
  """The mesh studies train on: every device of every process when there are several
  processes; None (the library's one-device default) in a single process, as before."""
  import jax
  if jax.process_count() == 1:
    return None
  from lora_limits import sharding
  return sharding.data_mesh()


# ------------------------------------------------------------------------------- shards


@dataclasses.dataclass(frozen=True)
class Shard:
  """This job's share of a study's independent units: every `count`-th, from `index`."""

  index: int = 0
  count: int = 1

  def __post_init__(self):
    if self.count < 1:
      raise ValueError(f"--num_shards must be >= 1, got {self.count}")
    if not 0 <= self.index < self.count:
      raise ValueError(f"--shard_index={self.index} must be in [0, --num_shards={self.count})")

  def __str__(self) -> str:
    return f"shard {self.index + 1}/{self.count}"


def shard_from_env(env: Mapping[str, str]) -> Shard | None:
  """A SLURM array task's shard: (task id - min id) / step of `SLURM_ARRAY_TASK_COUNT`."""
  if "SLURM_ARRAY_TASK_ID" not in env or "SLURM_ARRAY_TASK_COUNT" not in env:
    return None
  task = int(env["SLURM_ARRAY_TASK_ID"])
  first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
  step = int(env.get("SLURM_ARRAY_TASK_STEP", "1") or 1)
  return Shard((task - first) // step, int(env["SLURM_ARRAY_TASK_COUNT"]))


def resolve_shard(index: int, count: int, env: Mapping[str, str]) -> Shard:
  """Flags win (count 0 means unset); else the SLURM array; else the whole study."""
  if count:
    return Shard(index, count)
  if index:
    raise ValueError(f"--shard_index={index} needs --num_shards")
  return shard_from_env(env) or Shard()


def shard_units(units: Sequence[T], shard: Shard) -> list[T]:
  """The units one shard runs: round robin over the study's ordered units, so every unit
  belongs to exactly one shard and neighbouring units (often similar in cost) spread out."""
  return list(units)[shard.index::shard.count]


_shard = Shard()


def set_shard(shard: Shard) -> None:
  global _shard
  _shard = shard


def current_shard() -> Shard:
  return _shard


def mine(units: Sequence[T]) -> list[T]:
  """`shard_units` for the shard `experiments.run` was started as."""
  return shard_units(units, _shard)


# ------------------------------------------------------------------------- shared files


@contextlib.contextmanager
def exclusive(directory: pathlib.Path) -> Iterator[None]:
  """Hold `<directory>/.lock` (flock) while training into a cache directory that concurrent
  shards may share (a sweep's values share a base model). Several processes of one job
  train it together, so only process 0 locks, and the others wait for it at a barrier."""
  import jax
  from jax.experimental import multihost_utils
  lock_path = directory / ".lock"
  directory.mkdir(parents=True, exist_ok=True)
  many = jax.process_count() > 1
  with contextlib.ExitStack() as stack:
    if jax.process_index() == 0:
      f = stack.enter_context(open(lock_path, "a"))
      fcntl.flock(f, fcntl.LOCK_EX)
      stack.callback(fcntl.flock, f, fcntl.LOCK_UN)
    if many:
      multihost_utils.sync_global_devices(f"lock {directory}")
    yield
    if many:
      multihost_utils.sync_global_devices(f"unlock {directory}")


def agree(name: str) -> None:
  """A barrier of all processes of the job (nothing with one process): decisions made from
  shared files before it cannot see files another process writes after it."""
  import jax
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
