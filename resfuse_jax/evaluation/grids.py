"""Which grid a validation case is scored on: its original one, or the resampled one.

``original`` (results, per-case rows, the post-processing choice; nnU-Net's habit): the
thresholded masks are taken back to the source's grid (``data.geometry.to_canonical_grid``:
nearest-neighbour resampling undone, crop undone) and scored against the source label file
read as preprocessing reads it (``data.geometry.original_label``), with the source's
spacing. ``resampled`` (training's periodic validation, a cheap progress signal): the
preprocessed grid and label, as the network sees them. Either way the masks are kept
cropped (``postprocess_selection.crop_case``), which scores exactly like the whole volume.
"""

from __future__ import annotations

import numpy as np

from resfuse_jax import data
from resfuse_jax.data import geometry
from resfuse_jax.evaluation.postprocess_selection import CaseMasks, crop_case
from resfuse_jax.inference import postprocess

ORIGINAL = "original"
RESAMPLED = "resampled"
GRIDS = (ORIGINAL, RESAMPLED)


def case_masks(
  case: data.Case,
  thresholded: np.ndarray,
  regions: dict[str, tuple[int, ...]],
  grid: str = ORIGINAL,
  limits: data.InputLimits | None = None,
) -> CaseMasks:
  """Cropped [d, h, w, R] thresholded masks and reference masks on ``grid``, with its spacing.

  Args:
    case: a labelled case (its preprocessed arrays; for ``original`` its ``label_file``).
    thresholded: [D, H, W, R] masks on the preprocessed grid, before nesting and rules.
    regions: the dataset's regions (label values per region).
    grid: ``original`` or ``resampled``.
    limits: what the label file's header may claim (``data.input_limits``).
  """
  if grid == RESAMPLED:
    ref = postprocess.region_masks(np.asarray(case.label), regions)
    return crop_case(case.case_id, thresholded, ref, case.spacing)
  if grid != ORIGINAL:
    raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}")
  label, spacing = geometry.original_label(case, limits or data.InputLimits())
  ref = postprocess.region_masks(label, regions)
  del label
  pred = geometry.to_canonical_grid(thresholded, case)
  return crop_case(case.case_id, pred, ref, spacing)
