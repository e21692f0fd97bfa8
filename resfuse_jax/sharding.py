"""Device mesh from config, and placing host batches on it.

The mesh has two axes: ``data`` splits the batch, ``spatial`` splits the depth
axis of every 3D activation (for patches too large for one device; XLA's SPMD
partitioner exchanges the convolution halos). Parameters are replicated.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from resfuse_jax.errors import ConfigError

DATA = "data"
SPATIAL = "spatial"


def make_mesh(mesh_config: Any, devices: list | None = None) -> jax.sharding.Mesh:
  """('data', 'spatial') mesh; ``mesh.data = -1`` takes every device ``mesh.spatial`` leaves."""
  devices = jax.devices() if devices is None else devices
  spatial = mesh_config.spatial
  n = mesh_config.data
  if spatial < 1 or len(devices) % spatial:
    raise ConfigError(f"mesh.spatial={spatial} does not divide the {len(devices)} devices")
  if n == -1:
    n = len(devices) // spatial
  if n < 1 or n * spatial > len(devices) or len(devices) % (n * spatial):
    raise ConfigError(
      f"mesh.data={mesh_config.data} x mesh.spatial={spatial} does not fit {len(devices)} devices"
    )
  return jax.make_mesh(
    (n, spatial),
    (DATA, SPATIAL),
    axis_types=(jax.sharding.AxisType.Auto,) * 2,
    devices=devices[: n * spatial],
  )


def data_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Batch axis over 'data', depth (axis 1) over 'spatial', everything else whole."""
  return NamedSharding(mesh, P(DATA, SPATIAL))


def batch_only_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Batch axis over 'data', each sample whole (host crops the step augments, then re-lays)."""
  return NamedSharding(mesh, P(DATA))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(global_batch: int, mesh: jax.sharding.Mesh) -> int:
  """Returns this process's share of the global batch, or raises if it does not divide."""
  n = mesh.shape[DATA]
  if global_batch % n or global_batch % jax.process_count():
    raise ConfigError(
      f"train.batch_size={global_batch} must be divisible by the {n} data-parallel devices "
      f"and the {jax.process_count()} processes"
    )
  return global_batch // jax.process_count()


def check_patch_size(
  patch_size: tuple[int, ...], depth_factor: int, mesh: jax.sharding.Mesh
) -> None:
  """Depth must split evenly over 'spatial' at every encoder level.

  ``depth_factor``: the product of the model's depth strides (`config_lib.downsampling`).
  """
  need = mesh.shape[SPATIAL] * depth_factor
  if patch_size[0] % need:
    raise ConfigError(
      f"data.patch_size depth {patch_size[0]} must be divisible by mesh.spatial x the model's "
      f"depth downsampling = {mesh.shape[SPATIAL]} x {depth_factor} = {need}"
    )


def put_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Assembles each process's local rows into one global batch array per key."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def put_global(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """Places an array every process holds in full (e.g. the same inference tiles)."""
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])
