"""Segmentation metrics on binary masks, as pure functions plus an accumulator.

Empty-mask conventions (documented, as BraTS and MONAI users expect):
- Dice: both masks empty -> 1.0; exactly one empty -> 0.0.
- Recall: empty reference -> 1.0 (nothing to miss); precision: empty prediction -> 1.0.
- HD95: both empty -> 0.0 mm; exactly one empty -> ``EMPTY_HD95`` (373.13 mm,
  the BraTS convention: the diagonal of the 240x240x155 1 mm grid).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from resfuse_jax import files

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


def precision(pred: np.ndarray, ref: np.ndarray) -> float:
  pred, ref = pred.astype(bool), ref.astype(bool)
  n = pred.sum()
  return 1.0 if n == 0 else float(np.logical_and(pred, ref).sum() / n)


def _surface(mask: np.ndarray) -> np.ndarray:
  return mask & ~ndimage.binary_erosion(mask, border_value=0)


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


LESION_DILATION = 3  # BraTS 2023: ground truth dilated by 3 voxels to merge nearby lesions
LESION_MIN_VOXELS = 50  # BraTS 2023: smaller ground-truth lesions are ignored
_CONN26 = np.ones((3, 3, 3), bool)


def lesion_wise(
  pred: np.ndarray,
  ref: np.ndarray,
  spacing: Sequence[float] = (1.0, 1.0, 1.0),
  dilation: int = LESION_DILATION,
  min_lesion_voxels: int = LESION_MIN_VOXELS,
) -> dict[str, float]:
  """BraTS 2023 lesion-wise Dice and HD95 of one region.

  Lesions are 26-connected components of the reference after merging those
  within ``dilation`` voxels of each other; reference lesions under
  ``min_lesion_voxels`` are ignored (so are predictions touching only them).
  Each reference lesion is scored against the predicted components that touch
  its dilation; each predicted component touching no lesion is a false
  positive scored Dice 0, HD95 ``EMPTY_HD95``. Scores are averaged over
  lesions + false positives; nothing in either mask scores Dice 1, HD95 0.
  """
  pred, ref = pred.astype(bool), ref.astype(bool)
  pred_cc, n_pred = ndimage.label(pred, structure=_CONN26)
  merged, n_merged = ndimage.label(
    ndimage.binary_dilation(ref, _CONN26, iterations=dilation), structure=_CONN26
  )
  lesions = merged * ref  # reference voxels, labelled by their merged lesion
  sizes = ndimage.sum_labels(ref, lesions, index=np.arange(1, n_merged + 1))
  dices, hds, touched = [], [], set()
  for i in np.flatnonzero(sizes > 0) + 1:
    lesion = lesions == i
    zone = ndimage.binary_dilation(lesion, _CONN26, iterations=dilation)
    hits = set(np.unique(pred_cc[zone]).tolist()) - {0}
    touched |= hits
    if sizes[i - 1] < min_lesion_voxels:
      continue  # ignored, and so are the predictions it explains
    matched = np.isin(pred_cc, list(hits)) if hits else np.zeros_like(pred)
    dices.append(dice(matched, lesion))
    hds.append(hd95(matched, lesion, spacing))
  false_positives = n_pred - len(touched)
  n = len(dices) + false_positives
  if n == 0:
    return {"dice": 1.0, "hd95": 0.0, "lesions": 0, "false_positives": 0}
  return {
    "dice": float(sum(dices) / n),
    "hd95": float((sum(hds) + EMPTY_HD95 * false_positives) / n),
    "lesions": len(dices),
    "false_positives": int(false_positives),
  }


class RegionMetrics:
  """Accumulates per-case Dice, recall and HD95 per region; reports case means."""

  def __init__(self, region_names: Sequence[str], lesion_wise: bool = False):
    self.region_names = list(region_names)
    self.lesion_wise = lesion_wise
    self.rows: list[dict] = []

  def add(self, case_id: str, pred: np.ndarray, ref: np.ndarray, spacing) -> dict:
    """pred, ref: [D, H, W, R] boolean region masks."""
    row = {"case": case_id}
    for r, name in enumerate(self.region_names):
      row[f"dice_{name}"] = dice(pred[..., r], ref[..., r])
      row[f"recall_{name}"] = recall(pred[..., r], ref[..., r])
      row[f"precision_{name}"] = precision(pred[..., r], ref[..., r])
      row[f"hd95_{name}"] = hd95(pred[..., r], ref[..., r], spacing)
      if self.lesion_wise:
        lw = lesion_wise(pred[..., r], ref[..., r], spacing)
        row[f"lesion_dice_{name}"] = lw["dice"]
        row[f"lesion_hd95_{name}"] = lw["hd95"]
    self.rows.append(row)
    return row

  def summary(self) -> dict[str, dict[str, float]]:
    """{'dice': {region: mean, ..., 'mean': mean over regions}, 'recall': ..., 'hd95': ...}.

    With ``lesion_wise`` also 'lesion_dice' and 'lesion_hd95' (BraTS 2023).
    """
    if not self.rows:
      raise ValueError("no cases were evaluated")
    out = {}
    metrics = ["dice", "recall", "precision", "hd95"]
    if self.lesion_wise:
      metrics += ["lesion_dice", "lesion_hd95"]
    for metric in metrics:
      per_region = {
        name: float(np.mean([row[f"{metric}_{name}"] for row in self.rows]))
        for name in self.region_names
      }
      per_region["mean"] = float(np.mean(list(per_region.values())))
      out[metric] = per_region
    return out

  def write_csv(self, path: str | Path) -> None:
    """One row per case (``case``, ``dice_<region>``, ...), written atomically."""
    if not self.rows:
      raise ValueError("no cases were evaluated")
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(self.rows[0]))
    writer.writeheader()
    writer.writerows(self.rows)
    files.write_text(path, text.getvalue())

  def std(self) -> dict[str, dict[str, float]]:
    """Population standard deviation over cases, per metric of `summary` and region."""
    return {
      metric: {
        r: float(np.std([row[f"{metric}_{r}"] for row in self.rows])) for r in self.region_names
      }
      for metric in self.summary()
    }


def read_csv(path: str | Path) -> list[dict]:
  """Rows written by `RegionMetrics.write_csv`, metric values as floats."""
  with Path(path).open(newline="") as f:
    return [
      {k: v if k == "case" else float(v) for k, v in row.items()} for row in csv.DictReader(f)
    ]
