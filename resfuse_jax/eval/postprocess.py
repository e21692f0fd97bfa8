"""Region masks <-> label maps: thresholds, small-component removal, BraTS nesting.

Regions are nested (BraTS: WT ⊇ TC ⊇ ET), so a label map is painted outer
region first: WT∖TC -> 2 (ED), TC∖ET -> 1 (NCR), ET -> 3; a single lesion
region paints 1.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

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


def probabilities_to_masks(
  probs: np.ndarray, thresholds: list[float] | None = None, min_component_voxels: int = 0
) -> np.ndarray:
  """[D, H, W, R] region probabilities -> [D, H, W, R] boolean masks."""
  thresholds = thresholds or [0.5] * probs.shape[-1]
  return np.stack(
    [
      remove_small_components(probs[..., r] > thresholds[r], min_component_voxels)
      for r in range(probs.shape[-1])
    ],
    axis=-1,
  )


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
) -> np.ndarray:
  """[D, H, W, R] region probabilities -> [D, H, W] uint8 labels."""
  return masks_to_labels(probabilities_to_masks(probs, thresholds, min_component_voxels), regions)


def settings_from_config(eval_config) -> dict:
  """``eval.thresholds`` and ``eval.min_component_voxels`` as keyword arguments."""
  return {
    "thresholds": list(eval_config.get("thresholds", None) or []) or None,
    "min_component_voxels": int(eval_config.get("min_component_voxels", 0)),
  }
