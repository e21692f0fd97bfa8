"""Device mesh from config, and placing host batches on it."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA = "data"


def make_mesh(mesh_config: Any) -> jax.sharding.Mesh:
  """A 1-D ('data',) mesh; ``mesh.data = -1`` takes every device of every process."""
  n_devices = jax.device_count()
  n = mesh_config.data
  if n == -1:
    n = n_devices
  if n < 1 or n > n_devices or n_devices % n:
    raise ValueError(f"mesh.data={mesh_config.data} does not fit {n_devices} devices")
  return jax.make_mesh(
    (n,), (DATA,), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:n]
  )


def data_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data', everything else whole."""
  return NamedSharding(mesh, P(DATA))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(global_batch: int, mesh: jax.sharding.Mesh) -> int:
  """Returns this process's share of the global batch, or raises if it does not divide."""
  n = mesh.shape[DATA]
  if global_batch % n or global_batch % jax.process_count():
    raise ValueError(
      f"train.batch_size={global_batch} must be divisible by the {n} data-parallel devices "
      f"and the {jax.process_count()} processes"
    )
  return global_batch // jax.process_count()


def put_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Assembles each process's local rows into one global batch array per key."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def put_global(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """Places an array every process holds in full (e.g. the same inference tiles)."""
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])
