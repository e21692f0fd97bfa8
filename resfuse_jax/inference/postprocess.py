"""Region masks <-> label maps: thresholds, post-processing rules, BraTS nesting.

Regions are nested (BraTS: WT ⊇ TC ⊇ ET), so a label map is painted outer
region first: WT∖TC -> 2 (ED), TC∖ET -> 1 (NCR), ET -> 3; a single lesion
region paints 1. Thresholded masks are nested the way that painting reads them
(an inner voxel belongs to every outer region), then each region's ``Rule``
runs, outer region first, and an inner region keeps only what its processed
outer region kept: the masks scored are exactly the label map written.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from resfuse_jax import files
from resfuse_jax.errors import ConfigError

FORMAT = "resfuse_jax-postprocessing-1"

_CONN26 = np.ones((3, 3, 3), bool)


def region_masks(label: np.ndarray, regions: dict[str, tuple[int, ...]]) -> np.ndarray:
  """[D, H, W] integer labels -> [D, H, W, R] boolean region masks (the references)."""
  return np.stack([np.isin(label, values) for values in regions.values()], axis=-1)


def region_label_values(regions: dict[str, tuple[int, ...]]) -> list[int]:
  """The label each region paints: its values not covered by the next (nested) region.

  BraTS: WT={1,2,3} -> 2, TC={1,3} -> 1, ET={3} -> 3; a single lesion region -> 1.
  """
  names = list(regions)
  out = []
  for i, name in enumerate(names):
    rest = set(regions[name]) - (set(regions[names[i + 1]]) if i + 1 < len(names) else set())
    out.append(min(rest))
  return out


def remove_small_components(mask: np.ndarray, min_voxels: int) -> np.ndarray:
  """Drops 26-connected components of ``mask`` [D, H, W] smaller than ``min_voxels``."""
  if min_voxels <= 0 or not mask.any():
    return mask
  comp, n = ndimage.label(mask, structure=_CONN26)
  sizes = ndimage.sum_labels(mask, comp, index=np.arange(1, n + 1))
  return np.isin(comp, np.flatnonzero(sizes >= min_voxels) + 1)


@dataclasses.dataclass(frozen=True)
class Rule:
  """One region's post-processing, in mm³ so that it carries across voxel spacings.

  min_component_mm3: drop 26-connected components smaller than this;
  largest_only: keep the largest component alone (one lesion expected: WT, breast);
  relabel_below_mm3: if the region's total volume is under this, empty it (for ET:
    its voxels stay in TC, so they become necrosis, BraTS 2023 winners' habit).
  """

  min_component_mm3: float = 0.0
  largest_only: bool = False
  relabel_below_mm3: float = 0.0

  @property
  def operations(self) -> int:
    """How many operations the rule applies: ties go to the rule with fewer."""
    return (self.min_component_mm3 > 0) + self.largest_only + (self.relabel_below_mm3 > 0)

  def describe(self) -> str:
    parts = []
    if self.min_component_mm3 > 0:
      parts.append(f"remove components < {self.min_component_mm3:g} mm³")
    if self.largest_only:
      parts.append("keep the largest component")
    if self.relabel_below_mm3 > 0:
      parts.append(f"empty if total < {self.relabel_below_mm3:g} mm³")
    return ", ".join(parts) or "none"

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> Rule:
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"unknown post-processing rule fields {sorted(unknown)}")
    return cls(**d)


NO_RULE = Rule()


def keep_largest_component(mask: np.ndarray) -> np.ndarray:
  if not mask.any():
    return mask
  comp, n = ndimage.label(mask, structure=_CONN26)
  if n == 1:
    return mask
  sizes = ndimage.sum_labels(mask, comp, index=np.arange(1, n + 1))
  return comp == int(np.argmax(sizes)) + 1


def apply_rule(mask: np.ndarray, rule: Rule, voxel_mm3: float) -> np.ndarray:
  """One region's [D, H, W] mask after ``rule`` (components, largest, relabel)."""
  if rule.min_component_mm3 > 0:
    mask = remove_small_components(mask, math.ceil(rule.min_component_mm3 / voxel_mm3 - 1e-9))
  if rule.largest_only:
    mask = keep_largest_component(mask)
  if rule.relabel_below_mm3 > 0 and mask.sum() * voxel_mm3 < rule.relabel_below_mm3:
    mask = np.zeros_like(mask)
  return mask


