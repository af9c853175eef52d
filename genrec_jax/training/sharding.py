"""Device mesh and shardings: one code path from 1 CPU to many devices and hosts.

Parameters and optimizer state are replicated; batches are split along the `data` axis. On a
multi-host run every process feeds its own slice of the global batch
(`jax.make_array_from_process_local_data`), after `jax.distributed.initialize()`.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh() -> jax.sharding.Mesh:
  """1-D mesh over every device of every process, axis `data`.

  The axis is `Auto`: XLA propagates the batch sharding through the model, so model code stays
  free of sharding annotations.
  """
  return jax.make_mesh((jax.device_count(),), (DATA_AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicate(tree, mesh: jax.sharding.Mesh):
  """Places every leaf of `tree` on all devices."""
  return jax.device_put(tree, replicated(mesh))


def check_batch_size(batch_size: int, mesh: jax.sharding.Mesh) -> None:
  if batch_size % mesh.size:
    raise ValueError(f"batch size {batch_size} is not divisible by the {mesh.size} devices of "
                     f"the mesh; choose a multiple of {mesh.size}")


def shard_batch(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """Global arrays from this process's rows of a batch (leading axis split over `data`)."""
  sharding = batch_sharded(mesh)
  local = jax.process_count() > 1
  out = {}
  for name, value in batch.items():
    if local:
      rows = value.shape[0] // jax.process_count()
      value = value[jax.process_index() * rows:(jax.process_index() + 1) * rows]
    out[name] = jax.make_array_from_process_local_data(sharding, value)
  return out
