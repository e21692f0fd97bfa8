"""The training cases packed for accelerator memory: one padded array, foreground tables.

Device-resident training (``data.resident``) cuts its crops inside the jitted step
with ``lax.dynamic_slice``; this module builds, with numpy only, what it slices from:
every case at the same offset in a zero array large enough that any crop window the
host pipeline (`pipeline.PairedPatchSampler`) would cut lies inside it, so a resident
crop equals the host crop of the same (case, centre) voxel for voxel.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Sequence

import ml_dtypes
import numpy as np

from resfuse_jax.data import foreground
from resfuse_jax.data.common import Case
from resfuse_jax.errors import ConfigError

# Foreground locations kept per case and region for drawing patch centres (a fixed-seed
# subset of the cache's, in index order): 48 KB a region and case, ~180 MB for 1,251
# BraTS cases; nnU-Net draws from at most 10,000 per class.
LOCATIONS = 4096
STORAGE_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


@dataclasses.dataclass
class Packed:
  """The arrays a resident sampler slices from (numpy; placed on devices by training).

  scans: [N, *S, 2] storage dtype, (pre, post); case i's [d, h, w] at ``margin``, zeros
    elsewhere. S = max over cases of max(shape, patch) + 2 margin.
  labels: [N, *S] uint8, laid out as ``scans``.
  shapes: [N, 3] int32, each case's own shape.
  fg: [N, R, L, 3] int32 foreground voxel indices per region, the first ``fg_counts``
    valid (case coordinates, not padded ones).
  fg_counts: [N, R] int32.
  """

  scans: np.ndarray
  labels: np.ndarray
  shapes: np.ndarray
  fg: np.ndarray
  fg_counts: np.ndarray
  margin: tuple[int, int, int]
  case_ids: list[str]

  @property
  def nbytes(self) -> int:
    return sum(a.nbytes for a in (self.scans, self.labels, self.shapes, self.fg, self.fg_counts))


def margin_of(patch: Sequence[int], crop: Sequence[int]) -> tuple[int, int, int]:
  """(crop − patch) / 2 per axis: the room around the patch window a crop adds."""
  if any(c < p or (c - p) % 2 for c, p in zip(crop, patch)):
    raise ConfigError(f"crop {tuple(crop)} must hold patch {tuple(patch)} with an even margin")
  return tuple(int((c - p) // 2) for c, p in zip(crop, patch))


def padded_shape(shapes: Sequence[Sequence[int]], patch, crop) -> tuple[int, int, int]:
  """S: every crop window of every case (window clipped into max(shape, patch)) fits."""
  margin = margin_of(patch, crop)
  return tuple(int(max(max(s[a], patch[a]) for s in shapes) + 2 * margin[a]) for a in range(3))


def resident_bytes(
  shapes: Sequence[Sequence[int]], regions: int, patch, crop, dtype: str, shards: int = 1
) -> int:
  """Bytes one device holds when `pack` lays cases of these shapes over ``shards`` data
  shards (1: every device holds them all): scans, labels and tables of its slots."""
  size = int(np.prod(padded_shape(shapes, patch, crop)))
  per_case = size * (2 * np.dtype(STORAGE_DTYPES[dtype]).itemsize + 1)
  tables = regions * (LOCATIONS * 3 + 1) * 4 + 3 * 4
  return slots_per_shard(len(shapes), shards) * (per_case + tables)


def slots_per_shard(cases: int, shards: int) -> int:
  """Rows each data shard's block has: the largest share, ceil(cases / shards)."""
  return math.ceil(cases / shards)


def shard_members(cases: int, shards: int, shard: int) -> list[int]:
  """Training-case indices data shard ``shard`` holds: every ``shards``-th from ``shard``
  (interleaved, so the shares differ by at most one case)."""
  return list(range(shard, cases, shards))


def pack(
  cases: Sequence[Case],
  regions: dict[str, tuple[int, ...]],
  patch: Sequence[int],
  crop: Sequence[int],
  dtype: str = "float32",
  size: Sequence[int] | None = None,
  slots: int | None = None,
) -> Packed:
  """The cases in one padded layout, scans in ``dtype``, with their foreground tables.

  ``size`` fixes the padded shape (a data shard's block must match every other shard's,
  so it is `padded_shape` of all training cases, not of this shard's); ``slots`` ≥
  len(cases) adds empty rows (shape 0, never drawn) so every shard has as many.
  """
  if dtype not in STORAGE_DTYPES:
    raise ConfigError(
      f"data.resident_dtype must be one of {', '.join(STORAGE_DTYPES)}; got {dtype!r}"
    )
  if not cases:
    raise ConfigError("device-resident training needs at least one training case")
  margin = margin_of(patch, crop)
  slots = len(cases) if slots is None else slots
  shapes = np.zeros((slots, 3), np.int32)
  shapes[: len(cases)] = [c.pre.shape for c in cases]
  need = padded_shape(shapes[: len(cases)], patch, crop)
  size = need if size is None else tuple(int(s) for s in size)
  if any(s < n for s, n in zip(size, need)):
    raise ValueError(f"padded shape {size} is smaller than these cases need, {need}")
  scans = np.zeros((slots, *size, 2), STORAGE_DTYPES[dtype])
  labels = np.zeros((slots, *size), np.uint8)
  fg = np.zeros((slots, len(regions), LOCATIONS, 3), np.int32)
  counts = np.zeros((slots, len(regions)), np.int32)
  for i, case in enumerate(cases):
    # A case's location subset depends on the case alone, not on what it is packed with.
    rng = np.random.default_rng(zlib.crc32(case.case_id.encode()))
    at = tuple(slice(m, m + s) for m, s in zip(margin, case.pre.shape))
    scans[(i, *at, 0)] = np.asarray(case.pre, np.float32)
    scans[(i, *at, 1)] = np.asarray(case.post, np.float32)
    labels[(i, *at)] = np.asarray(case.label, np.uint8)
    locations = case.fg_locations
    if locations is None:
      locations = foreground.region_locations(case.label, regions)
    for r, loc in enumerate(locations):
      if len(loc) > LOCATIONS:
        loc = loc[np.sort(rng.choice(len(loc), LOCATIONS, replace=False))]
      fg[i, r, : len(loc)] = loc
      counts[i, r] = len(loc)
  return Packed(scans, labels, shapes, fg, counts, margin, [c.case_id for c in cases])
