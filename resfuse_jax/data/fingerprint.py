"""What a dataset's preprocessed cases are like: the one source of dataset statistics.

Validation (a patch that no case can hold) and, later, self-configuration (spacing,
patch and pooling chosen from the data) read these numbers here rather than each
measuring the cases in its own way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from resfuse_jax.data.common import Case


@dataclasses.dataclass(frozen=True)
class Fingerprint:
  """Per-case geometry of the cached cases, in canonical (RAS) voxel order.

  ``shapes`` [N, 3]: voxels after cropping to the head and resampling (what patches are
  cut from); ``spacings`` [N, 3]: their spacing in mm; ``original_spacings`` [N, 3]: the
  files' own spacing.
  """

  case_ids: tuple[str, ...]
  shapes: np.ndarray
  spacings: np.ndarray
  original_spacings: np.ndarray

  @classmethod
  def of_cases(cls, cases: Sequence[Case]) -> Fingerprint:
    if not cases:
      raise ValueError("a fingerprint needs at least one case")
    return cls(
      case_ids=tuple(c.case_id for c in cases),
      shapes=np.array([c.pre.shape for c in cases], np.int64),
      spacings=np.array([c.spacing for c in cases], np.float64),
      original_spacings=np.array([c.original_spacing for c in cases], np.float64),
    )

  @property
  def median_shape(self) -> tuple[int, int, int]:
    return tuple(int(round(v)) for v in np.median(self.shapes, axis=0))

  def largest_extent(self) -> tuple[tuple[int, str], ...]:
    """Per axis, the largest size any case has there, and that case's ID."""
    index = np.argmax(self.shapes, axis=0)
    return tuple((int(self.shapes[i, a]), self.case_ids[i]) for a, i in enumerate(index))

  def as_dict(self) -> dict:
    return {
      "cases": len(self.case_ids),
      "median_shape": list(self.median_shape),
      "min_shape": self.shapes.min(axis=0).tolist(),
      "max_shape": self.shapes.max(axis=0).tolist(),
      "median_spacing": np.median(self.spacings, axis=0).tolist(),
      "median_original_spacing": np.median(self.original_spacings, axis=0).tolist(),
    }
