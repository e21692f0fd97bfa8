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


LESION_DILATION_MM = 3.0  # BraTS 2023: ground truth dilated by 3 (1 mm) voxels to merge lesions
LESION_MIN_MM3 = 50.0  # BraTS 2023: lesions under 50 (1 mm) voxels are ignored
_CONN26 = np.ones((3, 3, 3), bool)
_MM_TOLERANCE = 1e-6


def dilation_radius(spacing: Sequence[float], distance_mm: float = LESION_DILATION_MM) -> tuple:
  """Voxels per axis within ``distance_mm`` of a voxel centre: floor(distance / spacing).

  BraTS 2023 dilates by 3 iterations of a 26-connected dilation on its 1 mm grid: every
  voxel whose offset is at most 3 voxels on each axis (a Chebyshev ball). Read in mm, that
  is every voxel centre at most 3 mm away on each axis: (3, 3, 3) at 1 mm, (1, 1, 1) at
  2 mm, (6, 6, 2) at 0.5 x 0.5 x 1.5 mm.
  """
  return tuple(int(np.floor(distance_mm / float(s) + _MM_TOLERANCE)) for s in spacing)


def dilate_box(mask: np.ndarray, radius: Sequence[int]) -> np.ndarray:
  """``mask`` [D, H, W] dilated by a box of half-width ``radius`` voxels per axis.

  Separable (a running maximum per axis); at radius (k, k, k) it equals k iterations of
  a 26-connected ``binary_dilation`` (Minkowski sums of cubes; the volume is a box, so
  clipping at its faces loses no voxel either way).
  """
  size = tuple(2 * int(r) + 1 for r in radius)
  return ndimage.maximum_filter(mask.astype(np.uint8), size=size, mode="constant", cval=0) > 0


def lesion_wise(
  pred: np.ndarray,
  ref: np.ndarray,
  spacing: Sequence[float] = (1.0, 1.0, 1.0),
  dilation_mm: float = LESION_DILATION_MM,
  min_lesion_mm3: float = LESION_MIN_MM3,
) -> dict[str, float]:
  """BraTS 2023 lesion-wise Dice and HD95 of one region, its rules read in millimetres.

  Lesions are 26-connected components of the reference after merging those within
  ``dilation_mm`` of each other on every axis (``dilation_radius``); reference lesions
  under ``min_lesion_mm3`` are ignored (so are predictions touching only them). Each
  reference lesion is scored against the predicted components that touch its dilation;
  each predicted component touching no lesion is a false positive scored Dice 0, HD95
  ``EMPTY_HD95``. Scores are averaged over lesions + false positives; nothing in either
  mask scores Dice 1, HD95 0. On the 1 mm grid the rules are the organisers' (3 voxels,
  50 voxels); on any other grid they keep their physical size.
  """
  radius = dilation_radius(spacing, dilation_mm)
  voxel_mm3 = float(np.prod(spacing))
  pred, ref = pred.astype(bool), ref.astype(bool)
  pred_cc, n_pred = ndimage.label(pred, structure=_CONN26)
  merged, n_merged = ndimage.label(dilate_box(ref, radius), structure=_CONN26)
  lesions = merged * ref  # reference voxels, labelled by their merged lesion
  sizes = ndimage.sum_labels(ref, lesions, index=np.arange(1, n_merged + 1))
  dices, hds, touched = [], [], set()
  for i in np.flatnonzero(sizes > 0) + 1:
    lesion = lesions == i
    zone = dilate_box(lesion, radius)
    hits = set(np.unique(pred_cc[zone]).tolist()) - {0}
    touched |= hits
    if sizes[i - 1] * voxel_mm3 < min_lesion_mm3 * (1 - _MM_TOLERANCE):
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


PACKAGE_METRICS = ("pkg_lesion_dice", "pkg_lesion_hd95", "pkg_lesion_f1")


def hd95_pooled(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> float:
  """95th percentile of both directed surface distances pooled (panoptica's HD95), in mm."""
  sp, sr = _surface(pred.astype(bool)), _surface(ref.astype(bool))
  to_ref = ndimage.distance_transform_edt(~sr, sampling=spacing)[sp]
  to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)[sr]
  return float(np.percentile(np.concatenate([to_ref, to_pred]), 95))


PANOPTICA_MATCH_THRESHOLD = 1e-6  # brats-evaluation's config_gli: matching Dice at least this


