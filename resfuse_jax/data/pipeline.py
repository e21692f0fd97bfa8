"""Grain pipeline of paired (pre, post, label) patches.

Cases are random-access (memory-mapped from the preprocessed cache); a patch
is cut around a foreground voxel with probability ``fg_fraction``, then
augmented. Every spatial transform is applied identically to pre, post and
label; the intensity transform is one shared affine map of both scans, so
post − pre is only rescaled and enhancement keeps its sign and ranking.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import grain
import numpy as np
from scipy import ndimage

from resfuse_jax.data import foreground
from resfuse_jax.data.common import Case
from resfuse_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Augment:
  flip: bool = True  # mirror each axis with p = 0.5
  rot90: bool = True  # k * 90° in the plane of ``rot90_axes``, k uniform
  rot90_axes: tuple[int, int] = (0, 1)  # canonical RAS+: (0, 1) is the axial plane
  rotate_degrees: float = 0.0  # small in-plane rotation, uniform in ±degrees (0 = off)
  scale_range: tuple[float, float] = (1.0, 1.0)  # isotropic zoom range (1, 1 = off)
  intensity: bool = True  # shared scale/shift of pre and post
  intensity_scale: float = 0.1  # scale uniform in 1 ± this
  intensity_shift: float = 0.1  # shift uniform in ± this (z-score units)

  @classmethod
  def from_config(cls, cfg) -> Augment:
    keys = {f.name for f in dataclasses.fields(cls)}
    values = {k: cfg[k] for k in keys if k in cfg}
    for k in ("rot90_axes", "scale_range"):
      if k in values:
        values[k] = tuple(values[k])
    return cls(**values)


class PairedPatchSampler(grain.transforms.RandomMap):
  """Cuts and augments one patch from a case index.

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
    augment: Augment | None = None,
  ):
    """``augment=None``: flips only (the sampler's own tests; training passes its config)."""
    self.cases = list(cases)
    self.patch = tuple(int(p) for p in patch_size)
    self.fg_fraction = float(fg_fraction)
    self.augment = augment if augment is not None else Augment(rot90=False, intensity=False)
    if (
      self.augment.rot90
      and not 0 <= min(self.augment.rot90_axes) < max(self.augment.rot90_axes) <= 2
    ):
      raise ConfigError(
        f"rot90_axes must be two distinct axes of 0..2, got {self.augment.rot90_axes}"
      )
    self.fg_locations = [self._fg(case, regions) for case in self.cases]

  @staticmethod
  def _fg(case: Case, regions) -> list[np.ndarray]:
    """Non-empty regions' locations: cached, or computed as the cache would."""
    locations = case.fg_locations
    if locations is None:
      locations = foreground.region_locations(case.label, regions)
    return [loc for loc in locations if len(loc)]

  def _centre(self, index: int, rng: np.random.Generator, crop: np.ndarray) -> np.ndarray:
    shape = np.array(self.cases[index].pre.shape)
    regions = self.fg_locations[index]
    if regions and rng.random() < self.fg_fraction:
      loc = regions[rng.integers(len(regions))]
      return loc[rng.integers(len(loc))].astype(np.int64)
    lo = np.minimum(crop // 2, shape // 2)
    hi = np.maximum(shape - (crop - crop // 2), lo)
    return rng.integers(lo, hi + 1)

  def _cut(self, case: Case, centre: np.ndarray, crop: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Crops ``crop`` around ``centre``, clipped into the volume, zero-padded if larger."""
    shape = np.array(case.pre.shape)
    crop_arr = np.array(crop)
    start = np.clip(centre - crop_arr // 2, 0, np.maximum(shape - crop_arr, 0))
    sl = tuple(slice(s, s + c) for s, c in zip(start, crop))
    out = {
      "pre": np.asarray(case.pre[sl]),
      "post": np.asarray(case.post[sl]),
      "label": np.asarray(case.label[sl]),
    }
    pad = [(0, c - s) for c, s in zip(crop, out["pre"].shape)]
    if any(hi for _, hi in pad):
      out = {k: np.pad(v, pad) for k, v in out.items()}
    return out

  def random_map(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    aug, case = self.augment, self.cases[index]
    k = int(rng.integers(4)) if aug.rot90 else 0
    crop = list(self.patch)
    a0, a1 = aug.rot90_axes
    if k % 2:  # cut the transposed shape so the rotated patch has the requested one
      crop[a0], crop[a1] = crop[a1], crop[a0]
    angle = rng.uniform(-aug.rotate_degrees, aug.rotate_degrees) if aug.rotate_degrees else 0.0
    scale = rng.uniform(*aug.scale_range) if aug.scale_range != (1.0, 1.0) else 1.0
    resample = angle != 0.0 or scale != 1.0
    cut_shape = tuple(int(np.ceil(c * 1.5 * max(scale, 1.0))) for c in crop) if resample else crop
    out = self._cut(case, self._centre(index, rng, np.array(crop)), tuple(cut_shape))
    if resample:
      out = _rotate_scale(out, tuple(crop), np.deg2rad(angle), scale, aug.rot90_axes)
    if k:
      out = {key: np.rot90(v, k, axes=aug.rot90_axes) for key, v in out.items()}
    if aug.flip:
      axes = tuple(a for a in range(3) if rng.random() < 0.5)
      if axes:
        out = {key: np.flip(v, axes) for key, v in out.items()}
    pre, post = out["pre"].astype(np.float32), out["post"].astype(np.float32)
    if aug.intensity and rng.random() < 0.5:
      s = rng.uniform(1 - aug.intensity_scale, 1 + aug.intensity_scale)
      b = rng.uniform(-aug.intensity_shift, aug.intensity_shift)
      head = (pre != 0) | (post != 0)
      pre = np.where(head, pre * s + b, 0.0).astype(np.float32)
      post = np.where(head, post * s + b, 0.0).astype(np.float32)
    return {
      "pre": np.ascontiguousarray(pre)[..., None],  # [D, H, W, 1]
      "post": np.ascontiguousarray(post)[..., None],
      "label": np.ascontiguousarray(out["label"], np.uint8),  # [D, H, W]
    }


def _rotate_scale(out: dict, shape: tuple, angle: float, scale: float, axes) -> dict:
  """Rotates by ``angle`` in the plane ``axes`` and zooms by ``scale`` about the centre."""
  a0, a1 = axes
  rot = np.eye(3)
  c, s = np.cos(angle), np.sin(angle)
  rot[a0, a0], rot[a0, a1], rot[a1, a0], rot[a1, a1] = c, -s, s, c
  matrix = rot / scale  # output voxel -> input voxel
  in_centre = (np.array(out["pre"].shape) - 1) / 2
  out_centre = (np.array(shape) - 1) / 2
  offset = in_centre - matrix @ out_centre

  def warp(v, order):
    return ndimage.affine_transform(v, matrix, offset, output_shape=shape, order=order, cval=0)

  return {
    "pre": warp(out["pre"].astype(np.float32), 1),
    "post": warp(out["post"].astype(np.float32), 1),
    "label": warp(out["label"], 0),
  }


def train_dataset(
  cases: Sequence[Case],
  *,
  patch_size: Sequence[int],
  batch_size: int,
  regions: dict[str, tuple[int, ...]],
  fg_fraction: float,
  seed: int,
  augment: Augment | None = None,
  workers: int = 0,
  shard_index: int = 0,
  shard_count: int = 1,
) -> grain.IterDataset:
  """Infinite, deterministic stream of batches {'pre','post': [B,D,H,W,1], 'label': [B,D,H,W]}.

  ``batch_size`` is this process's share; ``shard_index/count`` give each
  process its own slice of the shuffled case stream. With a local batch of 1,
  process p's k-th batch is row p of the single-process run's k-th batch.
  """
  sampler = PairedPatchSampler(
    cases, patch_size, regions, fg_fraction, augment=augment or Augment()
  )
  ds = grain.MapDataset.range(len(cases)).seed(seed).shuffle().repeat().random_map(sampler)
  # Slice after random_map: each element's augmentation is drawn from its index in the global
  # stream, so N processes together see exactly the batches one process would (MapDataset is
  # lazy: a process only computes its own elements).
  ds = ds[shard_index::shard_count].batch(batch_size, drop_remainder=True)
  it = ds.to_iter_dataset()
  if workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return it
