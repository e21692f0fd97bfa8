"""Segmentation metrics on binary masks, as pure functions plus an accumulator.

Empty-mask conventions (documented, as BraTS and MONAI users expect):
- Dice: both masks empty -> 1.0; exactly one empty -> 0.0.
- Recall: empty reference -> 1.0 (nothing to miss).
- HD95: both empty -> 0.0 mm; exactly one empty -> ``EMPTY_HD95`` (373.13 mm,
  the BraTS convention: the diagonal of the 240x240x155 1 mm grid).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

EMPTY_HD95 = 373.12866


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
  pred, ref = pred.astype(bool), ref.astype(bool)
  total = pred.sum() + ref.sum()
  if total == 0:
    return 1.0
  return float(2.0 * np.logical_and(pred, ref).sum() / total)


def recall(pred: np.ndarray, ref: np.ndarray) -> float:
  pred, ref = pred.astype(bool), ref.astype(bool)
  n = ref.sum()
  return 1.0 if n == 0 else float(np.logical_and(pred, ref).sum() / n)


def _surface(mask: np.ndarray) -> np.ndarray:
  return mask & ~ndimage.binary_erosion(mask, structure=np.ones((3,) * mask.ndim), border_value=0)


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> float:
  """95th-percentile symmetric Hausdorff distance between mask surfaces, in mm.

  The larger of the two directed 95th percentiles (MONAI's definition).
  """
  pred, ref = pred.astype(bool), ref.astype(bool)
  if not pred.any() and not ref.any():
    return 0.0
  if not pred.any() or not ref.any():
    return EMPTY_HD95
  sp, sr = _surface(pred), _surface(ref)
  to_ref = ndimage.distance_transform_edt(~sr, sampling=spacing)[sp]
  to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)[sr]
  return float(max(np.percentile(to_ref, 95), np.percentile(to_pred, 95)))


class RegionMetrics:
  """Accumulates per-case Dice, recall and HD95 per region; reports case means."""

  def __init__(self, region_names: Sequence[str]):
    self.region_names = list(region_names)
    self.rows: list[dict] = []

  def add(self, case_id: str, pred: np.ndarray, ref: np.ndarray, spacing) -> dict:
    """pred, ref: [D, H, W, R] boolean region masks."""
    row = {"case": case_id}
    for r, name in enumerate(self.region_names):
      row[f"dice_{name}"] = dice(pred[..., r], ref[..., r])
      row[f"recall_{name}"] = recall(pred[..., r], ref[..., r])
      row[f"hd95_{name}"] = hd95(pred[..., r], ref[..., r], spacing)
    self.rows.append(row)
    return row

  def summary(self) -> dict[str, dict[str, float]]:
    """{'dice': {region: mean, ..., 'mean': mean over regions}, 'recall': ..., 'hd95': ...}."""
    if not self.rows:
      raise ValueError("no cases were evaluated")
    out = {}
    for metric in ("dice", "recall", "hd95"):
      per_region = {
        name: float(np.mean([row[f"{metric}_{name}"] for row in self.rows]))
        for name in self.region_names
      }
      per_region["mean"] = float(np.mean(list(per_region.values())))
      out[metric] = per_region
    return out
