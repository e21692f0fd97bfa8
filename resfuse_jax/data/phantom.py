"""A procedural brain-tumour phantom written in the BraTS 2023 layout.

Each case is a brain-like head with a glioma (ring-enhancing, solid-enhancing
or non-enhancing) and the distractors that make post-contrast-only
segmentation fail the way the paper describes:

- T1-bright, non-enhancing foci (subacute blood, fat): bright in the
  pre-contrast AND the post-contrast scan, shaped like small solid or
  ring-like lesions, so on the post scan alone they look like enhancing
  tumour; only the pre scan shows they did not enhance;
- normally enhancing structures (vessels, dura): they do enhance, so the
  subtraction alone is not enough either; shape and context are needed.

Labels follow BraTS 2023: 1 NCR (necrotic / non-enhancing core), 2 ED (edema),
3 ET (enhancing tumour). Everything is deterministic in (seed, case index).

By default pre and post are voxel-aligned and share the bias field and noise
level. The acquisition knobs (``KNOBS``, all 0 = off) make the pre scan differ
the way real pre/post pairs do: patient motion between the acquisitions (rigid,
plus a smooth deformation), its own noise and bias field, thicker slices, and a
per-case enhancement amplitude and timing. Labels stay on the post grid (post
is the main branch). With every knob at 0 the phantom is version 1's, byte for
byte, and keeps its cache folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from resfuse_jax.data.phantom_acquisition import (
  KNOBS,
  acquisition,
  coarse_slices,
  knob_rng,
  pre_sample_points,
  smooth_noise,
  varied_enhancement,
)
from resfuse_jax.errors import DataError, OutputError

MARKER = "phantom.json"
ACQUISITION = "acquisition.json"  # per case: what the knobs drew
# T1 (pre-contrast) intensities of the tissues, arbitrary units.
T1 = {"wm": 0.75, "gm": 0.55, "csf": 0.15, "edema": 0.48, "core": 0.30, "et_pre": 0.52}


@dataclasses.dataclass(frozen=True)
class PhantomSpec:
  num_cases: int = 40
  shape: tuple[int, int, int] = (48, 48, 48)
  spacing: float = 1.5  # mm
  seed: int = 0
  misregistration_mm: float = 0.0
  misregistration_deg: float = 0.0
  deformation_mm: float = 0.0
  pre_noise: float = 0.0
  post_noise: float = 0.0
  pre_bias: float = 0.0
  pre_slice_mm: float = 0.0
  enhancement_amplitude: float = 0.0
  enhancement_timing: float = 0.0

  def __post_init__(self):
    for name in KNOBS:
      if getattr(self, name) < 0:
        raise DataError(f"data.{name} must be >= 0, got {getattr(self, name)}")
    for name in ("enhancement_amplitude", "enhancement_timing"):
      if getattr(self, name) > 1:
        raise DataError(
          f"data.{name} must be at most 1 (a relative spread), got {getattr(self, name)}"
        )

  def knobs(self) -> dict[str, float]:
    """The acquisition knobs that are on."""
    return {k: float(getattr(self, k)) for k in KNOBS if getattr(self, k)}

  def key(self) -> dict:
    key = {
      "num_cases": self.num_cases,
      "shape": list(self.shape),
      "spacing": self.spacing,
      "seed": self.seed,
      "version": 1,
    }
    if self.knobs():  # absent when off, so version 1's phantoms are still recognised
      key["acquisition"] = self.knobs()
    return key


def case_id(index: int) -> str:
  return f"BraTS-GLI-{index:05d}-000"


def _blob(coords, center, radius, rng, roughness=0.15):
  """Irregular ellipsoid: a radial distance with low-frequency wobble, <1 inside."""
  axes = radius * rng.uniform(0.8, 1.2, size=3)
  d = np.sqrt(sum(((c - m) / a) ** 2 for c, m, a in zip(coords, center, axes)))
  wobble = smooth_noise(rng, d.shape, sigma=3.0)
  return d * (1.0 + roughness * wobble)


def _tube(coords, start, end, radius):
  """Distance-to-segment mask of a straight vessel."""
  p = np.stack(coords, axis=-1).astype(np.float32)
  a, b = np.asarray(start, np.float32), np.asarray(end, np.float32)
  ab = b - a
  t = np.clip(((p - a) @ ab) / (ab @ ab), 0.0, 1.0)
  closest = a + t[..., None] * ab
  return np.linalg.norm(p - closest, axis=-1) < radius


def _point_inside(rng, brain_dist, lo, hi, coords):
  """A voxel position whose normalised brain radius lies in [lo, hi]."""
  candidates = np.argwhere((brain_dist > lo) & (brain_dist < hi))
  return candidates[rng.integers(len(candidates))].astype(np.float32)


def _head(rng, shape, coords) -> dict[str, np.ndarray]:
  """Brain ellipsoid with a grey-matter shell and ventricles: tissue maps per sequence."""
  center = np.array(shape, np.float32) / 2 + rng.uniform(-1.5, 1.5, 3)
  brain_axes = np.array(shape, np.float32) * rng.uniform(0.40, 0.45, 3)
  brain_dist = np.sqrt(sum(((c - m) / a) ** 2 for c, m, a in zip(coords, center, brain_axes)))
  brain_dist = brain_dist * (1.0 + 0.03 * smooth_noise(rng, shape, 4.0))
  brain = brain_dist < 1.0
  gm = brain & (brain_dist > 0.78 + 0.05 * smooth_noise(rng, shape, 2.0))
  ventricles = np.zeros(shape, bool)
  for side in (-1, 1):
    vc = center + np.array([0.0, 0.0, side * shape[2] * 0.07])
    ventricles |= _blob(coords, vc, np.array([0.16, 0.07, 0.04]) * np.array(shape), rng, 0.1) < 1
  csf = ventricles & brain

  def tissue(background, grey, fluid):
    img = np.where(brain, background, 0.0).astype(np.float32)
    img[gm], img[csf] = grey, fluid
    return img

  return {
    "brain_dist": brain_dist,
    "brain": brain,
    "t1": tissue(T1["wm"], T1["gm"], T1["csf"]),
    "enhancement": np.where(brain, 0.04, 0.0).astype(np.float32),  # normal parenchyma
    "t2": tissue(0.35, 0.5, 0.95),
    "flair": tissue(0.45, 0.55, 0.1),
    "seg": np.zeros(shape, np.uint8),
  }


def _tumour(rng, v: dict, coords) -> tuple[np.ndarray, float, float]:
  """Edema (WT) around a core (TC) with a ring, solid or no enhancement, painted into ``v``.

  Returns the tumour's centre, WT radius and enhancement strength.
  """
  t1, t2, flair, seg = v["t1"], v["t2"], v["flair"], v["seg"]
  pattern = rng.choice(["ring", "solid", "nonenhancing"], p=[0.45, 0.35, 0.20])
  t_center = _point_inside(rng, v["brain_dist"], 0.25, 0.55, coords)
  r_wt = rng.uniform(5.5, 8.5)
  wt = (_blob(coords, t_center, r_wt, rng) < 1) & v["brain"]
  core_scale = rng.uniform(0.5, 0.7)
  core_dist = _blob(coords, t_center, r_wt * core_scale, rng, 0.1)
  core = (core_dist < 1) & wt
  seg[wt], t1[wt], t2[wt], flair[wt] = 2, T1["edema"], 0.85, 0.9
  et_strength = rng.uniform(0.65, 0.9)
  if pattern == "ring":
    rim = 1.0 - rng.uniform(1.5, 2.5) / (r_wt * core_scale)
    et = core & (core_dist >= rim)
    ncr = core & ~et
  elif pattern == "solid":
    et, ncr = core, np.zeros(seg.shape, bool)
  else:
    et, ncr = np.zeros(seg.shape, bool), core
  seg[ncr], t1[ncr], t2[ncr], flair[ncr] = 1, T1["core"], 0.75, 0.5
  seg[et], t1[et] = 3, T1["et_pre"]
  v["enhancement"][et] = et_strength * rng.uniform(0.85, 1.15, size=int(et.sum()))
  return t_center, r_wt, et_strength


def _distractors(rng, v: dict, coords, t_center, r_wt: float, et_strength: float) -> None:
  """T1-bright non-enhancing foci, and normally enhancing vessels and dura, into ``v``.

  The foci are bright in the pre scan at about the level of enhancing tumour in
  the post scan, some ring-like, away from the tumour.
  """
  t1, enhancement, seg, brain, brain_dist = (
    v[k] for k in ("t1", "enhancement", "seg", "brain", "brain_dist")
  )
  for _ in range(rng.integers(4, 8)):
    for _attempt in range(20):
      f_center = _point_inside(rng, brain_dist, 0.15, 0.75, coords)
      if np.linalg.norm(f_center - t_center) > r_wt + 4:
        break
    r = rng.uniform(2.0, 4.5)
    fd = _blob(coords, f_center, r, rng, 0.1)
    focus = (fd < 1) & brain & (seg == 0)
    if rng.random() < 0.4:  # ring-like: bright rim, dark centre
      t1[focus & (fd < 0.5)] = T1["core"]
      focus &= fd >= 0.5
    t1[focus] = T1["et_pre"] + et_strength * rng.uniform(0.8, 1.25)
    enhancement[focus] = 0.0
  for _ in range(rng.integers(2, 4)):
    a = _point_inside(rng, brain_dist, 0.3, 0.9, coords)
    b = _point_inside(rng, brain_dist, 0.3, 0.9, coords)
    vessel = _tube(coords, a, b, rng.uniform(0.7, 1.1)) & brain & (seg == 0)
    t1[vessel] = 0.35
    enhancement[vessel] = rng.uniform(0.7, 0.95)
  dura = (brain_dist > 0.93) & brain & (smooth_noise(rng, seg.shape, 3.0) > 0.3)
  enhancement[dura & (seg == 0)] = rng.uniform(0.4, 0.6)


def make_case(spec: PhantomSpec, index: int) -> dict[str, np.ndarray]:
  """Returns {'t1n','t1c','t2w','t2f': float32, 'seg': uint8} volumes of ``spec.shape``."""
  rng = np.random.default_rng([spec.seed, index])
  shape = spec.shape
  coords = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
  v = _head(rng, shape, coords)
  t_center, r_wt, et_strength = _tumour(rng, v, coords)
  _distractors(rng, v, coords, t_center, r_wt, et_strength)

  # Acquisition: bias field shared by both T1 scans, own gain and noise per scan.
  bias = np.exp(0.08 * smooth_noise(rng, shape, 8.0)).astype(np.float32)
  post_gain = rng.uniform(0.85, 1.15)
  head = v["brain"].astype(np.float32)

  def acquire(img, gain, mask=head, field=bias, extra_noise=0.0, noise_stream=0):
    noisy = gain * img * field + rng.normal(0.0, 0.025, shape).astype(np.float32)
    if extra_noise:  # from the knob's own stream: the base noise is drawn as before
      extra = knob_rng(spec, index, noise_stream).normal(0.0, extra_noise, shape)
      noisy = noisy + extra.astype(np.float32)
    return (np.clip(noisy, 0.0, None) * mask * 1000.0).astype(np.float32)

  drawn = acquisition(spec, index)
  pre_t1, pre_head, pre_bias = v["t1"], head, bias
  points = pre_sample_points(spec, index, drawn)
  if points is not None:  # the anatomy moved; the scanner's bias field did not
    pre_t1 = ndimage.map_coordinates(v["t1"], points, order=1, mode="constant").astype(np.float32)
    # Linear resampling of the whole scene, its support included: partial volume at the border.
    pre_head = ndimage.map_coordinates(head, points, order=1, mode="constant").astype(np.float32)
  if spec.pre_bias:
    own = smooth_noise(knob_rng(spec, index, 4), shape, 8.0)
    pre_bias = (bias * np.exp(spec.pre_bias * own)).astype(np.float32)
  enhancement = v["enhancement"]
  if spec.enhancement_amplitude or spec.enhancement_timing:
    enhancement = varied_enhancement(v, drawn)
  t1n = acquire(pre_t1, 1.0, pre_head, pre_bias, spec.pre_noise, noise_stream=3)
  t1c = acquire(v["t1"] + enhancement, post_gain, extra_noise=spec.post_noise, noise_stream=5)
  if spec.pre_slice_mm:
    t1n = coarse_slices(t1n, spec.spacing, spec.pre_slice_mm)
  return {
    "t1n": t1n,
    "t1c": t1c,
    "t2w": acquire(v["t2"], 1.0),
    "t2f": acquire(v["flair"], 1.0),
    "seg": v["seg"],
  }


def _save_nifti_atomic(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
  tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
  nib.save(nib.Nifti1Image(array, affine), str(tmp))
  os.replace(tmp, path)


def write_phantom(root: str | os.PathLike, spec: PhantomSpec) -> Path:
  """Writes (or reuses) the phantom under ``root`` in the BraTS 2023 GLI layout.

  A marker file with the spec is written last, so an interrupted generation is
  redone rather than half-used; a root holding a different phantom is an error.
  """
  root = Path(root)
  marker = root / MARKER
  if marker.exists():
    found = json.loads(marker.read_text())
    if found == spec.key():
      return root
    raise DataError(
      f"{root} already holds a phantom with a different spec ({found}); "
      f"wanted {spec.key()}. Point data.root somewhere else or delete it."
    )
  try:
    _generate(root, spec, marker)
  except OSError as e:
    raise OutputError(
      f"cannot write the phantom into {root}: {e.strerror or e} (a read-only or full cache "
      "folder? set RESFUSE_CACHE, --cache_dir or data.root to a writable folder)"
    ) from None
  return root


def _generate(root: Path, spec: PhantomSpec, marker: Path) -> None:
  root.mkdir(parents=True, exist_ok=True)
  affine = np.diag([spec.spacing] * 3 + [1.0])
  affine[:3, 3] = -np.array(spec.shape) * spec.spacing / 2
  for index in range(spec.num_cases):
    cid = case_id(index)
    case_dir = root / cid
    case_dir.mkdir(exist_ok=True)
    for suffix, volume in make_case(spec, index).items():
      _save_nifti_atomic(volume, affine, case_dir / f"{cid}-{suffix}.nii.gz")
  if spec.knobs():  # what each case drew, for studies that relate scores to the motion
    drawn = {case_id(i): acquisition(spec, i) for i in range(spec.num_cases)}
    tmp = root / f".tmp-{ACQUISITION}"
    tmp.write_text(json.dumps(drawn, indent=1))
    os.replace(tmp, root / ACQUISITION)
  tmp = marker.with_suffix(".tmp")
  tmp.write_text(json.dumps(spec.key()))
  os.replace(tmp, marker)
