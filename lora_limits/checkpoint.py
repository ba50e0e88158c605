"""The one module that owns orbax: save and resume training state in a directory.

A checkpoint holds the train state (step, trainable params, optimizer state) and a JSON
record (data-iterator position, resolved config, metric history). Orbax writes each step
into a temporary directory and renames it when complete, so a crash mid-save leaves the
previous step intact; a step directory that fails to restore is reported by name.

Orbax's array files carry no checksum: a flipped byte in a data file restores silently as
a wrong value. So each save also records a SHA-256 of the state's bytes (tree paths,
dtypes, shapes, values) in the JSON record, and a restore that does not reproduce it is
refused. (Skipped for arrays this process cannot fully read, i.e. multi-host shards.)
"""

from __future__ import annotations

import hashlib
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

_DIGEST_KEY = "_state_sha256"


class CheckpointError(RuntimeError):
  """A checkpoint exists but cannot be restored (corrupt, truncated or mismatched)."""


class Checkpointer:
  """Saves every `save_every` steps (and on demand); keeps the newest `max_to_keep`."""

  def __init__(self, directory: str | pathlib.Path, *, max_to_keep: int = 2):
    if max_to_keep < 1:
      raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
    self.directory = pathlib.Path(directory).absolute()
    self.directory.mkdir(parents=True, exist_ok=True)
    # cleanup_tmp_directories: a process killed mid-save leaves `<step>.orbax-checkpoint-tmp-*`;
    # it is never restored, and is removed when the directory is next opened.
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=False,
                                           cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, record: dict[str, Any]) -> None:
    if _DIGEST_KEY in record:
      raise ValueError(f"record key {_DIGEST_KEY!r} is reserved for the state digest")
    record = dict(record, **{_DIGEST_KEY: state_digest(state)})
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record)))
    self._manager.wait_until_finished()

  def restore(self, step: int, like_state: Any) -> tuple[Any, dict[str, Any]]:
    """State shaped like `like_state` (arrays or ShapeDtypeStructs) and the JSON record."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like_state)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), record=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types for damaged files
      raise CheckpointError(
          f"checkpoint step {step} in {self.directory} cannot be restored "
          f"({type(e).__name__}: {str(e)[:300]}); delete that step directory to resume "
          "from an earlier one, or the whole directory to start over") from e
    record = dict(restored["record"])
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


def state_digest(state: Any) -> str | None:
  """SHA-256 over every leaf's tree path, dtype, shape and bytes (None if a leaf is not fully
  addressable by this process)."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      return None
    x = np.asarray(jax.device_get(leaf))
    h.update(f"{jax.tree_util.keystr(path)}|{x.dtype.str}|{x.shape}|".encode())
    h.update(np.ascontiguousarray(x).tobytes())
  return h.hexdigest()
