"""Foreground voxel locations per region, from which patch centres are drawn.

The cache stores them once per case; cases that did not come from the cache
(tests, small in-memory sets) compute them the same way.
"""

from __future__ import annotations

import numpy as np

MAX_LOCATIONS = 50_000  # per case and region: plenty to draw patch centres from


def region_locations(
  label: np.ndarray, regions: dict[str, tuple[int, ...]], max_locations: int = MAX_LOCATIONS
) -> list[np.ndarray]:
  """[D, H, W] labels -> per region an [N, 3] int32 array of voxel indices (N <= max).

  Regions with more voxels keep a fixed-seed random subset, in index order, so
  the cache is deterministic and a large region cannot crowd out a small one.
  """
  rng = np.random.default_rng(0)
  out = []
  for values in regions.values():
    loc = np.argwhere(np.isin(label, values)).astype(np.int32)
    if len(loc) > max_locations:
      loc = loc[np.sort(rng.choice(len(loc), max_locations, replace=False))]
    out.append(loc)
  return out
