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
# label value -> the legend's words (logs, metrics.csv and reports use the region names)
BRATS_LABEL_NAMES = {1: "necrotic core (NCR)", 2: "edema (ED)", 3: "enhancing tumour (ET)"}
LESION_LABEL_NAMES = {1: "lesion"}


def add_colour_legend(fig, colours: dict, names: dict) -> None:
  """One legend under the panels saying which colour paints which label."""
  from matplotlib.patches import Patch

  handles = [Patch(facecolor=colours[v], label=names[v]) for v in sorted(colours)]
  fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False)


def save_figure(fig, path: Path, dpi: int, bottom: float = 0.0) -> Path:
  """Written whole or not at all (a half-written PNG never replaces a good one); closes ``fig``.

  ``bottom``: the figure's fraction kept free under the panels (for a legend there)."""
  fig.tight_layout(rect=(0, bottom, 1, 1))
  try:
    with files.atomic_path(path) as tmp:
      fig.savefig(tmp, dpi=dpi)
  finally:
    plt.close(fig)
  return path


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
  names = BRATS_LABEL_NAMES if brats_colours else LESION_LABEL_NAMES
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
  fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 3.2))
  for ax, (title, img, cmap) in zip(axes, panels):
    ax.imshow(np.rot90(img), cmap=cmap)  # RAS+ (x, y) -> radiological-looking display
    ax.set_title(title, fontsize=9)
    ax.axis("off")
  fig.suptitle(f"{case_id}, axial slice {z}", fontsize=10)
  add_colour_legend(fig, colours, names)
  save_figure(fig, path, dpi=80, bottom=0.1)
  return z


def sweep_figure(path: str | Path, sweep: dict) -> Path:
  """DSC per region against the swept knob: one line per model, its seeds' range as a band.

  A last panel shows ResFuse's learned W_l norms per level when a swept model has them.
  """
  regions = sweep["regions"]
  cols = regions + ["mean"] if len(regions) > 1 else regions
  values = sweep["values"]
  numeric = all(isinstance(v, int | float) for v in values)
  x = np.asarray(values, float) if numeric else np.arange(len(values))
  learned = {
    n: m["fusion_weight_norms"] for n, m in sweep["models"].items() if "fusion_weight_norms" in m
  }
  panels = len(cols) + bool(learned)
  fig, axes = plt.subplots(1, panels, figsize=(3.6 * panels, 3.4), squeeze=False)
  for ax, region in zip(axes[0], cols):
    for name, m in sweep["models"].items():
      stats = m["dice"][region]
      mean = 100 * np.array([s["mean"] for s in stats])
      seeds = 100 * np.array([s["seed_means"] for s in stats])  # [values, seeds]
      (line,) = ax.plot(x, mean, marker="o", label=name)
      if seeds.shape[1] > 1:
        ax.fill_between(x, seeds.min(axis=1), seeds.max(axis=1), color=line.get_color(), alpha=0.2)
    ax.set_title(f"DSC {region}" if region != "mean" else "DSC mean")
    ax.set_xlabel(sweep["knob"])
    ax.set_ylabel("DSC (%)")
    ax.grid(alpha=0.3)
  if not numeric:
    for ax in axes[0]:
      ax.set_xticks(x, [str(v) for v in values])
  if learned:
    ax = axes[0][-1]
    for name, norms in learned.items():
      for level, stats in norms.items():
        mean = np.array([s["mean"] for s in stats])
        std = np.array([s["seed_std"] for s in stats])
        (line,) = ax.plot(x, mean, marker=".", label=f"{name} {level}")
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.set_title("||W_l|| (Frobenius)")
    ax.set_xlabel(sweep["knob"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
  axes[0][0].legend(fontsize=7)
  fig.suptitle(
    f"{sweep['dataset']}: {sweep['cases']} validation cases, seeds "
    f"{', '.join(map(str, sweep['seeds']))} (band: range over seeds)",
    fontsize=9,
  )
  return save_figure(fig, Path(path), dpi=100)
