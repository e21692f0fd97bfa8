"""Mapping arrays from the preprocessed grid back to the scanner's voxel grid.

Preprocessing reorients to RAS+, crops to the head and may resample; a
prediction made there must be resampled back (nearest neighbour), un-cropped
and re-oriented before it overlays the input file voxel for voxel.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
from scipy import ndimage

from resfuse_jax import files
from resfuse_jax.data.common import Case


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


def to_original_grid(volume: np.ndarray, case: Case) -> np.ndarray:
  """[d, h, w] array on ``case``'s preprocessed grid -> the source file's [D, H, W] grid."""
  box = case.crop
  crop_shape = tuple(b - a for a, b in box)
  volume = _resize_nearest(volume, crop_shape)  # undo resampling
  full = np.zeros(canonical_shape(case.affine, case.shape), volume.dtype)
  full[tuple(slice(a, b) for a, b in box)] = volume  # undo the crop
  ras = nib.orientations.axcodes2ornt(("R", "A", "S"))
  back = nib.orientations.ornt_transform(ras, nib.orientations.io_orientation(case.affine))
  return np.ascontiguousarray(nib.orientations.apply_orientation(full, back))  # undo reorientation


def save_nifti(img: nib.Nifti1Image, path) -> None:
  """Atomic ``nib.save``: a full disk or a kill never leaves a partial ``path``."""
  with files.atomic_path(path) as tmp:
    nib.save(img, str(tmp))


def save_label_map(volume: np.ndarray, case: Case, path) -> None:
  """Writes a preprocessed-grid label map as uint8 NIfTI in the case's own geometry."""
  data = to_original_grid(volume.astype(np.uint8), case)
  img = nib.Nifti1Image(data, case.affine)
  img.set_data_dtype(np.uint8)
  save_nifti(img, path)
