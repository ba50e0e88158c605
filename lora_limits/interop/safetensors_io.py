"""Reading safetensors checkpoints tensor by tensor, each device only its own block.

`load_params` builds each parameter with `jax.make_array_from_callback`: every device asks
only for its own block, and the block is read straight from the memory-mapped file with
safetensors' `get_slice`. Host memory therefore peaks near one device's shard of one tensor,
not at the size of the model; `SafetensorsCheckpoint.max_read_bytes` records the largest
block read so tests can assert it. Where each block goes (the sharding rules) is decided in
`lora_limits.sharding`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so bf16 tensors read as numpy)
import numpy as np
from safetensors import safe_open

Index = tuple[slice, ...]


@dataclasses.dataclass(frozen=True)
class Source:
  """Where one of our parameters lives in a checkpoint.

  Our array is `tensor.T` if `transpose` else `tensor`, restricted along our last axis to
  `[offset, offset + ours)`; `fused` is how many equal parts share that axis in the file
  (GPT-2's `c_attn` holds q, k and v: fused=3, offsets 0, d, 2d).
  """

  key: str
  transpose: bool = False
  offset: int = 0
  fused: int = 1


class SafetensorsCheckpoint:
  """The `*.safetensors` files of a directory (single file or sharded with an index).

  Files are opened lazily and memory-mapped; use as a context manager to close them.
  """

  def __init__(self, directory: str | pathlib.Path):
    self.directory = pathlib.Path(directory)
    index = self.directory / "model.safetensors.index.json"
    if index.exists():
      weight_map = read_json(index).get("weight_map")
      if not isinstance(weight_map, dict):
        raise ValueError(f"{str(index)!r} has no 'weight_map' object; the index is damaged")
      self._file_of = {k: self.directory / f for k, f in weight_map.items()}
    else:
      files = sorted(self.directory.glob("*.safetensors"))
      if not files:
        raise ValueError(
            f"checkpoint directory {str(self.directory)!r} has no *.safetensors files "
            "(only safetensors checkpoints are supported, not pytorch_model.bin)")
      self._file_of = {}
      for f in files:
        with _safe_open(f) as handle:
          for key in handle.keys():
            self._file_of[key] = f
    self._stack = contextlib.ExitStack()
    self._handles: dict[pathlib.Path, Any] = {}
    self.max_read_bytes = 0
    self.bytes_read = 0

  def __enter__(self) -> "SafetensorsCheckpoint":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    self._handles.clear()
    self._stack.close()

  def keys(self) -> list[str]:
    return sorted(self._file_of)

  def _handle(self, key: str):
    if key not in self._file_of:
      raise ValueError(f"tensor {key!r} is not in the checkpoint at {str(self.directory)!r}")
    f = self._file_of[key]
    if f not in self._handles:
      if not f.exists():
        raise ValueError(f"the index names {f.name!r} for {key!r}, but that file is missing")
      self._handles[f] = self._stack.enter_context(_safe_open(f))
    return self._handles[f]

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._handle(key).get_slice(key).get_shape())

  def read(self, key: str, index: Index | None = None) -> np.ndarray:
    """The block `tensor[index]` (the whole tensor for None), read from the mapped file."""
    sl = self._handle(key).get_slice(key)
    block = np.asarray(sl[index] if index else sl[:])
    self.max_read_bytes = max(self.max_read_bytes, block.nbytes)
    self.bytes_read += block.nbytes
    return block


def read_json(path: str | pathlib.Path) -> Any:
  """A JSON file's content; unreadable or malformed JSON is a ValueError naming the file."""
  try:
    return json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{str(path)!r} is not a readable JSON file ({type(e).__name__}: {e}); it "
                     "is truncated or corrupt") from e


def _safe_open(f: pathlib.Path):
  """safe_open(f), with a damaged file (truncated, bad header) reported by name."""
  try:
    return safe_open(f, "np")
  except Exception as e:  # safetensors raises SafetensorError, OSError, ...
    raise ValueError(f"safetensors file {str(f)!r} cannot be read ({type(e).__name__}: {e}); "
                     "it is truncated or corrupt") from e


def _normalise(index: Index | None, shape: tuple[int, ...]) -> list[slice]:
  if index is None:
    index = (slice(None),) * len(shape)
  out = []
  for s, n in zip(index, shape):
    start, stop, step = s.indices(n)
    if step != 1:
      raise ValueError(f"strided shard index {s} is not supported")
    out.append(slice(start, stop))
  return out


def source_shape(ckpt: SafetensorsCheckpoint, src: Source) -> tuple[int, ...]:
  """The shape our parameter must have to be read from `src` (validated against the file)."""
  shape = ckpt.shape(src.key)
  if src.transpose:
    if len(shape) != 2:
      raise ValueError(f"tensor {src.key!r} has shape {shape}; a transposed source must be 2-D")
    shape = shape[::-1]
  if src.fused > 1:
    if shape[-1] % src.fused:
      raise ValueError(f"tensor {src.key!r} of shape {shape} cannot split into {src.fused} parts")
    shape = (*shape[:-1], shape[-1] // src.fused)
  return tuple(shape)


def read_block(ckpt: SafetensorsCheckpoint, src: Source, shape: tuple[int, ...],
               index: Index | None) -> np.ndarray:
  """Our parameter's block at `index` (in our layout), read from the file."""
  ours = _normalise(index, shape)
  if src.offset:
    last = ours[-1]
    ours[-1] = slice(last.start + src.offset, last.stop + src.offset)
  if src.transpose:
    return ckpt.read(src.key, tuple(ours[::-1])).T
  return ckpt.read(src.key, tuple(ours))


def load_params(ckpt: SafetensorsCheckpoint, sources: Mapping[str, Source],
                abstract: Mapping[str, jax.ShapeDtypeStruct],
                shardings: Mapping[str, jax.sharding.Sharding] | None = None) -> dict[str, Any]:
  """{path: array} for every path of `abstract` (flat), read tensor by tensor.

  The file's shape must match `abstract`; values are cast to its dtype. With `shardings`
  (flat, by path) each device reads only its block; without, each tensor is read whole and
  put on the default device.
  """
  missing = sorted(set(abstract) - set(sources))
  if missing:
    raise ValueError(f"no checkpoint source for parameters {missing[:5]}")
  out = {}
  for path, spec in abstract.items():
    src = sources[path]
    shape, dtype = tuple(spec.shape), np.dtype(spec.dtype)
    found = source_shape(ckpt, src)
    if found != shape:
      raise ValueError(
          f"checkpoint tensor {src.key!r} gives shape {found} for {path!r}; the config implies "
          f"{shape}")
    if shardings is None:
      out[path] = jax.device_put(read_block(ckpt, src, shape, None).astype(dtype))
    else:
      def callback(index, src=src, shape=shape, dtype=dtype):
        return read_block(ckpt, src, shape, index).astype(dtype)
      out[path] = jax.make_array_from_callback(shape, shardings[path], callback)
  return out
