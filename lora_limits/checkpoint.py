"""The one module that owns orbax: save and resume training state in a directory.

A checkpoint holds the train state (step, trainable params, optimizer state) and a JSON
record (data-iterator position, resolved config, metric history). Orbax writes each step
into a temporary directory and renames it when complete, so a crash mid-save leaves the
previous step intact; a step directory that fails to restore is reported by name.

Orbax's array files carry no checksum: a flipped byte in a data file restores silently as
a wrong value. So each save also records a SHA-256 of the state's bytes (tree paths,
dtypes, shapes, values) in the JSON record, and a restore that does not reproduce it is
refused. (Replicated arrays are hashed from this process's copy, so the digest is the same
for any number of processes; skipped for arrays sharded across processes.) The record also holds the state's layout (path → dtype and shape), checked before the arrays
are read, so a checkpoint of another model or adapter is refused by name.

After each save, the SHA-256 of every file of the step directory goes to
`file_sha256/<step>.json` (written atomically; orbax ignores the folder); a restore checks
them first and names a missing, truncated or altered file before orbax reads anything.
(A step saved without the list is checked by its state digest alone.)

Several processes (multi-controller JAX): every process calls `save` and `restore` (orbax
coordinates them and writes each array once); only process 0 writes the file list, and
every process checks it before restoring.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import pathlib
import shutil
import sys
import types
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

_DIGEST_KEY = "_state_sha256"
_LAYOUT_KEY = "_state_layout"
_FILE_DIGESTS = "file_sha256"


class CheckpointError(RuntimeError):
  """A checkpoint exists but cannot be restored (corrupt, truncated or mismatched)."""


class Checkpointer:
  """Saves every `save_every` steps (and on demand); keeps the newest `max_to_keep`."""

  def __init__(self, directory: str | pathlib.Path, *, max_to_keep: int = 2):
    if max_to_keep < 1:
      raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
    self.directory = pathlib.Path(directory).absolute()
    self.directory.mkdir(parents=True, exist_ok=True)
    # A process killed mid-save leaves `<step>.orbax-checkpoint-tmp-*`; it is never restored.
    # Remove it now (orbax's cleanup_tmp_directories option does it in the background).
    for partial in self.directory.glob("*.orbax-checkpoint-tmp*"):
      shutil.rmtree(partial, ignore_errors=True)
    # ... and a file list killed mid-write leaves `.<step>.json.tmp` (never read).
    for partial in (self.directory / _FILE_DIGESTS).glob(".*.tmp"):
      partial.unlink(missing_ok=True)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=False)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, record: dict[str, Any]) -> None:
    for key in (_DIGEST_KEY, _LAYOUT_KEY):
      if key in record:
        raise ValueError(f"record key {key!r} is reserved")
    record = dict(record, **{_DIGEST_KEY: state_digest(state), _LAYOUT_KEY: state_layout(state)})
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record)))
    self._manager.wait_until_finished()
    if jax.process_index() == 0:  # orbax has finished the step on every process
      self._write_file_digests(step)

  def _digests_path(self, step: int) -> pathlib.Path:
    return self.directory / _FILE_DIGESTS / f"{step}.json"

  def _write_file_digests(self, step: int) -> None:
    step_dir = self.directory / str(step)
    digests = {str(p.relative_to(step_dir)): _file_sha256(p)
               for p in sorted(step_dir.rglob("*")) if p.is_file()}
    path = self._digests_path(step)
    path.parent.mkdir(exist_ok=True)
    for stale in path.parent.glob(".*.tmp"):  # left by a process killed mid-write
      stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(digests, f, indent=0, sort_keys=True)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
    kept = {f"{s}.json" for s in self._manager.all_steps()}
    for old in path.parent.glob("*.json"):
      if old.name not in kept:
        old.unlink(missing_ok=True)

  def _check_files(self, step: int) -> None:
    """Every file recorded at save time is there with the same SHA-256 (if recorded)."""
    path = self._digests_path(step)
    where = f"checkpoint step {step} in {self.directory} cannot be restored"
    if not path.exists():
      return
    try:
      digests = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
      raise CheckpointError(f"{where}: its file list {path} is damaged ({e}); delete that list "
                            "to restore without the file check") from e
    step_dir = self.directory / str(step)
    for rel, digest in sorted(digests.items()):
      f = step_dir / rel
      if not f.is_file():
        problem = "is missing"
      elif _file_sha256(f) != digest:
        problem = "was altered or truncated since it was saved (SHA-256 differs)"
      else:
        continue
      raise CheckpointError(
          f"{where}: file {f} {problem}; delete that step directory to resume from an earlier "
          "one, or the whole directory to start over")

  def restore(self, step: int, like_state: Any) -> tuple[Any, dict[str, Any]]:
    """State shaped like `like_state` (arrays or ShapeDtypeStructs) and the JSON record."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like_state)
    self._check_files(step)
    failure, previous_hook = None, None
    try:
      # The record first: its layout says whether the arrays fit `like_state` (another model's
      # or adapter's checkpoint fails in orbax with a long, unclear tensorstore error).
      saved = self._manager.restore(step, args=ocp.args.Composite(
          record=ocp.args.JsonRestore()))["record"]
      layout = saved.get(_LAYOUT_KEY) if isinstance(saved, dict) else None
      if layout is not None:
        _check_layout(layout, state_layout(abstract), f"checkpoint step {step} in "
                                                        f"{self.directory}")
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), record=ocp.args.JsonRestore()))
    except CheckpointError:
      raise
    except Exception as e:  # orbax raises many types for damaged files
      failure = f"{type(e).__name__}: {_first_line(e)}"
      previous_hook = _quiet_abandoned_reads()
    if failure is not None:
      # Not chained: the orbax error's traceback holds its event loop, whose abandoned reads
      # must be collected now (see _quiet_abandoned_reads).
      try:
        gc.collect()
      finally:
        sys.unraisablehook = previous_hook
      raise CheckpointError(
          f"checkpoint step {step} in {self.directory} cannot be restored ({failure}); delete "
          "that step directory to resume from an earlier one, or the whole directory to start "
          "over")
    record = dict(restored["record"])
    record.pop(_LAYOUT_KEY, None)
    expected = record.pop(_DIGEST_KEY, None)
    if expected is not None:
      got = state_digest(restored["state"])
      if got is not None and got != expected:
        raise CheckpointError(
            f"checkpoint step {step} in {self.directory} restores to different values than "
            f"were saved (state SHA-256 {got[:12]}..., recorded {expected[:12]}...): a data "
            "file was altered or damaged; delete that step directory to resume from an "
            "earlier one, or the whole directory to start over")
    return restored["state"], record

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _file_sha256(path: pathlib.Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _quiet_abandoned_reads():
  """Install an unraisable-exception hook that drops the errors of orbax's abandoned reads;
  returns the previous hook (the caller restores it).

  Orbax reads arrays concurrently; when one read fails, the loop is closed with the other
  reads pending, and their errors surface whenever those coroutines are garbage-collected
  ('Exception ignored in <coroutine ...>', 'Event loop is closed'), far from the failed
  restore. The restore already failed and is reported, so they are collected and dropped."""
  previous = sys.unraisablehook

  def hook(unraisable) -> None:
    if isinstance(unraisable.object, types.CoroutineType) or (
        isinstance(unraisable.exc_value, RuntimeError)
        and "Event loop is closed" in str(unraisable.exc_value)):
      return
    previous(unraisable)

  sys.unraisablehook = hook
  return previous


def _first_line(e: Exception) -> str:
  """An error's first line, shortened (tensorstore appends a multi-line spec dump)."""
  text = str(e).strip()
  return (text.splitlines()[0] if text else "")[:300]


def state_layout(state: Any) -> dict[str, str]:
  """{tree path: 'dtype[shape]'} of every leaf (arrays or ShapeDtypeStructs)."""
  return {jax.tree_util.keystr(path): f"{np.dtype(leaf.dtype).name}{list(np.shape(leaf))}"
          for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}


def _check_layout(saved: dict[str, str], wanted: dict[str, str], where: str) -> None:
  if saved == wanted:
    return
  missing, extra = sorted(set(wanted) - set(saved)), sorted(set(saved) - set(wanted))
  differ = [f"{k}: saved {saved[k]}, expected {wanted[k]}" for k in sorted(saved)
            if k in wanted and saved[k] != wanted[k]]
  parts = ([f"differs at {differ[:3]}"] if differ else []) + (
      [f"lacks {missing[:3]}"] if missing else []) + ([f"has extra {extra[:3]}"] if extra else [])
  raise CheckpointError(
      f"{where} holds a state of another layout than this run's model/adapter ({'; '.join(parts)}"
      "): it belongs to another configuration; use another checkpoint directory, or delete "
      "this one to start over")


def state_digest(state: Any) -> str | None:
  """SHA-256 over every leaf's tree path, dtype, shape and bytes (None if a leaf is sharded
  across processes; a replicated leaf is read from this process's copy)."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      if not leaf.is_fully_replicated:
        return None
      leaf = leaf.addressable_data(0)
    x = np.asarray(jax.device_get(leaf))
    h.update(f"{jax.tree_util.keystr(path)}|{x.dtype.str}|{x.shape}|".encode())
    h.update(np.ascontiguousarray(x).tobytes())
  return h.hexdigest()
