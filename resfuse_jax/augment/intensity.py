"""The intensity half of augmentation, on [D, H, W, 2] (pre and post as channels).

Every transform acts on both scans jointly (one draw, one set of statistics), so the
enhancement post - pre keeps its sign; the package docstring says why.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def _gaussian_blur(x: jax.Array, sigmas: jax.Array, radius: int) -> jax.Array:
  """Separable Gaussian per axis (mirror-padded, as scipy's default), one kernel for both scans."""
  taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  for axis in range(3):
    weights = jnp.exp(-0.5 * (taps / sigmas[axis]) ** 2)
    weights = weights / weights.sum()
    pad = [(0, 0)] * x.ndim
    pad[axis] = (radius, radius)
    padded = jnp.pad(x, pad, mode="symmetric")
    n = x.shape[axis]
    x = sum(
      weights[t] * jax.lax.slice_in_dim(padded, t, t + n, axis=axis) for t in range(2 * radius + 1)
    )
  return x


def _low_resolution(x: jax.Array, zoom: jax.Array) -> jax.Array:
  """Nearest-neighbour downsampling by ``zoom`` then linear upsampling, axis by axis.

  Sizes stay static (the coarse grid is indexed, not materialised); zoom 1 is
  the identity. nnU-Net upsamples cubically; linear keeps the weights non-negative.
  """
  for axis in range(3):
    n = x.shape[axis]
    m = jnp.maximum(jnp.round(n * zoom), 1.0)
    down, up = m / n, n / m  # scalars: exactly 1 at zoom 1, so the identity is exact
    coarse = jnp.clip((jnp.arange(n, dtype=jnp.float32) + 0.5) * down - 0.5, 0.0, m - 1)
    j0 = jnp.floor(coarse)
    j1 = jnp.minimum(j0 + 1, m - 1)
    t = coarse - j0

    def source(j, n=n, up=up):
      return jnp.clip(jnp.floor((j + 0.5) * up), 0, n - 1).astype(jnp.int32)

    shape = [1] * x.ndim
    shape[axis] = n
    t = t.reshape(shape)
    x = (1 - t) * jnp.take(x, source(j0), axis=axis) + t * jnp.take(x, source(j1), axis=axis)
  return x


def _gamma(x: jax.Array, gamma: jax.Array, invert: bool) -> jax.Array:
  """x -> x^gamma on the joint [min, max] of both scans, keeping their joint mean and std."""
  if invert:
    x = -x
  mean, std = x.mean(), x.std()
  low, high = x.min(), x.max()
  span = jnp.maximum(high - low, 1e-7)
  y = ((x - low) / span) ** gamma * span + low
  y = (y - y.mean()) / jnp.maximum(y.std(), 1e-7) * std + mean
  return -y if invert else y


def transform(spec, p: dict, x: jax.Array) -> jax.Array:
  """nnU-Net's order: noise, blur, brightness, contrast, low resolution, gamma (inverted, plain)."""
  if spec.p_noise > 0:
    field = jax.random.normal(jax.random.wrap_key_data(p["noise_key"]), x.shape[:-1], x.dtype)
    x = jnp.where(p["noise"], x + p["noise_sigma"] * field[..., None], x)
  if spec.p_blur > 0:
    radius = max(1, math.ceil(3 * spec.blur_sigma[1]))
    x = jnp.where(p["blur"], _gaussian_blur(x, p["blur_sigma"], radius), x)
  if spec.p_brightness > 0:
    x = x * p["brightness"]
  if spec.p_contrast > 0:
    mean, low, high = x.mean(), x.min(), x.max()
    contrasted = jnp.clip((x - mean) * p["contrast_factor"] + mean, low, high)
    x = jnp.where(p["contrast"], contrasted, x)
  if spec.p_lowres > 0:
    x = jnp.where(p["lowres"], _low_resolution(x, p["lowres_zoom"]), x)
  if spec.p_gamma_inverted > 0:
    x = jnp.where(p["gamma_inverted"], _gamma(x, p["gamma_inverted_value"], True), x)
  if spec.p_gamma > 0:
    x = jnp.where(p["gamma"], _gamma(x, p["gamma_value"], False), x)
  return x
