"""Figures like the paper's: scans, subtraction, label overlays and the fusion heat map.

The package's only matplotlib user: import it only when figures are asked for.

Colours follow the paper's Fig. 5: enhancing tumour red, necrotic core green,
edema blue, so WT = red+green+blue, TC = red+green, ET = red.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

from resfuse_jax import files  # noqa: E402

# label value -> RGB (BraTS: 1 NCR green, 2 ED blue, 3 ET red; a binary lesion is red)
BRATS_COLOURS = {1: (0.0, 1.0, 0.0), 2: (0.0, 0.3, 1.0), 3: (1.0, 0.0, 0.0)}
LESION_COLOURS = {1: (1.0, 0.0, 0.0)}


def largest_lesion_slice(labels: np.ndarray, axis: int = 2) -> int:
  """Index along ``axis`` of the slice through the largest connected lesion (its centre)."""
  mask = labels > 0
  if not mask.any():
    return labels.shape[axis] // 2
  comp, n = ndimage.label(mask, structure=np.ones((3, 3, 3)))
  sizes = ndimage.sum_labels(mask, comp, index=np.arange(1, n + 1))
  biggest = comp == (int(np.argmax(sizes)) + 1)
  area = biggest.sum(axis=tuple(a for a in range(3) if a != axis))
  return int(np.argmax(area))


def overlay(gray: np.ndarray, labels: np.ndarray, colours: dict, alpha: float = 0.5) -> np.ndarray:
  """[H, W] image and labels -> [H, W, 3] RGB with labels painted over the grey scan."""
  lo, hi = np.percentile(gray, [1, 99]) if gray.any() else (0.0, 1.0)
  g = np.clip((gray - lo) / max(hi - lo, 1e-6), 0, 1)
  rgb = np.repeat(g[..., None], 3, axis=-1)
  for value, colour in colours.items():
    m = labels == value
    rgb[m] = (1 - alpha) * rgb[m] + alpha * np.asarray(colour)
  return rgb


def case_figure(
  path: str | Path,
  case_id: str,
  pre: np.ndarray,
  post: np.ndarray,
  prediction: np.ndarray,
  reference: np.ndarray | None = None,
  heat: np.ndarray | None = None,
  brats_colours: bool = True,
) -> int:
  """Writes one PNG row for the axial slice through the largest lesion; returns the slice."""
  colours = BRATS_COLOURS if brats_colours else LESION_COLOURS
  z = largest_lesion_slice(reference if reference is not None else prediction)
  panels = [
    ("pre-contrast", pre[..., z], "gray"),
    ("post-contrast", post[..., z], "gray"),
    ("post − pre", post[..., z] - pre[..., z], "gray"),
  ]
  if reference is not None:
    panels.append(("reference", overlay(post[..., z], reference[..., z], colours), None))
  panels.append(("prediction", overlay(post[..., z], prediction[..., z], colours), None))
  if heat is not None:
    panels.append(("fusion |W(a)|", heat[..., z], "inferno"))
  fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.9))
  for ax, (title, img, cmap) in zip(axes, panels):
    ax.imshow(np.rot90(img), cmap=cmap)  # RAS+ (x, y) -> radiological-looking display
    ax.set_title(title, fontsize=9)
    ax.axis("off")
  fig.suptitle(f"{case_id}, axial slice {z}", fontsize=10)
  fig.tight_layout()
  try:
    with files.atomic_path(path) as tmp:
      fig.savefig(tmp, dpi=80)
  finally:
    plt.close(fig)
  return z
