"""Every mesh and sharding rule: data parallelism, and FSDP-style parameter placement.

Data parallelism (`data_mesh`, `batch_sharded`, `put_batch`, `to_local`): the batch is split
over the `data` axis; parameters, adapters and optimizer state are replicated. On one device
every sharding is trivial, so the same code runs unchanged on 1 or N devices, and on several
processes (multi-controller JAX, after `jax.distributed.initialize()`; see BUILD.md):
`put_batch` then feeds each process's devices from that process alone, and `to_local` hands
replicated results back as local arrays.

Parameter placement (`param_shardings`, `shard_params`, `batch_sharding`) is decided by
*rules*: an ordered tuple of `(regex, PartitionSpec)` pairs over parameter paths
(`layers/0/attn/q_proj/kernel`); the first regex that `re.search`es the path wins, and a path
no rule matches is replicated. `fsdp_rules()` is the FSDP-style default: every kernel and the
embeddings are split along one axis over the `fsdp` mesh axis, norm scales and biases are
replicated, and the batch goes over `data` (and `fsdp`, as in data parallelism). A mesh axis
that does not divide a dimension leaves that dimension whole, so odd-sized tensors still load
(replicated along it) instead of failing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lora_limits import tree as tree_lib

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"

Rules = tuple[tuple[str, P], ...]


def data_mesh(num_devices: int | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over the first `num_devices` devices (all by default), axis `data`."""
  available = list(devices) if devices is not None else jax.devices()
  n = len(available) if num_devices is None else num_devices
  if not 1 <= n <= len(available):
    raise ValueError(f"num_devices={n} must be between 1 and the {len(available)} available")
  return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=available[:n])


def fsdp_mesh(num_devices: int | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over the first `num_devices` devices (all by default), axis `fsdp`."""
  available = list(devices) if devices is not None else jax.devices()
  n = len(available) if num_devices is None else num_devices
  if not 1 <= n <= len(available):
    raise ValueError(f"num_devices={n} must be between 1 and the {len(available)} available")
  return jax.make_mesh((n,), (FSDP_AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=available[:n])


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over `data`, the rest replicated (see `batch_sharding` for an
  FSDP mesh)."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_divisible(batch_size: int, mesh: Mesh) -> None:
  n = mesh.shape[DATA_AXIS]
  if batch_size % n:
    raise ValueError(f"batch_size={batch_size} must be divisible by the {n} devices of the "
                     f"'{DATA_AXIS}' mesh axis")


def process_rows(sharding: NamedSharding, batch_size: int) -> slice:
  """The rows of a [batch_size, ...] batch that this process's devices hold under `sharding`.

  One process: every row. Several (multi-controller JAX): the contiguous block its devices
  cover on the batch axis (a 1-D `data` mesh lists each process's devices together)."""
  blocks = sorted({(index[0] if index else slice(None)).indices(batch_size)[:2]
                   for index in sharding.addressable_devices_indices_map((batch_size,)).values()})
  lo, hi = blocks[0][0], blocks[0][0]
  for start, stop in blocks:
    if start != hi:
      raise ValueError(f"this process's devices hold non-contiguous rows of the batch under "
                       f"{sharding}; order the mesh's devices by process")
    hi = stop
  return slice(lo, hi)


def put_batch(batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """A global batch from the host batch: each process transfers only the rows its own devices
  hold (`jax.make_array_from_process_local_data`); with one process this is `device_put`.

  Every process passes the same global host batch (a pure function of seed and step)."""
  sizes = {k: v.shape[0] for k, v in batch.items()}
  if len(set(sizes.values())) != 1:
    raise ValueError(f"batch arrays differ in their leading (batch) size: {sizes}")
  if jax.process_count() == 1:
    return jax.device_put(dict(batch), sharding)
  rows = process_rows(sharding, next(iter(sizes.values())))
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)[rows], v.shape)
          for k, v in batch.items()}


