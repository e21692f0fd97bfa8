"""Grain pipeline of paired (pre, post, label) patches with foreground oversampling."""

from __future__ import annotations

from collections.abc import Sequence

import grain
import numpy as np

from resfuse_jax.data.common import Case

MAX_FG_LOCATIONS = 20_000  # per case and region, enough to sample centres from


class PairedPatchSampler(grain.transforms.RandomMap):
  """Cuts one patch from a case; pre, post and label see the same crop and flips.

  With probability ``fg_fraction`` the patch is centred on a voxel of one
  region chosen uniformly (so a small region such as ET is seen as often as
  WT); otherwise the centre is uniform over the volume.
  """

  def __init__(
    self,
    cases: Sequence[Case],
    patch_size: Sequence[int],
    regions: dict[str, tuple[int, ...]],
    fg_fraction: float,
    flip: bool = True,
  ):
    self.cases = list(cases)
    self.patch = tuple(int(p) for p in patch_size)
    self.fg_fraction = float(fg_fraction)
    self.flip = flip
    rng = np.random.default_rng(0)
    self.fg_locations = []
    for case in self.cases:
      per_region = []
      for values in regions.values():
        loc = np.argwhere(np.isin(case.label, values)).astype(np.int32)
        if len(loc) > MAX_FG_LOCATIONS:
          loc = loc[rng.choice(len(loc), MAX_FG_LOCATIONS, replace=False)]
        if len(loc):
          per_region.append(loc)
      self.fg_locations.append(per_region)

  def _start(self, index: int, rng: np.random.Generator) -> np.ndarray:
    shape = np.array(self.cases[index].pre.shape)
    patch = np.array(self.patch)
    regions = self.fg_locations[index]
    if regions and rng.random() < self.fg_fraction:
      loc = regions[rng.integers(len(regions))]
      centre = loc[rng.integers(len(loc))]
      start = centre - patch // 2
    else:
      start = rng.integers(0, np.maximum(shape - patch, 0) + 1)
    return np.clip(start, 0, np.maximum(shape - patch, 0))

  def random_map(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    case = self.cases[index]
    start = self._start(index, rng)
    sl = tuple(slice(s, s + p) for s, p in zip(start, self.patch))
    out = {"pre": case.pre[sl], "post": case.post[sl], "label": case.label[sl]}
    pad = [(0, p - s) for p, s in zip(self.patch, out["pre"].shape)]
    if any(hi for _, hi in pad):  # volume smaller than the patch
      out = {k: np.pad(v, pad) for k, v in out.items()}
    if self.flip:
      axes = tuple(a for a in range(3) if rng.random() < 0.5)
      if axes:
        out = {k: np.flip(v, axes) for k, v in out.items()}
    return {
      "pre": np.ascontiguousarray(out["pre"], np.float32)[..., None],  # [D, H, W, 1]
      "post": np.ascontiguousarray(out["post"], np.float32)[..., None],
      "label": np.ascontiguousarray(out["label"], np.uint8),  # [D, H, W]
    }


def train_dataset(
  cases: Sequence[Case],
  *,
  patch_size: Sequence[int],
  batch_size: int,
  regions: dict[str, tuple[int, ...]],
  fg_fraction: float,
  seed: int,
  workers: int = 0,
  shard_index: int = 0,
  shard_count: int = 1,
) -> grain.IterDataset:
  """Infinite, deterministic stream of batches {'pre','post': [B,D,H,W,1], 'label': [B,D,H,W]}.

  ``batch_size`` is this process's share; ``shard_index/count`` give each
  process its own slice of the shuffled case stream.
  """
  sampler = PairedPatchSampler(cases, patch_size, regions, fg_fraction)
  ds = grain.MapDataset.range(len(cases)).seed(seed).shuffle().repeat()
  ds = ds[shard_index::shard_count]
  ds = ds.random_map(sampler).batch(batch_size, drop_remainder=True)
  it = ds.to_iter_dataset()
  if workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return it
