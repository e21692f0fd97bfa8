"""Reading a case and nnU-Net-style preprocessing: crop to the head, z-score."""

from __future__ import annotations

import numpy as np

from resfuse_jax.data.common import Case, CaseFiles, DataError, load_canonical


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


def zscore(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Per-channel z-score over the head mask; background stays 0.

  Each scan is normalised on its own: scanner gain differs between the pre and
  post acquisitions, and the tissue statistics are dominated by non-enhancing
  parenchyma, so enhancement survives as post > pre locally.
  """
  values = image[mask]
  mean, std = float(values.mean()), float(values.std())
  return np.where(mask, (image - mean) / max(std, 1e-8), 0.0).astype(np.float32)


def read_case(files: CaseFiles, label_values: tuple[int, ...]) -> Case:
  """Loads, checks, crops and normalises one case."""
  cid = files.case_id
  pre, pre_img, spacing = load_canonical(files.pre, cid, "pre-contrast")
  post, _, _ = load_canonical(files.post, cid, "post-contrast")
  label = None
  if files.label is not None:
    label_raw, _, _ = load_canonical(files.label, cid, "label")
    label = np.rint(label_raw).astype(np.int64)
  for kind, vol, path in (("post-contrast", post, files.post), ("label", label, files.label)):
    if vol is not None and vol.shape != pre.shape:
      raise DataError(
        f"case {cid}: {kind} file {path} has shape {vol.shape}, "
        f"but the pre-contrast scan {files.pre} has {pre.shape}"
      )
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
  box = nonzero_box(pre, post)
  sl = tuple(slice(a, b) for a, b in box)
  pre, post = pre[sl].astype(np.float32), post[sl].astype(np.float32)
  head = (pre != 0) | (post != 0)
  return Case(
    case_id=cid,
    pre=zscore(pre, head),
    post=zscore(post, head),
    label=None if label is None else label[sl].astype(np.uint8),
    spacing=spacing,
    affine=np.asarray(pre_img.affine),
    shape=tuple(int(s) for s in pre_img.shape[:3]),
    crop=box,
  )
