"""Grain pipeline of paired (pre, post, label) crops: the host reads, the device augments.

Cases are random-access (memory-mapped from the preprocessed cache); a patch
window is placed around a foreground voxel with probability ``fg_fraction``
and cut with a margin on every side (``crop_shape``, the room the device-side
rotation and zoom need; zero beyond the volume). Everything random but the
window's place happens inside the jitted train step (``resfuse_jax.augment``),
so the host does one strided copy per patch.
"""

from __future__ import annotations

from collections.abc import Sequence

import grain
import numpy as np

from resfuse_jax.data import foreground
from resfuse_jax.data.common import Case
from resfuse_jax.errors import ConfigError


class PairedPatchSampler(grain.transforms.RandomMap):
  """Cuts one crop from a case index.

  With probability ``fg_fraction`` the patch is centred on a voxel of one
  region chosen uniformly (so a small region such as ET is seen as often as
  WT); otherwise the centre is uniform over the volume. The patch window is
  clipped into the volume (as without a margin); the crop is that window
  grown by (crop − patch) / 2 per side, so the patch is the crop's centre.
  """

  def __init__(
    self,
    cases: Sequence[Case],
    patch_size: Sequence[int],
    regions: dict[str, tuple[int, ...]],
    fg_fraction: float,
    crop_shape: Sequence[int] | None = None,
  ):
    self.cases = list(cases)
    self.patch = tuple(int(p) for p in patch_size)
    self.crop = self.patch if crop_shape is None else tuple(int(c) for c in crop_shape)
    if any(c < p or (c - p) % 2 for c, p in zip(self.crop, self.patch)):
      raise ConfigError(
        f"crop {self.crop} must hold patch {self.patch} with an even margin per axis"
      )
    self.fg_fraction = float(fg_fraction)
    self.fg_locations = [self._fg(case, regions) for case in self.cases]

  @staticmethod
  def _fg(case: Case, regions) -> list[np.ndarray]:
    """Non-empty regions' locations: cached, or computed as the cache would."""
    locations = case.fg_locations
    if locations is None:
      locations = foreground.region_locations(case.label, regions)
    return [loc for loc in locations if len(loc)]

  def _centre(self, index: int, rng: np.random.Generator) -> np.ndarray:
    shape = np.array(self.cases[index].pre.shape)
    patch = np.array(self.patch)
    regions = self.fg_locations[index]
    if regions and rng.random() < self.fg_fraction:
      loc = regions[rng.integers(len(regions))]
      return loc[rng.integers(len(loc))].astype(np.int64)
    lo = np.minimum(patch // 2, shape // 2)
    hi = np.maximum(shape - (patch - patch // 2), lo)
    return rng.integers(lo, hi + 1)

  def _cut(self, case: Case, centre: np.ndarray) -> dict[str, np.ndarray]:
    """The crop around the clipped patch window; zero where it leaves the volume."""
    shape = np.array(case.pre.shape)
    patch, crop = np.array(self.patch), np.array(self.crop)
    window = np.clip(centre - patch // 2, 0, np.maximum(shape - patch, 0))
    start = window - (crop - patch) // 2
    lo, hi = np.maximum(start, 0), np.minimum(start + crop, shape)
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    pad = [(int(a - s), int(s + c - b)) for a, b, s, c in zip(lo, hi, start, crop)]
    out = {}
    for key, dtype in (("pre", np.float32), ("post", np.float32), ("label", np.uint8)):
      array = np.asarray(getattr(case, key)[sl], dtype)
      out[key] = np.pad(array, pad) if any(a or b for a, b in pad) else np.ascontiguousarray(array)
    return out

  def random_map(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    out = self._cut(self.cases[index], self._centre(index, rng))
    return {
      "pre": out["pre"][..., None],  # [D, H, W, 1] at crop_shape
      "post": out["post"][..., None],
      "label": out["label"],  # [D, H, W]
    }


def train_dataset(
  cases: Sequence[Case],
  *,
  patch_size: Sequence[int],
  batch_size: int,
  regions: dict[str, tuple[int, ...]],
  fg_fraction: float,
  seed: int,
  crop_shape: Sequence[int] | None = None,
  workers: int = 0,
  shard_index: int = 0,
  shard_count: int = 1,
  prefetch: int = 16,
  read_threads: int = 8,
) -> grain.IterDataset:
  """Infinite, deterministic stream of crops {'pre','post': [B,*crop,1], 'label': [B,*crop]}.

  ``crop_shape`` defaults to ``patch_size`` (no margin). ``read_threads`` cut
  crops concurrently and at most ``prefetch`` crops wait ahead of the consumer
  (Grain's default of 500 would hold 39 GB of 206³ crops on a slow step).
  ``batch_size`` is this process's share; ``shard_index/count`` give each
  process its own slice of the shuffled case stream. With a local batch of 1,
  process p's k-th batch is row p of the single-process run's k-th batch.
  """
  sampler = PairedPatchSampler(cases, patch_size, regions, fg_fraction, crop_shape)
  ds = grain.MapDataset.range(len(cases)).seed(seed).shuffle().repeat().random_map(sampler)
  # Slice after random_map: each element's window is drawn from its index in the global
  # stream, so N processes together see exactly the batches one process would (MapDataset is
  # lazy: a process only computes its own elements).
  ds = ds[shard_index::shard_count].batch(batch_size, drop_remainder=True)
  # The stream's elements are batches here: the buffer holds prefetch // batch_size of them.
  buffer = max(1, prefetch // batch_size)
  options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=buffer)
  it = ds.to_iter_dataset(options)
  if workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return it
