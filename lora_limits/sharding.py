"""Device meshes for data-parallel training with `jax.jit` + `NamedSharding` (no pmap).

The batch is split over the `data` axis; parameters, adapters and optimizer state are
replicated. On one device every sharding is trivial, so the same code runs unchanged on
1 or N devices. Multi-host users call `jax.distributed.initialize()` first (see BUILD.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def data_mesh(num_devices: int | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over the first `num_devices` devices (all by default), axis `data`."""
  available = list(devices) if devices is not None else jax.devices()
  n = len(available) if num_devices is None else num_devices
  if not 1 <= n <= len(available):
    raise ValueError(f"num_devices={n} must be between 1 and the {len(available)} available")
  return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=available[:n])


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over `data`, the rest replicated."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_divisible(batch_size: int, mesh: Mesh) -> None:
  n = mesh.shape[DATA_AXIS]
  if batch_size % n:
    raise ValueError(f"batch_size={batch_size} must be divisible by the {n} devices of the "
                     f"'{DATA_AXIS}' mesh axis")