def nest(masks: np.ndarray) -> np.ndarray:
  """[..., R] masks, outer region first -> each region also holds every inner one."""
  out = masks.copy()
  for r in range(out.shape[-1] - 2, -1, -1):
    out[..., r] |= out[..., r + 1]
  return out


def apply_rules(
  masks: np.ndarray, rules: Sequence[Rule] | None, spacing: Sequence[float]
) -> np.ndarray:
  """[D, H, W, R] thresholded masks -> nested, post-processed masks (what is painted)."""
  out = nest(masks)
  voxel_mm3 = float(np.prod(spacing))
  for r, rule in enumerate(rules or [NO_RULE] * out.shape[-1]):
    region = apply_rule(out[..., r], rule, voxel_mm3) if rule != NO_RULE else out[..., r]
    out[..., r] = region & out[..., r - 1] if r > 0 else region
  return out


def threshold(
  probs: np.ndarray, thresholds: list[float] | None = None, min_component_voxels: int = 0
) -> np.ndarray:
  """[D, H, W, R] probabilities -> [D, H, W, R] masks, before nesting and rules."""
  thresholds = thresholds or [0.5] * probs.shape[-1]
  return np.stack(
    [
      remove_small_components(probs[..., r] > thresholds[r], min_component_voxels)
      for r in range(probs.shape[-1])
    ],
    axis=-1,
  )


def probabilities_to_masks(
  probs: np.ndarray,
  thresholds: list[float] | None = None,
  min_component_voxels: int = 0,
  rules: Sequence[Rule] | None = None,
  spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> np.ndarray:
  """[D, H, W, R] region probabilities -> [D, H, W, R] nested, post-processed masks."""
  return apply_rules(threshold(probs, thresholds, min_component_voxels), rules, spacing)


def masks_to_labels(masks: np.ndarray, regions: dict[str, tuple[int, ...]]) -> np.ndarray:
  """[D, H, W, R] nested region masks -> [D, H, W] uint8 labels, outer regions painted first."""
  labels = np.zeros(masks.shape[:3], np.uint8)
  for r, value in enumerate(region_label_values(regions)):
    labels[masks[..., r]] = value
  return labels


def probabilities_to_labels(
  probs: np.ndarray,
  regions: dict[str, tuple[int, ...]],
  thresholds: list[float] | None = None,
  min_component_voxels: int = 0,
  rules: Sequence[Rule] | None = None,
  spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> np.ndarray:
  """[D, H, W, R] region probabilities -> [D, H, W] uint8 labels."""
  masks = probabilities_to_masks(probs, thresholds, min_component_voxels, rules, spacing)
  return masks_to_labels(masks, regions)


def settings_from_config(eval_config) -> dict:
  """``eval.thresholds`` and ``eval.min_component_voxels`` as keyword arguments."""
  return {
    "thresholds": list(eval_config.thresholds or []) or None,
    "min_component_voxels": int(eval_config.min_component_voxels),
  }


def rules_from_record(record: dict, region_names: Sequence[str], where: str) -> list[Rule]:
  """The rules of a ``postprocessing.json`` record, one per region, in region order."""
  try:
    if record.get("format") != FORMAT:
      raise ValueError(f"format {record.get('format')!r}, expected {FORMAT}")
    rules = record["rules"]
    missing = [n for n in region_names if n not in rules]
    if missing or set(rules) - set(region_names):
      raise ValueError(f"its regions {sorted(rules)} are not the model's {list(region_names)}")
    return [Rule.from_dict(rules[n]) for n in region_names]
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    raise ConfigError(f"{where}: not a usable post-processing file: {e}") from None


def read_rules(path: str | Path, region_names: Sequence[str]) -> list[Rule]:
  files.require_file(path, "post-processing file")
  try:
    record = json.loads(Path(path).read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ConfigError(f"{path}: cannot read the post-processing file ({e})") from None
  return rules_from_record(record, region_names, str(path))
