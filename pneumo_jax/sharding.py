"""Data parallelism over every device: one mesh axis, batches split along it, state replicated.

jit with these shardings lets XLA insert the cross-device reductions, so batch-norm statistics
and gradients are computed over the global batch and one device gives the same numbers as four.
"""

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pneumo_jax.errors import ConfigError

DATA_AXIS = 'data'


def make_mesh() -> Mesh:
  """A 1-D mesh over all devices of all processes."""
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the devices."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def shard_batch(batch: Any, mesh: Mesh) -> Any:
  """This process's slice of a global batch (a pytree of arrays) → global arrays split over
  the mesh."""
  n = mesh.devices.size // jax.process_count()
  for path, v in jax.tree_util.tree_leaves_with_path(batch):
    if v.shape[0] % n:
      raise ConfigError(
        f'batch field {jax.tree_util.keystr(path)} has {v.shape[0]} rows, not divisible by the '
        f'{n} local devices; choose input.batch_size / input.eval_batch_size as a multiple of '
        'the device count'
      )
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda v: jax.make_array_from_process_local_data(sharding, v), batch)


def own_rows(x: np.ndarray) -> np.ndarray:
  """This process's block of a whole global batch held on every process: what shard_batch
  expects from it."""
  n = len(x) // jax.process_count()
  return x[jax.process_index() * n : (jax.process_index() + 1) * n]


def local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-split global array (all of them with one process)."""
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  return np.concatenate([np.asarray(s.data) for s in shards])


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a pytree of arrays on every device of the mesh."""
  return jax.device_put(tree, replicated(mesh))


def round_up(batch: int) -> int:
  """`batch` rounded up to a multiple of the device count, so a padded batch splits evenly."""
  n = jax.device_count()
  return -(-batch // n) * n
