"""Mapping arrays from the preprocessed grid back to the scanner's voxel grid.

Preprocessing reorients to RAS+, crops to the head and may resample; a
prediction made there must be resampled back (nearest neighbour), un-cropped
and re-oriented before it overlays the input file voxel for voxel. Evaluation
scores in the canonical orientation of that grid (``to_canonical_grid``) against
the source label map read the same way (``original_label``).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from resfuse_jax import files
from resfuse_jax.data.common import Case, DataError, InputLimits, load_canonical
from resfuse_jax.data.preprocessing import integer_labels


def canonical_shape(affine: np.ndarray, shape: tuple[int, ...]) -> tuple[int, ...]:
  """Shape of the volume after ``nib.as_closest_canonical``."""
  ornt = nib.orientations.io_orientation(affine)
  out = [0, 0, 0]
  for in_axis, (out_axis, _) in enumerate(ornt):
    out[int(out_axis)] = shape[in_axis]
  return tuple(out)


def _resize_nearest(volume: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """Nearest-neighbour resize to exactly ``shape`` (voxel centres aligned, like zoom)."""
  if volume.shape == tuple(shape):
    return volume
  factors = [t / s for t, s in zip(shape, volume.shape)]
  out = ndimage.zoom(volume, factors, order=0, mode="nearest", grid_mode=True)
  pad = [(0, max(t - o, 0)) for t, o in zip(shape, out.shape)]
  out = np.pad(out, pad, mode="edge")
  return out[tuple(slice(0, t) for t in shape)]


def to_canonical_grid(volume: np.ndarray, case: Case) -> np.ndarray:
  """[d, h, w, ...] array on ``case``'s preprocessed grid -> the source's grid, RAS+ [D, H, W, ...].

  Resampling undone (nearest neighbour), then the crop (zeros outside it).
  """
  box = case.crop
  crop_shape = tuple(b - a for a, b in box)
  if volume.ndim > 3:  # trailing channels: each resized alone
    parts = [to_canonical_grid(volume[..., c], case) for c in range(volume.shape[-1])]
    return np.stack(parts, -1)
  volume = _resize_nearest(volume, crop_shape)  # undo resampling
  full = np.zeros(canonical_shape(case.affine, case.shape), volume.dtype)
  full[tuple(slice(a, b) for a, b in box)] = volume  # undo the crop
  return full


def from_canonical(volume: np.ndarray, case: Case) -> np.ndarray:
  """[D, H, W] in RAS+ on the source's grid -> the source file's own axis order and flips."""
  ras = nib.orientations.axcodes2ornt(("R", "A", "S"))
  back = nib.orientations.ornt_transform(ras, nib.orientations.io_orientation(case.affine))
  return np.ascontiguousarray(nib.orientations.apply_orientation(volume, back))


def to_original_grid(volume: np.ndarray, case: Case) -> np.ndarray:
  """[d, h, w] array on ``case``'s preprocessed grid -> the source file's [D, H, W] grid."""
  return from_canonical(to_canonical_grid(volume, case), case)


def original_label(
  case: Case, limits: InputLimits = InputLimits()
) -> tuple[np.ndarray, tuple[float, float, float]]:
  """The case's source label map, RAS+ [D, H, W] integers, and its spacing in mm.

  Read from ``case.label_file`` as preprocessing reads it (closest canonical orientation),
  so that it overlays ``to_canonical_grid`` voxel for voxel; never the preprocessed label.
  """
  if case.label_file is None:
    raise DataError(
      f"case {case.case_id}: its source label file is unknown, so it cannot be scored on "
      "its original grid"
    )
  raw, _, spacing = load_canonical(Path(case.label_file), case.case_id, "label", limits)
  label = integer_labels(case.case_id, case.label_file, raw)
  expected = canonical_shape(case.affine, case.shape)
  if label.shape != expected:
    raise DataError(
      f"case {case.case_id}: label file {case.label_file} has shape {label.shape} in RAS+, "
      f"but the case was preprocessed from a {expected} grid (changed since it was cached?)"
    )
  return label, spacing


def save_nifti(img: nib.Nifti1Image, path) -> None:
  """Atomic ``nib.save``: a full disk or a kill never leaves a partial ``path``."""
  with files.atomic_path(path) as tmp:
    nib.save(img, str(tmp))


def save_label_map(volume: np.ndarray, case: Case, path) -> None:
  """Writes a preprocessed-grid label map as uint8 NIfTI in the case's own geometry."""
  save_canonical_label_map(to_canonical_grid(volume.astype(np.uint8), case), case, path)


def save_canonical_label_map(volume: np.ndarray, case: Case, path) -> None:
  """Writes a label map on the source's grid in RAS+ (`to_canonical_grid`) as uint8 NIfTI
  in the case's own orientation and affine."""
  img = nib.Nifti1Image(from_canonical(volume.astype(np.uint8), case), case.affine)
  img.set_data_dtype(np.uint8)
  save_nifti(img, path)
