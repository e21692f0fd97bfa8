"""The planning rules, after nnU-Net v2's ``ExperimentPlanner`` (one module, named constants).

Pure arithmetic on the fingerprint's numbers: target spacing, the patch sequence (largest
first), the pooling (strides) per encoder level, the batch cap. What *fits* is measured
(`planning.memory`), not modelled. Axis order is the arrays' (canonical RAS voxel order).
Where these differ from nnU-Net, the docstring says so and why.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np

ANISOTROPY = 3.0  # nnU-Net anisotropy_threshold
LOW_RES_PERCENTILE = 10  # the coarse axis of anisotropic data takes this percentile
REFERENCE_VOXELS = 256**3  # the initial patch holds this many voxels (nnU-Net v2, 3d_fullres)
MIN_FEATURE_MAP = 4  # nnU-Net UNet_featuremap_min_edge_length: an axis pools while it keeps >= 4
POOL_SPACING_RATIO = 2.0  # an axis pools while its spacing is within 2x of the finest
MIN_BATCH = 2  # nnU-Net UNet_min_batch_size
MAX_DATASET_FRACTION = 0.05  # one batch covers at most 5% of the dataset's voxels

Triple = tuple[int, int, int]

RULES = {
  "target_spacing": (
    "median spacing per axis; an axis more than 3x coarser than the others (with 3x fewer "
    "voxels) takes its 10th percentile instead, never finer than the other axes (nnU-Net v2)"
  ),
  "patch_size": (
    "a 256^3-voxel volume shaped like 1/spacing, clipped to the median resampled shape and "
    "rounded to the pooling's divisor; while the step does not fit the budget (XLA's memory "
    "analysis) or, on a CPU, the time cap, the axis with the largest patch/median ratio shrinks "
    "(nnU-Net v2's loop, measured instead of its analytic VRAM model)"
  ),
  "strides": (
    "per encoder level, an axis pools (stride 2) while its feature map keeps >= 4 voxels and "
    "its spacing is within 2x of the finest; a lone axis pools only from >= 12 voxels "
    "(nnU-Net v2's get_pool_and_conv_props)"
  ),
  "features": (
    "config.model.features, one level per pooling step the patch allows (nnU-Net: one stage "
    "per pooling); the widths are the config's"
  ),
  "batch_size": (
    "the largest >= 2 whose step fits the budget (XLA's memory analysis) and, on a CPU, the "
    "time cap, capped at 5% of the dataset's voxels (median shape x cases); a multiple of "
    "train.grad_accum, times the data-parallel devices"
  ),
}


def target_spacing(spacings: np.ndarray, cropped_shapes: np.ndarray) -> np.ndarray:
  """nnU-Net v2's ``determine_fullres_target_spacing``: [N, 3] spacings -> [3] mm."""
  target = np.percentile(spacings, 50, axis=0)
  size = np.percentile(cropped_shapes, 50, axis=0)
  worst = int(np.argmax(target))
  others = [a for a in range(3) if a != worst]
  aniso_spacing = target[worst] > ANISOTROPY * max(target[others])
  aniso_voxels = size[worst] * ANISOTROPY < min(size[others])
  if aniso_spacing and aniso_voxels:
    low_res = float(np.percentile(spacings[:, worst], LOW_RES_PERCENTILE))
    target[worst] = max(low_res, max(target[others]) + 1e-5)
  return target


def resampled_shapes(
  spacings: np.ndarray, cropped_shapes: np.ndarray, target: Sequence[float]
) -> np.ndarray:
  """[N, 3] voxels each case has after cropping and resampling to ``target``."""
  return np.round(cropped_shapes * spacings / np.asarray(target, np.float64)).astype(np.int64)


def initial_patch(spacing: Sequence[float], median_shape: Sequence[int]) -> list[int]:
  """A ``REFERENCE_VOXELS`` volume shaped like 1/spacing, clipped to the median shape."""
  inv = 1.0 / np.asarray(spacing, np.float64)
  patch = inv * (REFERENCE_VOXELS / np.prod(inv)) ** (1 / 3)
  return [int(min(round(p), m)) for p, m in zip(patch, median_shape)]


