"""Post-processing chosen on validation, per region (nnU-Net's ``determine_postprocessing``).

The final validation saves every case's thresholded masks and references once, on
the case's original grid (``evaluate_cases(grid='original')``), cropped to the box of
prediction ∪ reference plus a margin that keeps the lesion-wise matching (a 3 mm
dilation) and HD95 exact, so every candidate rule is scored without a second forward
pass, and the folds of a cross-validation can be pooled. Regions are chosen outer first (an inner region only keeps what
its processed outer region kept), each by the validation score: BraTS 2023
lesion-wise Dice for BraTS regions, voxel Dice otherwise; ties go to the rule
with fewer operations, then to the smaller threshold.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from resfuse_jax import files
from resfuse_jax.errors import CheckpointError
from resfuse_jax.evaluation import metrics
from resfuse_jax.inference import postprocess
from resfuse_jax.inference.postprocess import NO_RULE, Rule
from resfuse_jax.workdir import Workdir

MARGIN = 2  # voxels kept around prediction ∪ reference beyond the lesion-wise dilation
MIN_COMPONENT_GRID_MM3 = (10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)
RELABEL_GRID_MM3 = (50.0, 100.0, 200.0, 500.0, 1000.0)
TOLERANCE = 1e-9


@dataclasses.dataclass
class CaseMasks:
  """One validation case: pred [d, h, w, R] thresholded masks (before nesting and rules)
  and ref [d, h, w, R] reference masks, cropped alike; spacing in mm."""

  case_id: str
  pred: np.ndarray
  ref: np.ndarray
  spacing: tuple[float, ...]


def crop_case(case_id: str, pred: np.ndarray, ref: np.ndarray, spacing) -> CaseMasks:
  """The box of pred ∪ ref (any region) plus a margin, clipped to the volume.

  The margin per axis is the lesion-wise dilation in voxels (``metrics.dilation_radius``,
  3 mm) plus ``MARGIN``: every metric and rule scores the crop as the whole volume.
  """
  occupied = pred.any(-1) | ref.any(-1)
  spacing = tuple(float(s) for s in spacing)
  if not occupied.any():
    return CaseMasks(case_id, pred[:1, :1, :1].copy(), ref[:1, :1, :1].copy(), spacing)
  box = []
  for axis, radius in enumerate(metrics.dilation_radius(spacing)):
    other = tuple(a for a in range(3) if a != axis)
    idx = np.flatnonzero(occupied.any(axis=other))
    margin = radius + MARGIN
    box.append(slice(max(idx[0] - margin, 0), min(idx[-1] + 1 + margin, occupied.shape[axis])))
  box = tuple(box)
  return CaseMasks(case_id, pred[box].copy(), ref[box].copy(), spacing)


def save_masks(path: str | Path, cases: Sequence[CaseMasks]) -> Path:
  arrays = {"case_ids": np.array([c.case_id for c in cases])}
  for i, c in enumerate(cases):
    arrays[f"pred_{i}"], arrays[f"ref_{i}"] = c.pred, c.ref
    arrays[f"spacing_{i}"] = np.asarray(c.spacing, np.float64)
  with files.atomic_path(path) as tmp:
    np.savez_compressed(tmp, **arrays)
  return Path(path)


def load_masks(path: str | Path) -> list[CaseMasks]:
  try:
    with np.load(path) as z:
      return [
        CaseMasks(str(cid), z[f"pred_{i}"], z[f"ref_{i}"], tuple(z[f"spacing_{i}"]))
        for i, cid in enumerate(z["case_ids"])
      ]
  except (OSError, KeyError, ValueError) as e:
    raise CheckpointError(f"{path}: cannot read the saved validation masks ({e})") from None


def candidates(index: int) -> list[Rule]:
  """none, then components under each size, then (outermost region) the largest alone."""
  out = [NO_RULE] + [Rule(min_component_mm3=k) for k in MIN_COMPONENT_GRID_MM3]
  if index == 0:
    out.append(Rule(largest_only=True))
  return out


def region_score(pred: np.ndarray, ref: np.ndarray, spacing, lesion_wise: bool) -> float:
  if lesion_wise:
    return metrics.lesion_wise(pred, ref, spacing)["dice"]
  return metrics.dice(pred, ref)


def _score(cases, rules, index: int, lesion_wise: bool) -> float:
  return float(
    np.mean(
      [
        region_score(
          postprocess.apply_rules(c.pred, rules, c.spacing)[..., index],
          c.ref[..., index],
          c.spacing,
          lesion_wise,
        )
        for c in cases
      ]
    )
  )


def determine(cases: Sequence[CaseMasks], region_names: Sequence[str], brats_like: bool) -> dict:
  """Chooses one rule per region; returns the ``postprocessing.json`` record.

  BraTS ET also tries emptying a small total ET (it then counts as necrosis).
  """
  if not cases:
    raise ValueError("no validation cases to choose post-processing on")
  names = list(region_names)
  chosen: list[Rule] = []
  table = []
  for r, name in enumerate(names):
    best = {"rule": NO_RULE, "score": -np.inf}

    def consider(rule: Rule, r=r, name=name, best=best) -> None:
      rules = chosen + [rule] + [NO_RULE] * (len(names) - r - 1)
      score = _score(cases, rules, r, brats_like)
      table.append(
        {"region": name, "rule": rule.to_dict(), "describe": rule.describe(), "score": score}
      )
      if score > best["score"] + TOLERANCE:
        best.update(rule=rule, score=score)

    for rule in candidates(r):
      consider(rule)
    if brats_like and name == "ET":  # then relabel a small total ET, keeping the component rule
      component_rule = best["rule"]
      for t in RELABEL_GRID_MM3:
        consider(dataclasses.replace(component_rule, relabel_below_mm3=t))
    chosen.append(best["rule"])
  return {
    "format": postprocess.FORMAT,
    "metric": "lesion_dice" if brats_like else "dice",
    "cases": len(cases),
    "case_ids": [c.case_id for c in cases],
    "rules": {name: rule.to_dict() for name, rule in zip(names, chosen)},
    "describe": {name: rule.describe() for name, rule in zip(names, chosen)},
    "candidates": table,
  }


def evaluate_rules(
  cases: Sequence[CaseMasks], rules: Sequence[Rule] | None, region_names, lesion_wise: bool
) -> metrics.RegionMetrics:
  """The validation metrics of ``rules`` from the saved masks (no forward pass)."""
  acc = metrics.RegionMetrics(region_names, lesion_wise=lesion_wise)
  for c in cases:
    acc.add(c.case_id, postprocess.apply_rules(c.pred, rules, c.spacing), c.ref, c.spacing)
  return acc


def pooled_masks(workdirs: Sequence[str | Path]) -> list[CaseMasks]:
  """The saved validation masks of several folds' workdirs; a case in two folds is refused."""
  cases, seen = [], set()
  for w in workdirs:
    path = Workdir(w).validation_masks_file
    if not path.is_file():
      raise CheckpointError(f"{path} is missing: train (or resume) that workdir to the end first")
    for c in load_masks(path):
      if c.case_id in seen:
        raise CheckpointError(f"case {c.case_id} is in the validation set of two workdirs")
      seen.add(c.case_id)
      cases.append(c)
  return cases


def determine_from_workdirs(workdirs: Sequence[str | Path], region_names, brats_like) -> dict:
  """Pools the saved validation masks of several folds' workdirs into one choice."""
  record = determine(pooled_masks(workdirs), region_names, brats_like)
  return {**record, "workdirs": [str(Path(w).absolute()) for w in workdirs]}
