"""The phantom's acquisition knobs: how pre and post differ the way real pairs do.

Motion of pre against post (rigid, plus a smooth deformation), thicker pre slices and a
per-case enhancement gain and timing, each drawn from its own random stream so that the
anatomy is the same with the knobs on or off (``phantom.make_case`` applies them).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

# The acquisition knobs: PhantomSpec fields and `data.<knob>` in resfuse_jax/configs/phantom.py.
KNOBS = {
  "misregistration_mm": "largest translation of pre against post (mm); per case U(0, max), "
  "random direction",
  "misregistration_deg": "largest rotation of pre about the volume centre (degrees); per case "
  "U(-max, max) about a random axis",
  "deformation_mm": "largest displacement of a smooth random deformation of pre (mm)",
  "pre_noise": "std of extra Gaussian noise in pre (white matter = 0.75, base noise 0.025)",
  "post_noise": "std of extra Gaussian noise in post (same units)",
  "pre_bias": "strength of pre's own log bias field (the shared one has 0.08)",
  "pre_slice_mm": "pre's slice thickness along the third axis (mm), resampled to post's grid; "
  "0 = post's spacing",
  "enhancement_amplitude": "per-case enhancement gain U(1 - a, 1 + a)",
  "enhancement_timing": "per-case timing t ~ U(-t, t): tumour enhancement x (1 + t), vessels, "
  "dura and parenchyma x (1 - t)",
}


def smooth_noise(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
  """Zero-mean, unit-std low-frequency noise field."""
  n = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
  return (n - n.mean()) / (n.std() + 1e-8)


def knob_rng(spec, index: int, stream: int) -> np.random.Generator:
  """The knobs' own random streams: the anatomy's stream is the same with knobs on or off."""
  return np.random.default_rng([spec.seed, index, stream])


def acquisition(spec, index: int) -> dict:
  """What the knobs drew for case ``index``: pre's motion and the enhancement's variation.

  The direction and the fraction of the maximum are drawn whatever the knobs'
  values, so a sweep over one knob moves every case along the same direction.
  """
  rng = knob_rng(spec, index, 1)
  direction = rng.standard_normal(3)
  direction /= np.linalg.norm(direction)
  translation = direction * rng.uniform(0.0, 1.0) * spec.misregistration_mm
  axis = rng.standard_normal(3)
  axis /= np.linalg.norm(axis)
  angle = rng.uniform(-1.0, 1.0) * spec.misregistration_deg
  gain = 1.0 + rng.uniform(-1.0, 1.0) * spec.enhancement_amplitude
  timing = rng.uniform(-1.0, 1.0) * spec.enhancement_timing
  return {
    "translation_mm": [float(t) for t in translation],
    "rotation_axis": [float(a) for a in axis],
    "rotation_deg": float(angle),
    "enhancement_gain": float(gain),
    "enhancement_timing": float(timing),
  }


def pre_sample_points(spec, index: int, drawn: dict) -> np.ndarray | None:
  """Where on the anatomy's grid each voxel of the pre scan looks, [3, *shape] voxels; None = aligned.

  The anatomy moved by R, t about the volume centre between the scans: pre at x
  shows the anatomy at R^T (x - c - t) + c, plus a smooth displacement.
  """
  if not (spec.misregistration_mm or spec.misregistration_deg or spec.deformation_mm):
    return None
  shape, spacing = spec.shape, spec.spacing
  grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"))
  centre = (np.array(shape, np.float64) - 1) / 2
  rotation = Rotation.from_rotvec(
    np.radians(drawn["rotation_deg"]) * np.asarray(drawn["rotation_axis"])
  ).as_matrix()
  shift = np.asarray(drawn["translation_mm"]) / spacing
  offset = (grid - centre[:, None, None, None] - shift[:, None, None, None]).reshape(3, -1)
  points = (rotation.T @ offset).reshape(grid.shape) + centre[:, None, None, None]
  if spec.deformation_mm:
    rng = knob_rng(spec, index, 2)
    field = np.stack([smooth_noise(rng, shape, 6.0) for _ in range(3)])
    field *= spec.deformation_mm / spacing / np.linalg.norm(field, axis=0).max()
    points += field
  return points


def coarse_slices(img: np.ndarray, spacing: float, slice_mm: float) -> np.ndarray:
  """Acquired with slices ``slice_mm`` thick along the third axis, then resampled to ``spacing``.

  Each slice integrates a Gaussian slab (FWHM = the thickness); slices are spaced
  by their thickness and linearly interpolated back onto the fine grid.
  """
  factor = slice_mm / spacing
  if factor <= 1.0:
    return img
  slab = ndimage.gaussian_filter1d(img, factor / 2.3548, axis=2, mode="nearest")
  n = img.shape[2]
  centres = np.arange((factor - 1) / 2, n - 0.5, factor)  # the thick slices' positions
  coarse = slab[..., np.clip(np.round(centres).astype(int), 0, n - 1)]
  z = np.clip(np.arange(n), centres[0], centres[-1])
  upper = np.clip(np.searchsorted(centres, z, side="right"), 1, len(centres) - 1)
  lower = upper - 1
  w = ((z - centres[lower]) / (centres[upper] - centres[lower]))[None, None, :]
  return ((1 - w) * coarse[..., lower] + w * coarse[..., upper]).astype(np.float32)


def varied_enhancement(v: dict, drawn: dict) -> np.ndarray:
  """Enhancement scaled by the case's gain, tumour vs vascular by its timing."""
  tumour = v["seg"] == 3
  scale = np.where(
    tumour, max(0.0, 1.0 + drawn["enhancement_timing"]), max(0.0, 1.0 - drawn["enhancement_timing"])
  )
  return (v["enhancement"] * scale * drawn["enhancement_gain"]).astype(np.float32)