def pooling(spacing: Sequence[float], patch: Sequence[int], max_pools: int) -> tuple[Triple, ...]:
  """Strides per encoder level ((1, 1, 1) first), at most ``max_pools`` poolings.

  nnU-Net v2's ``get_pool_and_conv_props``: at each level the axes with a map of >= 8
  voxels and a spacing within 2x of the finest such axis pool; one lone axis pools only
  from >= 12 voxels.
  """
  spacing, size = [float(s) for s in spacing], [float(n) for n in patch]
  levels: list[Triple] = [(1, 1, 1)]
  while len(levels) <= max_pools:
    valid = [a for a in range(3) if size[a] >= 2 * MIN_FEATURE_MAP]
    if not valid:
      break
    finest = min(spacing[a] for a in valid)
    valid = [a for a in valid if spacing[a] / finest < POOL_SPACING_RATIO]
    if len(valid) == 1 and size[valid[0]] < 3 * MIN_FEATURE_MAP:
      break
    for a in valid:
      spacing[a] *= 2
      size[a] = math.ceil(size[a] / 2)
    levels.append(tuple(2 if a in valid else 1 for a in range(3)))
  return tuple(levels)


def divisor(strides: Sequence[Sequence[int]]) -> list[int]:
  """Per axis, what a patch must be a multiple of: the product of that axis's strides."""
  return [int(np.prod([s[a] for s in strides])) for a in range(3)]


def round_patch(patch: Sequence[int], div: Sequence[int], largest: Sequence[int]) -> list[int]:
  """Up to the next multiple of ``div`` (nnU-Net's pad_shape), down where that would exceed
  the largest case (a patch longer than every case is refused by validation)."""
  out = []
  for p, d, n in zip(patch, div, largest):
    up = -(-p // d) * d
    out.append(int(up if up <= n else max(d, (min(p, n) // d) * d)))
  return out


def topology(spacing, patch, max_pools: int, fixed_strides=None) -> tuple[tuple[Triple, ...], list]:
  """(strides, divisor) of a patch: ``fixed_strides`` (given) or `pooling`'s."""
  strides = (
    tuple(fixed_strides) if fixed_strides is not None else pooling(spacing, patch, max_pools)
  )
  return strides, divisor(strides)


def floor_patch(median_shape: Sequence[int]) -> list[int]:
  """The smallest patch the planner tries: 8 voxels an axis (one pooling), or the median."""
  return [int(min(2 * MIN_FEATURE_MAP, m)) for m in median_shape]


def patch_sequence(
  spacing, median_shape, largest, max_pools: int, fixed_strides=None
) -> Iterator[tuple[list[int], tuple[Triple, ...]]]:
  """(patch, strides) from the initial patch down to `floor_patch`, largest first.

  nnU-Net v2's loop: the axis with the largest patch/median ratio shrinks by its divisor
  (recomputed for the smaller patch), and the topology is recomputed for the result.
  Axes at the floor are left alone.
  """
  floor = floor_patch(median_shape)
  patch = initial_patch(spacing, median_shape)
  strides, div = topology(spacing, patch, max_pools, fixed_strides)
  patch = round_patch(patch, div, largest)
  while True:
    yield list(patch), strides
    ratios = [p / m if p - d >= f else -1.0 for p, m, d, f in zip(patch, median_shape, div, floor)]
    axis = int(np.argmax(ratios))
    if ratios[axis] < 0:
      return
    last, smaller = list(patch), list(patch)
    smaller[axis] -= div[axis]
    _, new_div = topology(spacing, smaller, max_pools, fixed_strides)
    patch[axis] -= new_div[axis]
    strides, div = topology(spacing, patch, max_pools, fixed_strides)
    patch = round_patch(patch, div, largest)
    if patch[axis] >= last[axis]:  # a deeper topology rounded it back up: round down instead
      patch[axis] = (last[axis] - 1) // div[axis] * div[axis]
    if patch[axis] < max(div[axis], 1):
      return


def batch_cap(median_shape: Sequence[int], cases: int, patch: Sequence[int]) -> int:
  """The largest batch covering at most 5% of the dataset's voxels (never below 2)."""
  dataset = float(np.prod(median_shape, dtype=np.float64)) * cases
  cap = round(dataset * MAX_DATASET_FRACTION / float(np.prod(patch, dtype=np.float64)))
  return max(int(cap), MIN_BATCH)
