"""Device mesh and shardings: one code path from 1 CPU to many devices and hosts.

Batches are split along the `data` axis. Parameters and optimizer state are replicated, or,
for models too large for one device's memory, sharded over the same axis (`fsdp_shardings`:
fully sharded data parallelism, XLA gathering each weight where it is used). On a multi-host
run every process feeds its own slice of the global batch
(`jax.make_array_from_process_local_data`), after `jax.distributed.initialize()`.
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from genrec_jax.data.batching import sample_batches, sample_dispatches

DATA_AXIS = "data"


def use_cpu_devices(count: int) -> None:
  """Splits the host CPU into `count` XLA devices of one thread each (1: XLA's default, one
  device whose ops use every core).

  A small model's step is many small ops; one device spreads each op over the cores and
  synchronises them at every op, while `count` single-threaded devices each run the step on
  1/count of the batch (the `data` axis of `make_mesh`). Measured on 2 cores with the cpu
  preset's T5 (experiments/benchmarks/README.md, session 8): train samples/s +19 %, beam
  search +9 %. Computations outside the mesh (k-means, MiniLM vectors) then use one core. Only
  the CPU platform is affected; call it before JAX runs anything (`genrec_jax.main` does).

  It also gives XLA:CPU's thread pool at least 2 x `count` threads (`PJRT_NPROC`, which XLA
  reads when it creates the CPU client, unless `PJRT_NPROC` or `NPROC` is already set). The
  pool is sized to the cores by default, and a collective blocks its thread until every
  device's share of the program has arrived: with independent multi-device programs in
  flight at once, a pool of 2 threads for 2 devices can be held entirely by waiting shares,
  and XLA aborts after 40 s ("Termination timeout for all gather"; a continual run on the
  2-core machine did, in session 12). Measured on 2 cores (session 13, 4-12 independent
  chains of all-gather and all-reduce programs, as in
  `tests/test_trainer.py::test_cpu_devices_survive_concurrent_collectives`): 2, 4 and 8
  devices deadlocked with 3, 5 and 12 threads and finished with 4, 8 and 16. The cost on 2
  cores: training speed unchanged, beam search about 10 % slower (experiments/benchmarks).
  """
  if count == 1:
    return
  jax.config.update("jax_num_cpu_devices", count)  # raises once JAX has started its backends
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_cpu_multi_thread_eigen" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen=false".strip()
  if "PJRT_NPROC" not in os.environ and "NPROC" not in os.environ:
    os.environ["PJRT_NPROC"] = str(max(2 * count, usable_cores()))


def usable_cores() -> int:
  """The cores this process may run on (XLA's default size of its CPU thread pool)."""
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def make_mesh() -> jax.sharding.Mesh:
  """1-D mesh over every device of every process, axis `data`.

  The axis is `Auto`: XLA propagates the batch sharding through the model, so model code stays
  free of sharding annotations.
  """
  return jax.make_mesh((jax.device_count(),), (DATA_AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: jax.sharding.Mesh, batch_axis: int = 0) -> NamedSharding:
  return NamedSharding(mesh, P(*[None] * batch_axis, DATA_AXIS))


PARAM_SHARDINGS = ("replicated", "fsdp")


def fsdp_shardings(tree, mesh: jax.sharding.Mesh, min_elements: int = 2 ** 14):
  """Shardings for fully sharded data parallelism of a tree of arrays or shapes: an array of
  at least `min_elements` elements is split over `data` along its largest dimension that the
  axis size divides; smaller arrays, and arrays without such a dimension, are replicated. The
  rule depends on shapes alone, so parameters and their optimizer moments get one layout."""
  devices = mesh.shape[DATA_AXIS]

  def rule(x):
    if devices == 1 or math.prod(x.shape) < min_elements:
      return replicated(mesh)
    dims = [d for d in np.argsort(x.shape, kind="stable")[::-1] if x.shape[d] % devices == 0]
    if not dims:
      return replicated(mesh)
    spec = [None] * len(x.shape)
    spec[dims[0]] = DATA_AXIS
    return NamedSharding(mesh, P(*spec))

  return jax.tree.map(rule, tree)


def replicate(tree, mesh: jax.sharding.Mesh):
  """Places every leaf of `tree` on all devices."""
  return jax.device_put(tree, replicated(mesh))


def check_batch_size(batch_size: int, mesh: jax.sharding.Mesh) -> None:
  if batch_size % mesh.size:
    raise ValueError(f"batch size {batch_size} is not divisible by the {mesh.size} devices of "
                     f"the mesh; choose a multiple of {mesh.size}")


def shard_batch(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh,
                batch_axis: int = 0) -> dict[str, jax.Array]:
  """Global arrays from this process's rows of a batch, the rows (axis `batch_axis`: 0, or 1
  for batches stacked per update) split over `data`."""
  sharding = batch_sharded(mesh, batch_axis)
  local = jax.process_count() > 1
  out = {}
  for name, value in batch.items():
    if local:
      rows = value.shape[batch_axis] // jax.process_count()
      value = np.take(value, np.arange(jax.process_index() * rows,
                                       (jax.process_index() + 1) * rows), axis=batch_axis)
    out[name] = jax.make_array_from_process_local_data(sharding, value)
  return out


def shard_stacked_batch(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh
                        ) -> dict[str, jax.Array]:
  """A dispatch of stacked batches (`Trainer.train_steps`): the fields [steps, B, ...] split
  over `data` along B (replicated when the devices do not divide B, as `shard_item_batch`),
  `step_ids` [steps] replicated."""
  batch = dict(batch)
  step_ids = replicate(jnp.asarray(batch.pop("step_ids")), mesh)
  if any(value.shape[1] % mesh.size for value in batch.values()):
    return {**replicate(jax.tree.map(jnp.asarray, batch), mesh), "step_ids": step_ids}
  return {**shard_batch(batch, mesh, batch_axis=1), "step_ids": step_ids}


def shard_item_batch(idx: np.ndarray, mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """A tokenizer batch {"idx": int [B] item indices}, split over `data` when the devices divide
  B, else replicated (a catalog smaller than the batch size makes B the catalog size)."""
  if len(idx) % mesh.size:
    return replicate({"idx": jnp.asarray(idx)}, mesh)
  return shard_batch({"idx": idx}, mesh)


def sharded_training_batches(samples, batch_size: int, boundaries: tuple[int, ...],
                             mesh: jax.sharding.Mesh, *, seed: int, epoch: int,
                             grouping: str = "length", steps_per_dispatch: int = 1,
                             constants: dict[str, float] | None = None):
  """An epoch's training batches on the mesh, with their numbers of real samples: one batch
  per update (`sample_batches`), or with steps_per_dispatch K > 1 stacks of K batches of one
  bucket (`sample_dispatches`, for `Trainer.train_steps`). `constants` adds float32 fields
  holding one value on every row (a method's per-epoch switches and temperatures: read inside
  the step, they change between epochs without recompiling)."""
  def with_constants(batch, idx):
    for name, value in (constants or {}).items():
      batch[name] = np.full(idx.shape, value, np.float32)
    return batch

  if steps_per_dispatch > 1:
    for batch, idx in sample_dispatches(samples, batch_size, boundaries, steps_per_dispatch,
                                        seed=seed, epoch=epoch, grouping=grouping):
      yield shard_stacked_batch(with_constants(batch, idx), mesh), int((idx >= 0).sum())
    return
  for batch, idx in sample_batches(samples, batch_size, boundaries, seed=seed, epoch=epoch,
                                   grouping=grouping):
    yield shard_batch(with_constants(batch, idx), mesh), int((idx >= 0).sum())
