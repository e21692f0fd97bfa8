"""nnU-Net's default augmentation as pure JAX, run inside the jitted train step.

The host pipeline only cuts a patch with the margin rotation needs
(`Spec.crop_shape`); everything random happens here, on the device. Each row of
the global batch gets its own key, folded from the run's seed, the step and
the row's index (`sample_keys`), so a batch is the same on any number of
devices and after a resume. A row draws its parameters (`draw`) and is
transformed (`apply`): one affine resampling of pre, post and label together
(trilinear for the scans, nearest neighbour for the label), then the intensity
transforms, then mirroring.

Intensity transforms act on pre and post *jointly* (one draw and one set of
statistics for both scans), so the enhancement post − pre keeps its sign:
noise adds the same field to both (the difference is unchanged); brightness,
contrast and gamma are one non-decreasing map of both scans (sign(post − pre)
is kept voxel by voxel); blur and low-resolution simulation are one linear
smoothing with non-negative weights (a non-negative enhancement stays
non-negative). nnU-Net draws these per channel; BUILD_NOTES.md §8 says why not.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from resfuse_jax.augment import intensity
from resfuse_jax.augment.spatial import (
  affine_matrix,
  centre_crop,
  nearest,
  plane_rotation,
  sample_grid,
  trilinear,
)
from resfuse_jax.errors import ConfigError

Batch = dict[str, jax.Array]

# Folded into the run's seed so augmentation draws never coincide with initialisation's.
_AUGMENT_STREAM = 0x617567


@dataclasses.dataclass(frozen=True)
class Spec:
  """Probabilities (per sample unless noted) and ranges; all ``p_*`` = 0 is no augmentation."""

  p_rotation: float = 0.0  # one draw; then each axis's angle is uniform in ±rotation_degrees
  rotation_degrees: float = 30.0
  p_scale: float = 0.0
  scale_range: tuple[float, float] = (0.7, 1.4)  # zoom of the content: > 1 magnifies
  p_noise: float = 0.0
  noise_variance: tuple[float, float] = (0.0, 0.1)
  p_blur: float = 0.0
  blur_sigma: tuple[float, float] = (0.5, 1.0)  # voxels, drawn per axis
  p_brightness: float = 0.0
  brightness_range: tuple[float, float] = (0.75, 1.25)
  p_contrast: float = 0.0
  contrast_range: tuple[float, float] = (0.75, 1.25)
  p_lowres: float = 0.0
  lowres_zoom: tuple[float, float] = (0.5, 1.0)
  p_gamma_inverted: float = 0.0
  p_gamma: float = 0.0
  gamma_range: tuple[float, float] = (0.7, 1.5)
  p_mirror: float = 0.0  # per axis of mirror_axes
  mirror_axes: tuple[int, ...] = (0, 1, 2)
  # The smallest zoom the host crop holds whole (nnU-Net's get_patch_size uses 0.85 for a
  # (0.7, 1.4) range): a stronger zoom-out shows zeros beyond the crop, as nnU-Net's does.
  crop_zoom: float = 0.85

  @property
  def spatial(self) -> bool:
    """Whether the affine resampling (and so the host margin) is needed at all."""
    return self.p_rotation > 0 or self.p_scale > 0

  @property
  def identity(self) -> bool:
    return all(getattr(self, f.name) == 0 for f in dataclasses.fields(self) if f.name[:2] == "p_")

  def crop_shape(self, patch: tuple[int, ...]) -> tuple[int, ...]:
    """The host crop: the patch's bounding box under each axis's largest rotation, / crop_zoom.

    Rounded up so that crop − patch is even: the patch sits exactly in the middle.
    """
    patch_arr = np.asarray(patch, np.float64)
    if not self.spatial:
      return tuple(int(p) for p in patch)
    extent = patch_arr.copy()
    if self.p_rotation > 0:
      a = math.radians(self.rotation_degrees)
      for plane in ((1, 2), (0, 2), (0, 1)):
        extent = np.maximum(extent, np.abs(plane_rotation(a, plane)) @ patch_arr)
    if self.p_scale > 0:
      extent = extent / min(self.crop_zoom, 1.0)
    crop = np.ceil(extent - 1e-6).astype(int)
    return tuple(int(c + (c - p) % 2) for c, p in zip(crop, patch))


PRESETS = {
  "none": Spec(),
  # The phantom's measured set (BUILD_NOTES.md §2): mirroring only.
  "light": Spec(p_mirror=0.5),
  # nnU-Net v2's default training transforms, in its order and with its probabilities.
  "nnunet": Spec(
    p_rotation=0.2,
    p_scale=0.2,
    p_noise=0.1,
    p_blur=0.2,
    p_brightness=0.15,
    p_contrast=0.15,
    p_lowres=0.25,
    p_gamma_inverted=0.1,
    p_gamma=0.3,
    p_mirror=0.5,
  ),
}
FIELDS = tuple(f.name for f in dataclasses.fields(Spec))


def spec_from_config(cfg: Any) -> Spec:
  """``data.augment`` (every field, None = unset): a preset, then each set field overrides it."""
  preset = cfg.preset
  if preset not in PRESETS:
    raise ConfigError(f"data.augment.preset must be one of {', '.join(PRESETS)}; got {preset!r}")
  unknown = sorted(set(cfg.keys()) - set(FIELDS) - {"preset"})
  if unknown:
    raise ConfigError(f"data.augment has unknown fields {unknown}; known: {', '.join(FIELDS)}")
  values = {}
  for name in FIELDS:
    value = cfg[name]
    if value is not None:
      values[name] = tuple(value) if isinstance(value, list | tuple) else value
  spec = dataclasses.replace(PRESETS[preset], **values)
  _check(spec)
  return spec


def _check(spec: Spec) -> None:
  for f in dataclasses.fields(spec):
    value = getattr(spec, f.name)
    if f.name.startswith("p_") and not 0.0 <= value <= 1.0:
      raise ConfigError(f"data.augment.{f.name} must be a probability in [0, 1]; got {value}")
    if f.name.endswith(("_range", "_variance", "_sigma", "_zoom")) and f.name != "crop_zoom":
      if len(value) != 2 or not 0 <= value[0] <= value[1]:
        raise ConfigError(
          f"data.augment.{f.name} must be (low, high), 0 <= low <= high; got {value}"
        )
  if not set(spec.mirror_axes) <= {0, 1, 2}:
    raise ConfigError(f"data.augment.mirror_axes must be axes of 0..2; got {spec.mirror_axes}")
  if spec.scale_range[0] <= 0 or spec.lowres_zoom[0] <= 0 or spec.crop_zoom <= 0:
    raise ConfigError("data.augment.scale_range, lowres_zoom and crop_zoom must be positive")


# --- parameters ------------------------------------------------------------------------------


def _split_range(key, low: float, high: float):
  """nnU-Net's BGContrast draw: half the time below 1 (if the range reaches there), else above."""
  k_side, k_value = jax.random.split(key)
  below = jax.random.uniform(k_value, (), minval=low, maxval=min(high, 1.0))
  above = jax.random.uniform(k_value, (), minval=max(low, 1.0), maxval=high)
  if low >= 1.0:
    return above
  if high <= 1.0:
    return below
  return jnp.where(jax.random.uniform(k_side) < 0.5, below, above)


