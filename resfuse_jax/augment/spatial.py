"""The spatial half of augmentation: one affine resampling of a crop to the patch.

All pure JAX on [D, H, W, C] volumes: ``trilinear`` for scans, ``nearest`` for labels, both
zero outside the crop, so the identity transform returns the crop's centre bit for bit.
"""

from __future__ import annotations

import functools
import itertools
import math
import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def plane_rotation(angle, plane: tuple[int, int], xp: Any = np):
  """3x3 rotation by ``angle`` in the plane of two axes."""
  i, j = plane
  c, s = xp.cos(angle), xp.sin(angle)
  m = [[1.0 if r == k else 0.0 for k in range(3)] for r in range(3)]
  m[i][i], m[i][j], m[j][i], m[j][j] = c, -s, s, c
  return xp.stack([xp.stack([xp.asarray(v, dtype=xp.float32) for v in row]) for row in m])


def affine_matrix(angles: jax.Array, zoom: jax.Array) -> jax.Array:
  """Output offset -> input offset (voxels): rotations about axes 0, 1, 2, then 1/zoom."""
  rotation = jnp.eye(3, dtype=jnp.float32)
  for angle, plane in zip(angles, ((1, 2), (0, 2), (0, 1))):
    rotation = plane_rotation(angle, plane, jnp) @ rotation
  return rotation / zoom


def sample_grid(matrix: jax.Array, crop: tuple[int, ...], patch: tuple[int, ...]) -> jax.Array:
  """[3, *patch] input coordinates of every output voxel, about the two centres."""
  grid = jnp.stack(jnp.meshgrid(*[jnp.arange(n, dtype=jnp.float32) for n in patch], indexing="ij"))
  out_centre = (jnp.asarray(patch, jnp.float32) - 1) / 2
  in_centre = (jnp.asarray(crop, jnp.float32) - 1) / 2
  offsets = grid - out_centre[:, None, None, None]
  return jnp.einsum("ij,j...->i...", matrix, offsets) + in_centre[:, None, None, None]


def _inside(index: list[jax.Array], shape) -> jax.Array:
  return functools.reduce(operator.and_, [(i >= 0) & (i < n) for i, n in zip(index, shape)])


def _gather(volume: jax.Array, index: list[jax.Array]) -> jax.Array:
  clipped = [jnp.clip(i, 0, n - 1) for i, n in zip(index, volume.shape)]
  return volume[clipped[0], clipped[1], clipped[2]]


def trilinear(volume: jax.Array, coords: jax.Array) -> jax.Array:
  """[D, H, W, C] sampled at [3, *out] -> [*out, C]; zero outside the volume.

  At integer coordinates the other corners' weights are exactly 0, so an
  identity grid returns the voxels bit for bit.
  """
  low = jnp.floor(coords)
  frac = coords - low
  low = low.astype(jnp.int32)
  out = jnp.zeros((*coords.shape[1:], volume.shape[-1]), volume.dtype)
  for corner in itertools.product((0, 1), repeat=3):
    index = [low[a] + corner[a] for a in range(3)]
    weight = math.prod(frac[a] if corner[a] else 1 - frac[a] for a in range(3))
    weight = jnp.where(_inside(index, volume.shape), weight, 0.0)
    out = out + weight[..., None] * _gather(volume, index)
  return out


def nearest(volume: jax.Array, coords: jax.Array) -> jax.Array:
  """[D, H, W] label sampled at [3, *out] by its nearest voxel -> [*out]; 0 outside."""
  index = [jnp.round(c).astype(jnp.int32) for c in coords]
  return jnp.where(_inside(index, volume.shape), _gather(volume, index), 0).astype(volume.dtype)


def centre_crop(x: jax.Array, patch: tuple[int, ...]) -> jax.Array:
  start = [(n - p) // 2 for n, p in zip(x.shape, patch)]
  return x[tuple(slice(s, s + p) for s, p in zip(start, patch))]