def lesion_wise_panoptica(
  pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)
) -> dict[str, float]:
  """Lesion-wise scores by the rules of the organisers' current package.

  ``brats-evaluation`` 0.0.10 (panoptica 2.1.7, config ``gli``): instances are the
  26-connected components of prediction and reference (no dilation, no size
  threshold), matched one to one by maximum bipartite Dice matching of pairs with
  Dice >= 1e-6. ``dice``/``hd95`` are the means over matched pairs (its ``sq_dsc``,
  ``sq_hd95``; HD95 pools both directed distances); missed and spurious lesions
  enter only ``f1`` (its recognition quality ``rq``). No match: Dice 0, HD95 inf;
  nothing in either mask: NaN, as the package reports.
  """
  from scipy.optimize import linear_sum_assignment

  pred, ref = pred.astype(bool), ref.astype(bool)
  pred_cc, n_pred = ndimage.label(pred, structure=_CONN26)
  ref_cc, n_ref = ndimage.label(ref, structure=_CONN26)
  if n_pred == 0 and n_ref == 0:
    nan = float("nan")
    return {"dice": nan, "hd95": nan, "f1": nan, "tp": 0, "fp": 0, "fn": 0}
  cost = np.full((n_ref, n_pred), 1.0 + 1e-6)
  both = (ref_cc > 0) & (pred_cc > 0)
  pair_ids = ref_cc[both].astype(np.int64) * (n_pred + 1) + pred_cc[both]
  pairs, intersections = np.unique(pair_ids, return_counts=True)  # one pass over the volume
  ref_sizes = np.bincount(ref_cc.ravel(), minlength=n_ref + 1)
  pred_sizes = np.bincount(pred_cc.ravel(), minlength=n_pred + 1)
  for pair, inter in zip(pairs, intersections):
    r, p = divmod(int(pair), n_pred + 1)
    score = 2.0 * inter / (ref_sizes[r] + pred_sizes[p])
    if score >= PANOPTICA_MATCH_THRESHOLD:
      cost[r - 1, p - 1] = 1.0 - score
  matched = []
  if n_ref and n_pred:
    rows, cols = linear_sum_assignment(cost)
    matched = [(r + 1, p + 1, 1.0 - cost[r, p]) for r, p in zip(rows, cols) if cost[r, p] < 1.0]
  tp = len(matched)
  fp, fn = n_pred - tp, n_ref - tp
  if tp == 0:
    return {"dice": 0.0, "hd95": float("inf"), "f1": 0.0, "tp": 0, "fp": fp, "fn": fn}
  hds = [hd95_pooled(pred_cc == p, ref_cc == r, spacing) for r, p, _ in matched]
  return {
    "dice": float(np.mean([d for _, _, d in matched])),
    "hd95": float(np.mean(hds)),
    "f1": tp / (tp + 0.5 * fp + 0.5 * fn),
    "tp": tp,
    "fp": fp,
    "fn": fn,
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
        pkg = lesion_wise_panoptica(pred[..., r], ref[..., r], spacing)
        row[f"pkg_lesion_dice_{name}"] = pkg["dice"]
        row[f"pkg_lesion_hd95_{name}"] = min(pkg["hd95"], EMPTY_HD95)  # inf: no lesion matched
        row[f"pkg_lesion_f1_{name}"] = pkg["f1"]
    self.rows.append(row)
    return row

  def summary(self) -> dict[str, dict[str, float]]:
    """{'dice': {region: mean, ..., 'mean': mean over regions}, 'recall': ..., 'hd95': ...}.

    With ``lesion_wise`` also 'lesion_dice' and 'lesion_hd95' (BraTS 2023 rules) and
    'pkg_lesion_dice', 'pkg_lesion_hd95', 'pkg_lesion_f1' (the organisers' current
    package, ``lesion_wise_panoptica``; cases where both masks are empty are left out,
    as the package's summary leaves out its NaN).
    """
    if not self.rows:
      raise ValueError("no cases were evaluated")
    out = {}
    metrics = ["dice", "recall", "precision", "hd95"]
    if self.lesion_wise:
      metrics += ["lesion_dice", "lesion_hd95", *PACKAGE_METRICS]
    for metric in metrics:
      mean = np.nanmean if metric in PACKAGE_METRICS else np.mean
      per_region = {}
      for name in self.region_names:
        values = [row[f"{metric}_{name}"] for row in self.rows]
        defined = not all(np.isnan(values)) or metric not in PACKAGE_METRICS
        per_region[name] = float(mean(values)) if defined else float("nan")
      values = list(per_region.values())
      per_region["mean"] = float(mean(values)) if not all(np.isnan(values)) else float("nan")
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

    def spread(metric: str, region: str) -> float:
      values = np.array([row[f"{metric}_{region}"] for row in self.rows], np.float64)
      if metric in PACKAGE_METRICS:
        values = values[~np.isnan(values)]
      return float(np.std(values)) if len(values) else float("nan")

    return {m: {r: spread(m, r) for r in self.region_names} for m in self.summary()}


def read_csv(path: str | Path) -> list[dict]:
  """Rows written by `RegionMetrics.write_csv`, metric values as floats."""
  with Path(path).open(newline="") as f:
    return [
      {k: v if k == "case" else float(v) for k, v in row.items()} for row in csv.DictReader(f)
    ]