def to_local(tree: Any) -> Any:
  """Fully replicated global arrays → this process's copy (on one of its own devices).

  After multi-process training every process holds the whole replicated result; computing
  on the local copy (evaluation, merges) then needs no other process. Arrays already fully
  addressable are returned unchanged; a sharded, non-addressable array is refused."""
  def local(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
      return x
    if not x.is_fully_replicated:
      raise ValueError(f"to_local got an array sharded across processes ({x.sharding}); only "
                       "replicated arrays have a whole copy in each process")
    return x.addressable_data(0)
  return jax.tree.map(local, tree)


def put_replicated(tree: Any, sharding: NamedSharding) -> Any:
  """`jax.device_put(tree, sharding)` for a replicated sharding, also across processes:
  there, arrays on this process's devices go through the host (each process holds the same
  values and fills its own devices; the CPU backend has no cross-host device transfers)."""
  if jax.process_count() > 1:
    def one(x):
      if not (isinstance(x, jax.Array) and x.is_fully_addressable):
        return jax.device_put(x, sharding)
      if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # a key: its data, rewrapped
        return jax.random.wrap_key_data(jax.device_put(np.asarray(jax.random.key_data(x)),
                                                       sharding), impl=jax.random.key_impl(x))
      return jax.device_put(np.asarray(x), sharding)
    return jax.tree.map(one, tree)
  return jax.device_put(tree, sharding)


def fsdp_rules(axis: str = FSDP_AXIS) -> Rules:
  """FSDP-style rules: kernels [d_in, d_out] split on d_in, embeddings on the vocab."""
  return (
      (r"(^|/)embed/embedding$", P(axis, None)),
      (r"(^|/)pos_embed$", P(None, axis)),
      (r"/kernel$", P(axis, None)),
      (r".*", P()),
  )


def spec_for(path: str, shape: tuple[int, ...], rules: Rules, mesh: Mesh) -> P:
  """The PartitionSpec of one parameter: its first matching rule, minus non-dividing axes."""
  for pattern, spec in rules:
    if re.search(pattern, path):
      break
  else:
    return P()
  if len(spec) > len(shape):
    raise ValueError(
        f"sharding rule {pattern!r} gives {spec} ({len(spec)} dims) for {path!r}, which has "
        f"shape {tuple(shape)}")
  entries = []
  for dim, names in zip(shape, spec):
    if names is None:
      entries.append(None)
      continue
    names_t = names if isinstance(names, tuple) else (names,)
    for name in names_t:
      if name not in mesh.axis_names:
        raise ValueError(
            f"sharding rule {pattern!r} names mesh axis {name!r}; the mesh has axes "
            f"{list(mesh.axis_names)}")
    size = math.prod(mesh.shape[n] for n in names_t)
    entries.append(names if dim % size == 0 else None)
  return P(*entries)


def param_shardings(params: Mapping[str, Any], mesh: Mesh, rules: Rules | None = None):
  """A tree like `params` (arrays or ShapeDtypeStructs) of `NamedSharding`s."""
  rules = fsdp_rules() if rules is None else rules
  flat = tree_lib.flatten(params)
  return tree_lib.unflatten(
      {p: NamedSharding(mesh, spec_for(p, tuple(x.shape), rules, mesh)) for p, x in flat.items()})


def shard_params(params: Mapping[str, Any], mesh: Mesh, rules: Rules | None = None):
  """Place in-memory params on the mesh by the rules."""
  return jax.device_put(params, param_shardings(params, mesh, rules))


def batch_sharding(mesh: Mesh, batch_size: int) -> NamedSharding:
  """Leading axis over `data` and `fsdp` (those in the mesh that divide `batch_size`)."""
  axes = [a for a in (DATA_AXIS, FSDP_AXIS) if a in mesh.axis_names]
  while axes and batch_size % math.prod(mesh.shape[a] for a in axes):
    axes.pop()
  return NamedSharding(mesh, P(tuple(axes)) if axes else P())
