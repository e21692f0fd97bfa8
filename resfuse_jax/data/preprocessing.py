"""Reading and checking a case, then nnU-Net-style preprocessing.

Steps: reorient to canonical RAS+, check (shapes, affines, finite, non-empty,
label values), crop to the non-zero box of pre ∪ post, optionally resample to a
target spacing (images linear, labels nearest), normalise intensities.
"""

from __future__ import annotations

import dataclasses

import nibabel as nib
import numpy as np
from absl import logging
from scipy import ndimage

from resfuse_jax.data.common import (
  Case,
  CaseFiles,
  DataError,
  InputLimits,
  MiB,
  load_canonical,
  load_scans,
)

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
  values = image[mask].astype(np.float64)
  return float(values.mean()), max(float(values.std()), 1e-8)


MIN_DISTINCT = 3  # a scan's non-zero voxels take at least this many values
MIN_REL_STD = 1e-6  # ... and their std is at least this fraction of their mean |value|
LABEL_TOLERANCE = 1e-3  # a label voxel may differ from an integer by at most this


def check_scan_contrast(cid: str, kind: str, path, volume: np.ndarray) -> None:
  """Refuses a constant or near-constant scan (it would be z-scored into noise)."""
  values = volume[volume != 0]
  distinct = np.unique(values[: 2**16]).size if values.size else 0
  if distinct < MIN_DISTINCT:
    distinct = np.unique(values).size
  if distinct < MIN_DISTINCT:
    raise DataError(
      f"case {cid}: {kind} file {path} is constant: its non-zero voxels take {distinct} "
      f"distinct value(s), at least {MIN_DISTINCT} are needed for a scan"
    )
  std = float(values.std(dtype=np.float64))
  mean_abs = float(np.abs(values).mean(dtype=np.float64))
  if std < MIN_REL_STD * mean_abs:
    raise DataError(
      f"case {cid}: {kind} file {path} is near-constant: the std of its non-zero voxels "
      f"{std:.3g} is below {MIN_REL_STD:g} of their mean absolute value {mean_abs:.3g}"
    )


def check_finite(cid: str, what: str, *volumes: np.ndarray) -> None:
  """Refuses non-finite voxels after a cast or the normalisation (finite on disk is not enough)."""
  for v in volumes:
    if v is not None and not np.isfinite(v).all():
      raise DataError(f"case {cid}: {what} gives NaN or Inf voxels (values too large for float32?)")


def integer_labels(cid: str, path, label_raw: np.ndarray) -> np.ndarray:
  """The label map as integers; refused if any voxel is not within 1e-3 of one."""
  if not np.isfinite(label_raw).all():
    raise DataError(f"case {cid}: label file {path} contains NaN or Inf voxels")
  rounded = np.rint(label_raw)
  if label_raw.dtype.kind == "f":
    off = float(np.abs(label_raw - rounded).max()) if label_raw.size else 0.0
    if off > LABEL_TOLERANCE:
      where = np.unravel_index(int(np.argmax(np.abs(label_raw - rounded))), label_raw.shape)
      raise DataError(
        f"case {cid}: label file {path} has non-integer value "
        f"{float(label_raw[where]):g} at voxel {tuple(int(i) for i in where)} "
        f"(more than {LABEL_TOLERANCE:g} from an integer); labels are not rounded"
      )
  return rounded.astype(np.int64)


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


def canonical_affine(img) -> np.ndarray:
  """The affine of ``img`` after ``nib.as_closest_canonical`` (computed, nothing read)."""
  affine = np.asarray(img.affine, np.float64)
  ornt = nib.orientations.io_orientation(affine)
  shape = img.header.get_data_shape()[:3]
  return affine @ nib.orientations.inv_ornt_aff(ornt, shape)


def _check_affine(cid: str, kind: str, path, img, ref_img, ref_path, tol: float) -> None:
  """Compared in the canonical orientation: the same grid stored flipped or transposed passes."""
  affine, ref_affine = canonical_affine(img), canonical_affine(ref_img)
  diff = float(np.abs(affine - ref_affine).max())
  if diff > tol:
    raise DataError(
      f"case {cid}: {kind} file {path} is not in the same space as {ref_path}: affines differ "
      f"by up to {diff:.4g} (tolerance data.affine_tolerance={tol})"
    )


MAX_CASE_ID_BYTES = 200  # + ".tmp-", a random suffix, "_probabilities.nii.gz" < 255 per name


def check_case_id(files: CaseFiles) -> None:
  """A case ID too long for the file names made from it is a bad case (skippable)."""
  size = len(files.case_id.encode("utf-8", "surrogateescape"))
  if size > MAX_CASE_ID_BYTES:
    raise DataError(
      f"case {files.case_id[:40]}...: its case ID is {size} bytes long (from {files.pre}); "
      f"at most {MAX_CASE_ID_BYTES} fit in the file names made from it"
    )