def identity_params() -> dict[str, jax.Array]:
  """Parameters under which `apply` returns the centre of the crop unchanged."""
  f = jnp.float32
  return {
    "angles": jnp.zeros(3, f),
    "zoom": jnp.ones((), f),
    "noise": jnp.zeros((), bool),
    "noise_sigma": jnp.zeros((), f),
    "noise_key": jax.random.key_data(jax.random.key(0)),
    "blur": jnp.zeros((), bool),
    "blur_sigma": jnp.ones(3, f),
    "brightness": jnp.ones((), f),
    "contrast": jnp.zeros((), bool),
    "contrast_factor": jnp.ones((), f),
    "lowres": jnp.zeros((), bool),
    "lowres_zoom": jnp.ones((), f),
    "gamma_inverted": jnp.zeros((), bool),
    "gamma_inverted_value": jnp.ones((), f),
    "gamma": jnp.zeros((), bool),
    "gamma_value": jnp.ones((), f),
    "mirror": jnp.zeros(3, bool),
  }


def draw(spec: Spec, key: jax.Array) -> dict[str, jax.Array]:
  """One sample's transform parameters (the `identity_params` structure)."""
  k = dict(zip(FIELDS, jax.random.split(key, len(FIELDS))))

  def coin(name):
    return jax.random.uniform(jax.random.fold_in(k[name], 1)) < getattr(spec, name)

  def uniform(name, shape=()):
    lo, hi = getattr(spec, name)
    return jax.random.uniform(k[name], shape, minval=lo, maxval=hi)

  max_angle = math.radians(spec.rotation_degrees)
  angles = jax.random.uniform(k["rotation_degrees"], (3,), minval=-max_angle, maxval=max_angle)
  p = identity_params()
  p["angles"] = jnp.where(coin("p_rotation"), angles, p["angles"])
  p["zoom"] = jnp.where(coin("p_scale"), uniform("scale_range"), 1.0)
  p["noise"] = coin("p_noise")
  p["noise_sigma"] = jnp.sqrt(uniform("noise_variance"))
  p["noise_key"] = jax.random.key_data(k["p_noise"])
  p["blur"] = coin("p_blur")
  p["blur_sigma"] = uniform("blur_sigma", (3,))
  p["brightness"] = jnp.where(
    coin("p_brightness"), _split_range(k["brightness_range"], *spec.brightness_range), 1.0
  )
  p["contrast"] = coin("p_contrast")
  p["contrast_factor"] = _split_range(k["contrast_range"], *spec.contrast_range)
  p["lowres"] = coin("p_lowres")
  p["lowres_zoom"] = uniform("lowres_zoom")
  p["gamma_inverted"] = coin("p_gamma_inverted")
  p["gamma_inverted_value"] = _split_range(k["p_gamma_inverted"], *spec.gamma_range)
  p["gamma"] = coin("p_gamma")
  p["gamma_value"] = _split_range(k["gamma_range"], *spec.gamma_range)
  allowed = jnp.array([a in spec.mirror_axes for a in range(3)])
  p["mirror"] = allowed & (jax.random.uniform(k["p_mirror"], (3,)) < spec.p_mirror)
  return p


