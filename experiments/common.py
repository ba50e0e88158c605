"""Shell utilities shared by the studies: atomic files, JSON lines, progress, timing.

In a job of several JAX processes only process 0 writes: `experiments.run` calls
`set_writer(False)` on the others, and the file writers, `log` and `Progress` then do nothing
there (every process computes the same values; one copy of each file and line is enough).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pathlib
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from typing import Any


_writer = True


def set_writer(on: bool) -> None:
  """Whether this process writes files and progress (False on processes 1.. of a job)."""
  global _writer
  _writer = bool(on)


def is_writer() -> bool:
  return _writer


def log(message: str) -> None:
  if not _writer:
    return
  print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def format_seconds(seconds: float) -> str:
  seconds = int(round(seconds))
  m, s = divmod(seconds, 60)
  h, m = divmod(m, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Write to a temporary file in the same directory, fsync, then rename over `path`.

  Temporary files a killed writer left for `path` (`.<name>.*.tmp`) are removed first; they
  are never read. (One writer per path: a concurrent writer's temporary file would go too.)
  """
  if not _writer:
    return
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
    with contextlib.suppress(FileNotFoundError):
      stale.unlink()
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
  atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def write_jsonl(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> None:
  lines = [json.dumps(r, sort_keys=True, default=_json_default) for r in records]
  atomic_write_text(path, "".join(line + "\n" for line in lines))


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
  """Records (JSON objects) of a JSON-lines file.

  A line that is not a JSON object (a half-written last line, bytes that are not UTF-8) is
  a ValueError naming the file and line, never skipped: our writers are atomic, so such a
  file was damaged after it was written.
  """
  out = []
  try:
    with open(path, encoding="utf-8") as f:
      for i, line in enumerate(f, start=1):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}: line {i} is not valid JSON ({e.msg}); the file is truncated "
                           "or corrupt (delete it to recompute it)") from e
        if not isinstance(record, dict):
          raise ValueError(f"{path}: line {i} is a JSON {type(record).__name__}, not a record "
                           "object; the file is corrupt (delete it to recompute it)")
        out.append(record)
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); the file is "
                     "corrupt (delete it to recompute it)") from e
  return out


def _json_default(obj: Any) -> Any:
  import numpy as np
  if isinstance(obj, np.generic):
    return obj.item()
  if isinstance(obj, np.ndarray):
    return obj.tolist()
  if isinstance(obj, pathlib.Path):
    return str(obj)
  raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


class Progress:
  """A one-line progress display: `label  step/total  rate  ETA  extra` (stderr)."""

  def __init__(self, label: str, total: int, every: float = 1.0, stream=None):
    self.label, self.total, self.every = label, max(int(total), 1), every
    self.stream = stream or sys.stderr
    self.start = time.time()
    self._last = 0.0
    self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()

  def update(self, done: int, extra: str = "", force: bool = False) -> None:
    if not _writer:
      return
    now = time.time()
    if not force and now - self._last < self.every and done < self.total:
      return
    self._last = now
    elapsed = now - self.start
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = (self.total - done) / rate if rate > 0 else float("nan")
    eta_s = format_seconds(eta) if eta == eta else "?"
    line = (f"{self.label} {done}/{self.total} ({100 * done / self.total:5.1f}%) "
            f"{format_seconds(elapsed)} elapsed, ETA {eta_s} {extra}")
    if self._tty:
      self.stream.write("\r" + line[:200].ljust(100))
      if done >= self.total:
        self.stream.write("\n")
    else:
      self.stream.write(f"[{time.strftime('%H:%M:%S')}] {line}\n")
    self.stream.flush()

  def close(self, done: int | None = None) -> None:
    """Final line: `done` steps (default: all of them; fewer when a run stopped early)."""
    self.total = self.total if done is None else max(int(done), 1)
    self.update(self.total, force=True)


@contextlib.contextmanager
def stage(name: str, timings: dict[str, float] | None = None) -> Iterator[None]:
  """Log the start and the wall time of a pipeline stage (and record it in `timings`)."""
  log(f"stage {name}: start")
  start = time.time()
  yield
  seconds = time.time() - start
  if timings is not None:
    timings[name] = round(seconds, 2)
  log(f"stage {name}: done in {format_seconds(seconds)}")
