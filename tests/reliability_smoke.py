"""Shared by the reliability tests: run the smoke study as a subprocess, and compare workdirs.

`reference_run(root)` is one uninterrupted `python -m experiments.run --config=configs/smoke.py`
run, made once per test session and shared by the kill-and-resume and determinism tests.
Workdirs are compared file by file (SHA-256), except:
- orbax's container files under `*/ckpt/<step>/`: their names and metadata carry random ids
  and timestamps, so a checkpoint is compared by its JSON record instead, which holds the
  metric history and the SHA-256 of the whole saved train state (step, parameters,
  optimizer state) that `lora_limits.checkpoint` records and verifies on every restore;
- `timings.json` and `base.json`'s `train_seconds` (wall-clock seconds).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = "configs/smoke.py"
TIMEOUT_S = 600
WALL_CLOCK_FILES = ("timings.json",)
WALL_CLOCK_FIELDS = {"base.json": ("train_seconds",)}


def command(workdir: pathlib.Path, *overrides: str) -> list[str]:
  return [sys.executable, "-m", "experiments.run", f"--config={CONFIG}", f"--workdir={workdir}",
          *overrides]


def environment() -> dict[str, str]:
  """Offline, and no fixed PYTHONHASHSEED: each process hashes strings differently, so any
  dependence of the results on set or dict-of-str iteration order shows up as a difference."""
  env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
  env.pop("PYTHONHASHSEED", None)
  return env


def run(workdir: pathlib.Path, log: pathlib.Path, *overrides: str) -> None:
  """One run to completion; a failure shows the end of its log."""
  with open(log, "ab") as out:
    proc = subprocess.run(command(workdir, *overrides), cwd=REPO, env=environment(),
                          stdout=out, stderr=subprocess.STDOUT, timeout=TIMEOUT_S)
  if proc.returncode != 0:
    raise AssertionError(f"run in {workdir} exited with {proc.returncode}:\n"
                         f"{log.read_text()[-3000:]}")


@functools.cache
def reference_run(root: pathlib.Path) -> pathlib.Path:
  """The uninterrupted smoke run (once per session under `root`)."""
  workdir = root / "reference"
  run(workdir, root / "reference.log")
  return workdir


def is_checkpoint_file(rel: pathlib.Path) -> bool:
  parts = rel.parts
  return "ckpt" in parts and parts.index("ckpt") + 2 < len(parts)


def file_digests(workdir: pathlib.Path) -> dict[str, str]:
  """{relative path: SHA-256} of every file outside orbax step directories; JSON files with
  wall-clock fields are hashed without those fields; wall-clock files are left out."""
  out = {}
  for path in sorted(workdir.rglob("*")):
    rel = path.relative_to(workdir)
    if not path.is_file() or is_checkpoint_file(rel) or rel.name in WALL_CLOCK_FILES:
      continue
    data = path.read_bytes()
    if rel.name in WALL_CLOCK_FIELDS:
      obj = json.loads(data)
      for field in WALL_CLOCK_FIELDS[rel.name]:
        obj.pop(field, None)
      data = json.dumps(obj, sort_keys=True).encode()
    out[str(rel)] = hashlib.sha256(data).hexdigest()
  return out


def checkpoint_records(workdir: pathlib.Path) -> dict[str, dict]:
  """{'<cache dir>/ckpt/<step>': JSON record} of every checkpoint step (incl. its state digest)."""
  out = {}
  for meta in sorted(workdir.glob("cache/**/ckpt/*/record/metadata")):
    step_dir = meta.parent.parent
    out[str(step_dir.relative_to(workdir))] = json.loads(meta.read_text())
  return out


def differences(a: dict, b: dict) -> list[str]:
  keys = sorted(set(a) | set(b))
  return [k for k in keys if a.get(k) != b.get(k)]
