"""Types shared by the dataset readers, and NIfTI loading with clear errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import nibabel as nib
import numpy as np

from resfuse_jax.errors import DataError

__all__ = ["Case", "CaseFiles", "DataError", "load_canonical"]


@dataclasses.dataclass(frozen=True)
class CaseFiles:
  case_id: str
  pre: Path
  post: Path
  label: Path | None


@dataclasses.dataclass
class Case:
  """One case in canonical (RAS) orientation, cropped to the head and normalised.

  ``pre``/``post`` are float32 [D, H, W]; ``label`` uint8 [D, H, W] or None.
  ``crop`` is the (start, stop) box in the canonical grid, before any
  resampling to ``spacing`` from ``original_spacing``; ``affine``/``shape`` are
  the file's own, kept so predictions can be written back to it.
  """

  case_id: str
  pre: np.ndarray
  post: np.ndarray
  label: np.ndarray | None
  spacing: tuple[float, float, float]
  affine: np.ndarray
  shape: tuple[int, int, int]
  crop: tuple[tuple[int, int], ...]
  original_spacing: tuple[float, float, float] | None = None
  normalization: dict | None = None
  fg_locations: list[np.ndarray] | None = None  # per region: [N, 3] voxel indices


def load_canonical(
  path: Path, case_id: str, kind: str
) -> tuple[np.ndarray, nib.Nifti1Image, tuple[float, float, float]]:
  """Reads a volume reoriented to the closest canonical (RAS+) orientation.

  Returns the canonical voxels, the original image (for its affine and shape)
  and the canonical voxel spacing in mm.
  """
  try:
    img = nib.load(str(path))
    canonical = nib.as_closest_canonical(img)
    data = np.asarray(canonical.dataobj)
  except Exception as e:  # nibabel raises many types for damaged files
    raise DataError(f"case {case_id}: cannot read {kind} file {path}: {e}") from e
  if data.ndim == 4 and data.shape[-1] == 1:
    data = data[..., 0]
  if data.ndim != 3:
    raise DataError(f"case {case_id}: {kind} file {path} is {data.ndim}-D, expected a 3-D volume")
  spacing = tuple(float(z) for z in canonical.header.get_zooms()[:3])
  return data, img, spacing
