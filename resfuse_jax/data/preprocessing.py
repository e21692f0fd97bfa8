"""Reading and checking a case, then nnU-Net-style preprocessing.

Steps: reorient to canonical RAS+, check (shapes, affines, finite, non-empty,
label values), crop to the non-zero box of pre ∪ post, optionally resample to a
target spacing (images linear, labels nearest), normalise intensities.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from resfuse_jax.data.common import Case, CaseFiles, DataError, InputLimits, MiB, load_canonical

NORMALIZATIONS = ("zscore", "joint")


@dataclasses.dataclass(frozen=True)
class PrepSettings:
  """Everything that changes the cached arrays (and so the cache key).

  normalization:
    ``zscore``: each scan z-scored over the head on its own statistics
      (default; robust to a gain difference between the two acquisitions);
    ``joint``: both scans z-scored with the pre-contrast scan's statistics.
  """

  target_spacing: tuple[float, float, float] | None = None
  normalization: str = "zscore"
  affine_tolerance: float = 1e-3  # mm, largest allowed difference of affine entries
  resample_order: int = 1

  def __post_init__(self):
    if self.normalization not in NORMALIZATIONS:
      raise ValueError(
        f"data.normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}"
      )

  def as_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["target_spacing"] = None if self.target_spacing is None else list(self.target_spacing)
    return d


def nonzero_box(*volumes: np.ndarray) -> tuple[tuple[int, int], ...]:
  """(start, stop) per axis of the non-zero voxels of the union of ``volumes``."""
  mask = np.zeros(volumes[0].shape, bool)
  for v in volumes:
    mask |= v != 0
  if not mask.any():
    return tuple((0, s) for s in mask.shape)
  box = []
  for axis in range(mask.ndim):
    other = tuple(a for a in range(mask.ndim) if a != axis)
    idx = np.flatnonzero(mask.any(axis=other))
    box.append((int(idx[0]), int(idx[-1]) + 1))
  return tuple(box)


def _stats(image: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
  values = image[mask]
  return float(values.mean()), max(float(values.std()), 1e-8)


def normalize(
  pre: np.ndarray, post: np.ndarray, method: str
) -> tuple[np.ndarray, np.ndarray, dict]:
  """Returns normalised (pre, post) and the statistics used; background stays 0."""
  head = (pre != 0) | (post != 0)
  pre_mean, pre_std = _stats(pre, head)
  if method == "zscore":
    post_mean, post_std = _stats(post, head)
  elif method == "joint":
    post_mean, post_std = pre_mean, pre_std
  else:
    raise ValueError(f"unknown normalization {method!r}; choose from {NORMALIZATIONS}")

  def z(img, mean, std):
    return np.where(head, (img - mean) / std, 0.0).astype(np.float32)

  stats = {"method": method, "pre": [pre_mean, pre_std], "post": [post_mean, post_std]}
  return z(pre, pre_mean, pre_std), z(post, post_mean, post_std), stats


def resample(volume: np.ndarray, spacing, target, order: int) -> np.ndarray:
  factors = [s / t for s, t in zip(spacing, target)]
  if np.allclose(factors, 1.0):
    return volume
  return ndimage.zoom(volume, factors, order=order, mode="nearest", grid_mode=True)


def _check_affine(cid: str, kind: str, path, affine, ref_affine, ref_path, tol: float) -> None:
  diff = float(np.abs(np.asarray(affine) - np.asarray(ref_affine)).max())
  if diff > tol:
    raise DataError(
      f"case {cid}: {kind} file {path} is not in the same space as {ref_path}: affines differ "
      f"by up to {diff:.4g} (tolerance data.affine_tolerance={tol})"
    )


def resampled_shape(shape, spacing, target) -> tuple[int, ...]:
  """The shape ``ndimage.zoom`` gives ``shape`` resampled from ``spacing`` to ``target``."""
  return tuple(int(round(n * s / t)) for n, s, t in zip(shape, spacing, target))


def preprocess_case(
  files: CaseFiles,
  label_values: tuple[int, ...],
  settings: PrepSettings = PrepSettings(),
  limits: InputLimits = InputLimits(),
) -> Case:
  """Loads, checks, crops, resamples and normalises one case.

  Every failure is a ``DataError`` naming the case (so ``data.on_bad_case=skip``
  covers it); running out of memory says so, with what was being read.
  """
  try:
    return _preprocess_case(files, label_values, settings, limits)
  except DataError:
    raise
  except MemoryError:
    raise DataError(
      f"case {files.case_id}: out of memory while preprocessing {files.pre} and {files.post}"
    ) from None
  except Exception as e:
    raise DataError(f"case {files.case_id}: preprocessing failed: {type(e).__name__}: {e}") from e


def _read_checked(files: CaseFiles, label_values, settings, limits):
  """Scans and label in canonical orientation, each checked against the pre-contrast scan."""
  cid = files.case_id
  pre, pre_img, spacing = load_canonical(files.pre, cid, "pre-contrast", limits)
  post, post_img, _ = load_canonical(files.post, cid, "post-contrast", limits)
  label, label_img = None, None
  if files.label is not None:
    label_raw, label_img, _ = load_canonical(files.label, cid, "label", limits)
    if not np.isfinite(label_raw).all():
      raise DataError(f"case {cid}: label file {files.label} contains NaN or Inf voxels")
    label = np.rint(label_raw).astype(np.int64)
  for kind, vol, img, path in (
    ("post-contrast", post, post_img, files.post),
    ("label", label, label_img, files.label),
  ):
    if vol is None:
      continue
    if vol.shape != pre.shape:
      raise DataError(
        f"case {cid}: {kind} file {path} has shape {vol.shape}, "
        f"but the pre-contrast scan {files.pre} has {pre.shape}"
      )
    _check_affine(cid, kind, path, img.affine, pre_img.affine, files.pre, settings.affine_tolerance)
  for kind, vol, path in (("pre-contrast", pre, files.pre), ("post-contrast", post, files.post)):
    if not np.isfinite(vol).all():
      raise DataError(f"case {cid}: {kind} file {path} contains NaN or Inf voxels")
    if not vol.any():
      raise DataError(f"case {cid}: {kind} file {path} is all zero")
  if label is not None:
    bad = sorted(set(np.unique(label).tolist()) - set(label_values))
    if bad:
      raise DataError(
        f"case {cid}: label file {files.label} has values {bad} outside {list(label_values)}"
      )
  return pre, post, label, pre_img, spacing


def _crop_and_resample(cid, files, pre, post, label, spacing, settings, limits):
  """The scans cut to their non-zero box, then on ``data.target_spacing`` when one is set."""
  box = nonzero_box(pre, post)
  sl = tuple(slice(a, b) for a, b in box)
  pre, post = pre[sl].astype(np.float32), post[sl].astype(np.float32)
  label = None if label is None else label[sl].astype(np.uint8)
  target = spacing
  if settings.target_spacing is not None:
    target = tuple(float(t) for t in settings.target_spacing)
    new_shape = resampled_shape(pre.shape, spacing, target)
    voxels = int(np.prod(new_shape, dtype=np.int64))
    if voxels > limits.max_voxels or voxels * 4 > limits.max_bytes:
      raise DataError(
        f"case {cid}: resampling {files.pre} from {spacing} mm to data.target_spacing="
        f"{target} mm would make {'x'.join(map(str, new_shape))} voxels "
        f"({voxels * 4 / MiB:.0f} MiB per scan), over data.max_voxels={limits.max_voxels} / "
        f"data.max_bytes={limits.max_bytes}"
      )
    pre = resample(pre, spacing, target, settings.resample_order)
    post = resample(post, spacing, target, settings.resample_order)
    if label is not None:
      label = resample(label, spacing, target, 0)
  return pre, post, label, box, target


def _preprocess_case(files: CaseFiles, label_values, settings, limits) -> Case:
  cid = files.case_id
  pre, post, label, pre_img, spacing = _read_checked(files, label_values, settings, limits)
  pre, post, label, box, target = _crop_and_resample(
    cid, files, pre, post, label, spacing, settings, limits
  )
  pre, post, stats = normalize(pre, post, settings.normalization)
  return Case(
    case_id=cid,
    pre=pre,
    post=post,
    label=label,
    spacing=target,
    affine=np.asarray(pre_img.affine),
    shape=tuple(int(s) for s in pre_img.shape[:3]),
    crop=box,
    original_spacing=spacing,
    normalization=stats,
  )