# --- one sample, a batch ----------------------------------------------------------------------


def apply(spec: Spec, p: dict, sample: Batch, patch: tuple[int, ...]) -> Batch:
  """One sample {'pre','post': [*crop, 1], 'label': [*crop]} -> the same at ``patch``."""
  scans = jnp.concatenate([sample["pre"], sample["post"]], axis=-1).astype(jnp.float32)
  label = sample["label"]
  crop = tuple(label.shape)
  if spec.spatial:
    grid = sample_grid(affine_matrix(p["angles"], p["zoom"]), crop, patch)
    scans, label = trilinear(scans, grid), nearest(label, grid)
  elif crop != tuple(patch):
    scans, label = centre_crop(scans, patch), centre_crop(label, patch)
  scans = intensity.transform(spec, p, scans)
  if spec.p_mirror > 0:
    for axis in range(3):
      scans = jnp.where(p["mirror"][axis], jnp.flip(scans, axis), scans)
      label = jnp.where(p["mirror"][axis], jnp.flip(label, axis), label)
  return {"pre": scans[..., :1], "post": scans[..., 1:], "label": label}


def sample_keys(seed: int, step: jax.Array, batch_size: int) -> jax.Array:
  """One key per row of the global batch: (seed, step, row) alone decide a row's draw."""
  step_key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _AUGMENT_STREAM), step)
  return jax.vmap(jax.random.fold_in, (None, 0))(step_key, jnp.arange(batch_size))


def augment_batch(spec: Spec, batch: Batch, keys: jax.Array, patch: tuple[int, ...]) -> Batch:
  """[B, *crop(, 1)] host crops -> [B, *patch(, 1)] augmented patches, row i drawn from keys[i]."""
  if spec.identity and tuple(batch["label"].shape[1:]) == tuple(patch):
    return batch
  params = jax.vmap(lambda key: draw(spec, key))(keys)
  out = jax.vmap(lambda p, s: apply(spec, p, s, patch))(params, batch)
  return {**batch, **out}
