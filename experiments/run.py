"""Entry point: `python -m experiments.run --config=configs/<name>.py --workdir=<dir>`.

The config's `study` field names a module in `experiments/studies/`; its `main(config,
workdir)` turns the ConfigDict into typed, frozen dataclasses before calling the library.
Overrides: `--config.a.b=x`; variants: `--config=configs/x.py:variant`.
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
from experiments import studies as studies_pkg  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Study config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for outputs, checkpoints and caches.")
_NUM_DEVICES = flags.DEFINE_integer(
    "num_cpu_devices", 0, "Fake this many CPU devices (tests of sharding); 0 keeps the default.")


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
  if _NUM_DEVICES.value:
    import jax
    jax.config.update("jax_num_cpu_devices", _NUM_DEVICES.value)
  study = config.get("study")
  studies = available_studies()
  if study not in studies:
    raise app.UsageError(f"config.study={study!r} is not one of {studies}")
  workdir = pathlib.Path(_WORKDIR.value)
  workdir.mkdir(parents=True, exist_ok=True)
  start = time.time()
  module = importlib.import_module(f"experiments.studies.{study}")
  module.main(config, workdir)
  common.log(f"{study}: done in {common.format_seconds(time.time() - start)}; outputs in "
             f"{workdir.resolve()}")


if __name__ == "__main__":
  flags.mark_flags_as_required([])
  app.run(main)
  sys.exit(0)
