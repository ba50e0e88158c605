"""Entry point: `python -m experiments.run --config=configs/<name>.py --workdir=<dir>`.

The config's `study` field names a module in `experiments/studies/`; its `main(config,
workdir)` turns the ConfigDict into typed, frozen dataclasses before calling the library.
Overrides: `--config.a.b=x`; variants: `--config=configs/x.py:variant`.

Several processes of one job (multi-controller JAX): `--coordinator_address=host:port
--num_processes=N --process_id=i`, or nothing under a cluster `jax.distributed.initialize()`
detects (SLURM step of several tasks, TPU pod: see `experiments/distributed.py`). Shards:
`--shard_index=i --num_shards=n` (or a SLURM array job) run only every n-th unit of the study.

A user error — a config field, a missing or malformed input file, an adapter that does not
fit, i.e. a `schema.ConfigError` raised while the study validates its config and inputs —
prints one line naming the field or file and what is allowed, and exits with status 2
(`--traceback` shows the full traceback instead). Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import importlib
import os
import pathlib
import pkgutil
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments import common  # noqa: E402
from experiments import distributed  # noqa: E402
from experiments import schema  # noqa: E402
from experiments import studies as studies_pkg  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Study config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for outputs, checkpoints and caches.")
_NUM_DEVICES = flags.DEFINE_integer(
    "num_cpu_devices", 0, "Fake this many CPU devices (tests of sharding); 0 keeps the default.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", list(distributed.DISTRIBUTED_MODES),
    "Join a multi-process JAX job: auto (if the flags below or the environment name one), "
    "on (always call jax.distributed.initialize), off.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Processes in the job (0: detect).")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's id (-1: detect).")
_SHARD_INDEX = flags.DEFINE_integer("shard_index", 0, "Which shard of the study's units to run.")
_NUM_SHARDS = flags.DEFINE_integer(
    "num_shards", 0, "Split the study's units (seeds, sweep points) into this many shards "
    "(0: from SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT when set, else 1).")
_TRACEBACK = flags.DEFINE_bool(
    "traceback", False, "Show the full traceback of a config or input error (by default one "
    "line naming the field or file, and exit status 2).")
USER_ERROR_STATUS = 2


def available_studies() -> list[str]:
  return sorted(m.name for m in pkgutil.iter_modules(studies_pkg.__path__)
                if not m.name.startswith("_"))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/smoke.py")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  # Orbax logs every save at INFO through absl; keep the terminal for our progress lines.
  logging.set_verbosity(logging.WARNING)
  workdir = pathlib.Path(_WORKDIR.value)
  created = not workdir.exists()
  start = time.time()
  try:
    study = _run(config, workdir)
  except schema.ConfigError as e:
    if created and workdir.is_dir() and not any(workdir.iterdir()):
      workdir.rmdir()  # refused before anything was written: leave no empty workdir behind
    if _TRACEBACK.value:
      raise
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
    sys.exit(USER_ERROR_STATUS)
  common.log(f"{study}: done in {common.format_seconds(time.time() - start)}; outputs in "
             f"{workdir.resolve()}")


def _run(config, workdir: pathlib.Path) -> str:
  """Sets up the processes and shard, then runs the config's study in `workdir`; returns the
  study's name. A bad flag or config field raises `schema.ConfigError`."""
  try:
    processes = distributed.ProcessConfig(_DISTRIBUTED.value, _COORDINATOR.value,
                                          _NUM_PROCESSES.value, _PROCESS_ID.value)
    shard = distributed.resolve_shard(_SHARD_INDEX.value, _NUM_SHARDS.value, os.environ)
  except ValueError as e:
    raise schema.ConfigError(str(e)) from e
  study = config.get("study")
  studies = available_studies()
  if study not in studies:
    raise schema.ConfigError(f"config.study={study!r} is not one of {studies}")
  if shard.count > 1 and study not in distributed.SHARDED_STUDIES:
    raise schema.ConfigError(f"{shard}: study {study!r} has no independent units to split; "
                             f"shards apply to {list(distributed.SHARDED_STUDIES)}")
  if _NUM_DEVICES.value:
    import jax
    jax.config.update("jax_num_cpu_devices", _NUM_DEVICES.value)
  if distributed.initialize(processes):  # before any other JAX operation
    import jax
    common.set_writer(jax.process_index() == 0)
    common.log(f"process 0 of {jax.process_count()}: {jax.device_count()} devices in all")
  distributed.set_shard(shard)
  if shard.count > 1:
    common.log(f"{shard}: this job runs every {shard.count}-th unit of the study from unit "
               f"{shard.index}")
  workdir.mkdir(parents=True, exist_ok=True)
  module = importlib.import_module(f"experiments.studies.{study}")
  module.main(config, workdir)
  return study


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad flag or override (an unknown config key, a badly typed
  value, an unknown config variant) as a user error: one line, exit status 2."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, ValueError, AttributeError, KeyError, TypeError) as e:
    if "--traceback" in argv:
      raise
    message = str(e)
    unknown = _unknown_field(argv)
    if unknown:
      message = unknown
    elif isinstance(e, (AttributeError, KeyError)):  # ml_collections: an override of no field
      message = (f"unknown config field {message.strip(chr(34) + chr(39))!r} in "
                 f"{[a for a in argv[1:] if a.startswith('--config.')]}; a locked config "
                 "takes overrides of its own fields only")
    elif "Traceback (most recent call last)" in message:  # get_config raised (e.g. variant)
      head = message.split("Traceback (most recent call last)")[0].rstrip(" :\n")
      message = f"{head}: {message.strip().splitlines()[-1]}"
    print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    sys.exit(USER_ERROR_STATUS)


def _unknown_field(argv: list[str]) -> str | None:
  """'unknown config field config.a.b (...); config.a has the fields [...]' for the first
  `--config.a.b=...` override that names no field of the loaded config (None: every override
  names a field, or no config was loaded)."""
  source = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")), None)
  if source is None:
    return None
  try:  # the config as --config loads it (its overrides failed, so it holds no value)
    config = flags.FLAGS["config"].parser.parse(source)
  except Exception:  # noqa: BLE001 -- the file itself failed: the caller reports that
    return None
  for arg in argv[1:]:
    if not arg.startswith("--config."):
      continue
    name = arg.split("=", 1)[0]
    node, where = config, "config"
    for part in name.removeprefix("--config.").split("."):
      if not hasattr(node, "keys"):
        return f"unknown config field {where}.{part} ({name}): {where} is a value, not a section"
      if part not in node:
        return (f"unknown config field {where}.{part} ({name}); {where} has the fields "
                f"{sorted(node.keys())}")
      node, where = node[part], f"{where}.{part}"
  return None


if __name__ == "__main__":
  flags.mark_flags_as_required([])
  app.run(main, flags_parser=parse_flags)
  sys.exit(0)
