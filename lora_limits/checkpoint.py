"""The one module that owns orbax: save and resume training state in a directory.

A checkpoint holds the train state (step, trainable params, optimizer state) and a JSON
record (data-iterator position, resolved config, metric history). Orbax writes each step
into a temporary directory and renames it when complete, so a crash mid-save leaves the
previous step intact; a step directory that fails to restore is reported by name.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint exists but cannot be restored (corrupt, truncated or mismatched)."""


class Checkpointer:
  """Saves every `save_every` steps (and on demand); keeps the newest `max_to_keep`."""

  def __init__(self, directory: str | pathlib.Path, *, max_to_keep: int = 2):
    if max_to_keep < 1:
      raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
    self.directory = pathlib.Path(directory).absolute()
    self.directory.mkdir(parents=True, exist_ok=True)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=False)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, record: dict[str, Any]) -> None:
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
    return restored["state"], dict(restored["record"])

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