def resampled_shape(shape, spacing, target) -> tuple[int, ...]:
  """The shape ``ndimage.zoom`` gives ``shape`` resampled from ``spacing`` to ``target``."""
  return tuple(int(round(n * s / t)) for n, s, t in zip(shape, spacing, target))


def preprocess_case(
  files: CaseFiles,
  label_values: tuple[int, ...],
  settings: PrepSettings = PrepSettings(),
  limits: InputLimits = InputLimits(),
  training: bool = True,
) -> Case:
  """Loads, checks, crops, resamples and normalises one case.

  Every failure is a ``DataError`` naming the case (so ``data.on_bad_case=skip``
  covers it); running out of memory says so, with what was being read.
  ``training=False`` (prediction): identical pre and post scans are warned about, not refused.
  """
  if files.problem:
    raise DataError(files.problem)
  try:
    return _preprocess_case(files, label_values, settings, limits, training)
  except DataError:
    raise
  except MemoryError:
    raise DataError(
      f"case {files.case_id}: out of memory while preprocessing {files.pre} and {files.post}"
    ) from None
  except Exception as e:
    raise DataError(f"case {files.case_id}: preprocessing failed: {type(e).__name__}: {e}") from e


def _check_identical(cid: str, files: CaseFiles, pre, post, training: bool) -> None:
  """pre == post: refused in training data, warned about (once per case) in prediction."""
  if pre.shape != post.shape or not np.array_equal(pre, post):
    return
  message = (
    f"case {cid}: the pre-contrast scan {files.pre} and the post-contrast scan {files.post} "
    "are identical (no contrast uptake to see; the same file given twice?)"
  )
  if training:
    raise DataError(message)
  logging.warning("%s", message)


def _read_checked(files: CaseFiles, label_values, settings, limits, training: bool = True):
  """Scans and label in canonical orientation, each checked against the pre-contrast scan."""
  cid = files.case_id
  (pre, pre_img, spacing), (post, post_img, _) = load_scans(files, limits)
  label, label_img = None, None
  if files.label is not None:
    label_raw, label_img, _ = load_canonical(files.label, cid, "label", limits)
    label = integer_labels(cid, files.label, label_raw)
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
    _check_affine(cid, kind, path, img, pre_img, files.pre, settings.affine_tolerance)
  for kind, vol, path in (("pre-contrast", pre, files.pre), ("post-contrast", post, files.post)):
    if not np.isfinite(vol).all():
      raise DataError(f"case {cid}: {kind} file {path} contains NaN or Inf voxels")
    if not vol.any():
      raise DataError(f"case {cid}: {kind} file {path} is all zero")
    check_scan_contrast(cid, kind, path, vol)
  _check_identical(cid, files, pre, post, training)
  if label is not None:
    bad = sorted(set(np.unique(label).tolist()) - set(label_values))
    if bad:
      raise DataError(
        f"case {cid}: label file {files.label} has values {bad} outside {list(label_values)}"
      )
  return pre, post, label, pre_img, spacing


def read_checked(files: CaseFiles, label_values, settings, limits):
  """(pre, post, label or None, the pre-contrast image, spacing): the canonical arrays every
  check passed, before cropping (what preprocessing and the planner's fingerprint read).

  Every failure is a ``DataError`` naming the case, as in `preprocess_case`.
  """
  if files.problem:
    raise DataError(files.problem)
  try:
    check_case_id(files)
    return _read_checked(files, label_values, settings, limits)
  except DataError:
    raise
  except MemoryError:
    raise DataError(f"case {files.case_id}: out of memory while reading {files.pre}") from None
  except Exception as e:
    raise DataError(f"case {files.case_id}: reading failed: {type(e).__name__}: {e}") from e


def _crop_and_resample(cid, files, pre, post, label, spacing, settings, limits):
  """The scans cut to their non-zero box, then on ``data.target_spacing`` when one is set."""
  box = nonzero_box(pre, post)
  sl = tuple(slice(a, b) for a, b in box)
  pre, post = pre[sl].astype(np.float32), post[sl].astype(np.float32)
  check_finite(cid, f"the cast of {files.pre} / {files.post} to float32", pre, post)
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
    check_finite(cid, f"resampling {files.pre} / {files.post}", pre, post)
  return pre, post, label, box, target


def _preprocess_case(files: CaseFiles, label_values, settings, limits, training=True) -> Case:
  cid = files.case_id
  check_case_id(files)
  pre, post, label, pre_img, spacing = _read_checked(
    files, label_values, settings, limits, training
  )
  pre, post, label, box, target = _crop_and_resample(
    cid, files, pre, post, label, spacing, settings, limits
  )
  pre, post, stats = normalize(pre, post, settings.normalization)
  check_finite(
    cid, f"the {settings.normalization} normalisation of {files.pre} / {files.post}", pre, post
  )
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
    label_file=files.label,
  )
